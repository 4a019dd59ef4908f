"""torch.compile(step) on real gloo ranks: same parameters as eager, no recompilation."""

from __future__ import annotations

import torch

import funzero as fz
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt


def _compiled_vs_eager(rank, world, stages):
    from torch._dynamo.utils import counters

    out = {}
    for stage in stages:
        res = {}
        for compiled in (False, True):
            model = tiny_gpt(dtype=torch.float64)
            plan = fz.zero(stage, groups=GROUPS)
            tx = fz.optim.adamw(1e-2, weight_decay=0.1, fused=False)
            state = fz.init(model, tx, plan, precision=fz.Precision(torch.float64))
            step = fz.train_step(model, lm_loss, tx, plan)
            if compiled:
                torch._dynamo.reset()
                counters.clear()
                step = torch.compile(step)
            graphs = []
            for b in batches(3):
                state, metrics = step(state, b)
                graphs.append(counters["stats"]["unique_graphs"])
            res[compiled] = (fz.gather_params(state, plan), graphs, dict(counters["graph_break"]))
        out[stage] = res
    return out


def test_compiled_step_matches_eager_and_does_not_recompile():
    res = run_world(_compiled_vs_eager, 2, (1, 3))[0]
    for stage, r in res.items():
        eager, _, _ = r[False]
        compiled, graphs, breaks = r[True]
        assert graphs[0] >= 1 and graphs[1] == graphs[0] and graphs[2] == graphs[0], (stage, graphs)
        assert not breaks, (stage, list(breaks))
        for k, v in eager.items():
            rel = ((compiled[k] - v).norm() / v.norm()).item()
            assert rel < 1e-10, (stage, k, rel)
