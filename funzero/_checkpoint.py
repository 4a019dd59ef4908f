"""Checkpoints in ``torch.distributed.checkpoint`` (DCP) format that reshard on load and check
every byte they read.

A checkpoint is a directory of steps::

    <dir>/LATEST                    the name of the newest complete step (replaced atomically)
    <dir>/step-<n>-<token>/         one checkpoint
        .metadata                   DCP's: every tensor's global shape and the chunks covering it
        __<rank>_0.distcp           DCP's: the chunks rank <rank> wrote
        funzero.json                ours, written last: a crc32 of every chunk, groups, ties

What DCP sees is a nested state dict of tensors in their *whole* (logical) shapes, whatever the
layout that wrote them: ``params.<leaf>``, ``master.<leaf>`` and ``opt_state.<tree path>.<leaf>``
for every per-group buffer of the state, and ``step``, ``scaler.<i>``, ``opt_state.<tree path>``
for the small tensors. A rank's part of a group's flat buffer is a flat range of each leaf it
overlaps; a flat range of a row-major tensor is a few boxes (a partial row, whole rows, a partial
row, recursively: :func:`flat_boxes`), and a box is what DCP calls a chunk. A leaf split over
tensor-parallel ranks is held as this rank's slice of the whole tensor (``shardspec.shard_of``):
each box of the slice is cut where the split dim passes from one section's slice to the next and
written at its offsets in the whole tensor. So a funzero checkpoint is an ordinary DCP checkpoint
of full-shaped tensors: ``dcp.load({"params": {name: tensor}}, checkpoint_id=step_dir)`` or
``format_utils.dcp_to_torch_save`` read it without funzero, and a state of any world size, stage
and tensor-parallel split loads it by asking, leaf by leaf, for the chunks that overlap what it
holds.

Each rank writes the part of every buffer that its shard range covers, whether the buffer is a
shard or replicated (stages 0-2 keep full parameters: each rank writes a different slice, so
the I/O is spread evenly). Small tensors are written by rank 0. Under hierarchical sharding the
ranks of the first replica write and the other replicas, which hold the same shards, write
nothing; under tensor parallelism every tp rank writes its slices of the split leaves and the
first tp rank the leaves every tp rank holds whole. On load every rank reads what it holds,
whatever wrote it.

``funzero.json`` records each chunk as ``[lo, hi, crc32]``, its flat range in the whole leaf,
where it is one (always, without tensor parallelism), else as ``[offsets, sizes, crc32]`` (rows
of a leaf split along dim 1, say, which cover a slice of its columns). Version 1 indexes (flat
ranges only) read as before.

Integrity (nothing is ever silently wrong):

- every chunk's crc32 is taken from the host copy before it is written, and checked against the
  bytes DCP decodes on load; ``funzero.json`` and DCP's metadata must agree on every chunk, and
  the chunks of a leaf must tile it exactly. A flipped byte, a shifted range, a truncated or
  missing file, an extra or missing leaf is a ``ValueError`` naming the file and the leaf.
- every rank reaches the same small agreement (one ``all_gather_object``) after each phase of a
  save or a load, on every path, exceptions included, so an error on one rank is an error on
  every rank, and no rank waits forever for one that gave up.
- ranks write into a fresh ``step-*`` directory; ``funzero.json`` is written after DCP's metadata,
  and ``LATEST`` moves (``os.replace`` of a small file) only after every rank has written, so a
  save that fails or is killed leaves the previous checkpoint as it was. The next save removes
  step directories that never got their ``funzero.json``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import uuid
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import optree
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from funzero._plan import Plan
from funzero._state import TrainState
from shardspec import Shard, is_sharded

__all__ = ["flat_boxes", "load_state", "save_state", "wait_saves"]

INDEX = "funzero.json"
FORMAT = "funzero-dcp"
VERSION = 2  # 2: a piece may be a box ([offsets, sizes, crc32]); leaves split over tp are stored whole
_READS = (1, 2)
_NAME = re.compile(r"step-\d+-[0-9a-f]{8}")
_PARTS = ("step", "params", "master", "opt_state", "scaler")

# Indirection a test replaces to make the disk fail on one rank.
_storage_writer = FileSystemWriter


# --- flat ranges as boxes ------------------------------------------------------------------


def flat_boxes(shape, lo: int, hi: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Elements ``[lo, hi)`` of a tensor of ``shape`` flattened row-major, as boxes.

    Each box is ``(offsets, sizes)``: a rectangular block of the tensor that is also one
    contiguous run of the flat range; the boxes are in order and cover the range exactly (at
    most ``2 * ndim - 1`` of them).

    Example:
        >>> flat_boxes((3, 4), 2, 11)   # the end of row 0, row 1, the start of row 2
        [((0, 2), (1, 2)), ((1, 0), (1, 4)), ((2, 0), (1, 3))]
    """
    shape = tuple(int(s) for s in shape)
    if not 0 <= lo <= hi <= math.prod(shape):
        raise ValueError(f"range [{lo}, {hi}) is outside a tensor of shape {shape}")
    return _boxes(shape, lo, hi)


def _boxes(shape: tuple[int, ...], lo: int, hi: int) -> list:
    if lo >= hi:
        return []
    if len(shape) <= 1:
        return [((lo,), (hi - lo,))] if shape else [((), ())]
    inner = math.prod(shape[1:])
    r0, c0 = divmod(lo, inner)
    r1, c1 = divmod(hi, inner)
    out: list = []

    def row(r, a, b):
        out.extend(((r, *o), (1, *s)) for o, s in _boxes(shape[1:], a, b))

    if r0 == r1:
        row(r0, c0, c1)
        return out
    if c0:
        row(r0, c0, inner)
        r0 += 1
    if r1 > r0:
        out.append(((r0,) + (0,) * (len(shape) - 1), (r1 - r0,) + shape[1:]))
    if c1:
        row(r1, 0, c1)
    return out


