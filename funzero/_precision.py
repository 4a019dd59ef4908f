"""Precision policies: which dtype params, gradient reduction and master weights use."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Precision", "bf16", "fp16", "fp32"]


@dataclass(frozen=True)
class Precision:
    """Dtypes of one training run.

    Attributes:
        param_dtype: dtype of the parameters the model computes with (held in ``state.params``).
        master_dtype: dtype of the master copy the optimizer updates, or ``None`` when the params
            are themselves the master (fp32 training).
        reduce_dtype: dtype gradients are reduced in across ranks (``None``: the param dtype).
        loss_scaling: dynamic loss scaling (fp16): the scaler's knobs, or ``None``.
    """

    param_dtype: torch.dtype = torch.float32
    master_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    loss_scaling: "LossScaleConfig | None" = None

    def __post_init__(self) -> None:
        for name in ("param_dtype", "master_dtype", "reduce_dtype"):
            dt = getattr(self, name)
            if dt is None and name != "param_dtype":
                continue
            if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
                raise ValueError(f"{name} must be a floating-point torch.dtype, got {name}={dt!r}")
        if self.master_dtype is not None and self.master_dtype == self.param_dtype:
            raise ValueError(
                f"master_dtype equals param_dtype ({self.param_dtype}); use master_dtype=None"
            )
        if self.loss_scaling is not None and not isinstance(self.loss_scaling, LossScaleConfig):
            raise ValueError(f"loss_scaling must be a LossScaleConfig, got {type(self.loss_scaling).__name__}")

    @property
    def has_master(self) -> bool:
        return self.master_dtype is not None

    @property
    def opt_dtype(self) -> torch.dtype:
        """dtype of the optimizer's view of the parameters (master if any, else params)."""
        return self.master_dtype or self.param_dtype


@dataclass(frozen=True)
class LossScaleConfig:
    """Dynamic loss scaling with DeepSpeed's knobs and defaults.

    The scale starts at ``2**initial_scale_power``; ``hysteresis`` consecutive overflowing steps
    halve it (never below ``min_loss_scale``); ``loss_scale_window`` clean steps in a row double it.
    """

    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0

    def __post_init__(self) -> None:
        # The scale is an fp32 number: 2**127 is the largest power of two it holds; 2**200 is inf
        # and would skip every step for ever.
        p = self.initial_scale_power
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 127:
            raise ValueError(f"initial_scale_power must be an int in [0, 127] (the scale is 2**power in fp32), got {p!r}")
        for name in ("loss_scale_window", "hysteresis"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {name}={v!r}")
        m = self.min_loss_scale
        if not isinstance(m, (int, float)) or isinstance(m, bool) or not 0 < m < 2.0**127:
            raise ValueError(f"min_loss_scale must be a finite number > 0, got min_loss_scale={m!r}")


def fp32() -> Precision:
    """Everything in fp32; the params are the master weights."""
    return Precision(torch.float32)


def bf16(*, reduce_dtype: torch.dtype | None = torch.float32) -> Precision:
    """bf16 params and compute, fp32 master weights and optimizer state (ZeRO's 16 bytes/param).

    Args:
        reduce_dtype: dtype of gradient reduction across ranks; fp32 by default (accurate sums
            at twice the bytes of bf16 on the wire), ``torch.bfloat16`` to halve the traffic.
    """
    return Precision(torch.bfloat16, torch.float32, reduce_dtype)


def fp16(
    *,
    reduce_dtype: torch.dtype | None = torch.float32,
    initial_scale_power: int = 16,
    loss_scale_window: int = 1000,
    hysteresis: int = 2,
    min_loss_scale: float = 1.0,
) -> Precision:
    """fp16 params and compute, fp32 master, dynamic loss scaling (DeepSpeed's defaults)."""
    cfg = LossScaleConfig(initial_scale_power, loss_scale_window, hysteresis, min_loss_scale)
    return Precision(torch.float16, torch.float32, reduce_dtype, cfg)
