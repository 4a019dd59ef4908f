"""Schedules: pure ``count -> value`` functions, traceable (a tensor count gives a tensor value).

``count`` is the number of updates already applied (0 for the first), as in optax.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "Schedule",
    "constant_schedule",
    "cosine_decay_schedule",
    "join_schedules",
    "linear_schedule",
    "warmup_cosine",
]

Schedule = Callable[[torch.Tensor | int], torch.Tensor | float]


def _f(count: torch.Tensor | int) -> torch.Tensor:
    if isinstance(count, torch.Tensor):
        return count.to(torch.float32)
    return torch.tensor(float(count))


def constant_schedule(value: float) -> Schedule:
    """Always ``value``."""
    value = float(value)
    return lambda count: torch.full_like(_f(count), value)


def linear_schedule(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """Linear from ``init_value`` (until ``transition_begin``) to ``end_value`` over ``transition_steps``."""
    if transition_steps <= 0:
        raise ValueError(f"linear_schedule needs transition_steps > 0, got {transition_steps=}")
    if transition_begin < 0:
        raise ValueError(f"linear_schedule needs transition_begin >= 0, got {transition_begin=}")
    a, b = float(init_value), float(end_value)

    def schedule(count):
        frac = torch.clamp((_f(count) - transition_begin) / transition_steps, 0.0, 1.0)
        return a + (b - a) * frac

    return schedule


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0) -> Schedule:
    """``init * ((1-alpha) * (0.5 (1 + cos(pi t/T)))**exponent + alpha)`` for t <= T, then flat."""
    if decay_steps <= 0:
        raise ValueError(f"cosine_decay_schedule needs decay_steps > 0, got {decay_steps=}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"cosine_decay_schedule needs 0 <= alpha <= 1, got {alpha=}")
    v = float(init_value)

    def schedule(count):
        t = torch.clamp(_f(count), max=float(decay_steps)) / decay_steps
        cos = 0.5 * (1.0 + torch.cos(math.pi * t))
        return v * ((1.0 - alpha) * cos**exponent + alpha)

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Schedule ``i`` from ``boundaries[i-1]`` on, fed the count relative to its boundary."""
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            f"join_schedules needs len(schedules) == len(boundaries) + 1, got {len(schedules)} and {len(boundaries)}"
        )
    if list(boundaries) != sorted(boundaries):
        raise ValueError(f"join_schedules boundaries must be increasing, got {list(boundaries)}")

    def schedule(count):
        c = _f(count)
        out = torch.as_tensor(schedules[0](c), dtype=torch.float32)
        for b, s in zip(boundaries, schedules[1:]):
            out = torch.where(c >= b, torch.as_tensor(s(c - b), dtype=torch.float32), out)
        return out

    return schedule


def warmup_cosine(peak_value: float, warmup_steps: int, decay_steps: int, end_value: float = 0.0, init_value: float = 0.0) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value``, then cosine decay to ``end_value``.

    ``decay_steps`` counts the whole schedule, warmup included (optax's convention).
    """
    if warmup_steps < 0 or decay_steps <= warmup_steps:
        raise ValueError(f"warmup_cosine needs 0 <= warmup_steps < decay_steps, got {warmup_steps=}, {decay_steps=}")
    alpha = 0.0 if peak_value == 0 else end_value / peak_value
    parts = [cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha)]
    if warmup_steps == 0:
        return parts[0]
    return join_schedules([linear_schedule(init_value, peak_value, warmup_steps), parts[0]], [warmup_steps])
