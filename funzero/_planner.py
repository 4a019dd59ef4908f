"""Choosing a ZeRO stage and placement from memory budgets: the fastest candidate that fits."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from funzero._counts import format_bytes
from funzero._memory import MemoryEstimate, estimate_memory
from funzero._placement import conflict
from funzero._plan import STAGES

__all__ = ["Candidate", "OFFLOADS", "StageChoice", "candidates", "choose_stage"]

# The placements the planner walks, fastest first (see choose_stage), by label.
OFFLOADS: dict[str, dict[str, str]] = {
    "none": {"params": "device", "opt_state": "device"},
    "cpu": {"params": "device", "opt_state": "cpu"},
    "cpu+params": {"params": "cpu", "opt_state": "cpu"},
    "nvme": {"params": "device", "opt_state": "nvme"},
    "nvme+params": {"params": "nvme", "opt_state": "nvme"},
}


def candidates(labels: Sequence[str]) -> Iterator[tuple[str, int]]:
    """``(offload label, stage)`` pairs that exist, in the planner's order (a placement that
    offloads a part the stage's specs do not shard is skipped)."""
    for label in labels:
        for stage, specs_of in STAGES.items():
            if conflict(OFFLOADS[label], specs_of("dp")) is None:
                yield label, stage


@dataclass(frozen=True)
class Candidate:
    """One (stage, offload) the planner considered.

    Attributes:
        estimate: its :class:`MemoryEstimate`.
        fits: whether it fits every budget.
        reason: the budget it exceeds (by how much), or its headroom.
        gpu / cpu_node / nvme_node: bytes per GPU, CPU bytes per node, NVMe bytes per node.
    """

    stage: int
    offload: str
    estimate: MemoryEstimate
    fits: bool
    reason: str
    gpu: int
    cpu_node: int
    nvme_node: int


@dataclass(frozen=True)
class StageChoice:
    """What :func:`choose_stage` found: the fastest candidate that fits, and all it looked at."""

    best: Candidate | None
    candidates: tuple[Candidate, ...]
    why: str


SPEED_ORDER = """\
Order, fastest first: no offload, then optimizer state in CPU memory, then parameters too, then
NVMe; within each, the lower stage first. Offload moves every gradient and parameter shard over
PCIe once per step and updates on the CPU, which costs more than any collective between GPUs.
Stages 0-2 move the same 2Ψ elements per step (an all-reduce is a reduce-scatter plus an
all-gather); stage 3 gathers parameters again in backward, 3Ψ in all, 1.5x. Among 0-2 the lower
stage issues fewer, larger collectives (stage 1 reduces once per optimizer step, stage 2 once
per micro-batch and group)."""


def choose_stage(
    model: nn.Module | int | str,
    *,
    num_shards: int,
    num_replicas: int = 1,
    gpu_bytes: int,
    cpu_bytes: int | None = None,
    nvme_bytes: int | None = None,
    gpus_per_node: int | None = None,
    reserve_bytes: int = 0,
    **kw: Any,
) -> StageChoice:
    """The fastest ZeRO stage and placement whose estimate fits the memory budgets.

    Args:
        model: as for :func:`estimate_memory` (module or parameter count).
        num_shards: N, the ranks each group is sharded over (data-parallel ranks in all, unless
            ``num_replicas`` > 1).
        num_replicas: hierarchical sharding: copies of the N shards (``zero(..., replicate=)``);
            the world is ``num_shards * num_replicas`` ranks.
        gpu_bytes: memory per GPU.
        cpu_bytes: host memory per node (``None``: not limited).
        nvme_bytes: NVMe per node; ``None``: NVMe placements are not considered.
        gpus_per_node: ranks sharing one node's CPU and NVMe (default: the whole world).
        reserve_bytes: GPU memory to keep free beyond the estimate (CUDA context, allocator
            fragmentation, activations when none are estimated).
        **kw: passed to :func:`estimate_memory` (``precision``, ``tx``, ``groups``,
            ``activations``, ...).

    Returns:
        A :class:`StageChoice`; ``best`` is ``None`` when nothing fits.

    Raises:
        ValueError: naming a non-positive budget.

    Example:
        >>> c = choose_stage("13B", num_shards=4, gpu_bytes=80e9, cpu_bytes=128e9, precision="bf16",
        ...                  reserve_bytes=8e9)
        >>> (c.best.stage, c.best.offload)
        (3, 'none')
    """
    for name, v in (("gpu_bytes", gpu_bytes), ("cpu_bytes", cpu_bytes), ("nvme_bytes", nvme_bytes)):
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be > 0, got {name}={v}")
    if not 0 <= reserve_bytes < gpu_bytes:
        raise ValueError(f"reserve_bytes must be in [0, gpu_bytes={gpu_bytes}), got {reserve_bytes=}")
    usable = gpu_bytes - reserve_bytes
    world = num_shards * num_replicas
    per_node = world if gpus_per_node is None else gpus_per_node
    if per_node < 1 or world % per_node:
        raise ValueError(f"gpus_per_node={gpus_per_node} must divide the {world} ranks of "
                         f"{num_shards=} x {num_replicas=}")
    labels = ["none", "cpu", "cpu+params"] + (["nvme", "nvme+params"] if nvme_bytes is not None else [])
    out = []
    for label, stage in candidates(labels):
        est = estimate_memory(model, stage=stage, num_shards=num_shards, num_replicas=num_replicas,
                              placement=OFFLOADS[label], **kw)
        out.append(_judge(stage, label, est, usable, per_node, cpu_bytes, nvme_bytes))
    best = next((c for c in out if c.fits), None)
    return StageChoice(best, tuple(out), _explain(out, best))


def _judge(stage: int, label: str, est, usable: int, per_node: int, cpu_bytes, nvme_bytes) -> Candidate:
    """One candidate against the budgets: GPU per rank, CPU and NVMe per node."""
    cpu_node, nvme_node = est.cpu * per_node, est.nvme * per_node
    over = []
    if est.gpu > usable:
        over.append(f"GPU {format_bytes(est.gpu)} > {format_bytes(usable)}")
    if cpu_bytes is not None and cpu_node > cpu_bytes:
        over.append(f"CPU {format_bytes(cpu_node)}/node > {format_bytes(cpu_bytes)}")
    if nvme_bytes is not None and nvme_node > nvme_bytes:
        over.append(f"NVMe {format_bytes(nvme_node)}/node > {format_bytes(nvme_bytes)}")
    if over:
        reason = "needs " + "; ".join(over)
    else:
        reason = f"fits, {format_bytes(usable - est.gpu)} GPU headroom"
    return Candidate(stage, label, est, not over, reason, est.gpu, cpu_node, nvme_node)


def _explain(out: list[Candidate], best: Candidate | None) -> str:
    """Why ``best`` was chosen (or why nothing fits), naming the faster candidates rejected."""
    if best is None:
        return "nothing fits: " + min(out, key=lambda c: c.gpu).reason
    skipped = out[: out.index(best)]
    lines = [f"stage {best.stage}, offload {best.offload}: the first candidate that fits ({best.reason})."]
    if skipped:
        lines.append("Faster candidates rejected: " + "; ".join(
            f"stage {c.stage}/{c.offload} {c.reason}" for c in skipped
        ) + ".")
    lines.append(SPEED_ORDER)
    return "\n".join(lines)
