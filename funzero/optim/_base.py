"""The optimizer protocol: optax's ``GradientTransformation(init, update)`` over tensor pytrees.

``update(updates, state, params=None, *, info=None) -> (updates, state)``. Hyperparameters live
in closures, everything that changes lives in ``state`` (NamedTuples of tensors).

Under ZeRO the trees are ``{group: flat shard}``; ``info`` (a :class:`ShardInfo`) tells a
transform that needs it how shards map back to leaves (per-leaf masks, per-leaf norms) and how to
sum a scalar over the shard axis (global norms). Without ``info`` every dict entry is one leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import optree
import torch

from shardspec import FlatLayout

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "LeafGrads",
    "ShardInfo",
    "apply_updates",
    "chain",
    "gradient_tensors",
    "identity",
    "named_chain",
    "tree_map",
]

Tree = Any


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    """``optree.tree_map`` with ``None`` treated as a leaf-less node (optax's convention)."""
    return optree.tree_map(fn, tree, *rest, none_is_leaf=False, namespace="funzero")


class EmptyState(NamedTuple):
    """State of a stateless transform."""


class LeafGrads:
    """One group's gradient as autograd produced it: a tensor per leaf, not packed into the
    group's flat buffer.

    On one rank nothing needs the packed buffer, and packing it is a full copy of the gradient.
    The engine hands this only to an optimizer whose ``fused_apply`` declares ``leafwise = True``
    (:func:`funzero.optim.adamw`, and a :func:`chain` of scaling transforms before it), which
    reads each leaf where it lies.

    Attributes:
        paths: each leaf's path (for masks).
        grads: each leaf's gradient, in the leaf's shape.
        offsets: where each leaf starts in the flat buffer.
        numel: elements of the flat buffer (leaves plus alignment padding).
    """

    __slots__ = ("paths", "grads", "offsets", "numel")

    def __init__(self, paths: Sequence[str], grads: Sequence[torch.Tensor], offsets: Sequence[int], numel: int):
        self.paths, self.grads, self.offsets, self.numel = tuple(paths), tuple(grads), tuple(offsets), numel


def gradient_tensors(grads: Mapping[str, Any]) -> list[torch.Tensor]:
    """Every tensor of ``{group: gradient}``, a :class:`LeafGrads` contributing its leaves."""
    return [t for g in grads.values() for t in (g.grads if isinstance(g, LeafGrads) else (g,))]


@dataclass(frozen=True)
class ShardInfo:
    """How the trees a transform sees relate to the model's leaves.

    Attributes:
        layouts: ``{group: FlatLayout}`` for the flat buffers in the trees.
        rank: which shard of each layout this rank holds (0 when not sharded).
        sharded: whether the trees hold shards (True) or full buffers (False).
        psum: sums a tensor over the ranks that hold the other shards (identity if not sharded).
    """

    layouts: Mapping[str, FlatLayout]
    rank: int = 0
    sharded: bool = False
    psum: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda x: x)

    def segments(self, group: str) -> list[tuple[str, int, int]]:
        """``(leaf path, start, stop)`` of each leaf piece inside this rank's buffer of ``group``."""
        layout = self.layouts[group]
        if not self.sharded:
            return [(s.path, s.offset, s.offset + s.numel) for s in layout.slots]
        base = layout.shard_range(self.rank)[0]
        return [
            (s.path, s.offset + a - base, s.offset + b - base) for s, a, b in layout.leaf_ranges(self.rank)
        ]


class GradientTransformation:
    """A pair of pure functions ``init(params) -> state`` and ``update(...) -> (updates, state)``.

    ``fused_apply``, when present, performs ``update`` *and* the application to the master
    weights in one pass (and writes the low-precision parameter copy): the engine calls it
    instead of ``update`` + :func:`apply_updates`. It must compute the same function.

    ``scale_by``, when present, says the transform is stateless and multiplies every update by
    one scalar: ``scale_by(updates, prior, info) -> factor``, where ``prior`` (a float or 0-d
    tensor) is the factor the updates still have to be multiplied by. A :func:`chain` of such
    transforms before a fused optimizer folds them into the optimizer's ``grad_scale`` instead
    of writing scaled gradients (clipping costs one read of the gradient, for its norm).
    """

    def __init__(
        self,
        init: Callable[[Tree], Any],
        update: Callable[..., tuple[Tree, Any]],
        fused_apply: Callable[..., Any] | None = None,
        scale_by: Callable[..., Any] | None = None,
    ) -> None:
        self.init = init
        self.update = update
        self.fused_apply = fused_apply
        self.scale_by = scale_by

    def __iter__(self):  # allows `init, update = tx` as in optax
        return iter((self.init, self.update))