def _ravel(offsets, shape) -> int:
    """The flat index of element ``offsets`` of a row-major tensor of ``shape``."""
    i = 0
    for o, s in zip(offsets, shape):
        i = i * s + o
    return i


def overlap(a_offsets, a_sizes, b_offsets, b_sizes) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The box two boxes ``(offsets, sizes)`` share, or None where they share no element."""
    lo = [max(a, b) for a, b in zip(a_offsets, b_offsets)]
    hi = [min(a + m, b + n) for a, m, b, n in zip(a_offsets, a_sizes, b_offsets, b_sizes)]
    if any(z <= a for a, z in zip(lo, hi)):
        return None
    return tuple(lo), tuple(z - a for a, z in zip(lo, hi))


def _narrow(t: torch.Tensor, t_offsets, offsets, sizes) -> torch.Tensor:
    """The part of ``t`` (a box of a larger tensor, at ``t_offsets``) that is the box ``offsets``, ``sizes``."""
    for d, (o, base, n) in enumerate(zip(offsets, t_offsets, sizes)):
        t = t.narrow(d, o - base, n)
    return t


def copy_overlap(dst: torch.Tensor, dst_offsets, src: torch.Tensor, src_offsets) -> None:
    """Copy into ``dst`` the elements it shares with ``src``; both are boxes of one tensor, at
    their offsets in it."""
    box = overlap(dst_offsets, dst.shape, src_offsets, src.shape)
    if box is not None:
        _narrow(dst, dst_offsets, *box).copy_(_narrow(src, src_offsets, *box))


def _is_run(shape, offsets, sizes) -> bool:
    """Whether box ``offsets``, ``sizes`` of a tensor of ``shape`` is one run of its flat elements."""
    p = _ravel(offsets, shape)
    return flat_boxes(shape, p, p + math.prod(sizes)) == [(tuple(offsets), tuple(sizes))]


def _split_runs(spec: Shard, whole: int, rank: int, size: int, start: int, n: int) -> list[tuple[int, int, int]]:
    """Indices ``[start, start + n)`` of the split dim of rank ``rank``'s slice as runs of the whole
    dim (of ``whole`` elements): ``(index in the whole dim, index in the slice, length)``. The slice
    is the rank-th part of each section, concatenated (``shardspec.shard_of``)."""
    out, local, first = [], 0, 0
    for section in spec.sections or (whole,):
        w = section // size
        a, z = max(start, local), min(start + n, local + w)
        if a < z:
            out.append((first + rank * w + a - local, a, z - a))
        local, first = local + w, first + section
    return out


def crc32(t: torch.Tensor) -> int:
    """crc32 of a CPU tensor's bytes (row-major)."""
    t = t.detach().contiguous().reshape(-1)
    return zlib.crc32(t.view(torch.uint8).numpy()) if t.numel() else zlib.crc32(b"")


# --- the state as leaves -----------------------------------------------------------------


@dataclass(eq=False)
class _Leaf:
    """One tensor of the checkpoint, as this rank's state holds it.

    ``shape`` is the whole tensor's; this rank's buffer holds it as ``local``, which is ``shape``
    unless the leaf is split over tensor-parallel ranks (``split``: its spec there; ``tp``: this
    rank's ``(rank, size)`` on that axis). ``held`` / ``write``: ``[a, z)`` of the local tensor
    (flat) that this rank's buffer holds / that this rank writes; local element ``i`` is
    ``buffer.view(-1)[base + i]``.
    """

    fqn: str
    nest: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    buffer: torch.Tensor
    group: str | None
    held: tuple[int, int]
    write: tuple[int, int]
    base: int
    local: tuple[int, ...]
    split: Shard | None = None
    tp: tuple[int, int] = (0, 1)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def blocks(self, a: int, z: int) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        """Local elements ``[a, z)`` as boxes of the whole tensor: ``(offsets there, a view of the
        buffer)``. A box of the local tensor is one box of the whole, or, under a tp split with
        sections, one per section's slice it crosses."""
        flat = self.buffer.detach().view(-1)
        out = []
        for offsets, sizes in flat_boxes(self.local, a, z):
            p = self.base + _ravel(offsets, self.local)
            block = flat[p : p + math.prod(sizes)].view(sizes)
            if self.split is None:
                out.append((offsets, block))
                continue
            d = self.split.dim
            for at, local, n in _split_runs(self.split, self.shape[d], *self.tp, offsets[d], sizes[d]):
                out.append((offsets[:d] + (at,) + offsets[d + 1 :], block.narrow(d, local - offsets[d], n)))
        return out


def _held_range(t: torch.Tensor, layout, rank: int) -> tuple[int, int]:
    """The padded flat range of its group that buffer ``t`` holds on ``rank``."""
    if t.numel() == layout.padded:
        return 0, layout.padded
    if t.numel() == layout.shard_numel:
        return layout.shard_range(rank)
    raise ValueError(f"buffer of group {layout.name!r} has {t.numel()} elements: neither full nor a shard")


def _clip(lo: int, hi: int, slot) -> tuple[int, int]:
    a, z = max(lo, slot.offset) - slot.offset, min(hi, slot.offset + slot.numel) - slot.offset
    return (a, z) if a < z else (0, 0)


