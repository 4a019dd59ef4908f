"""funzero.optim against trajectories produced by optax itself (``tests/optax_ref/refs.npz``,
written by ``tests/optax_ref/make_refs.py`` with JAX on the CPU).

Each row replays the stored fp32 gradients through funzero's counterpart of an optax optimizer,
transform or schedule, on a flat dict and on a nested pytree (dicts, a tuple, lists, a
NamedTuple and a ``None`` leaf), and compares the parameters after every step.

Tolerance: ``|got - want| <= atol + rtol * |want|`` elementwise, at every step. The default,
rtol 1e-6 / atol 1e-7, is a few fp32 roundings of the parameters (~1, whose ulp is 1.2e-7); the
rows with a looser bound say why next to it.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from funzero import optim
from tests.optax_ref._trees import SCHEDULE_COUNTS, SHAPES, build, get, matrices, unflatten

REFS = np.load(os.path.join(os.path.dirname(__file__), "optax_ref", "refs.npz"))
DEFAULT = (1e-6, 1e-7)
# optax computes the bias corrections 1 - b**t in fp32, where 1 - fp32(0.999) is 1.3e-5 above
# 1e-3 (and up to ~1.5e-5 off for every t here); funzero computes them in fp64 as torch.optim
# does. A second-moment correction 1e-5 off moves the step by ~6e-6 of itself: steps of lr 1e-2
# drift apart by ~6e-8 a step, ~6e-7 over the ten (measured: at most 9.5e-7). The same for
# ema's debiasing (1 - fp32(0.9) is 2.4e-7 of itself off, on values of up to ~3).
BIAS_FP32 = (1e-6, 2e-6)
# The same cancellation in RAdam's rectification: rho_t = 1999 - 2 t b2^t / (1 - b2^t) is ~0.04
# too small in optax's fp32 (5.95 for 5.99 at t = 6), so its factor r (0.026 .. 0.049 for
# t = 6 .. 10) is 0.3-1.5% off; five rectified steps of lr * r ~ 3e-4 differ by up to ~1e-5
# (measured: 1.1e-5). The unrectified steps before t = 6 agree (both rho_t < 5 there).
RADAM_FP32 = (0.0, 3e-5)

def _flat(tree, kind: str) -> np.ndarray:
    return np.concatenate([get(tree, p).detach().reshape(-1).numpy() for p in SHAPES[kind]])


def _tree(kind: str, vec: np.ndarray):
    return unflatten(kind, vec, lambda piece, shape: torch.tensor(piece.reshape(shape)))


def _run(tx, kind: str, fused: bool = False) -> np.ndarray:
    params = _tree(kind, REFS[f"{kind}/params0"])
    state = tx.init(params)
    out = []
    for g in REFS[f"{kind}/grads"]:
        grads = _tree(kind, g)
        if fused:  # the engine's path: master updated in place by funzero.ops.adamw_
            state = tx.traits.fused.apply(grads, state, params)
        else:
            updates, state = tx.update(grads, state, params)
            params = optim.apply_updates(params, updates)
        out.append(_flat(params, kind))
    return np.stack(out)


def _cases(kind: str) -> dict:
    """row -> (optax case it must reproduce, funzero transform, tolerance, path)."""
    mats = matrices(kind)
    mask_tree = build(kind, lambda p: p in mats)
    labels = build(kind, lambda p: "adam" if p in mats else "sgd")
    regex = "^(" + "|".join(re.escape(p) for p in mats) + ")$"

    def mask_fn(params):
        return optim.tree_map(lambda x: x.ndim > 1, params)

    def label_fn(params):
        return optim.tree_map(lambda x: "adam" if x.ndim > 1 else "sgd", params)

    warm = optim.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 10, 1e-3)
    rows = {
        "sgd": ("sgd", optim.sgd(0.1)),
        "sgd_momentum": ("sgd_momentum", optim.sgd(0.05, momentum=0.9)),
        "sgd_nesterov": ("sgd_nesterov", optim.sgd(0.05, momentum=0.9, nesterov=True)),
        "adam": ("adam", optim.adam(1e-2, fused=False), BIAS_FP32),
        "adam_eps_root": ("adam_eps_root", optim.adam(1e-2, eps_root=1e-3), BIAS_FP32),
        "adam_b2_0.9": ("adam_b2_0.9", optim.adam(1e-2, b2=0.9, fused=False)),
        "nadam": ("nadam", optim.nadam(1e-2), BIAS_FP32),
        "adamw": ("adamw", optim.adamw(1e-2, weight_decay=0.1, fused=False), BIAS_FP32),
        "adamw_default_decay (funzero 1e-2)": ("adamw_decay_1e-2", optim.adamw(1e-2, fused=False), BIAS_FP32),
        "adamw_mask_tree": ("adamw_mask_tree", optim.adamw(1e-2, weight_decay=0.1, mask=mask_tree, fused=False), BIAS_FP32),
        "adamw_mask_callable": ("adamw_mask_callable", optim.adamw(1e-2, weight_decay=0.1, mask=mask_fn, fused=False), BIAS_FP32),
        "adamw_mask_regex": ("adamw_mask_tree", optim.adamw(1e-2, weight_decay=0.1, mask=regex, fused=False), BIAS_FP32),
        "adamw_mask_by_path": (
            "adamw_mask_tree", optim.adamw(1e-2, weight_decay=0.1, mask=optim.by_path(lambda p: p in mats), fused=False), BIAS_FP32,
        ),
        "adamw_schedule": ("adamw_schedule", optim.adamw(warm, weight_decay=0.1, fused=False), BIAS_FP32),
        "adamw_warmup_cosine": (
            "adamw_schedule", optim.adamw(optim.warmup_cosine(1e-2, 3, 10, end_value=1e-3), weight_decay=0.1, fused=False), BIAS_FP32,
        ),
        "nadamw": ("nadamw", optim.nadamw(1e-2, weight_decay=0.1), BIAS_FP32),
        "lion": ("lion", optim.lion(1e-2, weight_decay=0.1, mask=mask_tree)),
        "lamb": ("lamb", optim.lamb(1e-2, weight_decay=0.01), BIAS_FP32),
        "lamb_mask_callable": ("lamb_mask_callable", optim.lamb(1e-2, weight_decay=0.1, mask=mask_fn), BIAS_FP32),
        "adagrad": ("adagrad", optim.adagrad(0.1)),
        "rmsprop": ("rmsprop", optim.rmsprop(1e-2)),
        "rmsprop_centered_momentum": ("rmsprop_centered_momentum", optim.rmsprop(1e-2, centered=True, momentum=0.9)),
        "rmsprop_debiased_nesterov": (
            "rmsprop_debiased_nesterov",
            optim.rmsprop(1e-2, eps_in_sqrt=False, bias_correction=True, momentum=0.9, nesterov=True),
        ),
        "adafactor_factored": ("adafactor_factored", optim.adafactor(1e-2, min_dim_size_to_factor=3)),
        "adafactor_default": ("adafactor_default", optim.adafactor(1e-2)),
        "adafactor_unfactored_momentum_decay": (
            "adafactor_unfactored_momentum_decay",
            optim.adafactor(1e-2, factored=False, momentum=0.9, weight_decay_rate=1e-2, weight_decay_mask=mask_tree,
                            clipping_threshold=0.5),
        ),
        "radam": ("radam", optim.radam(1e-2), RADAM_FP32),
        "radam_b2_0.9_nesterov": ("radam_b2_0.9_nesterov", optim.radam(1e-2, b2=0.9, nesterov=True)),
        "adamax": ("adamax", optim.adamax(1e-2)),
        "amsgrad": ("amsgrad", optim.amsgrad(1e-2), BIAS_FP32),
        "clip": ("clip", optim.chain(optim.clip(0.5), optim.sgd(0.1))),
        "clip_by_block_rms": ("clip_by_block_rms", optim.chain(optim.clip_by_block_rms(0.5), optim.sgd(0.1))),
        "clip_by_global_norm": ("clip_by_global_norm", optim.chain(optim.clip_by_global_norm(1.0), optim.adam(1e-2)), BIAS_FP32),
        "ema": ("ema", optim.chain(optim.ema(0.9), optim.sgd(0.1)), BIAS_FP32),
        "apply_every": ("apply_every", optim.chain(optim.apply_every(3), optim.sgd(0.1))),
        "MultiSteps": ("multi_steps", optim.MultiSteps(optim.sgd(0.1, momentum=0.9), every_k_schedule=3).gradient_transformation()),
        "multi_steps(every_k=)": ("multi_steps", optim.multi_steps(optim.sgd(0.1, momentum=0.9), every_k=3)),
        "MultiSteps_schedule": (
            "multi_steps_schedule",
            optim.MultiSteps(optim.adam(1e-2), every_k_schedule=lambda step: 2 if int(step) < 2 else 3).gradient_transformation(),
            BIAS_FP32,
        ),
        "masked_tree": ("masked_tree", optim.chain(optim.masked(optim.scale_by_adam(), mask_tree), optim.scale(-1e-2)), BIAS_FP32),
        "masked_callable_global_norm": (
            "masked_callable_global_norm", optim.chain(optim.masked(optim.clip_by_global_norm(1.0), mask_fn), optim.sgd(0.1)),
        ),
        "multi_transform": ("multi_transform", optim.multi_transform({"adam": optim.adam(1e-2), "sgd": optim.sgd(0.1)}, labels), BIAS_FP32),
        "partition_callable": ("partition_callable", optim.partition({"adam": optim.adam(1e-2), "sgd": optim.sgd(0.1)}, label_fn), BIAS_FP32),
        "partition_rules": (
            "multi_transform", optim.partition({"adam": optim.adam(1e-2), "sgd": optim.sgd(0.1)}, [(regex, "adam"), ("", "sgd")]), BIAS_FP32,
        ),
        "add_decayed_weights_schedule": (
            "add_decayed_weights_schedule", optim.chain(optim.add_decayed_weights(optim.exponential_decay(0.1, 2, 0.5)), optim.sgd(0.1)),
        ),
        "inject_hyperparams": ("inject_hyperparams", optim.inject_hyperparams(optim.adamw)(learning_rate=1e-2, weight_decay=0.1), BIAS_FP32),
    }
    if kind == "flat":  # the engine's fused pass takes {name: tensor}
        rows["adamw_fused"] = ("adamw", optim.adamw(1e-2, weight_decay=0.1), BIAS_FP32, "fused")
        rows["adamw_fused_mask_tree"] = ("adamw_mask_tree", optim.adamw(1e-2, weight_decay=0.1, mask=mask_tree), BIAS_FP32, "fused")
    return {name: (row + (DEFAULT,) if len(row) == 2 else row) for name, row in rows.items()}


ROWS = [(kind, name) for kind in SHAPES for name in _cases(kind)]


def diff(kind: str, name: str) -> tuple[float, float, tuple[float, float]]:
    """``(max abs diff, max rel diff, (rtol, atol))`` of a row against optax, over every step."""
    ref, tx, tol, *path = _cases(kind)[name]
    got = _run(tx, kind, fused=path == ["fused"])
    want = REFS[f"{ref}/{kind}"]
    err = np.abs(got.astype(np.float64) - want)
    return float(err.max()), float((err / np.maximum(np.abs(want), 1e-30)).max()), tol


@pytest.mark.parametrize("kind,name", ROWS, ids=[f"{k}-{n}" for k, n in ROWS])
def test_trajectory_matches_optax(kind, name):
    ref, tx, (rtol, atol), *path = _cases(kind)[name]
    got = _run(tx, kind, fused=path == ["fused"])
    want = REFS[f"{ref}/{kind}"]
    for step, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{name} on {kind}, step {step + 1}")


def _schedules() -> dict:
    return {
        "constant_schedule": ("constant_schedule", optim.constant_schedule(0.3)),
        "linear_schedule": ("linear_schedule", optim.linear_schedule(1.0, 0.1, 8, transition_begin=3)),
        "polynomial_schedule": ("polynomial_schedule", optim.polynomial_schedule(1.0, 0.1, 2.0, 8, 2)),
        "cosine_decay_schedule": ("cosine_decay_schedule", optim.cosine_decay_schedule(1.0, 12, alpha=0.1, exponent=2.0)),
        "exponential_decay": ("exponential_decay", optim.exponential_decay(1.0, 4, 0.5, transition_begin=2)),
        "exponential_decay_staircase_end": (
            "exponential_decay_staircase_end", optim.exponential_decay(1.0, 3, 0.5, 1, staircase=True, end_value=0.2),
        ),
        "exponential_growth_end": ("exponential_growth_end", optim.exponential_decay(0.1, 3, 2.0, end_value=1.0)),
        "piecewise_constant_schedule": (
            "piecewise_constant_schedule", optim.piecewise_constant_schedule(1.0, {3: 0.5, 8: 0.1, 15: 2.0}),
        ),
        "join_schedules": (
            "join_schedules", optim.join_schedules([optim.constant_schedule(1.0), optim.linear_schedule(1.0, 0.0, 5)], [4]),
        ),
        "warmup_cosine_decay_schedule": (
            "warmup_cosine_decay_schedule", optim.warmup_cosine_decay_schedule(0.0, 1.0, 4, 20, 0.1, exponent=1.5),
        ),
        "warmup_cosine (funzero's order)": (
            "warmup_cosine_decay_schedule", optim.warmup_cosine(1.0, 4, 20, end_value=0.1, exponent=1.5),
        ),
        "warmup_cosine_decay_schedule_no_warmup": (
            "warmup_cosine_decay_schedule_no_warmup", optim.warmup_cosine_decay_schedule(0.1, 1.0, 0, 20),
        ),
        "warmup_exponential_decay_schedule": (
            "warmup_exponential_decay_schedule",
            optim.warmup_exponential_decay_schedule(0.0, 1.0, 4, 3, 0.5, transition_begin=1, end_value=0.05),
        ),
    }


def schedule_diff(name: str) -> tuple[float, float]:
    ref, s = _schedules()[name]
    got = np.array([float(s(torch.tensor(c, dtype=torch.int32))) for c in range(SCHEDULE_COUNTS)])
    want = REFS[f"sched/{ref}"].astype(np.float64)
    err = np.abs(got - want)
    return float(err.max()), float((err / np.maximum(np.abs(want), 1e-30)).max())


@pytest.mark.parametrize("name", list(_schedules()))
def test_schedule_matches_optax(name):
    ref, s = _schedules()[name]
    got = np.array([float(s(torch.tensor(c, dtype=torch.int32))) for c in range(SCHEDULE_COUNTS)], np.float32)
    # fp32 values of the same formulas; cos and pow may differ by an ulp between libms.
    np.testing.assert_allclose(got, REFS[f"sched/{ref}"], rtol=1e-6, atol=1e-7, err_msg=name)


# --- optax's semantics where funzero used to differ silently ------------------------------------
def _pv():
    p = {"w": torch.full((2, 3), 2.0), "b": torch.full((3,), 2.0)}
    return p, {k: torch.zeros_like(v) for k, v in p.items()}


def test_mask_forms_select_the_same_leaves():
    p, u = _pv()
    for mask in ({"w": True, "b": False}, lambda params: optim.tree_map(lambda x: x.ndim > 1, params), r"^w$", ["^w$"],
                 optim.by_path(lambda path: path == "w")):
        out, _ = optim.add_decayed_weights(0.5, mask).update(u, optim.EmptyState(), p)
        assert out["w"].eq(1.0).all() and out["b"].eq(0.0).all(), mask
    # a prefix covers the subtree below it
    tree = {"enc": {"w": torch.ones(2), "b": torch.ones(2)}, "dec": [torch.ones(2)]}
    out, _ = optim.add_decayed_weights(1.0, {"enc": True, "dec": False}).update(optim.tree_map(torch.zeros_like, tree), None, tree)
    assert out["enc"]["w"].eq(1).all() and out["enc"]["b"].eq(1).all() and out["dec"][0].eq(0).all()


def test_a_bad_mask_is_an_error_naming_it():
    p, u = _pv()
    with pytest.raises(ValueError, match=r"got mask=\{'w': 'yes'\}"):
        optim.adamw(1e-3, mask={"w": "yes"})  # at build time
    with pytest.raises(ValueError, match=r"mask=.*\[True, 'w'\]"):
        optim.masked(optim.scale(1.0), [True, "w"])
    # funzero's old path predicate: a callable now receives the params tree
    tx = optim.masked(optim.scale(10.0), lambda path: path == "b")
    with pytest.raises(ValueError, match="returned False, not a pytree over the params.*by_path"):
        tx.update(u, tx.init(p), p)
    tx = optim.add_decayed_weights(0.1, lambda path: path.endswith("w"))
    with pytest.raises(ValueError, match="failed when called with the params tree.*by_path"):
        tx.update(u, None, p)
    with pytest.raises(ValueError, match="neither by structure .* nor by leaf path"):
        optim.add_decayed_weights(0.1, {"x": True}).update(u, None, p)
    with pytest.raises(ValueError, match=r"label 'c' has no transform"):
        optim.partition({"a": optim.sgd(1.0)}, {"w": "a", "b": "c"})
    with pytest.raises(ValueError, match="returned 'a', not a pytree over the params"):
        optim.partition({"a": optim.sgd(1.0)}, lambda path: "a").update(u, {"a": ()}, p)


def test_masks_under_the_engine_are_matched_by_leaf_path():
    """Under ShardInfo a mask tree is over the model's leaves, matched by dotted path (nested dicts
    or full paths, prefixes covering subtrees), on any shard of the flat buffer."""
    from shardspec import FlatLayout

    shapes = {"blk.attn.w": (3, 4), "blk.attn.b": (4,), "blk.ln.w": (4,)}
    lay = FlatLayout.from_shapes("g", shapes, num_shards=2, shard_align=8)
    full_p = lay.pack({k: torch.ones(s) for k, s in shapes.items()})
    for rank in (0, 1):
        info = optim.ShardInfo({"g": lay}, rank=rank, sharded=True)
        p = {"g": lay.shard(full_p, rank)}
        u = {"g": torch.zeros_like(p["g"])}
        want = torch.zeros(lay.padded)
        want[lay.slots[0].offset : lay.slots[0].offset + 12] = 0.5  # only blk.attn.w decays
        for mask in ({"blk": {"attn": {"w": True, "b": False}, "ln": False}},
                     {"blk.attn.w": True, "blk.attn.b": False, "blk.ln": False},
                     lambda params: {k: v.ndim > 1 for k, v in params.items()}):
            out, _ = optim.add_decayed_weights(0.5, mask).update(u, None, p, info=info)
            assert torch.equal(out["g"], lay.shard(want, rank)), (rank, mask)
            tx = optim.adamw(1e-2, weight_decay=0.5, mask=mask)
            assert tx.traits.fused is not None
        info = optim.ShardInfo({"g": lay}, rank=rank, sharded=True)
        with pytest.raises(ValueError, match="covers leaf 'blk.ln.w'"):
            optim.add_decayed_weights(0.5, {"blk.attn": True}).update(u, None, p, info=info)
        with pytest.raises(ValueError, match="entry 'blk.mlp' of .* covers no leaf"):
            optim.add_decayed_weights(0.5, {"blk": True, "blk.mlp": False}).update(u, None, p, info=info)
    seen = {}
    optim.masked(optim.scale(2.0), lambda params: seen.update(params) or {k: True for k in params}).update(u, None, p, info=info)
    assert {k: (v.device.type, tuple(v.shape)) for k, v in seen.items()} == {k: ("meta", s) for k, s in shapes.items()}


def test_adafactor_under_the_engine_names_a_leaf_it_cannot_factor():
    from shardspec import FlatLayout

    lay = FlatLayout.from_shapes("g", {"blk.w": (8, 12), "blk.b": (12,)}, num_shards=2, shard_align=8)
    info = optim.ShardInfo({"g": lay}, rank=1, sharded=True)
    p = {"g": lay.shard(lay.pack({"blk.w": torch.ones(8, 12), "blk.b": torch.ones(12)}), 1)}
    g = {"g": torch.ones_like(p["g"])}
    tx = optim.adafactor(1e-2, min_dim_size_to_factor=8)
    with pytest.raises(ValueError, match=r"leaf 'blk.w' of shape \(8, 12\) would get factored.*factored=False"):
        tx.update(g, tx.init(p), p, info=info)
    for tx in (optim.adafactor(1e-2, min_dim_size_to_factor=8, factored=False), optim.adafactor(1e-2)):
        out, _ = tx.update(g, tx.init(p), p, info=info)  # per-element second moments
        assert torch.isfinite(out["g"]).all()


def test_warmup_cosine_in_optax_order_is_an_error_not_a_zero_schedule():
    with pytest.raises(TypeError):
        optim.warmup_cosine(0.0, 1e-3, 100, 1000)  # optax's (init, peak, warmup, decay)
    with pytest.raises(ValueError, match="int warmup_steps, got warmup_steps=0.001"):
        optim.warmup_cosine(0.0, 1e-3, 100)
    s = optim.warmup_cosine_decay_schedule(0.0, 1e-3, 100, 1000)
    assert float(s(100)) == pytest.approx(1e-3)
    assert float(optim.warmup_cosine(1e-3, 100, 1000)(100)) == pytest.approx(1e-3)


def test_multi_steps_takes_optax_arguments_and_reports_has_updated():
    ms = optim.MultiSteps(optim.sgd(1.0), every_k_schedule=lambda step: 1 if int(step) == 0 else 2)
    tx = ms.gradient_transformation()
    p = {"a": torch.zeros(1)}
    st = tx.init(p)
    updated = []
    for _ in range(5):
        _, st = tx.update({"a": torch.ones(1)}, st, p)
        updated.append(bool(ms.has_updated(st)))
    assert updated == [True, False, True, False, True]  # k = 1 for the first step, then 2
    ms = optim.MultiSteps(optim.sgd(1.0), 2)  # an int k: one counter, no gradient_step
    st = ms.init(p)
    assert not bool(ms.has_updated(st)) and st.gradient_step is None
    for want in (False, True, False):
        _, st = ms.update({"a": torch.ones(1)}, st, p)
        assert bool(ms.has_updated(st)) == want
    assert ms.inner_opt is ms.inner
    with pytest.raises(ValueError, match="every_k_schedule=0"):
        optim.MultiSteps(optim.sgd(1.0), 0)
    with pytest.raises(ValueError, match="not both"):
        optim.multi_steps(optim.sgd(1.0), 2, every_k_schedule=2)
    with pytest.raises(ValueError, match="should_skip_update_fn is not supported"):
        optim.MultiSteps(optim.sgd(1.0), 2, True, lambda *a: None)
    st = optim.MultiSteps(optim.sgd(1.0), 2, accumulator_dtype=torch.float64).init({"a": torch.zeros(1)})
    assert st.acc["a"].dtype == torch.float64


@pytest.mark.parametrize("make,match", [
    (lambda: optim.adafactor(min_dim_size_to_factor=0), "min_dim_size_to_factor=0"),
    (lambda: optim.clip_by_block_rms(0.0), "threshold=0.0"),
    (lambda: optim.clip(-1.0), "max_delta=-1.0"),
    (lambda: optim.apply_every(0), "k=0"),
    (lambda: optim.rmsprop(1e-2, nesterov=True), "momentum=None"),
    (lambda: optim.scale_by_adam(mu_dtype="bf16"), "mu_dtype='bf16'"),
    (lambda: optim.sgd(0.1, 0.9, accumulator_dtype="float32"), "accumulator_dtype='float32'"),
    (lambda: optim.ema(1.5), "decay=1.5"),
    (lambda: optim.radam(1e-2, b2=1.0), "b2=1.0"),
    (lambda: optim.adagrad(1e-2, initial_accumulator_value=-1.0), "initial_accumulator_value=-1.0"),
    (lambda: optim.exponential_decay(1.0, 0, 0.5), "transition_steps=0"),
    (lambda: optim.exponential_decay(1.0, 2, 0.0), "decay_rate=0.0"),
    (lambda: optim.polynomial_schedule(1.0, 0.0, 2, 5, -1), "transition_begin=-1"),
    (lambda: optim.piecewise_constant_schedule(1.0, {3: -0.5}), "scale -0.5 at boundary 3"),
    (lambda: optim.warmup_cosine_decay_schedule(0.0, 1.0, 10, 5), "warmup_steps=10, decay_steps=5"),
    (lambda: optim.masked(optim.scale(1.0), None), "mask=None"),
    (lambda: optim.by_path(3), "fn=3"),
])
def test_arguments_are_validated_when_built_naming_the_value(make, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        make()


def test_state_dtypes_follow_the_dtype_arguments_and_stay_put():
    p = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    g = optim.tree_map(torch.ones_like, p)
    cases = [
        (optim.adamw(1e-2, mu_dtype=torch.bfloat16), lambda s: (s[0].mu["w"].dtype, s[0].nu["w"].dtype), (torch.bfloat16, torch.float32)),
        (optim.sgd(0.1, 0.9, accumulator_dtype=torch.bfloat16), lambda s: (s[0].trace["w"].dtype,), (torch.bfloat16,)),
        (optim.lion(1e-3, mu_dtype=torch.bfloat16), lambda s: (s[0].trace["w"].dtype,), (torch.bfloat16,)),
        (optim.adafactor(1e-2, momentum=0.9, dtype_momentum=torch.bfloat16, min_dim_size_to_factor=2),
         lambda s: (s[0].v_row["w"].shape, s[0].v_col["w"].shape, s[4].ema["w"].dtype), (torch.Size([2]), torch.Size([3]), torch.bfloat16)),
    ]
    for tx, read, want in cases:
        st = tx.init(p)
        assert read(st) == want
        for _ in range(2):
            _, st = tx.update(g, st, p)
            assert read(st) == want


def test_arbitrary_pytrees_and_none_leaves():
    from typing import NamedTuple

    class Pair(NamedTuple):
        a: torch.Tensor
        b: torch.Tensor | None

    params = {"x": [torch.ones(2), (torch.ones(3, 2), None)], "y": Pair(torch.ones(1), None)}
    grads = optim.tree_map(torch.ones_like, params)
    for tx in (optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2)), optim.lamb(1e-2), optim.adafactor(1e-2),
               optim.masked(optim.sgd(0.1), optim.by_path(lambda path: path.startswith("x."))),
               optim.partition({"a": optim.sgd(0.1), "b": optim.adagrad(0.1)}, {"x": "a", "y": "b"})):
        st = tx.init(params)
        u, st = tx.update(grads, st, params)
        new = optim.apply_updates(params, u)
        assert new["x"][1][1] is None and new["y"].b is None and isinstance(new["y"], Pair)
    assert optim.apply_updates({"a": torch.ones(1)}, {"a": None})["a"].eq(1).all()
    assert optim.scale_by_learning_rate(None).update(grads, None)[0] is grads
