"""Specs: how one buffer lives across one mesh axis.

A spec names the mesh axis it describes, so that a buffer split over a second axis is a second
spec, not a new kind of object. ``dim`` is the dimension that is split: the flat group buffers
of ``FlatLayout`` have one (``dim=0``, what their users require); a parameter leaf split over a
tensor-parallel axis may be split along any of its dimensions, and a fused leaf (a q/k/v
projection in one weight) section by section, so that each rank gets its slice of every section.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Replicate", "Shard", "Spec", "held_numel", "is_sharded", "join_shards", "local_shape", "shard_of",
           "check_split"]


@dataclass(frozen=True)
class Replicate:
    """Every rank of ``axis`` holds the whole buffer."""

    axis: str = "dp"

    def __repr__(self) -> str:
        return "Replicate()" if self.axis == "dp" else f"Replicate({self.axis!r})"


@dataclass(frozen=True)
class Shard:
    """Rank r of ``axis`` holds the r-th contiguous slice of dimension ``dim`` of the (padded) buffer.

    ``sections``: sizes of consecutive sections of ``dim`` that are each split that way (rank r
    holds the r-th slice of every section, concatenated in section order); ``()``: the whole
    dimension is one section.

    Example:
        >>> Shard("tp", 0, sections=(8, 8, 8))   # a fused (3C, C) q/k/v weight: heads per rank
        Shard('tp', dim=0, sections=(8, 8, 8))
    """

    axis: str = "dp"
    dim: int = 0
    sections: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 0:
            raise ValueError(f"Shard dim must be an int >= 0, got Shard({self.axis!r}, dim={self.dim!r})")
        secs = tuple(self.sections)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in secs):
            raise ValueError(f"Shard sections must be positive ints, got {self.sections!r}")
        object.__setattr__(self, "sections", secs)

    def __repr__(self) -> str:
        if self.dim == 0 and not self.sections:
            return f"Shard({self.axis!r})"
        secs = f", sections={self.sections}" if self.sections else ""
        return f"Shard({self.axis!r}, dim={self.dim}{secs})"


Spec = Replicate | Shard


def is_sharded(spec: Spec) -> bool:
    """Whether ``spec`` splits the buffer over its axis."""
    return isinstance(spec, Shard)


def held_numel(spec: Spec, layout) -> int:
    """Elements of ``layout``'s buffer one rank holds under ``spec``."""
    return layout.shard_numel if is_sharded(spec) else layout.padded


def _sections(shape: Sequence[int], spec: Shard) -> tuple[int, ...]:
    return spec.sections or (int(shape[spec.dim]),)


def check_split(name: str, shape: Sequence[int], spec: Spec, size: int) -> None:
    """Raise unless ``spec`` splits a leaf of ``shape`` into ``size`` equal slices.

    Raises:
        ValueError: naming the leaf, its shape, the dim (and section) and the axis size.

    Example:
        >>> check_split("lm_head.weight", (67, 24), Shard("tp", 0), 2)
        Traceback (most recent call last):
        ValueError: leaf 'lm_head.weight' of shape (67, 24): dim 0 (67) does not divide over 2 ranks of axis 'tp'
    """
    if not is_sharded(spec):
        return
    shape = tuple(int(s) for s in shape)
    if spec.dim >= len(shape):
        raise ValueError(f"leaf {name!r} of shape {shape} has no dim {spec.dim} to split over axis {spec.axis!r}")
    secs = _sections(shape, spec)
    if sum(secs) != shape[spec.dim]:
        raise ValueError(f"leaf {name!r} of shape {shape}: sections {secs} of dim {spec.dim} sum to {sum(secs)}, "
                         f"not {shape[spec.dim]}")
    for i, s in enumerate(secs):
        if s % size:
            what = f"section {i} ({s}) of dim {spec.dim}" if spec.sections else f"dim {spec.dim} ({s})"
            raise ValueError(f"leaf {name!r} of shape {shape}: {what} does not divide over {size} ranks "
                             f"of axis {spec.axis!r}")


def local_shape(shape: Sequence[int], spec: Spec, size: int) -> tuple[int, ...]:
    """The shape one rank holds of a leaf of ``shape`` under ``spec`` over ``size`` ranks."""
    shape = tuple(int(s) for s in shape)
    if not is_sharded(spec):
        return shape
    return shape[: spec.dim] + (shape[spec.dim] // size,) + shape[spec.dim + 1 :]


def shard_of(full: torch.Tensor, spec: Spec, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of ``full`` under ``spec`` (a view where the slice is one piece).

    Example:
        >>> shard_of(torch.arange(6).view(6, 1), Shard("tp", 0, (2, 4)), 1, 2).flatten().tolist()
        [1, 4, 5]
    """
    if not is_sharded(spec):
        return full
    secs = _sections(full.shape, spec)
    pieces = [p.narrow(spec.dim, rank * (s // size), s // size) for p, s in zip(full.split(list(secs), spec.dim), secs)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, spec.dim)


def join_shards(shards: Sequence[torch.Tensor], spec: Spec) -> torch.Tensor:
    """The full leaf from every rank's slice (rank order): the inverse of :func:`shard_of`."""
    if not is_sharded(spec):
        return shards[0]
    size = len(shards)
    secs = spec.sections or (shards[0].shape[spec.dim] * size,)
    per_rank = [s.split([n // size for n in secs], spec.dim) for s in shards]
    return torch.cat([per_rank[r][i] for i in range(len(secs)) for r in range(size)], spec.dim)
