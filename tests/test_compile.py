"""torch.compile(step) on real gloo ranks: same parameters as eager, no recompilation."""

from __future__ import annotations

import pytest
import torch

import funzero as fz
from funzero import optim
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt


def _compiled_vs_eager(rank, world, stages, backend, make_plan=None):
    """``make_plan(stage)``: the plan to run (default: ``fz.zero(stage, groups=GROUPS)``)."""
    from torch._dynamo.utils import counters

    out = {}
    for stage in stages:
        res = {}
        for compiled in (False, True):
            model = tiny_gpt(dtype=torch.float64)
            plan = make_plan(stage) if make_plan is not None else fz.zero(stage, groups=GROUPS)
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


def _gathered_spans(prof) -> list[tuple[int, int, int]]:
    """``(allocated at, freed at, bytes)`` of every all-gather output a profiled compiled step made
    (the buffer the functional collective allocates: an ``aten::empty`` directly inside
    ``_c10d_functional::all_gather_into_tensor``), in the order they were made.

    A free can go unrecorded: the profiler sees only this thread's frees, and gloo's worker
    thread sometimes drops its reference to an output last, after the step has let go of it.
    Such a buffer is taken as freed when its address is next allocated (or at the step's end),
    so every span is at least as long as the buffer's life: live bytes from them are upper bounds.
    """
    from torch._C._profiler import _EventType

    made, events = [], {}

    def walk(e, parents):
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            events.setdefault(f.ptr, []).append((e.start_time_ns, f.alloc_size))
            if f.alloc_size > 0 and parents[-2:] == ["_c10d_functional::all_gather_into_tensor", "aten::empty"]:
                made.append((e.start_time_ns, f.ptr, f.alloc_size))
            return
        for c in e.children:
            walk(c, parents + [e.name])

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, [])
    end = 1 + max(ev[0] for evs in events.values() for ev in evs)
    spans = []
    for t, p, n in sorted(made):
        after = sorted(ev for ev in events[p] if ev[0] > t)
        spans.append((t, after[0][0] if after else end, n))
    return spans


def _live_gathered_bytes(rank, world):
    """Live gathered bytes at each all-gather of a compiled step (upper bounds; of the profiled
    steps, which all do the same, the one with the tightest forward bound), the groups' gathered
    sizes and the estimate's gather bytes."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_gpt()
    plan = fz.zero(3, groups=GROUPS)
    tx = optim.adamw(1e-2)
    state = fz.init(model, tx, plan)
    step = torch.compile(fz.train_step(model, lm_loss, tx, plan))
    data = batches(6)
    state, _ = step(state, data[0])  # compiles
    n = len(state.binding.layouts)
    lives = []
    for b in data[1:]:  # every rank runs every step (they gather together); each keeps its own count
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            state, _ = step(state, b)
        spans = _gathered_spans(prof)
        lives.append([sum(k for t0, t1, k in spans if t0 <= t < t1) for t, _, _ in spans])
    live = min(lives, key=lambda v: (max(v[:n]), max(v)))
    sizes = {g: lay.padded * 4 for g, lay in state.binding.layouts.items()}
    est = fz.estimate_memory(state.binding, compiled=True).gather
    return live, sizes, est


def test_compiled_stage3_frees_each_gathered_group_after_its_forward():
    """Compiled stage 3 holds what eager holds: at each forward gather, the root's group (its
    owner runs the whole forward) and the block being gathered, never the blocks before it; each
    group is gathered again in backward. Counted as live bytes of the all-gather outputs the
    compiled code allocates (CPU profiler, allocations and frees). The counts are upper bounds
    and the root plus the block being gathered a lower bound, so equality is exact."""
    for live, sizes, est in run_world(_live_gathered_bytes, 2):
        n = len(sizes)
        forward = live[:n]  # the first n gathers are the forward's, one per group
        assert max(forward) == sizes["rest"] + max(v for g, v in sizes.items() if g != "rest"), (live, sizes)
        assert len(live) == 2 * n, live  # and each group is gathered again in backward
        assert max(live) <= est, (live, est)