def identity() -> GradientTransformation:
    """Pass updates through unchanged."""
    return GradientTransformation(lambda params: EmptyState(), lambda u, s, p=None, **k: (u, s))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transforms in sequence; the state is the tuple of their states.

    If the last transform can fuse its application (:attr:`GradientTransformation.fused_apply`),
    so can the chain: the earlier transforms run, then the last one's fused pass. Earlier
    transforms that only scale (``scale_by``: clipping, ``scale``) are folded into the fused
    pass's ``grad_scale``; a loss scale to undo is applied before any of them.
    """
    if not transforms:
        raise ValueError("chain() needs at least one transform")
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise ValueError(f"chain: argument {i} is a {type(t).__name__}, not a GradientTransformation")

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None, **extra):
        new = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params, **extra)
            new.append(s)
        return updates, tuple(new)

    fused = None
    last = transforms[-1]
    if last.fused_apply is not None:

        prefix = transforms[:-1]
        foldable = all(t.scale_by is not None for t in prefix)

        def fold(grads, grad_scale, info, device):
            """The one factor the fused pass scales the gradients by: the loss scale to undo
            times each leading transform's factor (no scaled copy of the gradients)."""
            factor = 1.0 if grad_scale is None else grad_scale
            for t in prefix:
                factor = factor * t.scale_by(grads, factor, info)
            if isinstance(factor, torch.Tensor):
                return factor.to(device, torch.float32)
            return torch.full((), float(factor), device=device)

        def unscaled(grads, grad_scale):
            """Leading transforms that must see the gradients see them with the loss scale undone."""
            return grads if grad_scale is None else {k: g * grad_scale.to(g.device, g.dtype) for k, g in grads.items()}

        def fused(grads, state, master, **kw):
            if foldable:
                if prefix:
                    device = next(iter(master.values())).device
                    kw["grad_scale"] = fold(grads, kw.get("grad_scale"), kw.get("info"), device)
                return (*state[:-1], last.fused_apply(grads, state[-1], master, **kw))
            # Stateless leading transforms (clipping, scaling) run where the gradients are, which
            # saves moving them twice when the optimizer state lives on the host; the first
            # transform with state moves them to it (kw["to_state"]).
            grads, kw["grad_scale"] = unscaled(grads, kw.get("grad_scale")), None
            to_state = kw.get("to_state")
            new = []
            for t, s in zip(transforms[:-1], state[:-1]):
                if to_state is not None and _has_tensors(s):
                    grads, to_state = to_state(grads), None
                grads, s = t.update(grads, s, master, info=kw.get("info"))
                new.append(s)
            new.append(last.fused_apply(grads, state[-1], master, **kw))
            return tuple(new)

        def split(state):
            # For an engine that applies the last transform group by group (the pipelined host
            # update): the leading transforms as one whole-tree step where the gradients are, if
            # none of them keeps tensors (those must run where their state lives).
            inner = getattr(last.fused_apply, "split", None)
            parts = None if inner is None else inner(state[-1])
            if parts is None or parts[0] is not None or any(_has_tensors(s) for s in state[:-1]):
                return None  # no per-group update, a nested prefix, or a leading state to keep

            def run_prefix(grads, master, info, grad_scale):
                """``(grads, new leading states, the grad_scale the update applies from here)``."""
                if foldable:
                    return grads, list(state[:-1]), fold(grads, grad_scale, info, next(iter(grads.values())).device)
                grads, new = unscaled(grads, grad_scale), []
                for t, s in zip(transforms[:-1], state[:-1]):
                    grads, s = t.update(grads, s, master, info=info)
                    new.append(s)
                return grads, new, None

            return run_prefix, last.fused_apply, state[-1], lambda new_prefix, new_last: (*new_prefix, new_last)

        fused.split = split
        fused.leafwise = foldable and getattr(last.fused_apply, "leafwise", False)

    return GradientTransformation(init, update, fused)


def _has_tensors(tree) -> bool:
    return any(isinstance(x, torch.Tensor) for x in optree.tree_leaves(tree, namespace="funzero"))


def named_chain(*named: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Like :func:`chain`, with the state a dict keyed by the given names."""
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"named_chain: duplicate names in {names}")
    inner = chain(*(t for _, t in named))

    def init(params):
        return dict(zip(names, inner.init(params)))

    def update(updates, state, params=None, **extra):
        updates, s = inner.update(updates, tuple(state[n] for n in names), params, **extra)
        return updates, dict(zip(names, s))

    fused = None
    if inner.fused_apply is not None:

        def fused(grads, state, master, **kw):
            return dict(zip(names, inner.fused_apply(grads, tuple(state[n] for n in names), master, **kw)))

    return GradientTransformation(init, update, fused)


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """``params + updates`` leaf by leaf, in the params' dtype (new tensors)."""
    return tree_map(lambda p, u: (p + u.to(p.dtype)) if u is not None else p, params, updates)


def as_list(x: Sequence[Any] | Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]
