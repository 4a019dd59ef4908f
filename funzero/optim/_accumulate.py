"""Gradient accumulation as state: optax's ``MultiSteps`` semantics.

``k`` calls make one optimizer step: the first ``k - 1`` add their gradient to an accumulator and
change nothing else; the ``k``-th applies the inner transform to the *mean* of the ``k``
gradients and resets the accumulator. ``k`` may change with the number of optimizer steps taken
(optax's ``every_k_schedule``).

Under ZeRO what is accumulated depends on the plan (stage 1 accumulates its full local,
unreduced gradients and reduce-scatters once per optimizer step; the other stages accumulate
what they reduced per micro-batch), so the transform declares itself to the engine as data
(:class:`funzero.optim.Accumulate`) and the engine passes the gradients' shape (``grad_like``).

The mean is the sum divided by ``k`` (optax keeps a running mean, Welford's update; the two
differ by fp32 rounding): the engine's accumulators are plain sums.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from funzero.optim._base import Accumulate, GradientTransformation, Traits, tree_map
from funzero.optim._tree import device_of

__all__ = ["MultiSteps", "MultiStepsState", "multi_steps"]


class MultiStepsState(NamedTuple):
    # () int32, micro-steps accumulated since the last update (optax's), and -1 before the first
    # call, so has_updated needs no second counter
    mini_step: torch.Tensor
    acc: Any  # tree like the gradients (accumulator dtype): their running sum
    inner_state: Any  # the wrapped transform's state
    # () int32, optimizer steps applied so far; kept only for a callable every_k_schedule (which
    # reads it), else None: an int k needs no count, and the state stays one counter
    gradient_step: torch.Tensor | None = None


def _every_k(every_k_schedule, every_k, where: str):
    """The schedule, from optax's ``every_k_schedule`` or funzero's ``every_k`` (one of them)."""
    if every_k_schedule is not None and every_k is not None:
        raise ValueError(f"{where}: pass every_k_schedule or every_k, not both; got {every_k_schedule=}, {every_k=}")
    value, name = (every_k, "every_k") if every_k is not None else (every_k_schedule, "every_k_schedule")
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} needs an integer {name} >= 1 or a callable of the step, got {name}={value!r}")
    return value


class MultiSteps:
    """Apply ``opt`` every ``k`` calls to the mean of the gradients since the last time.

    Args:
        opt: the transform to apply once per optimizer step.
        every_k_schedule: ``k``, an int or a callable ``gradient_step -> k`` of the optimizer
            steps applied so far (evaluated on the host).
        use_grad_mean: apply the mean of the ``k`` gradients (True) or their sum.
        should_skip_update_fn: not supported (optax's hook to skip a micro-step); must be None.
        accumulator_dtype: the accumulator's dtype; default the gradient's, promoted to at least
            fp32 (optax: fp32 always; funzero keeps fp64 gradients fp64).
        every_k, accum_dtype: funzero's earlier names of ``every_k_schedule`` and
            ``accumulator_dtype``.

    ``gradient_transformation()`` is the transform (optax's spelling); :func:`multi_steps`
    returns it directly. ``has_updated(state)`` says whether the last call applied ``opt``. The
    state is optax's fields, with ``mini_step`` -1 before the first call and ``gradient_step``
    kept only for a callable ``every_k_schedule``.
    """

    def __init__(
        self,
        opt: GradientTransformation,
        every_k_schedule: int | Callable[[torch.Tensor], Any] | None = None,
        use_grad_mean: bool = True,
        should_skip_update_fn: Callable | None = None,
        accumulator_dtype: torch.dtype | None = None,
        *,
        every_k: int | None = None,
        accum_dtype: torch.dtype | None = None,
    ):
        self.every_k = _every_k(every_k_schedule, every_k, "multi_steps")
        if not isinstance(opt, GradientTransformation):
            raise ValueError(f"multi_steps wraps a GradientTransformation, got {type(opt).__name__}")
        if should_skip_update_fn is not None:
            raise ValueError(f"MultiSteps: should_skip_update_fn is not supported, got {should_skip_update_fn=}")
        if accumulator_dtype is not None and accum_dtype is not None and accumulator_dtype != accum_dtype:
            raise ValueError(f"MultiSteps: pass accumulator_dtype or accum_dtype, got {accumulator_dtype=}, {accum_dtype=}")
        dtype = accumulator_dtype if accumulator_dtype is not None else accum_dtype
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise ValueError(f"MultiSteps: accumulator_dtype must be a torch.dtype, got {dtype!r}")
        self.inner = opt
        self.use_grad_mean = bool(use_grad_mean)
        self.accum_dtype = dtype

    @property
    def inner_opt(self) -> GradientTransformation:
        return self.inner

    def init(self, params, grad_like=None) -> MultiStepsState:
        like = params if grad_like is None else grad_like
        acc = tree_map(lambda t: torch.zeros_like(t, dtype=self._dtype(t.dtype)), like)
        zero = torch.zeros((), dtype=torch.int32, device=device_of(params))
        return MultiStepsState(zero - 1, acc, self.inner.init(params), zero if callable(self.every_k) else None)

    def _dtype(self, dtype: torch.dtype) -> torch.dtype:
        # Default: at least fp32 (bf16 sums of many micro-batches lose the small ones).
        return self.accum_dtype or torch.promote_types(dtype, torch.float32)

    def k(self, state: MultiStepsState) -> int:
        """Micro-steps of the optimizer step in progress (a schedule is read on the host)."""
        if not callable(self.every_k):
            return self.every_k
        k = int(self.every_k(state.gradient_step))
        if k < 1:
            raise ValueError(f"multi_steps: every_k_schedule({int(state.gradient_step)}) must be >= 1, got {k}")
        return k

    def add(self, state: MultiStepsState, grads) -> tuple[bool, Any, MultiStepsState]:
        """One micro-step: ``(ready, mean gradient or None, state)`` (see ``Accumulate.add``)."""
        acc = tree_map(lambda a, g: a + g.to(a.dtype), state.acc, grads)
        k = self.k(state)
        if max(int(state.mini_step), 0) < k - 1:  # decided on the host (-1, before the first call, is 0)
            return False, None, state._replace(mini_step=state.mini_step.clamp(min=0) + 1, acc=acc)
        mean = tree_map(lambda a: a / k, acc) if self.use_grad_mean else acc
        reset = tree_map(torch.zeros_like, acc)
        step = None if state.gradient_step is None else state.gradient_step + 1
        return True, mean, MultiStepsState(torch.zeros_like(state.mini_step), reset, state.inner_state, step)

    def update(self, updates, state: MultiStepsState, params=None, **extra):
        """optax's behaviour without an engine: zero updates on the accumulating calls."""
        ready, mean, new = self.add(state, updates)
        if not ready:
            return tree_map(torch.zeros_like, updates), new
        mean = tree_map(lambda a, u: a.to(u.dtype), mean, updates)
        out, inner = self.inner.update(mean, state.inner_state, params, **extra)
        return out, new._replace(inner_state=inner)

    @staticmethod
    def has_updated(state: MultiStepsState) -> torch.Tensor:
        """Whether the call that produced ``state`` applied the inner transform (() bool; False
        for the state ``init`` made)."""
        return state.mini_step == 0

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


def multi_steps(
    inner: GradientTransformation,
    every_k: int | Callable[[torch.Tensor], Any] | None = None,
    *,
    every_k_schedule: int | Callable[[torch.Tensor], Any] | None = None,
    use_grad_mean: bool = True,
    accum_dtype: torch.dtype | None = None,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Accumulate gradients over ``every_k`` calls, then apply ``inner`` once (optax ``MultiSteps``).

    ``every_k`` (or optax's name, ``every_k_schedule``) is an int or a callable of the optimizer
    steps applied so far. The accumulator's dtype (``accum_dtype`` or ``accumulator_dtype``)
    defaults to the gradient's dtype promoted to at least fp32.
    """
    if every_k is not None and every_k_schedule is not None:
        raise ValueError(f"multi_steps: pass every_k or every_k_schedule, not both; got {every_k=}, {every_k_schedule=}")
    if every_k is None and every_k_schedule is None:
        raise ValueError(f"multi_steps needs every_k (or every_k_schedule), got {every_k=}")
    return MultiSteps(inner, every_k_schedule, use_grad_mean, None, accumulator_dtype, every_k=every_k,
                      accum_dtype=accum_dtype).gradient_transformation()
