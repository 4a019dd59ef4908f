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
    "Accumulate",
    "EmptyState",
    "FusedUpdate",
    "GradientTransformation",
    "Groupwise",
    "LeafGrads",
    "ShardInfo",
    "Traits",
    "apply_updates",
    "chain",
    "gradient_tensors",
    "identity",
    "map_state",
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
    The engine hands this only to an optimizer whose fused update declares
    ``takes_leaves=True`` (:func:`funzero.optim.adamw`, and a :func:`chain` of scaling
    transforms before it), which reads each leaf where it lies.

    Attributes:
        paths: each leaf's path (for masks).
        grads: each leaf's gradient, in the leaf's shape.
        offsets: where each leaf starts in the flat buffer.
        numel: elements of the flat buffer (leaves plus alignment padding).
    """

    __slots__ = ("paths", "grads", "offsets", "numel")

    def __init__(self, paths: Sequence[str], grads: Sequence[torch.Tensor], offsets: Sequence[int], numel: int):
        self.paths, self.grads, self.offsets, self.numel = tuple(paths), tuple(grads), tuple(offsets), numel


def gradient_tensors(grads: Any) -> list[torch.Tensor]:
    """Every tensor of ``{group: gradient}`` (in the dict's order), a :class:`LeafGrads`
    contributing its leaves; any other pytree's tensors in its flattening order."""
    if isinstance(grads, Mapping) and all(isinstance(g, (torch.Tensor, LeafGrads)) for g in grads.values()):
        values = grads.values()
    else:
        values = optree.tree_leaves(grads, none_is_leaf=False, namespace="funzero")
    return [t for g in values for t in (g.grads if isinstance(g, LeafGrads) else (g,))]


@dataclass(frozen=True)
class ShardInfo:
    """How the trees a transform sees relate to the model's leaves.

    Attributes:
        layouts: ``{group: FlatLayout}`` for the flat buffers in the trees.
        rank: which shard of each layout this rank holds (0 when not sharded).
        sharded: whether the trees hold shards (True) or full buffers (False).
        psum: sums a tensor over the ranks that hold the other shards (identity if not sharded).
        tp_split: leaf paths split over a tensor-parallel axis (each tp rank holds a slice).
        tp_psum: sums a tensor over that axis (a split leaf's statistics are summed there too,
            a replicated leaf's are not).
        tp_size: ranks of that axis (a split leaf has ``tp_size`` times the elements a rank sees).
    """

    layouts: Mapping[str, FlatLayout]
    rank: int = 0
    sharded: bool = False
    psum: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda x: x)
    tp_split: frozenset = frozenset()
    tp_psum: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda x: x)
    tp_size: int = 1

    def segments(self, group: str) -> list[tuple[str, int, int]]:
        """``(leaf path, start, stop)`` of each leaf piece inside this rank's buffer of ``group``."""
        layout = self.layouts[group]
        if not self.sharded:
            return [(s.path, s.offset, s.offset + s.numel) for s in layout.slots]
        base = layout.shard_range(self.rank)[0]
        return [
            (s.path, s.offset + a - base, s.offset + b - base) for s, a, b in layout.leaf_ranges(self.rank)
        ]


# --- what a transform declares to the engine --------------------------------------------------
class Groupwise(NamedTuple):
    """A fused update taken apart so that an engine can run it one group at a time (the pipelined
    host update streams groups through it as their gradients arrive).

    ``prefix(grads, master, info, grad_scale) -> (grads, prefix_states, grad_scale)`` is the
    whole-tree work that must see every group first (a clipping norm), or ``None``. ``apply`` is
    then called with ``{g: grad}`` of one group at a time and the same incoming ``state`` each
    time (moments update in place); ``apply({}, state, {})`` returns the new state alone.
    ``join(prefix_states, new_state)`` is the new state of the whole transform.
    """

    prefix: Callable[..., Any] | None
    apply: Callable[..., Any]
    state: Any
    join: Callable[[Any, Any], Any]


class FusedUpdate(NamedTuple):
    """``update`` and its application to the master weights in one pass, as data.

    Attributes:
        apply: ``apply(grads, state, master, *, param_out=None, grad_scale=None, found_inf=None,
            info=None, to_state=None) -> new state``: updates ``master`` in place (and writes the
            low-precision copy into ``param_out``); it must compute what ``update`` followed by
            :func:`apply_updates` computes. ``grad_scale`` multiplies the gradients first,
            ``found_inf`` (nonzero) makes it a no-op that leaves the state as it was, ``to_state``
            moves gradients to where the state lives.
        groupwise: ``groupwise(state) -> Groupwise | None``: how to run ``apply`` group by group
            for this state, or ``None`` when it cannot be (``None`` here: never).
        takes_leaves: ``apply`` accepts :class:`LeafGrads` values.
    """

    apply: Callable[..., Any]
    groupwise: Callable[[Any], Groupwise | None] | None = None
    takes_leaves: bool = False


