"""Gradient accumulation as state: optax's ``MultiSteps`` semantics.

``k`` calls make one optimizer step: the first ``k - 1`` add their gradient to an accumulator and
change nothing else; the ``k``-th applies the inner transform to the *mean* of the ``k``
gradients and resets the accumulator.

Under ZeRO what is accumulated depends on the plan (stage 1 accumulates its full local,
unreduced gradients and reduce-scatters once per optimizer step; the other stages accumulate
what they reduced per micro-batch), so the transform declares itself to the engine as data
(:class:`funzero.optim.Accumulate`) and the engine passes the gradients' shape (``grad_like``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funzero.optim._base import Accumulate, GradientTransformation, Traits, tree_map

__all__ = ["MultiSteps", "MultiStepsState", "multi_steps"]


class MultiStepsState(NamedTuple):
    mini_step: torch.Tensor  # () int32, micro-steps accumulated since the last update
    acc: dict  # {name: (n,) accum dtype}, the running sum of gradients
    inner_state: Any  # the wrapped transform's state


class MultiSteps:
    """Apply ``inner`` every ``every_k`` calls to the mean of the gradients since the last one.

    ``gradient_transformation()`` is the transform (optax's spelling); :func:`multi_steps`
    returns it directly.
    """

    def __init__(self, inner: GradientTransformation, every_k: int, accum_dtype: torch.dtype | None = None):
        if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
            raise ValueError(f"multi_steps needs an integer every_k >= 1, got {every_k=}")
        if not isinstance(inner, GradientTransformation):
            raise ValueError(f"multi_steps wraps a GradientTransformation, got {type(inner).__name__}")
        self.inner = inner
        self.every_k = every_k
        self.accum_dtype = accum_dtype

    def init(self, params, grad_like=None) -> MultiStepsState:
        like = params if grad_like is None else grad_like
        acc = tree_map(lambda t: torch.zeros_like(t, dtype=self._dtype(t.dtype)), like)
        device = next(iter(params.values())).device if isinstance(params, dict) and params else None
        return MultiStepsState(torch.zeros((), dtype=torch.int32, device=device), acc, self.inner.init(params))

    def _dtype(self, dtype: torch.dtype) -> torch.dtype:
        # Default: at least fp32 (bf16 sums of many micro-batches lose the small ones).
        return self.accum_dtype or torch.promote_types(dtype, torch.float32)

    def add(self, state: MultiStepsState, grads: dict) -> tuple[bool, dict | None, MultiStepsState]:
        """One micro-step: ``(ready, mean gradient or None, state)`` (see ``Accumulate.add``)."""
        acc = {k: state.acc[k] + g.to(state.acc[k].dtype) for k, g in grads.items()}
        if int(state.mini_step) != self.every_k - 1:  # decided on the host
            return False, None, MultiStepsState(state.mini_step + 1, acc, state.inner_state)
        mean = {k: a / self.every_k for k, a in acc.items()}
        reset = {k: torch.zeros_like(a) for k, a in acc.items()}
        return True, mean, MultiStepsState(torch.zeros_like(state.mini_step), reset, state.inner_state)

    def update(self, updates, state: MultiStepsState, params=None, **extra):
        """optax's behaviour without an engine: zero updates on the accumulating calls."""
        ready, mean, new = self.add(state, updates)
        if not ready:
            return tree_map(torch.zeros_like, updates), new
        mean = {k: a.to(updates[k].dtype) for k, a in mean.items()}
        out, inner = self.inner.update(mean, state.inner_state, params, **extra)
        return out, new._replace(inner_state=inner)

    def gradient_transformation(self) -> GradientTransformation:
        declared = Accumulate(
            inner=self.inner,
            every_k=self.every_k,
            init=self.init,
            inner_state=lambda state: state.inner_state,
            with_inner_state=lambda state, inner: state._replace(inner_state=inner),
            add=self.add,
        )
        return GradientTransformation(self.init, self.update, Traits(accumulate=declared))


def multi_steps(inner: GradientTransformation, every_k: int, *, accum_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Accumulate gradients over ``every_k`` calls, then apply ``inner`` once (optax ``MultiSteps``).

    ``accum_dtype`` defaults to the gradient's dtype promoted to at least fp32.
    """
    return MultiSteps(inner, every_k, accum_dtype).gradient_transformation()