def _tensors(tree) -> list[tuple[tuple, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        return [((), tree)]
    paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace="funzero")
    return [(p, x) for p, x in zip(paths, leaves) if isinstance(x, torch.Tensor)]


def _leaves(state: TrainState, rank: int, writes: bool = True) -> list[_Leaf]:
    """Every tensor of the checkpoint with where this rank's state holds it (``rank``: on the
    shard axis) and what it writes (nothing unless ``writes``: a replica's copy)."""
    b = state.binding
    tp = b.tp if b.tp is not None and b.tp.size > 1 else None
    coords = (tp.rank, tp.size) if tp is not None else (0, 1)
    out = []
    for part in _PARTS:
        tree = getattr(state, part)
        if tree is None:
            continue
        for path, t in _tensors(tree):
            names = tuple(map(str, path))
            g = path[-1] if path and isinstance(path[-1], str) and path[-1] in b.layouts and t.dim() == 1 else None
            if g is None:
                nest = (part, ".".join(names)) if names else (part,)
                n = t.numel()
                mine = rank == 0 and writes and coords[0] == 0
                out.append(_Leaf(".".join(nest), nest, tuple(t.shape), t.dtype, t, None, (0, n),
                                 (0, n) if mine else (0, 0), 0, tuple(t.shape)))
                continue
            lay = b.layouts[g]
            lo, hi = _held_range(t, lay, rank)
            prefix = ".".join(names[:-1])
            for s in lay.slots:
                nest = (part, prefix, s.path) if prefix else (part, s.path)
                split = tp.specs.get(s.path) if tp is not None else None
                whole = tuple(tp.shapes[s.path]) if split is not None else s.shape
                # a leaf every tp rank holds whole is written by the first of them
                wlo, whi = lay.shard_range(rank) if writes and (split is not None or coords[0] == 0) else (0, 0)
                out.append(_Leaf(".".join(nest), nest, whole, t.dtype, t, g, _clip(lo, hi, s), _clip(wlo, whi, s),
                                 s.offset - lo, s.shape, split, coords))
    return out


def _check_replicated(state: TrainState) -> None:
    """A full-size optimizer-state buffer under a sharded optimizer spec is rank-local (stage 1's
    accumulated local gradients, mid-accumulation): no rank's slice stands for the others'."""
    b = state.binding
    if b.num_shards == 1 or not is_sharded(b.specs.opt_state):
        return
    for path, t in _tensors(state.opt_state):
        g = path[-1] if path and isinstance(path[-1], str) else None
        if g in b.layouts and t.dim() == 1 and t.numel() == b.layouts[g].padded and bool(t.any()):
            raise ValueError(
                f"opt_state leaf {'.'.join(map(str, path))!r} holds this rank's own accumulated gradients "
                "(a save in the middle of gradient accumulation at stage 1); save after an optimizer step"
            )


# --- save ----------------------------------------------------------------------------------


class _Pieces:
    """A leaf as DCP sees it on one rank: its global shape and the chunks this rank writes.

    Implements the ``__create_write_items__`` hook DCP's planner asks of sharded values (DTensor
    implements it too), so DCP records each chunk at its offsets in the full-shaped tensor.
    """

    def __init__(self, shape, dtype: torch.dtype, pieces: list[tuple[tuple[int, ...], torch.Tensor]]) -> None:
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.pieces = {tuple(o): t for o, t in pieces}

    def size(self) -> torch.Size:
        return self.shape

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        props = TensorProperties(dtype=self.dtype)
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(o)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(o), sizes=t.shape), properties=props, size=self.shape
                ),
            )
            for o, t in self.pieces.items()
        ]

    def piece(self, offsets) -> torch.Tensor:
        return self.pieces[tuple(offsets)]


class _SavePlanner(DefaultSavePlanner):
    """DCP's default save planner, finding each chunk's data in our :class:`_Pieces`."""

    def lookup_object(self, index: MetadataIndex) -> Any:
        return self.state_dict[index.fqn].piece(index.offset)


def _set(tree: dict, nest: tuple[str, ...], value) -> None:
    for k in nest[:-1]:
        tree = tree.setdefault(k, {})
    tree[nest[-1]] = value


def _record(shape, offsets, sizes, crc: int) -> list:
    """A piece as the index records it: ``[lo, hi, crc32]`` where it is one flat run of the leaf,
    else ``[offsets, sizes, crc32]``."""
    if _is_run(shape, offsets, sizes):
        p = _ravel(offsets, shape)
        return [p, p + math.prod(sizes), crc]
    return [list(offsets), list(sizes), crc]


def _first_element(shape, piece: list) -> int:
    """Where a piece record starts in the flat leaf (the order of the index's pieces)."""
    return piece[0] if isinstance(piece[0], int) else _ravel(piece[0], shape)


def _stage(leaves: list[_Leaf], first: bool) -> tuple[dict, dict]:
    """Host copies of the chunks this rank writes (a nested DCP state dict of :class:`_Pieces`),
    and their records for the index (with each chunk's crc32); ``first``: the rank that writes
    the empty leaves."""
    sd: dict = {}
    records: dict = {}
    for leaf in leaves:
        a, z = leaf.write
        empty = leaf.numel == 0 and first
        if z <= a and not empty:
            continue
        pieces, rec = [], []
        if empty:
            pieces.append(((0,) * len(leaf.shape), torch.empty(leaf.shape, dtype=leaf.dtype)))
            rec.append([0, 0, crc32(pieces[-1][1])])
        for offsets, view in leaf.blocks(a, z):
            piece = torch.empty(view.shape, dtype=leaf.dtype)
            piece.copy_(view)
            pieces.append((offsets, piece))
            rec.append(_record(leaf.shape, offsets, tuple(piece.shape), crc32(piece)))
        _set(sd, leaf.nest, _Pieces(leaf.shape, leaf.dtype, pieces))
        records[leaf.fqn] = dict(nest=list(leaf.nest), group=leaf.group, shape=list(leaf.shape),
                                 dtype=str(leaf.dtype).removeprefix("torch."), pieces=rec)
    return sd, records


