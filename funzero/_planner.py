"""Choosing a ZeRO stage and placement from memory budgets: the fastest candidate that fits.

Given a number of GPUs and a tensor-parallel (and sequence-parallel) size, the planner also picks
the hierarchical-sharding split of the data-parallel ranks: ``dp = gpus / (tp x sp)``, each group
sharded over ``N = dp / replicas x sp`` ranks (the shard axis spans the sp ranks) and replicated
``replicas`` times.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from funzero._counts import format_bytes
from funzero._memory import MemoryEstimate, estimate_memory, split_for_estimate
from funzero._placement import conflict
from funzero._plan import STAGES
from shardspec import is_sharded

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
    """One (stage, offload, replicas) the planner considered.

    Attributes:
        estimate: its :class:`MemoryEstimate` (``num_shards``, ``num_replicas``, ``tp``, ``sp``
            say the layout).
        fits: whether it fits every budget.
        reason: the budget it exceeds (by how much), or its headroom.
        gpu / cpu_node / nvme_node: bytes per GPU, CPU bytes per node, NVMe bytes per node.
        num_replicas: copies of the shards (hierarchical sharding; 1 without it).
    """

    stage: int
    offload: str
    estimate: MemoryEstimate
    fits: bool
    reason: str
    gpu: int
    cpu_node: int
    nvme_node: int
    num_replicas: int = 1

    @property
    def label(self) -> str:
        """``stage 3/none`` (and ``x4 replicas`` where there are copies): how the text names it."""
        copies = f" x{self.num_replicas} replicas" if self.num_replicas > 1 else ""
        return f"stage {self.stage}/{self.offload}{copies}"


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

REPLICA_ORDER = """\
Within a stage, more replicas first: each group's gathers and reduce-scatters then span fewer
ranks (one node's, where the shards fit in it) and only the reduced 1/N shard of each gradient is
all-reduced across the replicas (hierarchical sharding; ZeRO++'s hpZ)."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    return value


def _layouts(gpus, num_shards, num_replicas, tp: int, sp: int) -> tuple[int, list[int], bool]:
    """``(GPUs, replica counts to try, whether the replicas were searched)``; the shards of a
    replica count R follow as ``gpus / (tp x R)``."""
    tp, sp = _check_size("tp", tp), _check_size("sp", sp)
    if gpus is None:
        if num_shards is None:
            raise ValueError("choose_stage needs gpus= (the planner splits them) or num_shards=")
        num_shards, num_replicas = _check_size("num_shards", num_shards), _check_size("num_replicas", num_replicas or 1)
        if num_shards % sp:
            raise ValueError(f"sp={sp} does not divide num_shards={num_shards}: the shard axis spans the sp ranks")
        return num_shards * num_replicas * tp, [num_replicas], False
    gpus = _check_size("gpus", gpus)
    if gpus % (tp * sp):
        raise ValueError(f"tp x sp = {tp} x {sp} = {tp * sp} does not divide gpus={gpus}")
    dp = gpus // (tp * sp)
    if num_shards is not None:
        _check_size("num_shards", num_shards)
        replicas = gpus // (tp * num_shards) if gpus % (tp * num_shards) == 0 else None
        if replicas is None or (num_replicas is not None and num_replicas != replicas) or num_shards % sp:
            raise ValueError(f"num_shards={num_shards} x num_replicas={num_replicas or replicas} x tp={tp} "
                             f"is not gpus={gpus} with the shards spanning sp={sp}")
        return gpus, [replicas], False
    if num_replicas is not None:
        _check_size("num_replicas", num_replicas)
        if dp % num_replicas:
            raise ValueError(f"num_replicas={num_replicas} does not divide dp = gpus / (tp x sp) = {dp}")
        return gpus, [num_replicas], False
    # A replica count that leaves one rank per shard group (N = 1) holds what stage 0 holds, or
    # offloaded, each rank's whole optimizer state: only R = 1 is kept of those.
    return gpus, [r for r in sorted(_divisors(dp), reverse=True) if r == 1 or dp // r * sp > 1], True


def choose_stage(
    model: nn.Module | int | str,
    *,
    num_shards: int | None = None,
    num_replicas: int | None = None,
    gpus: int | None = None,
    tp: int = 1,
    sp: int = 1,
    gpu_bytes: int,
    cpu_bytes: int | None = None,
    nvme_bytes: int | None = None,
    gpus_per_node: int | None = None,
    reserve_bytes: int = 0,
    **kw: Any,
) -> StageChoice:
    """The fastest ZeRO stage, placement and replica count whose estimate fits the budgets.

    Give either the shard layout (``num_shards``, ``num_replicas``) or ``gpus``: the planner then
    splits them into ``dp = gpus / (tp x sp)`` data-parallel ranks and tries every replica count
    R dividing ``dp`` (the groups sharded over ``N = dp / R x sp`` ranks; R = 1 only of those
    leaving N = 1), unless ``num_replicas`` fixes it. A stage whose specs shard nothing (stage
    0) holds the same at any R, so it is tried at R = 1 only.

    Args:
        model: as for :func:`estimate_memory` (module or parameter count). A module is split over
            ``tp`` once (on a meta copy) for every candidate.
        num_shards: N, the ranks each group is sharded over (with sequence parallelism they
            include the ``sp`` ranks).
        num_replicas: hierarchical sharding: copies of the N shards (``zero(..., replicate=)``);
            default: 1, or with ``gpus`` the planner's choice.
        gpus: GPUs in all (``tp x sp`` must divide them).
        tp / sp: tensor- and sequence-parallel ranks (as for :func:`estimate_memory`).
        gpu_bytes: memory per GPU.
        cpu_bytes: host memory per node (``None``: not limited).
        nvme_bytes: NVMe per node; ``None``: NVMe placements are not considered.
        gpus_per_node: ranks sharing one node's CPU and NVMe (default: the whole world).
        reserve_bytes: GPU memory to keep free beyond the estimate (CUDA context, allocator
            fragmentation, activations when none are estimated).
        **kw: passed to :func:`estimate_memory` (``precision``, ``tx``, ``groups``, ``tp_rules``,
            ``activations``, ...).

    Returns:
        A :class:`StageChoice`; ``best`` is ``None`` when nothing fits.

    Raises:
        ValueError: naming a non-positive budget, or sizes that do not divide (tp x sp and the
            GPUs, the replicas and dp, tp and the model's heads or dimensions).

    Example:
        >>> c = choose_stage("13B", num_shards=4, gpu_bytes=80e9, cpu_bytes=128e9, precision="bf16",
        ...                  reserve_bytes=8e9)
        >>> (c.best.stage, c.best.offload)
        (3, 'none')
        >>> c = choose_stage("70B", gpus=64, tp=8, gpu_bytes=80e9, precision="bf16", reserve_bytes=8e9)
        >>> (c.best.stage, c.best.estimate.num_shards, c.best.num_replicas)
        (1, 4, 2)
    """
    for name, v in (("gpu_bytes", gpu_bytes), ("cpu_bytes", cpu_bytes), ("nvme_bytes", nvme_bytes)):
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be > 0, got {name}={v}")
    if not 0 <= reserve_bytes < gpu_bytes:
        raise ValueError(f"reserve_bytes must be in [0, gpu_bytes={gpu_bytes}), got {reserve_bytes=}")
    usable = gpu_bytes - reserve_bytes
    world, replica_counts, searched = _layouts(gpus, num_shards, num_replicas, tp, sp)
    per_node = world if gpus_per_node is None else gpus_per_node
    if per_node < 1 or world % per_node:
        raise ValueError(f"gpus_per_node={gpus_per_node} must divide the {world} GPUs")
    if isinstance(model, nn.Module):
        model = split_for_estimate(model, tp, kw.pop("tp_rules", None))  # once, not per candidate
    labels = ["none", "cpu", "cpu+params"] + (["nvme", "nvme+params"] if nvme_bytes is not None else [])
    out = []
    for label, stage in candidates(labels):
        # Specs that shard nothing hold the same at any replica count: try the smallest only.
        sharded = is_sharded(STAGES[stage]("dp").opt_state)
        for replicas in (replica_counts if sharded or not searched else replica_counts[-1:]):
            shards = world // (tp * replicas)
            est = estimate_memory(model, stage=stage, num_shards=shards, num_replicas=replicas, tp=tp, sp=sp,
                                  placement=OFFLOADS[label], **kw)
            out.append(_judge(stage, label, est, usable, per_node, cpu_bytes, nvme_bytes))
    best = next((c for c in out if c.fits), None)
    return StageChoice(best, tuple(out), _explain(out, best, searched))


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
    return Candidate(stage, label, est, not over, reason, est.gpu, cpu_node, nvme_node, est.num_replicas)


def _explain(out: list[Candidate], best: Candidate | None, searched: bool = False) -> str:
    """Why ``best`` was chosen (or why nothing fits), naming the faster candidates rejected."""
    if best is None:
        return "nothing fits: " + min(out, key=lambda c: c.gpu).reason
    skipped = out[: out.index(best)]
    e = best.estimate
    layout = ""
    if searched or e.tp > 1 or e.sp > 1:
        dp = e.num_shards * e.num_replicas // e.sp
        layout = (f" on dp {dp} x tp {e.tp}" + (f" x sp {e.sp}" if e.sp > 1 else "")
                  + f", each group sharded over {e.num_shards} rank{'s' if e.num_shards > 1 else ''}"
                  + (f" x {best.num_replicas} replicas" if best.num_replicas > 1 else ""))
    lines = [f"stage {best.stage}, offload {best.offload}{layout}: the first candidate that fits ({best.reason})."]
    if skipped:
        lines.append("Faster candidates rejected: " + "; ".join(f"{c.label} {c.reason}" for c in skipped) + ".")
    lines.append(SPEED_ORDER)
    if searched:
        lines.append(REPLICA_ORDER)
    return "\n".join(lines)
