"""optax-style optimizers and masks through the engine: stages 0-3 on 2 real gloo ranks, against
the same transform run standalone on the model's ``{leaf path: tensor}`` (one process, the
whole batch, fp64).

Under the engine the trees are flat group shards: the mask trees below are over the model's
leaf paths (nested dicts), adafactor's per-leaf RMS (clipping, parameter scale) and LAMB-style
per-leaf sums are added over the shards a leaf straddles.
"""

from __future__ import annotations

import re

import torch

import funzero as fz
from funzero import optim
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt

DTYPE = torch.float64
STEPS = 3


def _nested(flat: dict) -> dict:
    """``{"a.b.c": v}`` as ``{"a": {"b": {"c": v}}}``."""
    out: dict = {}
    for path, v in flat.items():
        *head, last = path.split(".")
        node = out
        for k in head:
            node = node.setdefault(k, {})
        node[last] = v
    return out


def _leaf_shapes() -> dict:
    return {k: tuple(v.shape) for k, v in tiny_gpt().named_parameters()}


def _mask_tree() -> dict:
    """Decay the attention and MLP matrices (optax's pytree-of-bools form, nested like the modules)."""
    return _nested({k: len(s) > 1 and (".attn." in k or ".mlp." in k) for k, s in _leaf_shapes().items()})


def _labels() -> dict:
    return _nested({k: "adam" if len(s) > 1 else "sgd" for k, s in _leaf_shapes().items()})


def _ndim_mask(params):
    return optim.tree_map(lambda x: x.ndim > 1, params)


CONFIGS = {
    "adagrad": lambda: optim.adagrad(0.05),
    "rmsprop_centered_momentum": lambda: optim.rmsprop(1e-3, centered=True, momentum=0.9),
    # min_dim_size_to_factor (128) is above every dim of the tiny GPT: per-element moments. eps
    # above the default 1e-30: the first step is g / |g|, and the key biases' gradients are
    # rounding noise (attention is invariant to them), whose sign differs between reductions.
    "adafactor": lambda: optim.adafactor(1e-2, momentum=0.9, weight_decay_rate=1e-3, weight_decay_mask=_ndim_mask, eps=1e-10),
    "adamw_mask_tree": lambda: optim.adamw(1e-2, weight_decay=0.1, mask=_mask_tree()),
    "lion_mask_callable": lambda: optim.lion(1e-3, weight_decay=0.1, mask=_ndim_mask),
    "multi_transform_labels_tree": lambda: optim.multi_transform({"adam": optim.adam(1e-2), "sgd": optim.sgd(0.05)}, _labels()),
}


def _standalone(make) -> dict:
    model = tiny_gpt(dtype=DTYPE)
    params = dict(model.named_parameters())
    tx = make()
    state = tx.init({k: p.detach() for k, p in params.items()})
    for x, y in batches(STEPS):
        model.zero_grad()
        model(x, y).backward()
        grads = {k: p.grad.detach().clone() for k, p in params.items()}
        updates, state = tx.update(grads, state, {k: p.detach() for k, p in params.items()})
        with torch.no_grad():
            for k, p in params.items():
                p.add_(updates[k])
    return {k: p.detach().clone() for k, p in params.items()}


def _train(make, stage, precision, backend=None):
    """``STEPS`` steps of the tiny GPT (fp64 unless ``precision``; ``torch.compile(backend=)``d
    if given); the gathered parameters."""
    model = tiny_gpt(dtype=DTYPE if precision is None else torch.float32)
    plan = fz.zero(stage, groups=GROUPS)
    tx = make()
    state = fz.init(model, tx, plan, precision=precision or fz.Precision(DTYPE))
    step = fz.train_step(model, lm_loss, tx, plan)
    if backend is not None:
        step = torch.compile(step, backend=backend)
    for b in batches(STEPS):
        state, _ = step(state, b)
    return fz.gather_params(state, plan)


def _engine(rank, world):
    out = {(name, stage): _train(make, stage, None) for name, make in CONFIGS.items() for stage in (0, 1, 2, 3)}
    # fp32: adamw's fused pass (funzero.ops.adamw_) with a pytree-of-bools mask decays exactly
    # the leaves its regex twin does
    for stage in (1, 3):
        for form, mask in (("tree", _mask_tree), ("regex", lambda: r"(attn|mlp)\.c_\w+\.weight$")):
            out[("fused", form, stage)] = _train(lambda: optim.adamw(1e-2, weight_decay=0.1, mask=mask()), stage, fz.fp32())
    try:
        _train(lambda: optim.adafactor(1e-2, min_dim_size_to_factor=8), 2, None)
        out["factored"] = None
    except ValueError as e:
        out["factored"] = str(e)
    return out


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_optax_style_optimizers_and_masks_match_standalone_at_every_stage():
    got = run_world(_engine, 2)[0]
    for name, make in CONFIGS.items():
        want = _standalone(make)
        for stage in (0, 1, 2, 3):
            res = got[(name, stage)]
            assert set(res) == set(want)
            for k in want:
                assert _rel(res[k], want[k]) < 1e-10, (name, stage, k, _rel(res[k], want[k]))  # fp64 rounding
    for stage in (1, 3):
        tree, regex = got[("fused", "tree", stage)], got[("fused", "regex", stage)]
        assert all(torch.equal(tree[k], regex[k]) for k in regex), stage
    # a leaf adafactor would factor is an error naming it, raised on the first step
    assert re.search(r"leaf '(blocks\.\d\.[\w.]+|wte)\.weight' of shape \(\d+, \d+\) would get factored", got["factored"]), got["factored"]
    assert "factored=False" in got["factored"], got["factored"]