def _world(plan: Plan, b) -> tuple[int, Any]:
    """``(rank on the shard axis, the group)``: a save or load is a collective over every
    data-parallel rank, replicas included, and every tensor-parallel rank (each holds its own
    slices of the split leaves)."""
    axes = plan.data_axes
    if b.tp is not None and b.tp.size > 1:
        axes = (*axes, b.tp.axis)
    return plan.rank, plan.mesh.group_over(axes)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _own_failure(e: BaseException, group) -> BaseException | None:
    """This rank's own error inside a ``CheckpointException`` (DCP raises one on every rank when
    any rank fails; it is a ``BaseException``), or None when only other ranks failed."""
    failures = getattr(e, "failures", None)
    if not isinstance(e, CheckpointException) or not failures:
        return e
    me = 0 if group is None else dist.get_rank(group)
    return failures[me][0] if me in failures else None


def _agree(group, error: BaseException | None, payload: Any = None) -> list[tuple[str | None, Any]]:
    """Every rank's ``(error text or None, payload)``: the one small collective each phase ends with."""
    mine = (None if error is None else _describe(error), payload)
    if group is None:
        return [mine]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, mine, group=group)
    return out


def _gather_to_first(group, obj: Any) -> list | None:
    """Every rank's ``obj`` on the group's first rank (None elsewhere)."""
    if group is None:
        return [obj]
    first = dist.get_global_rank(group, 0)
    out = [None] * dist.get_world_size(group) if dist.get_rank() == first else None
    dist.gather_object(obj, out, dst=first, group=group)
    return out


def _check_votes(votes, error: BaseException | None, what: str, cls: type[Exception], hint: str = "") -> None:
    """Raise on every rank if any rank failed: this rank's own error, or one naming the rank that failed."""
    failed = [(r, msg) for r, (msg, _) in enumerate(votes) if msg is not None]
    if not failed:
        return
    if error is not None:
        raise error
    r, msg = failed[0]
    more = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
    raise cls(f"{what} failed on rank {r}{more}: {msg}{hint}")


class _quiet(warnings.catch_warnings):
    """DCP warns on every call made without a process group (one process, nothing to coordinate)."""

    def __enter__(self):
        out = super().__enter__()
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        return out


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@dataclass
class _Job:
    """What the writing phase of a save needs (run inline, or in a thread for ``async_save``)."""

    sd: dict
    records: dict
    meta: dict
    directory: str
    name: str
    keep: int
    rank: int
    group: Any
    thread: threading.Thread | None = None
    error: BaseException | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.name)

    def run(self) -> None:
        """DCP writes every rank's chunks; rank 0 writes the index and moves ``LATEST``. Each
        step ends in an agreement, so a failure anywhere raises everywhere."""
        error = None
        try:
            with _quiet():
                dcp.save(self.sd, storage_writer=_storage_writer(self.path), planner=_SavePlanner(),
                         process_group=self.group, no_dist=self.group is None)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - every rank must reach the agreement below
            error = _own_failure(e, self.group)
        self.sd = {}  # the host copies are on disk (or useless): let them go
        self._fail_if(_agree(self.group, error), error)
        everyone = _gather_to_first(self.group, self.records)
        error = None
        if self.rank == 0:
            try:
                entries = {}
                for recs in everyone:
                    for fqn, rec in recs.items():
                        if fqn in entries:
                            entries[fqn]["pieces"] += rec["pieces"]
                        else:
                            entries[fqn] = rec
                for rec in entries.values():
                    rec["pieces"].sort(key=lambda p, shape=rec["shape"]: _first_element(shape, p))
                _write_atomic(os.path.join(self.path, INDEX), json.dumps(dict(self.meta, entries=entries)))
                _write_atomic(os.path.join(self.directory, "LATEST"), self.name)
            except Exception as e:  # noqa: BLE001
                error = e
        self._fail_if(_agree(self.group, error), error)
        if self.rank == 0:
            try:
                _prune(self.directory, self.keep, self.name)
            except OSError as e:
                warnings.warn(f"checkpoint saved, but pruning old steps in {self.directory!r} failed: {e}", stacklevel=2)

    def _fail_if(self, votes, error) -> None:
        if any(msg is not None for msg, _ in votes):
            if self.rank == 0:
                shutil.rmtree(self.path, ignore_errors=True)
            if self.group is not None:
                dist.barrier(group=self.group)  # gone before any rank returns
        _check_votes(votes, error, "checkpoint save", RuntimeError, "; the previous checkpoint is intact")

    def run_captured(self) -> None:
        try:
            self.run()
        except BaseException as e:  # noqa: BLE001 - reported by wait_saves
            self.error = e


_PENDING: list[_Job] = []
_ASYNC_GROUPS: dict[tuple[int, ...], Any] = {}


def wait_saves() -> None:
    """Wait for the checkpoint saves started with ``async_save=True`` that are still writing.

    ``save_state`` and ``load_state`` call it first. Call it on every rank.

    Raises:
        RuntimeError (or the failing rank's own error): a save in flight failed; it did so on
            every rank, and the previous checkpoint is intact.
    """
    while _PENDING:
        job = _PENDING.pop(0)
        if job.thread is not None:
            job.thread.join()
        if job.error is not None:
            raise job.error


