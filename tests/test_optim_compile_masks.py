"""optax-style masks and labels inside torch.compile(step): resolved while tracing, so the step
is one graph, is not recompiled on later calls, and computes what the eager step does."""

from __future__ import annotations

import torch

from funzero import optim
from tests._dist import run_world
from tests.test_optim_engine_optax import _labels, _ndim_mask, _train

CONFIGS = {
    "adamw_mask_callable": lambda: optim.adamw(1e-2, weight_decay=0.1, mask=_ndim_mask),
    "multi_transform_labels_tree": lambda: optim.multi_transform({"adam": optim.adam(1e-2), "sgd": optim.sgd(0.05)}, _labels()),
}


def _compiled_vs_eager(rank, world):
    from torch._dynamo.utils import counters

    out = {}
    for name, make in CONFIGS.items():
        eager = _train(make, 2, None)
        torch._dynamo.reset()
        counters.clear()
        compiled = _train(make, 2, None, backend="aot_eager")
        out[name] = (eager, compiled, counters["stats"]["unique_graphs"], list(counters["graph_break"]))
    return out


def test_masks_and_labels_compile_to_one_graph_without_recompiling():
    for name, (eager, compiled, graphs, breaks) in run_world(_compiled_vs_eager, 2)[0].items():
        assert graphs == 1 and not breaks, (name, graphs, breaks)  # 3 steps, one graph: no recompile
        for k, v in eager.items():
            assert ((compiled[k] - v).norm() / v.norm()).item() < 1e-12, (name, k)
