"""fz.cuda_graph: the recorded-step protocol (fixed buffers in, the same buffers advanced out).

On the CPU nothing is recorded; the wrapper re-runs the step on the recorded buffers, so these
tests check what a CUDA graph depends on: the state's buffers are updated in place, leaves the
step returns anew are copied back into them, the batch goes through the recorded buffers, and
metrics are copies. The GPU run (benchmarks/train_step.py, `-cg` systems) checks the graph.
"""

from __future__ import annotations

import optree
import pytest
import torch

import funzero as fz
from funzero import optim
from funzero._graph import _check_placed
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt


def _setup(stage=2, clip=False):
    model = tiny_gpt()
    plan = fz.zero(stage, groups=GROUPS)
    tx = optim.adamw(optim.warmup_cosine(1e-2, 2, 10), weight_decay=0.1)
    if clip:
        tx = optim.chain(optim.clip_by_global_norm(0.5), tx)
    state = fz.init(model, tx, plan)
    return fz.train_step(model, lm_loss, tx, plan), state, plan


def _run(stage, graphed: bool, n=6, clip=False):
    step, state, plan = _setup(stage, clip)
    fn = fz.cuda_graph(step, warmup=2) if graphed else step
    losses, states = [], []
    for b in batches(n):
        state, m = fn(state, b)
        losses.append(m["loss"])
        states.append(state)
    return fz.gather_params(state, plan), losses, states, state


@pytest.mark.parametrize("stage,clip", [(0, False), (2, True), (3, False)])
def test_graphed_steps_equal_plain_steps_bit_for_bit(stage, clip):
    want, want_losses, _, want_state = _run(stage, False, clip=clip)
    got, losses, states, state = _run(stage, True, clip=clip)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    # Metrics are copies: each step's loss is still its own after later steps overwrote the graph's.
    assert [x.item() for x in losses] == [x.item() for x in want_losses]
    assert int(state.step) == int(want_state.step) == 6
    # The warm-up steps return new states; the recording keeps the state it is given (the last
    # warm-up's) and every later call returns that object, its buffers advanced.
    assert states[0] is not states[1]
    assert states[1] is states[2] is states[3] is states[5]


def test_the_recorded_buffers_stay_the_graph_inputs():
    step, state, _ = _setup(2)
    fn = fz.cuda_graph(step, warmup=1)
    data = batches(4)
    state, _ = fn(state, data[0])
    state, _ = fn(state, data[1])  # recorded here

    def ptrs(s):
        return [x.data_ptr() for x in optree.tree_leaves(s, namespace="funzero") if isinstance(x, torch.Tensor)]

    before = ptrs(state)
    state, _ = fn(state, data[2])
    state, _ = fn(state, data[3])
    assert ptrs(state) == before
    assert int(state.step) == 4  # the step count, returned anew by each step, copied back in


def test_another_state_is_copied_into_the_recorded_buffers():
    """Replaying from a state other than the one returned (say, a loaded checkpoint) continues
    from that state, as the plain step would."""
    step, state, plan = _setup(2)
    fn = fz.cuda_graph(step, warmup=1)
    data = batches(5)
    for b in data[:3]:
        state, _ = fn(state, b)
    step2, want, _ = _setup(2)  # the step updates buffers in place: two equal fresh states
    _, got, _ = _setup(2)
    for b in data[3:]:
        want, _ = step2(want, b)
    for b in data[3:]:
        got, _ = fn(got, b)
    for k, v in fz.gather_params(want, plan).items():
        assert torch.equal(fz.gather_params(got, plan)[k], v), k


def _recorded():
    """A stage-2 step through cuda_graph, one warm-up call and the recording call done."""
    step, state, _ = _setup(2)
    fn = fz.cuda_graph(step, warmup=1)
    data = batches(2)
    state, _ = fn(state, data[0])
    state, _ = fn(state, data[1])
    return step, fn, state, data


def test_a_batch_of_another_shape_is_refused_by_its_leaf():
    step, fn, state, _ = _recorded()
    x, y = batches(1, batch=4)[0]
    with pytest.raises(ValueError, match=r"batch leaf '0' is \(4, 16\) torch.int64; the step was recorded with \(8, 16\)"):
        fn(state, (x, y))
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        fz.cuda_graph(step, warmup=0)


def test_a_leaf_off_the_compute_device_is_refused_by_its_path():
    with pytest.raises(ValueError, match=r"state leaf 'opt_state.mu.blocks.0' is on meta"):
        _check_placed(["params.blocks.0", "opt_state.mu.blocks.0"],
                      [torch.zeros(2), torch.empty(2, device="meta")], torch.device("cpu"))


def _two_ranks(rank, world, stage):
    return _run(stage, True)[0], _run(stage, False)[0]


@pytest.mark.parametrize("stage", [1, 3])
def test_graphed_steps_on_two_ranks(stage):
    for got, want in run_world(_two_ranks, 2, stage):
        for k, v in want.items():
            assert torch.equal(got[k], v), k


def test_a_state_leaf_of_another_shape_is_refused_by_its_path():
    _, fn, _, data = _recorded()
    _, other, _ = _setup(2)
    g = next(iter(other.params))
    other.params[g] = other.params[g][:-1].clone()
    with pytest.raises(ValueError, match=rf"state leaf 'params\.{g}' is \(\d+,\) torch.float32; the step was recorded"):
        fn(other, data[0])


def test_gradient_accumulation_state_is_refused_at_recording():
    model = tiny_gpt()
    plan = fz.zero(2, groups=GROUPS)
    tx = optim.multi_steps(optim.adamw(1e-2), 2)
    state = fz.init(model, tx, plan)
    fn = fz.cuda_graph(fz.train_step(model, lm_loss, tx, plan), warmup=1)
    data = batches(2)
    state, _ = fn(state, data[0])
    with pytest.raises(ValueError, match="opt_state is optim.multi_steps' state"):
        fn(state, data[1])


def test_a_batch_that_passes_one_tensor_twice_keeps_one_buffer():
    """``(x, x)`` is recorded as one buffer, so a compiled step's aliasing guard holds on replay
    (no recompile: frame count unchanged after recording) and the losses equal plain steps'; a
    later batch that breaks the recorded aliasing is refused by its leaf."""
    from torch._dynamo.testing import CompileCounter

    def loss_fn(apply, batch):
        x, y = batch
        return apply(x, y)

    results = {}
    for graphed in (False, True):
        torch._dynamo.reset()
        counter = CompileCounter()
        model = tiny_gpt()
        plan = fz.zero(2, groups=GROUPS)
        tx = optim.adamw(1e-2, weight_decay=0.1)
        state = fz.init(model, tx, plan)
        fn = torch.compile(fz.train_step(model, loss_fn, tx, plan), backend=counter)
        if graphed:
            fn = fz.cuda_graph(fn, warmup=2)
        losses, frames = [], []
        for x, _ in batches(5):
            state, m = fn(state, (x, x))
            losses.append(m["loss"])
            frames.append(counter.frame_count)
        results[graphed] = losses
        if graphed:
            assert fn.batch_leaves[0] is fn.batch_leaves[1]
            assert frames[-1] == frames[1], frames  # the recording call and replays compiled nothing new
            x, y = batches(1)[0]
            with pytest.raises(ValueError, match=r"batch leaf '1' was recorded as the same tensor as leaf '0'"):
                fn(state, (x, y))
    assert [float(v) for v in results[True]] == [float(v) for v in results[False]]