def _async_group(group):
    """A process group of the same ranks for background saves: their collectives must never
    interleave with the training step's on the main group. Made once, on every rank."""
    if group is None:
        return None
    ranks = tuple(dist.get_process_group_ranks(group))
    if ranks not in _ASYNC_GROUPS:
        _ASYNC_GROUPS[ranks] = dist.new_group(list(ranks), backend="gloo")
    return _ASYNC_GROUPS[ranks]


def save_state(state: TrainState, plan: Plan, directory: str, *, keep: int = 2, async_save: bool = False) -> str:
    """Write ``state`` as a new checkpoint step under ``directory``; a collective over ``plan``'s ranks
    (and the model's tensor-parallel ranks).

    Each rank writes its own pieces of the whole tensors (``torch.distributed.checkpoint``); the
    step becomes the latest only once every rank has written. See the module docstring for the
    format.

    Args:
        state: the state to save (not modified).
        plan: the plan it was made with (its mesh names the ranks that write).
        directory: the checkpoint directory (created if needed).
        keep: complete steps to keep (>= 1); older ones, and steps a failed or killed save left
            without an index, are deleted once the new one is in place.
        async_save: copy the pieces to host memory, then write them in a background thread and
            return; the state may change right away. The next ``save_state``, ``load_state`` or
            :func:`wait_saves` waits for the write (and raises if it failed).

    Returns:
        the path of the new step directory (complete once the call returns, or once the
        background write has finished).

    Raises:
        RuntimeError, OSError, ValueError: the save failed on some rank; it raises on every rank
            and the previous checkpoint stays the latest.
    """
    state.check_alive("save_state")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep=}")
    wait_saves()
    state.binding.placement.sync()  # a delayed host update still running would be saved half-done
    b = state.binding
    rank, group = _world(plan, b)
    me = 0 if group is None else dist.get_rank(group)
    error, staged = None, None
    try:
        _check_replicated(state)
        staged = _stage(_leaves(state, rank, writes=plan.replica == 0), me == 0)
        os.makedirs(directory, exist_ok=True)
    except Exception as e:  # noqa: BLE001 - every rank must reach the agreement below
        error = e
    name = f"step-{int(state.step)}-{uuid.uuid4().hex[:8]}"
    votes = _agree(group, error, name)
    _check_votes(votes, error, "checkpoint save", RuntimeError, "; the previous checkpoint is intact")
    meta = dict(
        format=FORMAT, version=VERSION, step=int(state.step), stage=b.stage, num_shards=b.num_shards,
        num_replicas=b.num_replicas,
        param_dtype=str(b.precision.param_dtype).removeprefix("torch."),
        groups={g: dict(numel=lay.numel, leaves=list(lay.paths)) for g, lay in b.layouts.items()},
        aliases={p: list(names) for p, names in b.aliases.items()},
        tensor_parallel=dict(axis=b.tp.axis, size=b.tp.size) if b.tp is not None else None,  # of the writer
    )
    job = _Job(staged[0], staged[1], meta, directory, votes[0][1], keep, me, group)
    del staged
    if not async_save:
        job.run()
        return job.path
    job.group = _async_group(group)
    job.thread = threading.Thread(target=job.run_captured, name="funzero-checkpoint", daemon=False)
    _PENDING.append(job)
    job.thread.start()
    return job.path


def _prune(directory: str, keep: int, latest: str) -> None:
    """Remove step directories without an index (a save that failed or was killed), and complete
    ones beyond the newest ``keep`` (``latest`` is always kept)."""
    complete = []
    for d in os.listdir(directory):
        full = os.path.join(directory, d)
        if d == latest or not _NAME.fullmatch(d) or not os.path.isdir(full):
            continue
        if os.path.isfile(os.path.join(full, INDEX)):
            complete.append(d)
        elif not os.path.isfile(os.path.join(full, "index.json")):  # leave an older funzero's checkpoints
            shutil.rmtree(full, ignore_errors=True)
    complete.sort(key=lambda d: os.path.getmtime(os.path.join(directory, d, INDEX)))
    for d in complete[: max(0, len(complete) - (keep - 1))]:
        shutil.rmtree(os.path.join(directory, d), ignore_errors=True)


# --- reading a checkpoint ------------------------------------------------------------------


def latest_step(directory: str) -> str:
    """The path of the step ``directory/LATEST`` names.

    Raises:
        ValueError: no ``LATEST``, one that holds no step name (garbage, a null byte), or one
            naming a step that is not complete there.
    """
    if not os.path.isdir(directory):
        raise ValueError(f"no complete checkpoint in {directory!r} (no such directory)")
    file = os.path.join(directory, "LATEST")
    if not os.path.isfile(file):
        raise ValueError(f"no complete checkpoint in {directory!r} (no LATEST file)")
    with open(file, "rb") as f:
        raw = f.read(257)
    try:
        name = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not _NAME.fullmatch(name):
        raise ValueError(f"{file!r} holds {raw[:80]!r}, not the name of a checkpoint step (step-<n>-<token>)")
    path = os.path.join(directory, name)
    if not os.path.isfile(os.path.join(path, INDEX)):
        old = os.path.isfile(os.path.join(path, "index.json"))
        why = "was written by an older funzero (index.json), which this one does not read" if old else (
            "does not exist or is not complete")
        raise ValueError(f"{file!r} names step {name!r}, which {why}")
    return path


