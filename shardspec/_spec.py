"""Specs: how one buffer lives across one mesh axis."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Replicate", "Shard", "Spec"]


@dataclass(frozen=True)
class Replicate:
    """Every rank of the axis holds the whole buffer."""

    def __repr__(self) -> str:
        return "Replicate()"


@dataclass(frozen=True)
class Shard:
    """Rank r of ``axis`` holds the r-th contiguous slice of the (padded) flat buffer."""

    axis: str = "dp"

    def __repr__(self) -> str:
        return f"Shard({self.axis!r})"


Spec = Replicate | Shard