class Accumulate(NamedTuple):
    """Gradient accumulation declared to the engine (:func:`funzero.optim.multi_steps`).

    The engine decides *what* is accumulated (stage 1's full local gradients, or the reduced
    shards of the other stages: ``grad_like``) and calls these in this order each micro-step.

    Attributes:
        inner: the transform applied once every ``every_k`` micro-steps.
        every_k: micro-steps per optimizer step: an int, or (optax's ``every_k_schedule``) a
            callable ``gradient_step -> int`` of the optimizer steps applied so far; ``add``
            reads it, the engine need not.
        init: ``init(params, grad_like) -> state`` (the accumulator shaped like ``grad_like``).
        inner_state: ``inner_state(state) -> the inner transform's state``.
        with_inner_state: ``with_inner_state(state, inner_state) -> state``.
        add: ``add(state, grads) -> (ready, grads, state)``: accumulate one micro-batch's
            gradients; when ``ready`` (decided on the host), ``grads`` is the mean to apply and
            ``state`` the reset accumulator (the inner state untouched); otherwise ``grads`` is
            ``None`` and ``state`` is the whole new state.
    """

    inner: "GradientTransformation"
    every_k: int
    init: Callable[..., Any]
    inner_state: Callable[[Any], Any]
    with_inner_state: Callable[[Any, Any], Any]
    add: Callable[..., tuple[bool, Any, Any]]


class Traits(NamedTuple):
    """What a transform declares about itself beyond ``init``/``update``. Every field is an
    optional speed-up or a contract the engine may rely on; a transform without any (the
    default) is run through ``update`` alone.

    Attributes:
        fused: :class:`FusedUpdate`: update and apply in one pass (``funzero.optim.adamw``).
        scale: ``scale(updates, prior, info) -> factor``: the transform is stateless and
            multiplies every update by one scalar (``prior`` is the factor the updates still
            have to be multiplied by); a :func:`chain` of such transforms before a fused one folds
            them into its ``grad_scale`` (clipping costs one read of the gradient, for its norm).
        accumulate: :class:`Accumulate`: gradient accumulation over micro-steps.
    """

    fused: FusedUpdate | None = None
    scale: Callable[..., Any] | None = None
    accumulate: Accumulate | None = None


class GradientTransformation(NamedTuple):
    """A pair of pure functions ``init(params) -> state`` and ``update(...) -> (updates, state)``
    (optax's protocol), plus the :class:`Traits` the transform declares to the engine.

    ``GradientTransformation(init, update)`` builds one with no traits. Combinators
    (:func:`chain`, :func:`named_chain`, ``inject_hyperparams``) derive their traits from those
    of their parts, so a capability is never lost by wrapping.
    """

    init: Callable[[Tree], Any]
    update: Callable[..., tuple[Tree, Any]]
    traits: Traits = Traits()


def identity() -> GradientTransformation:
    """Pass updates through unchanged."""
    return GradientTransformation(lambda params: EmptyState(), lambda u, s, p=None, **k: (u, s))


