"""No silent wrong results (issue 22): a donated state, ranks that disagree, and inputs that are not
what they look like end in an error that names the value, on every rank."""

from __future__ import annotations

import time

import pytest
import torch

import funzero as fz
from funzero import optim
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt


def _donated(rank, world, stage, tmpdir, compiled):
    model = tiny_gpt()
    plan = fz.zero(stage, groups=GROUPS)
    tx = optim.adamw(1e-2)
    state = fz.init(model, tx, plan)
    step = fz.train_step(model, lm_loss, tx, plan)
    if compiled:
        step = torch.compile(step, backend="eager")
    b = batches(2)
    new, _ = step(state, b[0])
    errors = []
    for what, call in (
        ("the train step", lambda: step(state, b[1])),
        ("gather_params", lambda: fz.gather_params(state, plan)),
        ("save_state", lambda: fz.save_state(state, plan, f"{tmpdir}/r{rank}")),
        ("sync", lambda: fz.sync(state)),
    ):
        try:
            call()
            errors.append((what, None))
        except ValueError as e:
            errors.append((what, str(e)))
    new, _ = step(new, b[1])  # the returned state goes on
    return errors, int(new.step)


@pytest.mark.parametrize("world,stage,compiled", [(1, 0, False), (2, 2, False), (2, 3, False), (1, 2, True)])
def test_a_donated_state_is_refused_naming_the_step(world, stage, compiled, tmp_path):
    """Used again, a state a step consumed once ran, returned step=1 instead of 2 and parameters
    up to 3.4e-4 off; gather_params returned the new parameters, save_state wrote step 1 with
    step 2's parameters."""
    for errors, steps in run_world(_donated, world, stage, str(tmp_path), compiled):
        assert steps == 2
        for what, msg in errors:
            assert msg is not None and f"{what} got a TrainState that was donated to a train step at step 0" in msg, (what, msg)


def _disagree(rank, world, what):
    stage = 3 if (what == "stage" and rank == 1) else 2
    groups = [r"blocks\.(\d+)\."] if not (what == "groups" and rank == 1) else [r"blocks\.0\."]
    tx = optim.adamw(1e-2)
    if what == "clip" and rank == 1:
        tx = optim.chain(optim.clip_by_global_norm(1.0), tx)
    model = tiny_gpt(n_layer=3 if (what == "shapes" and rank == 1) else 2)
    t0 = time.monotonic()
    try:
        fz.init(model, tx, fz.zero(stage, groups=groups), precision=fz.bf16())
    except ValueError as e:
        return str(e), time.monotonic() - t0
    return None, time.monotonic() - t0


@pytest.mark.parametrize("what,named", [
    ("stage", "the ZeRO stage: rank 0 has 2, rank 1 has 3"),
    ("clip", "the optimizer state's structure"),
    ("groups", "the groups"),
    ("shapes", "the groups"),
])
def test_ranks_that_disagree_fail_fast_on_every_rank_naming_what(what, named):
    """Stage 2 on one rank and 3 on the other, or clipping on one rank only, hung for torch's
    30-minute timeout (and at stage 3 one rank first finished a step with a wrong loss); other
    group rules or shapes aborted one rank in gloo's C++."""
    results = run_world(_disagree, 2, what, timeout=120)
    for msg, seconds in results:
        assert msg is not None and "ranks disagree on" in msg and named in msg, msg
        assert seconds < 60, seconds


def test_inputs_that_are_not_what_they_look_like_are_named():
    model, plan = tiny_gpt(), fz.zero(2, groups=GROUPS)
    with pytest.raises(ValueError, match=r"precision must be a funzero.Precision .* got torch.bfloat16: use fz.bf16\(\)"):
        fz.init(model, optim.adamw(1e-3), plan, precision=torch.bfloat16)
    with pytest.raises(ValueError, match=r"got AdamW: funzero takes optax-style transforms, e.g. fz.optim.adamw"):
        fz.init(tiny_gpt(), torch.optim.AdamW, plan)
    with pytest.raises(ValueError, match=r"initial_scale_power must be an int in \[0, 127\].* got 200"):
        fz.fp16(initial_scale_power=200)
    with pytest.raises(ValueError, match=r"reduce_dtype must be a floating-point torch.dtype, got reduce_dtype=torch.int32"):
        fz.bf16(reduce_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"hysteresis must be an int >= 1, got hysteresis=0"):
        fz.fp16(hysteresis=0)


@pytest.mark.parametrize("returns,named", [
    (lambda out: out.reshape(1), r"a tensor of shape \(1,\): reduce it to a scalar"),
    (lambda out: float(out.detach()), "got float"),
    (lambda out: (out, out), "returned a tuple: return the loss alone, or \\(loss, aux\\) with has_aux=True"),
    (lambda out: out.detach(), "does not depend on the model's parameters"),
    (lambda out: type("CausalLMOutputWithPast", (), {"loss": out})(), r"returned a CausalLMOutputWithPast: return its `.loss`"),
])
def test_a_loss_that_is_not_a_scalar_tensor_with_grad_is_named(returns, named):
    model, plan, tx = tiny_gpt(), fz.zero(2, groups=GROUPS), optim.adamw(1e-3)
    state = fz.init(model, tx, plan)
    step = fz.train_step(model, lambda apply, b: returns(lm_loss(apply, b)), tx, plan)
    with pytest.raises(ValueError, match=named):
        step(state, batches(1)[0])
    # the failed call consumed nothing: the state trains on
    state, m = fz.train_step(model, lm_loss, tx, plan)(state, batches(1)[0])
    assert int(state.step) == 1 and torch.isfinite(m["loss"])
