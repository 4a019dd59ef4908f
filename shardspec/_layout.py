"""Flat layouts: a group of leaves packed into one padded buffer that splits into equal shards.

A layout is pure metadata, built once at plan time from shapes alone (so it also serves the
memory model for models that are never allocated). Packing copies the leaves once; unpacking
returns views into the buffer through one ``split``, so autograd turns the leaves' gradients
into one flat gradient with a single ``cat`` instead of one zero-filled buffer per leaf.

::

    buffer  | leaf0 |pad| leaf1 |pad| ... | leafK |  tail padding   |   numel = padded
    shards  |   rank 0   |   rank 1   |   ...   |   rank N-1  |        each padded // N

Each leaf starts at a multiple of ``leaf_align`` elements (aligned vector loads in kernels and
GEMMs); the total is rounded up to a multiple of ``num_shards * shard_align`` so every shard has
the same size and starts aligned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["FlatLayout", "LeafSlot", "build_layouts"]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class LeafSlot:
    """Where one leaf lives in its group's flat buffer."""

    path: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class FlatLayout:
    """One group's buffer: slots for its leaves, padded to ``num_shards`` equal shards.

    Attributes:
        name: the group.
        dtype: element type of the packed buffer.
        slots: leaves in buffer order.
        numel: elements the leaves occupy, without padding.
        padded: elements of the whole buffer (a multiple of ``num_shards * shard_align``).
        num_shards: number of ranks the buffer is split over.
    """

    name: str
    dtype: torch.dtype
    slots: tuple[LeafSlot, ...]
    numel: int
    padded: int
    num_shards: int

    @staticmethod
    def from_shapes(
        name: str,
        shapes: Mapping[str, Sequence[int]] | Sequence[tuple[str, Sequence[int]]],
        *,
        dtype: torch.dtype = torch.float32,
        num_shards: int = 1,
        leaf_align: int = 16,
        shard_align: int = 64,
    ) -> "FlatLayout":
        """Lay out leaves given only their shapes.

        Raises:
            ValueError: a bad ``num_shards``/alignment, or an empty group.
        """
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards=}")
        if leaf_align < 1 or shard_align < 1:
            raise ValueError(f"alignments must be >= 1, got {leaf_align=}, {shard_align=}")
        items = list(shapes.items()) if isinstance(shapes, Mapping) else list(shapes)
        if not items:
            raise ValueError(f"group {name!r} has no leaves")
        slots, offset = [], 0
        for path, shape in items:
            shape = tuple(int(s) for s in shape)
            n = math.prod(shape)
            offset = _round_up(offset, leaf_align)
            slots.append(LeafSlot(path, shape, offset, n))
            offset += n
        padded = max(_round_up(offset, num_shards * shard_align), num_shards * shard_align)
        return FlatLayout(name, dtype, tuple(slots), offset, padded, num_shards)

    # --- sizes -----------------------------------------------------------------------------
    @property
    def shard_numel(self) -> int:
        return self.padded // self.num_shards

    @property
    def padding(self) -> int:
        """Elements in the buffer that belong to no leaf (alignment gaps and tail)."""
        return self.padded - sum(s.numel for s in self.slots)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(s.path for s in self.slots)

    def shard_range(self, rank: int) -> tuple[int, int]:
        """``[start, stop)`` of ``rank``'s shard in the flat buffer."""
        if not 0 <= rank < self.num_shards:
            raise ValueError(f"rank {rank} out of range for {self.num_shards} shards of {self.name!r}")
        s = self.shard_numel
        return rank * s, (rank + 1) * s

    def leaf_ranges(self, rank: int) -> list[tuple[LeafSlot, int, int]]:
        """Leaves overlapping ``rank``'s shard: ``(slot, start, stop)`` in leaf-flat coordinates."""
        lo, hi = self.shard_range(rank)
        out = []
        for s in self.slots:
            a, b = max(lo, s.offset), min(hi, s.offset + s.numel)
            if a < b:
                out.append((s, a - s.offset, b - s.offset))
        return out

    # --- data ------------------------------------------------------------------------------
    def _split_sizes(self) -> list[int]:
        # Alternating [gap, leaf, gap, leaf, ..., tail]; gaps may be 0.
        sizes, pos = [], 0
        for s in self.slots:
            sizes += [s.offset - pos, s.numel]
            pos = s.offset + s.numel
        sizes.append(self.padded - pos)
        return sizes

    def pack(
        self,
        leaves: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
        *,
        device: torch.device | str | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Copy the leaves into a new zero-padded flat buffer of ``self.dtype``.

        Raises:
            ValueError: a leaf is missing or has the wrong shape (named by path).
        """
        if isinstance(leaves, Mapping):
            missing = [s.path for s in self.slots if s.path not in leaves]
            if missing:
                raise ValueError(f"group {self.name!r}: leaf {missing[0]!r} is missing")
            tensors = [leaves[s.path] for s in self.slots]
        else:
            tensors = list(leaves)
            if len(tensors) != len(self.slots):
                raise ValueError(
                    f"group {self.name!r} has {len(self.slots)} leaves, got {len(tensors)} tensors"
                )
        if device is None:
            device = tensors[0].device
        if out is None:
            out = torch.zeros(self.padded, dtype=self.dtype, device=device)
        elif out.shape != (self.padded,):
            raise ValueError(f"group {self.name!r}: out has shape {tuple(out.shape)}, want ({self.padded},)")
        else:
            out.zero_()
        for s, t in zip(self.slots, tensors):
            if tuple(t.shape) != s.shape:
                raise ValueError(
                    f"leaf {s.path!r} has shape {tuple(t.shape)}, the layout expects {s.shape}"
                )
            out[s.offset : s.offset + s.numel].copy_(t.detach().reshape(-1))
        return out

    def unpack(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of the leaves inside ``flat`` (differentiable: one ``split``, then ``view``)."""
        if flat.shape != (self.padded,):
            raise ValueError(
                f"group {self.name!r}: flat buffer has shape {tuple(flat.shape)}, want ({self.padded},)"
            )
        chunks = torch.split(flat, self._split_sizes())
        return {s.path: chunks[2 * i + 1].view(s.shape) for i, s in enumerate(self.slots)}

    def shard(self, flat: torch.Tensor, rank: int) -> torch.Tensor:
        """``rank``'s shard of a full flat buffer (a view)."""
        lo, hi = self.shard_range(rank)
        return flat[lo:hi]


def build_layouts(
    shapes: Mapping[str, tuple[Sequence[int], torch.dtype]],
    groups: Mapping[str, Sequence[str]],
    *,
    num_shards: int,
    dtype: torch.dtype | None = None,
    leaf_align: int = 16,
    shard_align: int = 64,
) -> dict[str, FlatLayout]:
    """One layout per group (per group and dtype where a group mixes dtypes and ``dtype`` is None).

    Args:
        shapes: ``{path: (shape, dtype)}`` for every leaf.
        groups: ``{group: [paths]}`` as from :func:`assign_groups`.
        num_shards: ranks each buffer is split over.
        dtype: cast every buffer to this dtype; ``None`` keeps the leaves' own dtypes.

    Returns:
        ``{name: FlatLayout}``; a mixed-dtype group ``g`` becomes ``g:float32``, ``g:int64``, ...
    """
    out: dict[str, FlatLayout] = {}
    for g, paths in groups.items():
        by_dtype: dict[torch.dtype, list[tuple[str, Sequence[int]]]] = {}
        for p in paths:
            if p not in shapes:
                raise ValueError(f"group {g!r} names leaf {p!r}, which is not in the tree")
            shape, dt = shapes[p]
            by_dtype.setdefault(dtype or dt, []).append((p, shape))
        for dt, items in by_dtype.items():
            name = g if len(by_dtype) == 1 else f"{g}:{str(dt).removeprefix('torch.')}"
            out[name] = FlatLayout.from_shapes(
                name, items, dtype=dt, num_shards=num_shards, leaf_align=leaf_align, shard_align=shard_align
            )
    return out
