"""Explicit collectives on a mesh axis (the group path's gather and reduce are built on these,
``_group.py``).

Built on ``torch.distributed._functional_collectives`` (traceable by ``torch.compile``; NCCL on
GPUs, gloo on CPU). An axis of size 1 needs no communication: every collective is the identity
there and moves nothing.

Every call is recorded by the active :class:`CommCounter` (if any) in *logical* elements: an
all-gather or reduce-scatter over a buffer of P elements counts P, an all-reduce counts 2P (a
reduce-scatter plus an all-gather), which is the accounting of the ZeRO paper (sec. 7): stages
0-2 move 2Psi per step, stage 3 moves 3Psi. Counting happens when the Python call runs, i.e.
eagerly or while ``torch.compile`` traces, not on every replay of a compiled graph.

``axis`` is one mesh axis, or a tuple of axes taken as one group (their ranks flattened:
``Mesh.group_over``); the empty tuple is no communication at all.

A collective that some rank never joins ends, after the group's timeout (``FUNZERO_TIMEOUT_S``
where ``shardspec.Mesh.from_env`` starts the process group), in :class:`CollectiveTimeout`,
naming the collective, its tag, the mesh axis and the group's ranks (eager calls that wait, as
gloo's do; NCCL's watchdog reports a timed-out kernel itself, and a compiled graph waits inside
the graph).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from shardspec import Mesh

__all__ = [
    "CollectiveTimeout",
    "CommCounter",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "broadcast",
    "count_comm",
    "reduce_scatter",
]

# torch 2.13 renamed the single-tensor collectives; 2.11 (the GPU image) has only the old names.
_all_gather_single = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor
_reduce_scatter_single = getattr(fc, "reduce_scatter_single", None) or fc.reduce_scatter_tensor


@dataclass
class CommCounter:
    """Logical elements and bytes moved per rank, and calls, by ``(op, tag)``.

    ``by_axis`` keeps the same three counts by ``(op, tag, axis)`` (``axis`` as the collective
    was given it: a name or a tuple of names), for :meth:`total`'s ``axis=``.
    ``on_call(op, tag, tensor)``, when given, is also told of each call as it is issued, with the
    tensor passed to the collective (its order among other events of a step is observable).
    """

    elements: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)
    on_call: Callable[[str, str, torch.Tensor], None] | None = None
    by_axis: dict = field(default_factory=lambda: {"elements": Counter(), "bytes": Counter(), "calls": Counter()})

    def record(self, op: str, tag: str, numel: int, itemsize: int, tensor: torch.Tensor | None = None,
               axis: str | tuple[str, ...] | None = None) -> None:
        for what, v in (("elements", numel), ("bytes", numel * itemsize), ("calls", 1)):
            getattr(self, what)[(op, tag)] += v
            self.by_axis[what][(op, tag, axis)] += v
        if self.on_call is not None:
            self.on_call(op, tag, tensor)

    def total(self, *, op: str | None = None, tag: str | None = None, what: str = "elements",
              axis: str | tuple[str, ...] | None = None) -> int:
        """Sum over records matching ``op``, ``tag`` and ``axis`` (None matches all)."""
        if axis is not None:
            return sum(v for (o, t, a), v in self.by_axis[what].items()
                       if (op is None or o == op) and (tag is None or t == tag) and a == axis)
        c = getattr(self, what)
        return sum(v for (o, t), v in c.items() if (op is None or o == op) and (tag is None or t == tag))

    def num_calls(self, *, op: str | None = None, tag: str | None = None,
                  axis: str | tuple[str, ...] | None = None) -> int:
        return self.total(op=op, tag=tag, what="calls", axis=axis)


_COUNTERS: list[CommCounter] = []


@contextlib.contextmanager
def count_comm(on_call: Callable[[str, str, torch.Tensor], None] | None = None) -> Iterator[CommCounter]:
    """Record every collective issued inside the block by an eager step.

    A compiled step issues the same collectives but records nothing: counting inside the traced
    autograd functions would be a side effect that breaks the graph. Count one eager step.

    Example:
        >>> with count_comm() as c:
        ...     state, _ = step(state, batch)
        >>> c.total(tag="grad")      # elements reduced for gradients
    """
    c = CommCounter(on_call=on_call)
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


def _record(op: str, tag: str, numel: int, itemsize: int, tensor: torch.Tensor, axis=None) -> None:
    if torch.compiler.is_compiling():
        return
    for c in _COUNTERS:
        c.record(op, tag, numel, itemsize, tensor, axis)


def _group_of(mesh: Mesh, axis: str | tuple[str, ...]) -> tuple["dist.ProcessGroup | None", int]:
    """``(process group, ranks)`` of one axis, or of a tuple of axes taken as one."""
    if isinstance(axis, str):
        return mesh.group(axis), mesh.size(axis)
    return mesh.group_over(axis), math.prod([mesh.size(a) for a in axis])


# torch 2.13 renamed these too; the old names warn there.
_c10d_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_c10d_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "max": dist.ReduceOp.MAX}


class CollectiveTimeout(RuntimeError):
    """A collective that did not complete within its group's timeout (some rank did not join)."""


