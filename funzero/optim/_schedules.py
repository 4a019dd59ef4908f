"""Schedules: pure ``count -> value`` functions, traceable (a tensor count gives a tensor value).

``count`` is the number of updates already applied (0 for the first), as in optax.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "Schedule",
    "constant_schedule",
    "cosine_decay_schedule",
    "join_schedules",
    "linear_schedule",
    "warmup_cosine",
    "warmup_cosine_lr",
    "warmup_decay_lr",
    "warmup_lr",
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
    """Linear from ``init_value`` (until ``transition_begin``) to ``end_value`` over ``transition_steps``
    (optax's: :func:`polynomial_schedule` with ``power=1``)."""
    return polynomial_schedule(init_value, end_value, 1, transition_steps, transition_begin, where="linear_schedule")


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0) -> Schedule:
    """``init * ((1-alpha) * (0.5 (1 + cos(pi t/T)))**exponent + alpha)`` for t <= T, then flat."""
    if not decay_steps > 0:
        raise ValueError(f"cosine_decay_schedule needs decay_steps > 0, got {decay_steps=}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"cosine_decay_schedule needs 0 <= alpha <= 1, got {alpha=}")
    v, steps = float(init_value), float(decay_steps)

    def schedule(count):
        t = torch.clamp(_f(count), max=steps)
        cos = 0.5 * (1.0 + torch.cos(math.pi * t / steps))
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


# --- optax's schedules under optax's names, argument order and defaults ---------------------
# (validated when built: where optax logs and falls back to a constant schedule, these raise)
__all__ += [
    "exponential_decay",
    "piecewise_constant_schedule",
    "polynomial_schedule",
    "warmup_cosine_decay_schedule",
    "warmup_exponential_decay_schedule",
]


def _steps(where: str, **kw) -> None:
    for name, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or (name.startswith("transition_steps") and not v > 0) or not v >= 0:
            bound = "> 0" if name.startswith("transition_steps") else ">= 0"
            raise ValueError(f"{where} needs {name} {bound}, got {name}={v!r}")


def polynomial_schedule(
    init_value: float, end_value: float, power: float, transition_steps: int, transition_begin: int = 0, *, where: str = "polynomial_schedule"
) -> Schedule:
    """``(init - end) * (1 - t / transition_steps)**power + end``, ``t`` the count after
    ``transition_begin`` clipped to ``[0, transition_steps]``."""
    _steps(where, transition_steps=transition_steps, transition_begin=transition_begin)
    a, b, steps, begin = float(init_value), float(end_value), float(transition_steps), float(transition_begin)

    def schedule(count):
        frac = 1.0 - torch.clamp(_f(count) - begin, 0.0, steps) / steps
        return (a - b) * (frac if power == 1 else frac**power) + b

    return schedule


def piecewise_constant_schedule(init_value: float, boundaries_and_scales: dict[int, float] | None = None) -> Schedule:
    """``init_value``, multiplied by ``scale`` at each ``{boundary: scale}`` the count has reached."""
    items = sorted((boundaries_and_scales or {}).items())
    for boundary, s in items:
        if not s >= 0:
            raise ValueError(f"piecewise_constant_schedule needs scales >= 0, got scale {s!r} at boundary {boundary!r}")
    init = float(init_value)

    def schedule(count):
        c = _f(count)
        v = torch.full_like(c, init)
        for boundary, s in items:
            before = torch.clamp(torch.sign(boundary - c), min=0.0)  # 1 before the boundary, else 0
            v = v * before + (1 - before) * s * v
        return v

    return schedule


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """``init * decay_rate ** ((count - transition_begin) / transition_steps)`` (the exponent
    floored with ``staircase``), ``init`` before ``transition_begin``, bounded by ``end_value``."""
    _steps("exponential_decay", transition_steps=transition_steps, transition_begin=transition_begin)
    if not decay_rate > 0:
        raise ValueError(f"exponential_decay needs decay_rate > 0, got {decay_rate=}")
    init, steps, begin = float(init_value), float(transition_steps), float(transition_begin)
    bound = None if end_value is None else (torch.maximum if decay_rate < 1.0 else torch.minimum)

    def schedule(count):
        d = _f(count) - begin
        p = d / steps
        if staircase:
            p = torch.floor(p)
        v = torch.where(d <= 0, torch.full_like(d, init), init * torch.pow(decay_rate, p))
        if bound is not None:
            v = bound(v, torch.full_like(v, float(end_value)))
        return v

    return schedule


def warmup_cosine_decay_schedule(
    init_value: float, peak_value: float, warmup_steps: int, decay_steps: int, end_value: float = 0.0, exponent: float = 1.0
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine
    decay to ``end_value`` (raised to ``exponent``); ``decay_steps`` counts the whole schedule,
    warmup included."""
    _steps("warmup_cosine_decay_schedule", warmup_steps=warmup_steps, decay_steps=decay_steps)
    if not decay_steps > warmup_steps:
        raise ValueError(f"warmup_cosine_decay_schedule needs warmup_steps < decay_steps, got {warmup_steps=}, {decay_steps=}")
    alpha = 0.0 if peak_value == 0 else end_value / peak_value
    decay = cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha, exponent)
    if warmup_steps == 0:
        return decay
    return join_schedules([linear_schedule(init_value, peak_value, warmup_steps), decay], [warmup_steps])


def warmup_exponential_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value``, then :func:`exponential_decay` from
    ``peak_value`` (its count starting at 0 after the warmup)."""
    _steps("warmup_exponential_decay_schedule", warmup_steps=warmup_steps)
    decay = exponential_decay(peak_value, transition_steps, decay_rate, transition_begin, staircase, end_value)
    if warmup_steps == 0:
        return decay
    return join_schedules([linear_schedule(init_value, peak_value, warmup_steps), decay], [warmup_steps])


# --- funzero's name ----------------------------------------------------------------------------
def warmup_cosine(
    peak_value: float, warmup_steps: int, decay_steps: int, *, end_value: float = 0.0, init_value: float = 0.0, exponent: float = 1.0
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value``, then cosine decay to ``end_value``:
    :func:`warmup_cosine_decay_schedule` with the peak first.

    ``decay_steps`` counts the whole schedule, warmup included (optax's convention). Only the
    first three arguments are positional and the step counts must be ints, so a call in
    optax's order (``init_value, peak_value, ...``) is an error, not a zero schedule.
    """
    for name, v in (("warmup_steps", warmup_steps), ("decay_steps", decay_steps)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(
                f"warmup_cosine(peak_value, warmup_steps, decay_steps) needs an int {name}, got {name}={v!r} "
                "(optax's argument order is warmup_cosine_decay_schedule's)"
            )
    if warmup_steps < 0 or decay_steps <= warmup_steps:
        raise ValueError(f"warmup_cosine needs 0 <= warmup_steps < decay_steps, got {warmup_steps=}, {decay_steps=}")
    return warmup_cosine_decay_schedule(init_value, peak_value, warmup_steps, decay_steps, end_value, exponent)


# --- DeepSpeed's schedules ------------------------------------------------------------------
# DeepSpeed's engine sets each scheduler's value at iteration -1 when it builds the scheduler and
# steps the scheduler after every applied update, so the update that follows `count` applied
# updates runs at iteration `count - 1`. The schedules below take funzero's count and return that
# learning rate, so a funzero run reproduces a DeepSpeed run's rates update for update. Formulas
# from deepspeed/runtime/lr_schedules.py (WarmupLR._get_gamma, WarmupDecayLR._get_gamma,
# WarmupCosineLR.get_lr_ratio), DeepSpeed 0.19.


def _ds_warmup_args(warmup_num_steps, warmup_type) -> int:
    if isinstance(warmup_num_steps, bool) or not isinstance(warmup_num_steps, int) or warmup_num_steps <= 0:
        raise ValueError(f"warmup_num_steps must be a positive integer, got {warmup_num_steps=}")
    if warmup_type not in ("log", "linear"):
        raise ValueError(f"warmup_type must be 'log' or 'linear', got {warmup_type=}")
    return max(2, warmup_num_steps)  # DeepSpeed's floor: log(1) would divide by zero


def _ds_total(total_num_steps) -> None:
    if isinstance(total_num_steps, bool) or not isinstance(total_num_steps, int) or total_num_steps < 0:
        raise ValueError(f"total_num_steps must be a non-negative integer, got {total_num_steps=}")


def _ds_gamma(it: torch.Tensor, num_steps: int, warmup_type: str) -> torch.Tensor:
    """The warmup fraction at iteration ``it`` (meaningful for 0 <= it < num_steps)."""
    if warmup_type == "log":
        return torch.log(it + 1.0) / math.log(num_steps)
    return it / num_steps


def _ds_min_max(warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, after) -> Schedule:
    """``min + (max - min) * gamma``: the warmup fraction, then ``after(it)`` once it is over."""
    num = _ds_warmup_args(warmup_num_steps, warmup_type)
    lo, hi = float(warmup_min_lr), float(warmup_max_lr)

    def schedule(count):
        it = torch.clamp(_f(count) - 1.0, min=0.0)  # iteration -1 reads as min_lr, as iteration 0 does
        gamma = torch.where(it < num, _ds_gamma(it, num, warmup_type), after(it))
        return lo + (hi - lo) * gamma

    return schedule


def warmup_lr(
    *, warmup_min_lr: float = 0.0, warmup_max_lr: float = 0.001, warmup_num_steps: int = 1000, warmup_type: str = "log"
) -> Schedule:
    """DeepSpeed's ``WarmupLR``: from ``warmup_min_lr`` up to ``warmup_max_lr`` over
    ``warmup_num_steps`` (log or linear in the iteration), then flat.

    ``lr(it) = min + (max - min) * g(it)``, ``g = log(it + 1) / log(W)`` (``"log"``) or ``it / W``
    (``"linear"``) for ``it < W = max(2, warmup_num_steps)``, else 1; at ``count`` the iteration is
    ``count - 1`` (see the note above: the first two updates both run at ``warmup_min_lr``).
    """
    return _ds_min_max(warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, lambda it: torch.ones_like(it))


def warmup_decay_lr(
    total_num_steps: int,
    *,
    warmup_min_lr: float = 0.0,
    warmup_max_lr: float = 0.001,
    warmup_num_steps: int = 1000,
    warmup_type: str = "log",
) -> Schedule:
    """DeepSpeed's ``WarmupDecayLR``: :func:`warmup_lr`'s warmup, then linear decay to 0 at
    ``total_num_steps``: ``g(it) = max(0, (T - it) / max(1, T - W))`` for ``it >= W``."""
    _ds_total(total_num_steps)
    span = float(max(1, total_num_steps - _ds_warmup_args(warmup_num_steps, warmup_type)))
    return _ds_min_max(warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                       lambda it: torch.clamp((total_num_steps - it) / span, min=0.0))


def warmup_cosine_lr(
    total_num_steps: int,
    *,
    learning_rate: float = 0.001,
    warmup_min_ratio: float = 0.0,
    warmup_num_steps: int = 1000,
    cos_min_ratio: float = 0.0001,
    warmup_type: str = "log",
) -> Schedule:
    """DeepSpeed's ``WarmupCosineLR``: ``learning_rate`` (the optimizer's lr in DeepSpeed) times a
    ratio that warms up from ``warmup_min_ratio`` to 1 over ``warmup_num_steps``, then follows a
    half cosine down to ``cos_min_ratio`` at ``total_num_steps`` and stays there.

    Warmup: ``r = wmin + (1 - wmin) g(it)``. After: ``p = min(1, (it - W + 1) / max(1, T - W))``,
    ``r = max(0, cmin + (1 - cmin)(1 + cos(pi p)) / 2)``. Before DeepSpeed's first scheduler step
    the rate is 0, so the first update (``count == 0``) runs at 0.
    """
    _ds_total(total_num_steps)
    num = _ds_warmup_args(warmup_num_steps, warmup_type)
    base, wmin, cmin = float(learning_rate), float(warmup_min_ratio), float(cos_min_ratio)
    span = float(max(1, total_num_steps - num))

    def schedule(count):
        c = _f(count)
        it = torch.clamp(c - 1.0, min=0.0)
        warm = wmin + _ds_gamma(it, num, warmup_type) * (1.0 - wmin)
        progress = torch.clamp((it - num + 1.0) / span, max=1.0)
        cos = torch.clamp(cmin + (1.0 - cmin) * (1.0 + torch.cos(math.pi * progress)) / 2.0, min=0.0)
        ratio = torch.where(it < num, warm, cos)
        return torch.where(c < 1.0, 0.0, base * ratio)

    return schedule