def _check_transforms(where: str, transforms) -> None:
    if not transforms:
        raise ValueError(f"{where}() needs at least one transform")
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise ValueError(f"{where}: argument {i} is a {type(t).__name__}, not a GradientTransformation")


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transforms in sequence; the state is the tuple of their states.

    If the last transform has a fused update (:class:`FusedUpdate`), so has the chain: the
    earlier transforms run, then the last one's fused pass. Earlier transforms that only scale
    (``traits.scale``: clipping, ``scale``) are folded into the fused pass's ``grad_scale``; a
    loss scale to undo is applied before any of them.
    """
    _check_transforms("chain", transforms)

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None, **extra):
        new = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params, **extra)
            new.append(s)
        return updates, tuple(new)

    fused = _chain_fused(transforms[:-1], transforms[-1].traits.fused)
    return GradientTransformation(init, update, Traits(fused=fused))


def _chain_fused(prefix: Sequence[GradientTransformation], last: FusedUpdate | None) -> FusedUpdate | None:
    """The fused update of ``chain(*prefix, last)``, from the last transform's."""
    if last is None:
        return None
    foldable = all(t.traits.scale is not None for t in prefix)

    def fold(grads, grad_scale, info, device):
        """The one factor the fused pass scales the gradients by: the loss scale to undo times
        each leading transform's factor (no scaled copy of the gradients)."""
        factor = 1.0 if grad_scale is None else grad_scale
        for t in prefix:
            factor = factor * t.traits.scale(grads, factor, info)
        if isinstance(factor, torch.Tensor):
            return factor.to(device, torch.float32)
        return torch.full((), float(factor), device=device)

    def unscaled(grads, grad_scale):
        """Leading transforms that must see the gradients see them with the loss scale undone."""
        return grads if grad_scale is None else {k: g * grad_scale.to(g.device, g.dtype) for k, g in grads.items()}

    def apply(grads, state, master, **kw):
        if foldable:
            if prefix:
                device = next(iter(master.values())).device
                kw["grad_scale"] = fold(grads, kw.get("grad_scale"), kw.get("info"), device)
            return (*state[:-1], last.apply(grads, state[-1], master, **kw))
        # Stateless leading transforms (clipping, scaling) run where the gradients are, which
        # saves moving them twice when the optimizer state lives on the host; the first
        # transform with state moves them to it (kw["to_state"]).
        grads, kw["grad_scale"] = unscaled(grads, kw.get("grad_scale")), None
        to_state = kw.get("to_state")
        new = []
        for t, s in zip(prefix, state[:-1]):
            if to_state is not None and _has_tensors(s):
                grads, to_state = to_state(grads), None
            grads, s = t.update(grads, s, master, info=kw.get("info"))
            new.append(s)
        new.append(last.apply(grads, state[-1], master, **kw))
        return tuple(new)

    def groupwise(state):
        # The leading transforms as one whole-tree step where the gradients are, if none of them
        # keeps tensors (those must run where their state lives).
        inner = None if last.groupwise is None else last.groupwise(state[-1])
        if inner is None or inner.prefix is not None or any(_has_tensors(s) for s in state[:-1]):
            return None  # no per-group update, a nested prefix, or a leading state to keep

        def run_prefix(grads, master, info, grad_scale):
            """``(grads, new leading states, the grad_scale the update applies from here)``."""
            if foldable:
                return grads, list(state[:-1]), fold(grads, grad_scale, info, next(iter(grads.values())).device)
            grads, new = unscaled(grads, grad_scale), []
            for t, s in zip(prefix, state[:-1]):
                grads, s = t.update(grads, s, master, info=info)
                new.append(s)
            return grads, new, None

        return Groupwise(run_prefix if prefix else None, inner.apply, inner.state,
                         lambda new_prefix, new_last: (*(new_prefix or state[:-1]), inner.join(None, new_last)))

    return FusedUpdate(apply, groupwise, takes_leaves=foldable and last.takes_leaves)


def _has_tensors(tree) -> bool:
    return any(isinstance(x, torch.Tensor) for x in optree.tree_leaves(tree, namespace="funzero"))


def map_state(tx: GradientTransformation, to_inner: Callable[[Any], Any], from_inner: Callable[[Any], Any]) -> GradientTransformation:
    """``tx`` with its state kept in another form: ``to_inner`` turns the outer state into
    ``tx``'s, ``from_inner`` back. Every trait of ``tx`` carries over."""

    def init(params):
        return from_inner(tx.init(params))

    def update(updates, state, params=None, **extra):
        updates, s = tx.update(updates, to_inner(state), params, **extra)
        return updates, from_inner(s)

    fused = tx.traits.fused
    if fused is not None:
        inner_fused = fused

        def apply(grads, state, master, **kw):
            return from_inner(inner_fused.apply(grads, to_inner(state), master, **kw))

        def groupwise(state):
            gw = None if inner_fused.groupwise is None else inner_fused.groupwise(to_inner(state))
            if gw is None:
                return None
            return gw._replace(join=lambda new_prefix, new_last: from_inner(gw.join(new_prefix, new_last)))

        fused = FusedUpdate(apply, groupwise, inner_fused.takes_leaves)
    return GradientTransformation(init, update, tx.traits._replace(fused=fused))


def named_chain(*named: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Like :func:`chain`, with the state a dict keyed by the given names."""
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"named_chain: duplicate names in {names}")
    inner = chain(*(t for _, t in named))
    return map_state(inner, lambda state: tuple(state[n] for n in names), lambda s: dict(zip(names, s)))


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """``params + updates`` leaf by leaf, in the params' dtype (new tensors); a ``None`` update
    leaves its parameter as it is (optax)."""
    return optree.tree_map(
        lambda p, u: (p + u.to(p.dtype)) if u is not None and p is not None else p,
        params, updates, none_is_leaf=True, namespace="funzero",
    )
