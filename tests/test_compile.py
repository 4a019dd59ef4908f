"""torch.compile(step) on real gloo ranks: same parameters as eager, no recompilation."""

from __future__ import annotations

import pytest
import torch

import funzero as fz
from funzero import optim
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt


def _compiled_vs_eager(rank, world, stages, backend):
    from torch._dynamo.utils import counters

    out = {}
    for stage in stages:
        res = {}
        for compiled in (False, True):
            model = tiny_gpt(dtype=torch.float64)
            plan = fz.zero(stage, groups=GROUPS)
            tx = optim.adamw(1e-2, weight_decay=0.1)
            state = fz.init(model, tx, plan, precision=fz.Precision(torch.float64))
            step = fz.train_step(model, lm_loss, tx, plan)
            if compiled:
                torch._dynamo.reset()
                counters.clear()
                step = torch.compile(step, backend=backend)
            graphs = []
            for b in batches(3):
                state, metrics = step(state, b)
                graphs.append(counters["stats"]["unique_graphs"])
            res[compiled] = (fz.gather_params(state, plan), graphs, dict(counters["graph_break"]))
        out[stage] = res
    return out


@pytest.mark.parametrize(
    "stages,backend",
    [((3,), "inductor"), ((0, 1, 2), "aot_eager")],
    ids=["stage3-inductor", "stages012-aot_eager"],
)
def test_compiled_step_matches_eager_and_does_not_recompile(stages, backend):
    res = run_world(_compiled_vs_eager, 2, stages, backend)[0]
    for stage, r in res.items():
        eager, _, _ = r[False]
        compiled, graphs, breaks = r[True]
        assert graphs[0] == 1 and graphs[1] == 1 and graphs[2] == 1, (stage, graphs)
        assert not breaks, (stage, list(breaks))
        for k, v in eager.items():
            rel = ((compiled[k] - v).norm() / v.norm()).item()
            assert rel < 1e-10, (stage, k, rel)


def test_changing_the_learning_rate_does_not_recompile():
    from torch._dynamo.utils import counters

    results = {}
    for compiled in (False, True):
        model = tiny_gpt()
        plan = fz.zero(2, groups=GROUPS)
        tx = optim.chain(optim.clip_by_global_norm(1.0), optim.inject_hyperparams(optim.adamw)(learning_rate=1e-2, weight_decay=0.1))
        state = fz.init(model, tx, plan)
        step = fz.train_step(model, lm_loss, tx, plan)
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            step = torch.compile(step, backend="aot_eager")
        for i, b in enumerate(batches(4)):
            if i == 2:
                state.opt_state[1].hyperparams["learning_rate"].fill_(3e-3)
            state, _ = step(state, b)
        results[compiled] = fz.gather_params(state, plan)
        if compiled:
            assert counters["stats"]["unique_graphs"] == 1
            assert not counters["graph_break"]
    for k, v in results[False].items():
        assert torch.allclose(results[True][k], v, rtol=1e-5, atol=1e-7), k
    # and the change took effect: a run that keeps 1e-2 ends elsewhere
    model = tiny_gpt()
    plan = fz.zero(2, groups=GROUPS)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    state = fz.init(model, tx, plan)
    step = fz.train_step(model, lm_loss, tx, plan)
    for b in batches(4):
        state, _ = step(state, b)
    other = fz.gather_params(state, plan)
    assert not torch.allclose(other["wte.weight"], results[False]["wte.weight"])
