"""The example model's compiled step: graph breaks are pinned, each with its reason.

Dynamo-level only (backend="eager"): graph breaks and recompiles happen before any backend runs.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import funzero as fz
from funzero.models import GPT, GPTConfig

from ._dist import run_world

# The example model as the demo and benchmarks build it (fused cross-entropy kernel included).
CFG = GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=64)


def _break_reasons(stage: int, trace_autograd_ops: bool, counter: list | None = None) -> tuple[list[str], int]:
    """Graph-break reasons and graph count of three compiled steps; with ``counter`` given, a
    ``count_comm`` is held open around them and appended to it."""
    from torch._dynamo.utils import counters

    old = torch._dynamo.config.trace_autograd_ops
    torch._dynamo.config.trace_autograd_ops = trace_autograd_ops
    try:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = GPT(CFG)
        plan = fz.zero(stage, groups=[r"blocks\.(\d+)\."])
        tx = fz.optim.chain(fz.optim.clip_by_global_norm(1.0), fz.optim.adamw(fz.optim.warmup_cosine(1e-3, 2, 10), weight_decay=0.1))
        state = fz.init(model, tx, plan)
        step = torch.compile(fz.train_step(model, lambda apply, b: apply(*b), tx, plan), backend="eager")
        g = torch.Generator().manual_seed(0)
        with fz.count_comm() if counter is not None else contextlib.nullcontext() as c:
            if counter is not None:
                counter.append(c)
            for _ in range(3):
                x = torch.randint(0, 256, (4, 32), generator=g)
                state, _ = step(state, (x, x))
        return sorted(k.split("\n")[0] for k in counters["graph_break"]), counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.config.trace_autograd_ops = old


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"), reason="torch < 2.13 has no in-graph autograd.grad")
@pytest.mark.parametrize("stage", [2, 3])
def test_example_model_step_is_one_graph(stage):
    reasons, graphs = _break_reasons(stage, True)
    assert reasons == [] and graphs == 1, (reasons, graphs)


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"), reason="the switch exists from torch 2.13 on")
def test_graph_breaks_where_autograd_grad_is_not_traced_are_exactly_these():
    """What torch 2.11 (the GPU image) does: break at ``torch.autograd.grad``.

    Reasons, pinned: (1) dynamo without ``trace_autograd_ops`` cannot put ``torch.autograd.grad``
    in a graph, so forward+loss, backward and the update compile separately; (2) the step's
    gradient anchors are made with ``requires_grad_()`` inside the step (that keeps the step pure),
    and dynamo breaks when such a tensor crosses the first break.
    """
    reasons, graphs = _break_reasons(2, False)
    assert set(reasons) == {
        "using `torch.autograd.grad` with `torch._dynamo.config.trace_autograd_ops=False`",
        "requires_grad_() intermediate leaked as output",
    }, reasons
    assert graphs <= 4, graphs


def _compiled_breaks_while_counting(rank, world, stage):
    counter = []
    reasons, graphs = _break_reasons(stage, hasattr(torch._dynamo.config, "trace_autograd_ops"), counter)
    return reasons, graphs, counter[0].total()


@pytest.mark.parametrize("stage", [2, 3])
def test_counting_collectives_does_not_break_a_compiled_multi_rank_step(stage):
    """On 2 ranks the compiled step has the collectives in it; a ``count_comm`` held open around
    it (as a benchmark does) must add no graph break, and it records nothing while compiled."""
    one = _break_reasons(stage, hasattr(torch._dynamo.config, "trace_autograd_ops"))
    for reasons, graphs, counted in run_world(_compiled_breaks_while_counting, 2, stage):
        assert (reasons, graphs) == one
        assert counted == 0
