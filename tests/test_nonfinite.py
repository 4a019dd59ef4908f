"""Non-finite steps under every precision: a NaN in the loss or a gradient skips the update on
every rank, bit-identically; ``nonfinite="raise"`` and the ``max_skips`` bound stop the run with
an error naming the step; ``"ignore"`` applies the update as it comes."""

from __future__ import annotations

import optree
import pytest
import torch

import funzero as fz
from funzero import optim
from tests._dist import run_world
from tests._models import GROUPS, batches, tiny_gpt

NAN = float("nan")


def _leaves(state):
    parts = (state.params, state.master, state.opt_state)
    return [t for t in optree.tree_leaves(parts, namespace="funzero") if isinstance(t, torch.Tensor)]


def _snap(state):
    return [t.clone() for t in _leaves(state)]


def _same(snap, state) -> bool:
    return all(torch.equal(a, b) for a, b in zip(snap, _leaves(state), strict=True))


class _PoisonGrad(torch.autograd.Function):
    """Identity forward; backward turns one element of the incoming gradient into NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g.view(-1)[0] = NAN
        return g


def _loss(apply, batch):
    """``batch = (x, y, k)``: ``k`` (one value per row) is added to the loss as ``k - 1``, which
    has no gradient: a NaN there makes this rank's loss NaN and leaves its gradients finite."""
    x, y, k = batch
    return apply(x, y) + (k[0] - 1)


def _model():
    """The tiny GPT; while ``_POISON[0]`` is set, the gradient flowing back out of ``blocks.1``
    holds a NaN (the loss stays finite)."""
    model = tiny_gpt()

    def poison(module, args, out):
        return _PoisonGrad.apply(out) if _POISON[0] else out

    model.blocks[1].register_forward_hook(poison)
    return model


_POISON = [False]


def _batch(i, k_rows):
    x, y = batches(i + 1)[i]
    return x, y, k_rows


def _ks(world, bad_rank=None, value=NAN):
    """Per-row ``k``: 1 everywhere, ``value`` on the rows of ``bad_rank``."""
    k = torch.ones(8)
    if bad_rank is not None:
        per = 8 // world
        k[bad_rank * per:(bad_rank + 1) * per] = value
    return k


def _skip_case(rank, world, stage, precision, poison):
    """Good step, bad step (rank ``world - 1``'s loss NaN, or a NaN gradient), good step."""
    model = _model()
    plan = fz.zero(stage, groups=GROUPS)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    state = fz.init(model, tx, plan, precision=precision)
    step = fz.train_step(model, _loss, tx, plan)
    state, m0 = step(state, _batch(0, _ks(world)))
    snap = _snap(state)
    _POISON[0] = poison == "grad"
    bad = _ks(world, None if poison == "grad" else world - 1)
    state, m1 = step(state, _batch(1, bad))
    _POISON[0] = False
    same, step_after = _same(snap, state), int(state.step)
    state, m2 = step(state, _batch(2, _ks(world)))
    return dict(skipped=[bool(m["skipped"]) for m in (m0, m1, m2)], same=same, step_after=step_after,
                params=fz.gather_params(state, plan))


def _clean_case(rank, world, stage, precision):
    """The same run without the bad step: what the run above must end in, bit for bit."""
    model = _model()
    plan = fz.zero(stage, groups=GROUPS)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    state = fz.init(model, tx, plan, precision=precision)
    step = fz.train_step(model, _loss, tx, plan)
    for i in (0, 2):
        state, _ = step(state, _batch(i, _ks(world)))
    return fz.gather_params(state, plan)


def _raise_case(rank, world):
    model = _model()
    plan = fz.zero(3, groups=GROUPS)
    tx = optim.adamw(1e-2)
    state = fz.init(model, tx, plan, precision=fz.bf16())
    step = fz.train_step(model, _loss, tx, plan, nonfinite="raise")
    state, _ = step(state, _batch(0, _ks(world)))
    snap = _snap(state)
    try:
        step(state, _batch(1, _ks(world, 0)))  # rank 0's loss only
        message = None
    except fz.NonFiniteError as e:
        message = str(e)
    same = _same(snap, state)
    state, m = step(state, _batch(2, _ks(world)))  # the state handed in is still alive
    return dict(message=message, same=same, skipped=bool(m["skipped"]), step=int(state.step))


def _world_cases(rank, world):
    out = {}
    for stage in (0, 3):
        for name, precision in (("fp32", fz.fp32()), ("bf16", fz.bf16())):
            for poison in ("loss", "grad"):
                out[stage, name, poison] = _skip_case(rank, world, stage, precision, poison)
            out[stage, name, "clean"] = _clean_case(rank, world, stage, precision)
    out["raise"] = _raise_case(rank, world)
    return out


def test_a_nan_loss_or_gradient_skips_the_step_on_every_rank_bit_identically():
    """2 gloo ranks, stages 0 and 3, fp32 and bf16: the bad step changes no bit of params, master
    or optimizer state, does not advance ``state.step``, and the run then goes on exactly as one
    that never saw the bad batch. A NaN loss on one rank alone skips on both (the flag is reduced);
    ``nonfinite="raise"`` raises on every rank, naming the step, and leaves the state usable."""
    for rank_out in run_world(_world_cases, 2):
        for stage in (0, 3):
            for name in ("fp32", "bf16"):
                clean = rank_out[stage, name, "clean"]
                for poison in ("loss", "grad"):
                    r = rank_out[stage, name, poison]
                    where = (stage, name, poison)
                    assert r["skipped"] == [False, True, False], where
                    assert r["same"] and r["step_after"] == 1, where
                    for k, v in clean.items():
                        assert torch.equal(r["params"][k], v), (where, k)
        r = rank_out["raise"]
        assert r["message"] is not None and "at step 1 (state.step)" in r["message"], r
        assert r["same"] and not r["skipped"] and r["step"] == 2, r