def read_index(path: str) -> dict:
    """A step's ``funzero.json``, checked for form."""
    file = os.path.join(path, INDEX)
    try:
        with open(file) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path!r} has no {INDEX} (an incomplete save)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint index {file!r} is unreadable: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("entries"), dict):
        raise ValueError(f"checkpoint index {file!r} is not a {FORMAT} index")
    if index.get("version") not in _READS:
        raise ValueError(f"checkpoint index {file!r} has version {index.get('version')!r}; this funzero reads "
                         f"versions {', '.join(map(str, _READS))}")
    return index


def read_metadata(path: str) -> Metadata:
    """DCP's metadata of a step."""
    file = os.path.join(path, ".metadata")
    try:
        return FileSystemReader(path).read_metadata()
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path!r} has no DCP metadata file {file!r}") from None
    except Exception as e:  # noqa: BLE001 - an unpickling error of a damaged file can be anything
        raise ValueError(f"checkpoint metadata {file!r} is unreadable: {_describe(e)}") from None


@dataclass
class Piece:
    """One chunk of a leaf in a checkpoint: the box ``offsets``, ``sizes`` of the whole leaf."""

    fqn: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    crc: int
    dtype: torch.dtype
    file: str  # absolute path of the DCP file holding it
    at: int  # its byte offset and length there
    length: int
    shape: tuple[int, ...]  # the whole leaf's

    @property
    def what(self) -> str:
        """The piece in words: its flat range where it is one run of the leaf, else its box."""
        if _is_run(self.shape, self.offsets, self.sizes):
            p = _ravel(self.offsets, self.shape)
            return f"elements [{p}, {p + math.prod(self.sizes)})"
        return f"the block at {self.offsets} of size {self.sizes}"


_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _flat_tiling(where: str, shape: tuple[int, ...], pieces: list) -> list[tuple]:
    """Flat-range pieces ``[lo, hi, crc]`` that tile the leaf in order, as ``(offsets, sizes, crc,
    words)``."""
    numel = math.prod(shape)
    out, pos = [], 0
    for lo, hi, crc in sorted(tuple(p) for p in pieces):
        if numel == 0:
            break
        if lo != pos or hi <= lo or hi > numel:
            raise ValueError(f"{where}: its pieces do not tile its {numel} elements ({INDEX} has a piece "
                             f"[{lo}, {hi}) where element {pos} should start one)")
        boxes = flat_boxes(shape, lo, hi)
        if len(boxes) != 1:
            raise ValueError(f"{where}: the piece [{lo}, {hi}) of {INDEX} is not a chunk DCP's metadata has")
        out.append((*boxes[0], crc, f"[{lo}, {hi})"))
        pos = hi
    if pos != numel:
        raise ValueError(f"{where}: its pieces cover elements [0, {pos}) of {numel}")
    return out


def _box_tiling(where: str, shape: tuple[int, ...], pieces: list) -> list[tuple]:
    """Pieces, some of them boxes ``[offsets, sizes, crc]``, that tile the leaf: each inside it,
    no two sharing an element, together as many elements as it has. As ``(offsets, sizes, crc,
    words)`` in order of their offsets."""
    numel = math.prod(shape)
    out = []
    for p in pieces:
        if _is_int(p[0]):
            lo, hi, crc = p
            boxes = flat_boxes(shape, lo, hi) if 0 <= lo < hi <= numel else []
            if len(boxes) != 1:
                raise ValueError(f"{where}: the piece [{lo}, {hi}) of {INDEX} is not one box of its shape {shape}")
            out.append((*boxes[0], crc, f"[{lo}, {hi})"))
            continue
        offsets, sizes, crc = tuple(p[0]), tuple(p[1]), p[2]
        if (len(offsets) != len(shape) or len(sizes) != len(shape) or not shape
                or not all(map(_is_int, offsets + sizes))
                or any(o < 0 or n < 1 or o + n > d for o, n, d in zip(offsets, sizes, shape))):
            raise ValueError(f"{where}: the piece at {offsets} of size {sizes} in {INDEX} is not a box of its "
                             f"shape {shape}")
        out.append((offsets, sizes, crc, f"at {offsets} of size {sizes}"))
    out.sort(key=lambda q: q[0])
    active: list[tuple] = []  # pieces whose dim-0 range reaches the current one's start
    for q in out:
        active = [a for a in active if a[0][0] + a[1][0] > q[0][0]]
        for a in active:
            if overlap(a[0], a[1], q[0], q[1]) is not None:
                raise ValueError(f"{where}: its pieces {a[3]} and {q[3]} in {INDEX} overlap")
        active.append(q)
    covered = sum(math.prod(q[1]) for q in out)
    if covered != numel:
        raise ValueError(f"{where}: its pieces cover {covered} of its {numel} elements")
    return out


