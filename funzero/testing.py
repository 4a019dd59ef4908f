"""What tests and benchmarks may look at inside a step, without reaching into private modules.

Everything here observes or steers a step through documented hooks; none of it is needed to
train. ::

    grads = testing.gradients(step, state, batch)       # one forward + backward, no update
    r = testing.route(step, state)                       # which form the step takes
    with testing.host_events(state) as events: ...       # the host update, group by group
    testing.misplaced(state)                             # leaves not where the placement says
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import optree
import torch

from funzero._group import GatherTracker
from funzero._placement import filename, group_of_path, is_file_backed
from funzero._state import TrainState
from funzero._step import Step, _local_batch
from funzero._update import groupwise, pipelined

__all__ = [
    "GatherTracker",
    "HostEvent",
    "Route",
    "file_backed",
    "gradients",
    "host_events",
    "host_stats",
    "misplaced",
    "nvme_files",
    "route",
    "set_leaf_grads",
]


def _step(step) -> Step:
    if not isinstance(step, Step):
        raise ValueError(f"expected the step from funzero.train_step, got {type(step).__name__}")
    return step


def gradients(step: Step, state: TrainState, batch: Any) -> dict:
    """``{group: gradient}`` of one forward and backward of ``step`` on this rank's part of
    ``batch``, as the update would receive them before any step-time reduce: flat tensors, or
    ``funzero.optim.LeafGrads`` on the one-rank leaf route. The state is not changed."""
    step = _step(step)
    step.prepare(state.binding)
    grads, _, _ = step.forward_backward(state, _local_batch(batch, step.plan), None)
    return grads


class Route(NamedTuple):
    """The form a call of a step takes for a state.

    Attributes:
        leaves: the optimizer reads each leaf's gradient in place (one rank, eager).
        pipelined: the update is the host's pipelined one (optimizer state off the device).
        modes: ``{group: "op" | "direct" | "leaves"}`` (see ``funzero._group``).
    """

    leaves: bool
    pipelined: bool
    modes: dict


def route(step: Step, state: TrainState) -> Route:
    """How an eager call of ``step`` on ``state`` runs (see :class:`Route`)."""
    step = _step(step)
    step.prepare(state.binding)
    acc = step.accumulate
    inner = acc.inner_state(state.opt_state) if acc is not None else state.opt_state
    job = step.job(state, inner)
    return Route(step.takes_leaves(state), pipelined(state.binding.placement, groupwise(job)), step.modes(state))


def set_leaf_grads(step: Step, enabled: bool) -> Step:
    """Allow (default) or forbid the one-rank leaf route, e.g. to compare it with the flat one."""
    _step(step).leaf_grads = bool(enabled)
    return step


class HostEvent(NamedTuple):
    """One event of the host update: ``kind`` is ``"issue"`` (the group's gradient copy to the
    host was issued) or ``"update"`` (the group's host update finished); ``in_backward``
    whether it happened inside the backward pass."""

    kind: str
    group: str
    in_backward: bool


@contextlib.contextmanager
def host_events(state: TrainState, *, delay: float = 0.0,
                on_event: Callable[[HostEvent], None] | None = None) -> Iterator[list[HostEvent]]:
    """Record the host update's events for the binding of ``state`` while the block runs.

    Args:
        delay: seconds each group's host update sleeps first (to make overlap observable).
        on_event: also called with each event as it happens (from the worker thread for
            ``"update"``).
    """
    host = state.binding.placement.host
    events: list[HostEvent] = []

    def observe(kind: str, g: str) -> None:
        e = HostEvent(kind, g, torch._C._current_graph_task_id() != -1)
        events.append(e)
        if on_event is not None:
            on_event(e)

    host.observers.append(observe)
    old, host.slowdown = host.slowdown, delay
    try:
        yield events
    finally:
        host.observers.remove(observe)
        host.slowdown = old


def host_stats(state: TrainState) -> dict[str, float]:
    """Seconds the host update of ``state``'s binding has spent so far: ``update_s`` (the worker
    updating groups) and ``forward_wait_s`` (the next forward waiting for them)."""
    return dict(state.binding.placement.host.stats)


def misplaced(state: TrainState) -> list[str]:
    """Leaves of ``state`` that are not where its placement says (each leaf against its group's
    kind); empty when everything is in place."""
    pl, groups = state.binding.placement, state.binding.layouts
    bad = []
    for key, parts in (("params", [state.params]), ("opt_state", [state.master, state.opt_state])):
        for part in parts:
            paths, leaves, _ = optree.tree_flatten_with_path(part, namespace="funzero")
            for path, t in zip(paths, leaves):
                if not isinstance(t, torch.Tensor):
                    continue
                g = group_of_path(path, groups)
                if t.dim() > 0 and g is None:
                    bad.append(f"{key}: {path} belongs to no group")
                elif not pl.holds(key, t, g):
                    bad.append(f"{key}: {path} {tuple(t.shape)} on {t.device} file={filename(t)}")
    return bad


def nvme_files(state: TrainState) -> list[str]:
    """The files in this rank's NVMe directory of ``state``'s placement (sorted; [] without one)."""
    nvme = state.binding.placement.nvme()
    if nvme is None or nvme.dir is None or not os.path.isdir(nvme.dir):
        return []
    return sorted(os.listdir(nvme.dir))


def file_backed(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory is a mapped file (an NVMe-placed leaf)."""
    return is_file_backed(t)
