"""Placement: on which memory each state leaf lives (device, pinned CPU, or NVMe)."""

from __future__ import annotations

__all__ = ["validate_placement"]

_TARGETS = ("params", "opt_state")


def validate_placement(placement: dict[str, str], stage: int) -> dict[str, str]:
    """Check a placement mapping against the stage; return it normalised.

    Raises:
        ValueError: an unknown key or device, or an offload the stage cannot do.
    """
    for key, where in placement.items():
        if key not in _TARGETS:
            raise ValueError(f"placement key {key!r} is not one of {_TARGETS}")
        if where not in ("device",):
            raise ValueError(f"placement[{key!r}] = {where!r}: offload is not available yet")
    return placement
