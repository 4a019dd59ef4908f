"""Dynamic loss scaling as pure state, with DeepSpeed's semantics and knobs.

DeepSpeed's ``DynamicLossScaler`` (defaults: initial scale 2**16, window 1000, hysteresis 2,
min scale 1, consecutive_hysteresis off): an overflowing step is skipped; it spends one unit of
hysteresis, and when none is left the scale halves (not below the minimum). A step counts as clean
towards the window from the last overflow; every ``window`` clean steps the scale doubles and the
hysteresis is restored.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funzero._precision import LossScaleConfig

__all__ = ["LossScaleState", "init_scaler", "update_scaler"]


class LossScaleState(NamedTuple):
    scale: torch.Tensor  # () fp32, the current loss scale
    iteration: torch.Tensor  # () int64, steps seen (skipped ones included)
    last_overflow: torch.Tensor  # () int64, iteration of the last overflow (-1: none yet)
    hysteresis: torch.Tensor  # () int32, overflows still tolerated before the scale halves


def init_scaler(cfg: LossScaleConfig, device: torch.device | str | None = None) -> LossScaleState:
    return LossScaleState(
        torch.tensor(2.0**cfg.initial_scale_power, dtype=torch.float32, device=device),
        torch.zeros((), dtype=torch.int64, device=device),
        torch.full((), -1, dtype=torch.int64, device=device),
        torch.full((), cfg.hysteresis, dtype=torch.int32, device=device),
    )


def update_scaler(s: LossScaleState, found_inf: torch.Tensor, cfg: LossScaleConfig) -> LossScaleState:
    """The next scaler state after a step that overflowed iff ``found_inf`` (0-d, nonzero)."""
    overflow = found_inf != 0
    last_hyst = s.hysteresis <= 1
    # overflow branch
    o_scale = torch.where(last_hyst, torch.clamp(s.scale / 2, min=cfg.min_loss_scale), s.scale)
    o_hyst = torch.where(last_hyst, s.hysteresis, s.hysteresis - 1)
    # clean branch
    grow = torch.remainder(s.iteration - s.last_overflow, cfg.loss_scale_window) == 0
    c_scale = torch.where(grow, s.scale * 2, s.scale)
    c_hyst = torch.where(grow, torch.full_like(s.hysteresis, cfg.hysteresis), s.hysteresis)
    return LossScaleState(
        torch.where(overflow, o_scale, c_scale),
        s.iteration + 1,
        torch.where(overflow, s.iteration, s.last_overflow),
        torch.where(overflow, o_hyst, c_hyst),
    )