def _one_rank(policy="skip", max_skips=100, stage=2, placement=None, tx=None, precision=None, compile_=False):
    model = _model()
    plan = fz.zero(stage, groups=GROUPS, placement=placement or {})
    tx = tx or optim.adamw(1e-2)
    state = fz.init(model, tx, plan, precision=precision or fz.bf16())
    step = fz.train_step(model, _loss, tx, plan, nonfinite=policy, max_skips=max_skips)
    if compile_:
        step = fz.compile(step, backend="aot_eager")
    return state, step, plan


def test_consecutive_skips_beyond_max_skips_raise_a_clear_error():
    state, step, _ = _one_rank(max_skips=2)
    good, bad = _batch(0, _ks(1)), _batch(0, _ks(1, 0))
    state, _ = step(state, good)
    for b in (bad, bad, good, bad, bad):  # a finite step in between starts the count again
        state, m = step(state, b)
    assert int(state.step) == 2
    snap = _snap(state)
    with pytest.raises(fz.NonFiniteError, match=r"3 consecutive steps skipped .* from step 2 \(state.step\) on, "
                                                r"more than max_skips=2"):
        step(state, bad)
    assert _same(snap, state)
    state, m = step(state, good)  # caught: the count starts again and the state is usable
    assert not bool(m["skipped"]) and int(state.step) == 3
    step.check_nonfinite()  # nothing in flight on the CPU: every flag was judged in its step


def test_compiled_step_skips_and_raises_without_a_graph_break():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    state, step, _ = _one_rank(policy="raise", stage=3, compile_=True)
    state, m = step(state, _batch(0, _ks(1)))
    snap = _snap(state)
    with pytest.raises(fz.NonFiniteError, match="at step 1"):
        step(state, _batch(1, _ks(1, 0)))
    assert _same(snap, state)
    state, m = step(state, _batch(2, _ks(1)))
    assert not bool(m["skipped"]) and int(state.step) == 2
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])


def test_offloaded_optimizer_state_skips_bit_identically():
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    state, step, _ = _one_rank(stage=2, placement={"opt_state": "cpu"}, tx=tx)
    assert fz.testing.route(step, state).pipelined  # the host's update (funzero/_placement/_host.py)
    state, _ = step(state, _batch(0, _ks(1)))
    snap = _snap(state)
    for poison in (False, True):  # a NaN loss, then a NaN gradient
        _POISON[0] = poison
        state, m = step(state, _batch(1, _ks(1, None if poison else 0)))
        _POISON[0] = False
        assert bool(m["skipped"]) and _same(snap, state) and int(state.step) == 1


def test_accumulation_skips_the_window_with_a_nan_micro_step():
    """multi_steps(k=2): a NaN loss in the first micro-step is judged at the optimizer step, which
    is skipped: params, master and the inner state unchanged, the accumulator emptied."""
    tx = optim.multi_steps(optim.adamw(1e-2), 2)
    state, step, _ = _one_rank(stage=1, tx=tx)
    good, bad = _batch(0, _ks(1)), _batch(1, _ks(1, 0))
    for b in (good, good):
        state, _ = step(state, b)
    inner = [t.clone() for t in optree.tree_leaves((state.params, state.master, state.opt_state.inner_state),
                                                   namespace="funzero")]
    state, m = step(state, bad)
    assert not bool(m["applied"]) and not bool(m["skipped"])
    state, m = step(state, good)
    assert bool(m["applied"]) and bool(m["skipped"]) and int(state.step) == 1
    now = optree.tree_leaves((state.params, state.master, state.opt_state.inner_state), namespace="funzero")
    assert all(torch.equal(a, b) for a, b in zip(inner, now, strict=True))
    assert all(not t.any() for t in optree.tree_leaves(state.opt_state.acc, namespace="funzero"))


def test_ignore_applies_the_update_and_finite_steps_do_not_depend_on_the_policy():
    runs = {}
    for policy in ("skip", "ignore"):
        state, step, plan = _one_rank(policy=policy, precision=fz.fp32())
        for i in range(3):
            state, m = step(state, _batch(i, _ks(1)))
        runs[policy] = fz.gather_params(state, plan)
        assert ("skipped" in m) == (policy == "skip")
        _POISON[0] = True
        state, m = step(state, _batch(3, _ks(1)))
        _POISON[0] = False
        if policy == "ignore":  # today's behaviour, by choice: the NaN reaches the state
            assert int(state.step) == 4
            assert not all(torch.isfinite(t).all() for t in state.params.values())
    for k, v in runs["skip"].items():
        assert torch.equal(runs["ignore"][k], v), k


def test_bad_policies_are_refused_naming_the_value():
    model = tiny_gpt()
    plan = fz.zero(2, groups=GROUPS)
    tx = optim.adamw(1e-2)
    with pytest.raises(ValueError, match=r"nonfinite must be one of 'skip', 'raise', 'ignore', got nonfinite='warn'"):
        fz.train_step(model, _loss, tx, plan, nonfinite="warn")
    with pytest.raises(ValueError, match=r"max_skips must be an int >= 0 or None \(no bound\), got max_skips=-1"):
        fz.train_step(model, _loss, tx, plan, max_skips=-1)
    fz.init(model, tx, plan, precision=fz.fp16())
    with pytest.raises(ValueError, match="nonfinite='ignore' cannot apply under fp16"):
        fz.train_step(model, _loss, tx, plan, nonfinite="ignore")