def leaf_pieces(path: str, fqn: str, rec: dict, md: Metadata) -> list[Piece]:
    """The chunks of leaf ``fqn`` with where they are stored, after checking that the index and
    DCP's metadata agree on them and that they tile the leaf exactly.

    Raises:
        ValueError: naming the leaf (and the file) where they do not.
    """
    where = f"checkpoint {path!r}: leaf {fqn!r}"
    tmd = md.state_dict_metadata.get(fqn)
    if not isinstance(tmd, TensorStorageMetadata):
        raise ValueError(f"{where} is in {INDEX} but not a tensor in DCP's metadata")
    shape = tuple(rec["shape"])
    if tuple(tmd.size) != shape:
        raise ValueError(f"{where} has shape {shape} in {INDEX} but {tuple(tmd.size)} in DCP's metadata")
    dtype = _DTYPES.get(rec.get("dtype"))
    if dtype is None or tmd.properties.dtype != dtype:
        raise ValueError(f"{where} has dtype {rec.get('dtype')!r} in {INDEX} but {tmd.properties.dtype} in DCP's metadata")
    pieces = rec["pieces"]
    if not all(isinstance(p, list) and len(p) == 3 and _is_int(p[2]) and (
            all(map(_is_int, p[:2])) or all(isinstance(x, list) for x in p[:2])) for p in pieces):
        raise ValueError(f"{where}: {INDEX} has a piece that is neither [lo, hi, crc32] nor [offsets, sizes, crc32]")
    flat = all(_is_int(p[0]) for p in pieces)
    tiles = _flat_tiling(where, shape, pieces) if flat else _box_tiling(where, shape, pieces)
    chunks = {(tuple(c.offsets), tuple(c.sizes)) for c in tmd.chunks}
    out = []
    for offsets, sizes, crc, words in tiles:
        if (offsets, sizes) not in chunks:
            raise ValueError(f"{where}: the piece {words} of {INDEX} is not a chunk DCP's metadata has")
        info = md.storage_data.get(MetadataIndex(fqn, torch.Size(offsets)))
        if info is None:
            raise ValueError(f"{where}: DCP's metadata does not say where its chunk at {offsets} is stored")
        out.append(Piece(fqn, offsets, sizes, int(crc), dtype, os.path.join(path, info.relative_path), info.offset,
                         info.length, shape))
    if math.prod(shape) and len(chunks) != len(out):
        raise ValueError(f"{where}: DCP's metadata has {len(chunks)} chunks, {INDEX} {len(out)} pieces")
    return out


def check_files(pieces: list[Piece]) -> None:
    """Every piece's file exists and is long enough (truncation is named before any read)."""
    sizes: dict[str, int] = {}
    for p in pieces:
        if p.file not in sizes:
            try:
                sizes[p.file] = os.path.getsize(p.file)
            except FileNotFoundError:
                raise ValueError(f"checkpoint file {p.file!r} is missing (it holds leaf {p.fqn!r}, {p.what})") from None
        if sizes[p.file] < p.at + p.length:
            raise ValueError(f"checkpoint file {p.file!r} is truncated: {sizes[p.file]} bytes, but leaf {p.fqn!r} "
                             f"({p.what}) is stored at bytes [{p.at}, {p.at + p.length})")


