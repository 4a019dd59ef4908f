"""Hyperparameters as state, so they can change between steps without recompiling the step."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

from funzero.optim._base import FusedUpdate, GradientTransformation, Traits
from funzero.optim._tree import device_of

__all__ = ["InjectHyperparamsState", "inject_hyperparams"]


class InjectHyperparamsState(NamedTuple):
    count: torch.Tensor  # () int32, updates applied so far
    hyperparams: dict  # {name: () fp32 tensor}: edit these to change a value between steps
    inner_state: object


def inject_hyperparams(
    factory: Callable[..., GradientTransformation], static_args: Iterable[str] = ()
) -> Callable[..., GradientTransformation]:
    """Wrap an optimizer factory so its numeric hyperparameters live in the state (optax's API).

    Numbers (and schedules, evaluated at the state's count) become 0-d fp32 tensors in
    ``state.hyperparams``; the step reads them from there, so a compiled step keeps its graph when
    a value changes. Names in ``static_args`` stay Python constants, and so do masks (``mask``,
    ``weight_decay_mask``), which are callables but not schedules.

    Example:
        >>> tx = inject_hyperparams(adamw)(learning_rate=1e-3, weight_decay=0.1)
        >>> state.opt_state.hyperparams["learning_rate"].fill_(3e-4)   # takes effect next step
    """
    # Callables that are not schedules: a mask is never evaluated at the count.
    static = frozenset(static_args) | {"mask", "weight_decay_mask", "decay_rate_fn"}

    def wrapped(*args, **kwargs) -> GradientTransformation:
        if args:
            raise ValueError("inject_hyperparams: pass hyperparameters by keyword")
        dynamic = {k: v for k, v in kwargs.items() if k not in static and (isinstance(v, numbers.Number) and not isinstance(v, bool) or callable(v))}
        fixed = {k: v for k, v in kwargs.items() if k not in dynamic}
        factory(**kwargs)  # validate the arguments now, not inside the step

        def values(state_or_none, count, device):
            out = {}
            for k, v in dynamic.items():
                if callable(v):
                    out[k] = torch.as_tensor(v(count), dtype=torch.float32, device=device)
                elif state_or_none is None:
                    out[k] = torch.tensor(float(v), dtype=torch.float32, device=device)
                else:
                    out[k] = state_or_none.hyperparams[k]
            return out

        def init(params):
            device = device_of(params)
            count = torch.zeros((), dtype=torch.int32, device=device)
            hp = values(None, count, device)
            return InjectHyperparamsState(count, hp, factory(**fixed, **hp).init(params))

        def current(state):
            hp = values(state, state.count, state.count.device)
            return hp, factory(**fixed, **hp)

        def update(updates, state, params=None, **extra):
            hp, inner = current(state)
            updates, inner_state = inner.update(updates, state.inner_state, params, **extra)
            return updates, InjectHyperparamsState(state.count + 1, hp, inner_state)

        probe = factory(**fixed, **{k: torch.zeros(()) for k in dynamic})
        fused = None
        if probe.traits.fused is not None:

            def apply(grads, state, master, **kw):
                hp, inner = current(state)
                inner_state = inner.traits.fused.apply(grads, state.inner_state, master, **kw)
                found_inf = kw.get("found_inf")
                advance = 1 if found_inf is None else (found_inf == 0).to(torch.int32)
                return InjectHyperparamsState(state.count + advance, hp, inner_state)

            # Not group by group (the hyperparameters are read from the state once per step) and
            # not on LeafGrads: the inner transform is rebuilt from the state each step.
            fused = FusedUpdate(apply)

        return GradientTransformation(init, update, Traits(fused=fused))

    return wrapped
