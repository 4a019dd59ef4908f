"""Specs: how one buffer lives across one mesh axis.

A spec names the mesh axis it describes, so that a buffer split over a second axis later is a
second spec, not a new kind of object. ``dim`` is the buffer dimension that is split; the flat
group buffers of ``FlatLayout`` have one (``dim=0``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Replicate", "Shard", "Spec", "held_numel", "is_sharded"]


@dataclass(frozen=True)
class Replicate:
    """Every rank of ``axis`` holds the whole buffer."""

    axis: str = "dp"

    def __repr__(self) -> str:
        return "Replicate()" if self.axis == "dp" else f"Replicate({self.axis!r})"


@dataclass(frozen=True)
class Shard:
    """Rank r of ``axis`` holds the r-th contiguous slice of dimension ``dim`` of the (padded) buffer."""

    axis: str = "dp"
    dim: int = 0

    def __post_init__(self) -> None:
        if self.dim != 0:
            raise ValueError(f"flat buffers have one dimension; got Shard({self.axis!r}, dim={self.dim})")

    def __repr__(self) -> str:
        return f"Shard({self.axis!r})"


Spec = Replicate | Shard


def is_sharded(spec: Spec) -> bool:
    """Whether ``spec`` splits the buffer over its axis."""
    return isinstance(spec, Shard)


def held_numel(spec: Spec, layout) -> int:
    """Elements of ``layout``'s buffer one rank holds under ``spec``."""
    return layout.shard_numel if is_sharded(spec) else layout.padded
