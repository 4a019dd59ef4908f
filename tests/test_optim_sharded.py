"""The optimizer library under every ZeRO stage and world size (real gloo groups)."""

from __future__ import annotations

import torch

import funzero as fz
from funzero import optim
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt, torch_reference

DECAY = r"(attn|mlp)\.c_\w+\.weight$"  # matrices decay; biases, norms, embeddings do not
DTYPE = torch.float64


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _clip_accum_masked(rank, world, stages):
    data = batches(6)
    out = {}
    for stage in stages:
        model = tiny_gpt(dtype=DTYPE)
        plan = fz.zero(stage, groups=GROUPS)
        tx = optim.multi_steps(
            optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2, weight_decay=0.1, mask=DECAY)), 2
        )
        state = fz.init(model, tx, plan, precision=fz.Precision(DTYPE))
        step = fz.train_step(model, lm_loss, tx, plan)
        with fz.count_comm() as comm:
            for b in data:
                state, _ = step(state, b)
        out[stage] = (fz.gather_params(state, plan), comm.num_calls(tag="norm"))
    return out


def test_clipping_accumulation_masked_decay_every_stage_and_world():
    ref = torch_reference(tiny_gpt(dtype=DTYPE), batches(6), clip=0.5, accumulate=2, decay=DECAY)
    for world in (1, 2, 4):
        res = run_world(_clip_accum_masked, world, (0, 1, 2, 3))[0]
        for stage, (got, norm_calls) in res.items():
            for k in ref:
                assert _rel(got[k], ref[k]) < 1e-10, (world, stage, k, _rel(got[k], ref[k]))
            # the sharded squared norm is summed across ranks: one all-reduce per optimizer step
            sharded = stage >= 1 and world > 1
            assert norm_calls == (3 if sharded else 0), (world, stage, norm_calls)


def _lion_lamb(rank, world, stage):
    out = {}
    for name, make in (("lion", lambda: optim.lion(1e-3, weight_decay=0.1, mask=DECAY)), ("lamb", lambda: optim.lamb(1e-3, weight_decay=0.01))):
        model = tiny_gpt(dtype=DTYPE)
        plan = fz.zero(stage, groups=GROUPS)
        tx = make()
        state = fz.init(model, tx, plan, precision=fz.Precision(DTYPE))
        step = fz.train_step(model, lm_loss, tx, plan)
        for b in batches(3):
            state, _ = step(state, b)
        out[name] = fz.gather_params(state, plan)
    return out


def test_lion_and_lamb_per_leaf_math_survives_sharding():
    """LAMB's per-leaf trust ratio needs leaf norms across shards; Lion's mask needs leaf slices."""
    want = run_world(_lion_lamb, 1, 0)[0]
    got = run_world(_lion_lamb, 4, 3)[0]
    for name in want:
        for k in want[name]:
            assert _rel(got[name][k], want[name][k]) < 1e-10, (name, k)


def _fp16_skip(rank, world, stage):
    """One clean step, then a poisoned batch: the step is skipped and nothing but the scaler moves."""
    model = tiny_gpt(dtype=torch.float32)
    plan = fz.zero(stage, groups=GROUPS)
    tx = optim.adamw(1e-2, weight_decay=0.1)

    def loss(apply, batch):
        x, y, poison = batch
        return apply(x, y) * poison[0]

    precision = fz.fp16(initial_scale_power=8, hysteresis=2)
    state = fz.init(model, tx, plan, precision=precision)
    step = fz.train_step(model, loss, tx, plan)
    x, y = batches(1)[0]
    one = torch.ones(8)
    state, m0 = step(state, (x, y, one))
    snap = [t.clone() for t in _tensors(state)]
    poison = torch.ones(8)
    poison[:] = float("inf")
    state, m1 = step(state, (x, y, poison))
    same = all(torch.equal(a, b) for a, b in zip(snap, _tensors(state)))
    scale_after_1 = float(state.scaler.scale)
    state, m2 = step(state, (x, y, poison))
    return dict(
        skipped=[bool(m0["skipped"]), bool(m1["skipped"]), bool(m2["skipped"])],
        same=same,
        scales=[256.0, scale_after_1, float(state.scaler.scale)],
        step=int(state.step),
    )


def _tensors(state):
    return [t for part in (state.params, state.master, state.opt_state) for t in _leaves(part)]


def _leaves(tree):
    import optree

    return [t for t in optree.tree_leaves(tree, namespace="funzero") if isinstance(t, torch.Tensor)]


def test_fp16_overflow_skips_the_step_bit_identically_and_halves_after_hysteresis():
    for stage in (1, 3):
        r = run_world(_fp16_skip, 2, stage)[0]
        assert r["skipped"] == [False, True, True], r
        assert r["same"], r
        assert r["scales"] == [256.0, 256.0, 128.0], r  # hysteresis 2: the second overflow halves
        assert r["step"] == 1, r