class PieceReader(LoadPlanner):
    """A DCP load planner that reads whole chunks, checks each one's crc32, and hands it to
    ``sink(piece, tensor)`` (which copies what it needs out of it).

    Whole chunks, because a checksum covers a whole chunk (DCP decodes the whole chunk anyway to
    cut a part of it). Each is read into a temporary of its own size that is dropped as soon as
    it has been checked and used. Errors are collected in ``errors`` rather than raised inside
    DCP, so that every rank finishes its reads and reaches the agreement.
    """

    def __init__(self, pieces: list[Piece], sink, group=None) -> None:
        self.group = group
        self.pieces = {(p.fqn, p.offsets): p for p in pieces}
        self.sink = sink
        self.errors: list[str] = []
        self.done: set[tuple[str, tuple]] = set()

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        pass

    def create_local_plan(self) -> LoadPlan:
        items = []
        for p in self.pieces.values():
            zeros = torch.Size([0] * len(p.offsets))
            index = MetadataIndex(p.fqn, torch.Size(p.offsets))
            items.append(ReadItem(type=LoadItemType.TENSOR, dest_index=index, dest_offsets=zeros, storage_index=index,
                                  storage_offsets=zeros, lengths=torch.Size(p.sizes)))
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise ValueError(f"checkpoint entry {read_item.dest_index.fqn!r} is bytes, not a tensor")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        p = self.pieces[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        return torch.empty(p.sizes, dtype=p.dtype)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        key = (read_item.dest_index.fqn, tuple(read_item.dest_index.offset))
        p = self.pieces[key]
        self.done.add(key)
        got = crc32(tensor)
        if got != p.crc:
            self.errors.append(f"checkpoint file {p.file!r} is corrupted: the piece of leaf {p.fqn!r} with "
                               f"{p.what} has crc32 {got:08x}, {INDEX} recorded {p.crc:08x}")
            return
        with torch.no_grad():
            self.sink(p, tensor)

    def explain(self, e: BaseException) -> BaseException | None:
        """This rank's share of a DCP read failure, naming the piece it was reading; None when this
        rank's reads all finished (the failure was another rank's)."""
        left = [p for k, p in self.pieces.items() if k not in self.done]
        if not left:
            return None
        # DCP reads file by file, in the order the plan first names each file.
        order = list(dict.fromkeys(p.file for p in self.pieces.values()))
        p = min(left, key=lambda q: (order.index(q.file), list(self.pieces).index((q.fqn, q.offsets))))
        inner = _own_failure(e, self.group) or e
        return ValueError(f"checkpoint file {p.file!r} could not be read at the piece of leaf {p.fqn!r} "
                          f"({p.what}): {_describe(inner)[:500]}")

    def error(self) -> ValueError | None:
        if not self.errors:
            return None
        more = f" (and {len(self.errors) - 1} more pieces)" if len(self.errors) > 1 else ""
        return ValueError(self.errors[0] + more)


def read_pieces(path: str, pieces: list[Piece], sink, group=None, *, metadata: Metadata | None = None) -> ValueError | None:
    """Read ``pieces`` of step ``path`` and check each; returns this rank's error (not raised, so
    that callers can agree first).

    With ``metadata`` (already read), the reads are this process's alone: DCP's storage reader
    is driven directly, without ``dcp.load``'s collectives (a :class:`WeightSource` reading one
    range). Otherwise it is ``dcp.load``, a collective over ``group`` (local when None).
    """
    planner = PieceReader(pieces, sink, group)
    try:
        if metadata is not None:
            storage = FileSystemReader(path)
            storage.set_up_storage_reader(metadata, True)
            planner.set_up_planner({}, metadata, True)
            storage.read_data(storage.prepare_local_plan(planner.create_local_plan()), planner).wait()
        else:
            with _quiet():
                dcp.load({}, storage_reader=FileSystemReader(path), planner=planner, process_group=group,
                         no_dist=group is None)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - turned into an error naming the piece
        explained = planner.explain(e)
        if explained is not None:
            return explained
    return planner.error()


# --- load ----------------------------------------------------------------------------------


def _mismatch(path: str, missing: list[_Leaf], extra: list[tuple[str, dict]]) -> str:
    parts = []
    for what, items in (("the state does not have", [(f, r.get("group")) for f, r in extra]),
                        ("the checkpoint does not have", [(lf.fqn, lf.group) for lf in missing])):
        by_group: dict = {}
        for fqn, g in items:
            by_group.setdefault(g, []).append(fqn)
        for g, fqns in by_group.items():
            who = f"group {g!r}" if g is not None else "small tensors"
            parts.append(f"{who}: {len(fqns)} leaves {what} (e.g. {fqns[0]!r})")
    return f"checkpoint {path!r} does not match the state: " + "; ".join(parts)


def _copy_into(blocks: list[tuple[tuple[int, ...], torch.Tensor]]):
    """A sink that copies what a piece shares with each of ``blocks`` (a leaf's held boxes) into it."""
    def sink(p: Piece, t: torch.Tensor) -> None:
        for offsets, view in blocks:
            copy_overlap(view, offsets, t, p.offsets)

    return sink


def _plan_load(state: TrainState, rank: int, path: str, strict: bool) -> tuple[list[Piece], dict, list[str]]:
    index = read_index(path)
    md = read_metadata(path)
    entries = index["entries"]
    leaves = _leaves(state, rank)
    mine = {lf.fqn for lf in leaves}
    missing = [lf for lf in leaves if lf.fqn not in entries]
    extra = [(f, r) for f, r in entries.items() if f not in mine]
    skipped = []
    if missing or extra:
        message = _mismatch(path, missing, extra)
        if strict:
            raise ValueError(message + " (a different model, optimizer or precision; strict=False loads the leaves "
                                       "both have)")
        skipped = [lf.fqn for lf in missing] + [f for f, _ in extra]
    reads, sinks = [], {}
    for leaf in leaves:
        rec = entries.get(leaf.fqn)
        if rec is None:
            continue
        if tuple(rec["shape"]) != leaf.shape:
            split = "" if leaf.split is None else (
                f" (split over {leaf.tp[1]} tensor-parallel ranks, {leaf.local} on each)")
            raise ValueError(f"checkpoint {path!r}: leaf {leaf.fqn!r} has shape {tuple(rec['shape'])}, "
                             f"the state's has shape {leaf.shape}{split}")
        blocks = leaf.blocks(*leaf.held)
        for p in leaf_pieces(path, leaf.fqn, rec, md):
            mine = [(o, v) for o, v in blocks if overlap(o, v.shape, p.offsets, p.sizes) is not None]
            if mine:
                reads.append(p)
                sinks[(p.fqn, p.offsets)] = _copy_into(mine)
    check_files(reads)
    return reads, sinks, skipped


def load_state(state: TrainState, plan: Plan, directory: str, *, strict: bool = True) -> TrainState:
    """Fill ``state`` (made by ``funzero.init`` for any stage, world size and tensor-parallel split)
    from the latest checkpoint.

    A collective over ``plan``'s ranks (and the model's tensor-parallel ranks); each rank reads the
    chunks that overlap what it holds, and checks each chunk's crc32.

    Args:
        state: a state with the target layout; its buffers are overwritten in place.
        plan: the plan ``state`` was made with.
        directory: a directory written by :func:`save_state`.
        strict: every leaf of the state must be in the checkpoint and every leaf of the
            checkpoint in the state. ``False`` loads the leaves both have, leaves the others as
            they are, and warns naming what it skipped.

    Returns:
        ``state``, filled. After an error its contents are unspecified.

    Raises:
        ValueError: on every rank, naming the file, leaf or group: no complete checkpoint or a
            malformed ``LATEST``; leaves or groups that differ (strict), or shapes that differ;
            a piece whose checksum, range or file does not match what the index recorded.
    """
    wait_saves()
    state.binding.placement.sync()  # a host update still running would overwrite what is loaded
    rank, group = _world(plan, state.binding)
    error, reads, sinks, skipped, path = None, [], {}, [], None
    try:
        path = latest_step(directory)
        reads, sinks, skipped = _plan_load(state, rank, path, strict)
    except Exception as e:  # noqa: BLE001 - every rank must reach the agreement below
        error = e
    _check_votes(_agree(group, error), error, "checkpoint load", ValueError)
    error = read_pieces(path, reads, lambda p, t: sinks[(p.fqn, p.offsets)](p, t), group)
    _check_votes(_agree(group, error), error, "checkpoint load", ValueError)
    if skipped:
        shown = ", ".join(repr(s) for s in skipped[:8]) + (f" and {len(skipped) - 8} more" if len(skipped) > 8 else "")
        warnings.warn(f"load_state(strict=False) skipped {len(skipped)} leaves of {path!r}: {shown}", stacklevel=2)
    return state