_TIMED_OUT = re.compile(r"timed? ?out|timeout", re.IGNORECASE)


def _group_text(group, axis: str) -> str:
    """The group in words: its mesh axis, name, global ranks, backend and timeout."""
    text = f"mesh axis {axis!r} (process group {getattr(group, 'group_name', '?')}"
    try:
        text += f", global ranks {dist.get_process_group_ranks(group)}, {dist.get_backend(group)}"
        device = next(iter(group._device_types), torch.device("cpu"))  # noqa: SLF001 - for the message only
        text += f", timeout {group._get_backend(device).options._timeout.total_seconds():g} s"  # noqa: SLF001
    except Exception:  # noqa: BLE001 - whatever torch cannot say is left out of the message
        pass
    return text + ")"


@contextlib.contextmanager
def _named(op: str, tag: str, group, axis: str) -> Iterator[None]:
    """Raise a timeout inside the block as :class:`CollectiveTimeout` naming the collective."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, CollectiveTimeout) or not _TIMED_OUT.search(str(e)):
            raise
        raise CollectiveTimeout(
            f"{op} (tag {tag!r}) over {_group_text(group, axis)} timed out on rank "
            f"{dist.get_rank()}: a rank of the group did not join it in time ({e})"
        ) from e


def _eager() -> bool:
    # Under torch.compile the functional collectives are traced into the graph; eagerly we call
    # c10d into buffers we allocate, so each gathered buffer has one owner and a clear lifetime.
    return not torch.compiler.is_compiling()


def _op(op: str, group) -> tuple["dist.ReduceOp", bool]:
    """The c10d op for ``op``, and whether to divide by the group size afterwards.

    gloo has no AVG: there it is a SUM followed by a division.
    """
    if op not in _OPS:
        raise ValueError(f"reduce op must be one of {sorted(_OPS)}, got {op!r}")
    if op == "avg" and dist.get_backend(group) != "nccl":
        return dist.ReduceOp.SUM, True
    return _OPS[op], False


def all_gather(
    shard: torch.Tensor, mesh: Mesh, axis: str | tuple[str, ...] = "dp", *, tag: str = "param",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Concatenate every rank's 1-D ``shard`` along dim 0 (rank order).

    ``out`` (eager only) receives the result; ``shard`` may be this rank's slice of ``out``
    (an in-place gather, as after a stage-1/2 update).
    """
    group, n = _group_of(mesh, axis)
    if group is None:
        if out is not None and out.data_ptr() != shard.data_ptr():
            out.copy_(shard)
            return out
        return shard
    _record("all_gather", tag, shard.numel() * n, shard.element_size(), shard, axis)
    if _eager():
        if out is None:
            out = torch.empty(shard.numel() * n, dtype=shard.dtype, device=shard.device)
        with _named("all_gather", tag, group, axis):
            _c10d_all_gather(out, shard.contiguous(), group=group)
        return out
    res = fc.wait_tensor(_all_gather_single(shard.contiguous(), 0, group))
    if out is not None:
        out.copy_(res)
        return out
    return res


