"""Gradient accumulation as state: optax's ``MultiSteps`` semantics.

``k`` calls make one optimizer step: the first ``k - 1`` add their gradient to an accumulator and
change nothing else; the ``k``-th applies the inner transform to the *mean* of the ``k``
gradients and resets the accumulator.

Under ZeRO the engine owns the accumulator because it decides *what* is accumulated: stage 1
accumulates its full local (unreduced) gradients and reduce-scatters once per optimizer step;
stages 2-3 accumulate their reduced shards (one reduce per micro-batch); stage 0 the all-reduced
full gradient.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funzero.optim._base import GradientTransformation, tree_map

__all__ = ["MultiSteps", "MultiStepsState", "multi_steps"]


class MultiStepsState(NamedTuple):
    mini_step: torch.Tensor  # () int32, micro-steps accumulated since the last update
    acc: dict  # {name: (n,) accum dtype}, the running sum of gradients
    inner_state: Any  # the wrapped transform's state


class MultiSteps(GradientTransformation):
    """Apply ``inner`` every ``every_k`` calls to the mean of the gradients since the last one."""

    def __init__(self, inner: GradientTransformation, every_k: int, accum_dtype: torch.dtype | None = None):
        if not isinstance(every_k, int) or every_k < 1:
            raise ValueError(f"multi_steps needs an integer every_k >= 1, got {every_k=}")
        if not isinstance(inner, GradientTransformation):
            raise ValueError(f"multi_steps wraps a GradientTransformation, got {type(inner).__name__}")
        self.inner = inner
        self.every_k = every_k
        self.accum_dtype = accum_dtype
        super().__init__(self._init, self._update)

    def _init(self, params, grad_like=None):
        like = params if grad_like is None else grad_like
        acc = tree_map(lambda t: torch.zeros_like(t, dtype=self._dtype(t.dtype)), like)
        device = next(iter(params.values())).device if isinstance(params, dict) and params else None
        return MultiStepsState(torch.zeros((), dtype=torch.int32, device=device), acc, self.inner.init(params))

    def _dtype(self, dtype: torch.dtype) -> torch.dtype:
        # Default: at least fp32 (bf16 sums of many micro-batches lose the small ones).
        return self.accum_dtype or torch.promote_types(dtype, torch.float32)

    # engine helpers ------------------------------------------------------------------------
    def accumulate(self, state: MultiStepsState, grads: dict) -> dict:
        return {k: state.acc[k] + g.to(state.acc[k].dtype) for k, g in grads.items()}

    def is_ready(self, state: MultiStepsState) -> bool:
        return int(state.mini_step) == self.every_k - 1

    def mean(self, acc: dict) -> dict:
        return {k: a / self.every_k for k, a in acc.items()}

    @staticmethod
    def zeros(acc: dict) -> dict:
        return {k: torch.zeros_like(a) for k, a in acc.items()}

    # standalone (no engine): optax's behaviour, zero updates on the accumulating calls -------
    def _update(self, updates, state: MultiStepsState, params=None, **extra):
        acc = self.accumulate(state, updates)
        if not self.is_ready(state):
            zeros = tree_map(torch.zeros_like, updates)
            return zeros, MultiStepsState(state.mini_step + 1, acc, state.inner_state)
        mean = {k: a.to(updates[k].dtype) for k, a in self.mean(acc).items()}
        out, inner = self.inner.update(mean, state.inner_state, params, **extra)
        return out, MultiStepsState(torch.zeros_like(state.mini_step), self.zeros(acc), inner)


def multi_steps(inner: GradientTransformation, every_k: int, *, accum_dtype: torch.dtype | None = None) -> MultiSteps:
    """Accumulate gradients over ``every_k`` calls, then apply ``inner`` once (optax ``MultiSteps``).

    ``accum_dtype`` defaults to the gradient's dtype promoted to at least fp32.
    """
    return MultiSteps(inner, every_k, accum_dtype)