def reduce_scatter(
    full: torch.Tensor, mesh: Mesh, axis: str | tuple[str, ...] = "dp", *, op: str = "avg", tag: str = "grad"
) -> torch.Tensor:
    """Reduce ``full`` (1-D, divisible by the axis size) over ranks; return this rank's slice."""
    group, n = _group_of(mesh, axis)
    if group is None:
        return full
    if full.numel() % n:
        raise ValueError(f"reduce_scatter of {full.numel()} elements over {n} ranks: not divisible")
    _record("reduce_scatter", tag, full.numel(), full.element_size(), full, axis)
    if _eager():
        out = torch.empty(full.numel() // n, dtype=full.dtype, device=full.device)
        rop, divide = _op(op, group)
        with _named("reduce_scatter", tag, group, axis):
            _c10d_reduce_scatter(out, full.contiguous(), op=rop, group=group)
        return out.div_(n) if divide else out
    return fc.wait_tensor(_reduce_scatter_single(full.contiguous(), op, 0, group))


def all_reduce(x: torch.Tensor, mesh: Mesh, axis: str | tuple[str, ...] = "dp", *, op: str = "avg",
               tag: str = "grad") -> torch.Tensor:
    """Reduce ``x`` over the ranks of ``axis``; every rank gets the result (a new tensor)."""
    group, n = _group_of(mesh, axis)
    if group is None:
        return x
    _record("all_reduce", tag, 2 * x.numel(), x.element_size(), x, axis)
    if _eager():
        out = x.detach().clone().contiguous()
        rop, divide = _op(op, group)
        with _named("all_reduce", tag, group, axis):
            dist.all_reduce(out, op=rop, group=group)
        return out.div_(n) if divide else out
    return fc.wait_tensor(fc.all_reduce(x.contiguous(), op, group))


def all_to_all(x: torch.Tensor, mesh: Mesh, axis: str, *, tag: str = "sp") -> torch.Tensor:
    """Row ``i`` of ``x`` (dim 0, one row per rank of ``axis``) goes to rank ``i``; row ``i`` of the
    result came from rank ``i``. Its own inverse; counted as ``x.numel()`` elements.

    Example:
        >>> y = all_to_all(x, mesh, "sp")  # x: (sp, ...) -> y: (sp, ...), y[i] is rank i's x[me]
    """
    group = mesh.group(axis)
    if group is None:
        return x
    if x.shape[0] != mesh.size(axis):
        raise ValueError(f"all_to_all over {mesh.size(axis)} ranks of {axis!r} needs dim 0 of that size, got {tuple(x.shape)}")
    _record("all_to_all", tag, x.numel(), x.element_size(), x, axis)
    if _eager():
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        with _named("all_to_all", tag, group, axis):
            dist.all_to_all_single(out, x.contiguous(), group=group)
        return out
    return fc.wait_tensor(fc.all_to_all_single(x.contiguous(), None, None, group))


def broadcast(x: torch.Tensor, mesh: Mesh, axis: str | tuple[str, ...] = "dp", *, src: int = 0,
              tag: str = "init") -> torch.Tensor:
    """Rank ``src`` of ``axis``'s ``x`` on every rank of it, in place (eager only: for ``init``)."""
    group, _ = _group_of(mesh, axis)
    if group is None:
        return x
    _record("broadcast", tag, x.numel(), x.element_size(), x, axis)
    x = x.contiguous()
    with _named("broadcast", tag, group, axis):
        dist.broadcast(x, src=dist.get_global_rank(group, src), group=group)
    return x
