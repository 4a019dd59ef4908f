"""Gradient transformations: the ~10-line building blocks and the optimizers chained from them.

Every transform works on any pytree of tensors (dicts, lists, tuples, NamedTuples; ``None`` is
an empty subtree, as in optax) and, under ZeRO, on the engine's ``{group: flat shard}`` with
``info`` (:class:`ShardInfo`) mapping shards back to the model's leaves: per-leaf work (masks,
trust ratios, block RMS) then runs per leaf segment, partial sums added over the shards.
Arguments are validated when a transform is built, never inside the step.

Names, argument order and defaults follow optax 0.2.x; the differences are deliberate:

* ``adamw``'s ``weight_decay`` defaults to 1e-2 (torch.optim.AdamW's), not optax's 1e-4.
* step-dependent scalars (bias corrections, RAdam's rectification) are computed in fp64 from the
  count, as torch.optim does in Python floats; optax computes them in fp32, where
  ``1 - 0.999**t`` is off by up to ~1.5e-5 of its value.
* ``masked`` and ``partition`` keep the inner transforms' state for every leaf (under ZeRO a
  leaf is a slice of a flat shard, not a tree node that could be dropped); the inner transform
  sees zeros on the leaves it does not own, so its outputs there are never used and whole-tree
  reductions (a global norm) cover only its own leaves, as in optax.
* funzero's extras are keyword-only: ``fused`` (adamw), ``weight_decay`` (sgd's L2 decay).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import optree
import torch

from funzero.optim._base import (
    EmptyState,
    FusedUpdate,
    GradientTransformation,
    Groupwise,
    LeafGrads,
    ShardInfo,
    Traits,
    chain,
    gradient_tensors,
    identity,
    tree_map,
)
from funzero.optim._schedules import Schedule
from funzero.optim._tree import NS, LeafRule, device_of, model_leaves, pieces

__all__ = [
    "AddDecayedWeightsState",
    "ApplyEvery",
    "EmaState",
    "FactoredState",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "ScaleByRStdDevState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "TraceState",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "add_decayed_weights",
    "amsgrad",
    "apply_every",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "ema",
    "global_norm",
    "lamb",
    "lion",
    "masked",
    "multi_transform",
    "nadam",
    "nadamw",
    "partition",
    "radam",
    "rmsprop",
    "scale",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_amsgrad",
    "scale_by_factored_rms",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_param_block_rms",
    "scale_by_radam",
    "scale_by_rms",
    "scale_by_rss",
    "scale_by_schedule",
    "scale_by_stddev",
    "scale_by_trust_ratio",
    "sgd",
    "trace",
]

ScalarOrSchedule = float | torch.Tensor | Schedule
# None (every leaf), a pytree of bools over the params (or a prefix of it), a callable
# params -> such a pytree (optax), a regex or list of regexes over leaf paths, or by_path(fn).
Mask = Any


# --- helpers ---------------------------------------------------------------------------------
# Messages are built only on failure: the builders also run inside traced steps
# (inject_hyperparams), where formatting a closure would break the graph.
def _nonneg(name: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {name}={value}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {name}={value}")


def _unit(name: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {name}={value}")


def _dtype(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, torch.dtype):
        raise ValueError(f"{name} must be a torch.dtype or None, got {name}={value!r}")


def _check_moments(b1, b2, eps, eps_root=0.0, mu_dtype=None) -> None:
    """The arguments Adam's relatives share."""
    _unit("b1", b1)
    _unit("b2", b2)
    _nonneg("eps", eps)
    _nonneg("eps_root", eps_root)
    _dtype("mu_dtype", mu_dtype)


def _value(v: ScalarOrSchedule, count: torch.Tensor) -> torch.Tensor | float:
    """A hyperparameter's value at ``count``: schedules are called, scalars pass through."""
    return v(count) if callable(v) else v


def _on(x, device: torch.device):
    """A 0-d tensor hyperparameter as the kernel on ``device`` takes it: a host value elsewhere
    becomes a Python number, a device value elsewhere is copied."""
    if not isinstance(x, torch.Tensor) or x.device == device:
        return x
    if x.device.type == "cpu":
        return x.item()
    return x.to(device)


def _zeros(tree, dtype=None):
    return tree_map(lambda t: torch.zeros_like(t, dtype=dtype or t.dtype), tree)


def _full(tree, value: float, dtype=None):
    return tree_map(lambda t: torch.full_like(t, value, dtype=dtype or t.dtype), tree)


def _count0(tree) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int32, device=device_of(tree))


def _map(fn: Callable[..., tuple], n: int, tree, *rest) -> tuple:
    """``tree_map`` for a ``fn`` returning ``n`` values: ``n`` trees shaped like ``tree``."""
    leaves, spec = optree.tree_flatten(tree, none_is_leaf=False, namespace=NS)
    others = [spec.flatten_up_to(r) for r in rest]
    outs = [fn(*xs) for xs in zip(leaves, *others)]
    cols = list(zip(*outs)) if outs else [()] * n
    return tuple(optree.tree_unflatten(spec, list(c)) for c in cols)


def _bias_correction(decay: float, count: torch.Tensor) -> torch.Tensor:
    """``1 - decay**count`` in fp64 (in fp32, ``1 - 0.999**1`` loses ~1e-5 of its value)."""
    return 1 - decay ** count.to(torch.float64)


def _runs(info: ShardInfo | None, name: str, numel: int, keep: Callable[[str], bool]) -> list[tuple[int, int]]:
    """Merged ``[start, stop)`` runs of the buffer ``name`` whose leaves satisfy ``keep``."""
    if info is None:
        return [(0, numel)] if keep(name) else []
    runs: list[tuple[int, int]] = []
    for path, a, b in info.segments(name):
        if not keep(path):
            continue
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))
    return runs


def _leafwise_psum(sums: torch.Tensor, keys: Sequence[tuple[str, str]], info: ShardInfo) -> torch.Tensor:
    """Sum per-leaf partial sums over shards: scatter to a per-leaf table, psum, gather back. The
    rows of leaves split over a tensor-parallel axis are summed over it as well."""
    slots = {(g, path): j for j, (g, path) in enumerate((g, s.path) for g, lay in info.layouts.items() for s in lay.slots)}
    table = torch.zeros(len(slots), *sums.shape[1:], dtype=sums.dtype, device=sums.device)
    index = torch.tensor([slots[k] for k in keys], device=sums.device, dtype=torch.long)
    table = table.index_add(0, index, sums)
    if info.sharded:
        table = info.psum(table)
    if info.tp_split:
        split = torch.tensor([path in info.tp_split for _, path in slots], device=sums.device)
        table = torch.where(split.view(-1, *[1] * (table.dim() - 1)), info.tp_psum(table), table)
    return table[index]


def _leaf_sums(pc, info: ShardInfo | None, stat: Callable[[int, int, int], torch.Tensor], width: int) -> torch.Tensor:
    """``(num_segments, width)``: ``stat(tensor index, start, stop)`` of every leaf piece, with the
    pieces of one leaf on other ranks added in (one all-reduce for all leaves)."""
    rows, keys = [], []
    for i, (name, segs) in enumerate(zip(pc.names, pc.segments)):
        for path, a, b in segs:
            rows.append(stat(i, a, b))
            keys.append((name, path))
    sums = torch.stack(rows) if rows else torch.zeros(0, width)
    if info is not None and (info.sharded or info.tp_split) and rows:
        sums = _leafwise_psum(sums, keys, info)
    return sums


def _leaf_numels(pc, info: ShardInfo | None) -> list[int]:
    """Elements of the whole leaf each segment belongs to (for per-leaf means)."""
    if info is None:
        return [x.numel() for x in pc.leaves]
    slots = model_leaves(info)
    return [slots[path].numel * (info.tp_size if path in info.tp_split else 1) for segs in pc.segments
            for path, _, _ in segs]


def _per_segment(pc, info: ShardInfo | None, factors: torch.Tensor, op) -> list[torch.Tensor]:
    """``op(piece, factor)`` on every leaf piece; padding passes through."""
    out, i = [], 0
    for u, segs in zip(pc.leaves, pc.segments):
        if info is None:  # the whole leaf is its one segment
            out.append(op(u, factors[i].to(u.dtype)))
            i += 1
            continue
        o = u.clone()
        for _, a, b in segs:
            o[a:b] = op(u[a:b], factors[i].to(u.dtype))
            i += 1
        out.append(o)
    return out


def _restrict(pc, chosen: list[list[bool]]) -> list[torch.Tensor]:
    """Each tensor with the pieces not ``chosen`` zeroed (what a masked inner transform sees)."""
    out = []
    for u, segs, c in zip(pc.leaves, pc.segments, chosen):
        if all(c):
            out.append(u)
        elif not any(c):
            out.append(torch.zeros_like(u))
        else:
            z, uf = torch.zeros_like(u, memory_format=torch.contiguous_format), u.reshape(-1)
            zf = z.view(-1)
            for (_, a, b), k in zip(segs, c):
                if k:
                    zf[a:b] = uf[a:b]
            out.append(z)
    return out


def _merge(old: torch.Tensor, new: torch.Tensor, segs, chosen: list[bool]) -> torch.Tensor:
    """``new`` on the chosen pieces, ``old`` elsewhere."""
    if all(chosen):
        return new
    if not any(chosen):
        return old
    o = old.clone(memory_format=torch.contiguous_format)
    of, nf = o.view(-1), new.reshape(-1)
    for (_, a, b), k in zip(segs, chosen):
        if k:
            of[a:b] = nf[a:b]
    return o


# --- stateless -------------------------------------------------------------------------------
def scale(step_size: float) -> GradientTransformation:
    """Multiply updates by ``step_size``."""

    def update(updates, state, params=None, **_):
        return tree_map(lambda u: u * step_size, updates), state

    return GradientTransformation(lambda p: EmptyState(), update, Traits(scale=lambda updates, prior, info=None: step_size))


class ScaleByScheduleState(NamedTuple):
    count: torch.Tensor  # () int32, updates applied so far


def scale_by_schedule(step_size_fn: Schedule) -> GradientTransformation:
    """Multiply updates by ``step_size_fn(count)``."""
    if not callable(step_size_fn):
        raise ValueError(f"scale_by_schedule needs a callable, got {step_size_fn!r}")

    def init(params):
        return ScaleByScheduleState(_count0(params))

    def update(updates, state, params=None, **_):
        s = step_size_fn(state.count)
        return tree_map(lambda u: u * s, updates), ScaleByScheduleState(state.count + 1)

    return GradientTransformation(init, update)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule | None, *, flip_sign: bool = True) -> GradientTransformation:
    """Multiply by ``-learning_rate`` (a float, a 0-d tensor, or a schedule); ``None``: identity."""
    if learning_rate is None:
        return identity()
    _nonneg("learning_rate", learning_rate)
    m = -1.0 if flip_sign else 1.0
    if callable(learning_rate):
        return scale_by_schedule(lambda count: m * learning_rate(count))
    return scale_by_schedule(lambda count: m * learning_rate)


class AddDecayedWeightsState(NamedTuple):
    count: torch.Tensor  # () int32, updates applied so far (a scheduled decay reads it)


def add_decayed_weights(weight_decay: ScalarOrSchedule = 0.0, mask: Mask = None) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates (decoupled decay) on the leaves ``mask`` selects.

    Args:
        weight_decay: a number, a 0-d tensor, or a schedule ``count -> rate``.
        mask: which leaves decay (see :mod:`funzero.optim`): ``None`` (all), a pytree of bools or
            a callable ``params -> pytree of bools`` (optax), a regex or list of regexes over leaf
            paths, or :func:`by_path`.
    """
    scheduled = callable(weight_decay)
    _nonneg("weight_decay", weight_decay)
    rule = LeafRule(mask, where="add_decayed_weights")

    def init(params):
        return AddDecayedWeightsState(_count0(params)) if scheduled else EmptyState()

    def update(updates, state, params=None, info: ShardInfo | None = None, **_):
        if params is None:
            raise ValueError("add_decayed_weights needs params")
        wd = weight_decay(state.count) if scheduled else weight_decay
        new_state = AddDecayedWeightsState(state.count + 1) if scheduled else state
        if isinstance(wd, (int, float)) and wd == 0:
            return updates, new_state
        keep = rule.decide(updates, info)
        pc = pieces(updates, info)
        out = []
        for name, u, p in zip(pc.names, pc.leaves, pc.align(params)):
            runs = _runs(info, name, u.numel(), keep)
            if runs == [(0, u.numel())]:
                out.append(u + wd * p.to(u.dtype))
            else:
                u = u.clone()
                for a, b in runs:
                    u[a:b] += wd * p[a:b].to(u.dtype)
                out.append(u)
        return pc.rebuild(out), new_state

    return GradientTransformation(init, update)


def masked(inner: GradientTransformation, mask: Mask) -> GradientTransformation:
    """Apply ``inner`` only to the leaves ``mask`` selects; the others pass through unchanged.

    Args:
        inner: the transform to apply on the selected leaves.
        mask: a pytree of bools shaped like the params (or a prefix of them), a callable
            ``params -> such a pytree`` (optax's forms), a regex or list of regexes over leaf
            paths, or :func:`by_path` (how each form meets the leaves: :mod:`funzero.optim`).

    The state is ``inner``'s, kept for every leaf (optax wraps a state for the selected leaves
    only in ``MaskedState``): under ZeRO a leaf is a slice of a flat shard, not a tree node of
    its own. ``inner`` sees zeros on the other leaves and its outputs there are dropped.

    Example:
        >>> tx = masked(add_decayed_weights(0.1), lambda p: tree_map(lambda x: x.ndim > 1, p))
    """
    if not isinstance(inner, GradientTransformation):
        raise ValueError(f"masked wraps a GradientTransformation, got a {type(inner).__name__}: {inner!r}")
    if mask is None:
        raise ValueError(f"masked() needs a mask, got {mask=}")
    rule = LeafRule(mask, where="masked")

    def update(updates, state, params=None, info: ShardInfo | None = None, **kw):
        keep = rule.decide(updates, info)
        pc = pieces(updates, info)
        chosen = [[keep(path) for path, _, _ in segs] for segs in pc.segments]
        new, state = inner.update(pc.rebuild(_restrict(pc, chosen)), state, params, info=info, **kw)
        out = [_merge(u, n, segs, c) for u, n, segs, c in zip(pc.leaves, pc.align(new), pc.segments, chosen)]
        return pc.rebuild(out), state

    return GradientTransformation(inner.init, update)


def partition(transforms: Mapping[Any, GradientTransformation], param_labels) -> GradientTransformation:
    """Apply a different transform to each class of leaves (optax's ``partition``, alias
    ``multi_transform``).

    Args:
        transforms: ``{label: transform}``.
        param_labels: which label each leaf has: a pytree of labels shaped like the params (or a
            prefix of them), a callable ``params -> such a pytree`` (optax's forms), ordered
            ``(regex, label)`` rules over leaf paths (first match wins; a leaf no rule matches is
            an error naming it), or :func:`by_path`. A list of ``(str, str)`` pairs reads as
            rules unless it has the params' own structure (then it is a labels pytree).

    The state is ``{label: that transform's state}``, each kept for every leaf (see
    :func:`masked`); each transform sees zeros on the leaves of other labels. Under ZeRO the
    buffers' padding, which belongs to no leaf, comes out as zeros.

    Example:
        >>> tx = partition({"adam": adam(1e-3), "sgd": sgd(1e-2)}, {"w": "adam", "b": "sgd"})
    """
    if not transforms:
        raise ValueError(f"partition() needs at least one transform, got {transforms=}")
    for lab, t in transforms.items():
        if not isinstance(t, GradientTransformation):
            raise ValueError(f"partition: transform {lab!r} is a {type(t).__name__}, not a GradientTransformation")
    rule = LeafRule(param_labels, where="partition", kind="labels")
    for lab in sorted(rule.labels() or (), key=repr):
        if lab not in transforms:
            raise ValueError(f"partition: label {lab!r} has no transform (have {sorted(transforms, key=repr)})")

    def init(params):
        return {k: t.init(params) for k, t in transforms.items()}

    def update(updates, state, params=None, info: ShardInfo | None = None, **kw):
        label_of = rule.decide(updates, info)
        pc = pieces(updates, info)
        labels = []
        for segs in pc.segments:
            labs = [label_of(path) for path, _, _ in segs]
            for (path, _, _), lab in zip(segs, labs):
                if lab not in transforms:  # a callable's labels are known only now
                    raise ValueError(f"partition: leaf {path!r} has label {lab!r}, which has no transform")
            labels.append(labs)
        news, states = {}, {}
        for lab, t in transforms.items():
            chosen = [[x == lab for x in labs] for labs in labels]
            new, states[lab] = t.update(pc.rebuild(_restrict(pc, chosen)), state[lab], params, info=info, **kw)
            news[lab] = pc.align(new)
        out = []
        for i, (u, segs, labs) in enumerate(zip(pc.leaves, pc.segments, labels)):
            if info is None:
                out.append(news[labs[0]][i])
                continue
            o = torch.zeros_like(news[next(iter(transforms))][i])  # padding: belongs to no leaf
            for (_, a, b), lab in zip(segs, labs):
                o[a:b] = news[lab][i][a:b]
            out.append(o)
        return pc.rebuild(out), states

    return GradientTransformation(init, update)


multi_transform = partition


def global_norm(tree, info: ShardInfo | None = None) -> torch.Tensor:
    """L2 norm over every element of the tree (fp32), summed across shards when sharded.

    A value may be :class:`LeafGrads` (a group's gradient as separate leaves). Under tensor
    parallelism (``info.tp_split``) the leaves split over tp are summed over it too, the
    replicated ones counted once."""
    if info is not None and info.tp_split:
        return _tp_global_norm(tree, info)
    leaves = gradient_tensors(tree)
    if leaves:
        # One multi-tensor pass that reads each gradient once and accumulates in fp32 (fp64 for
        # fp64 trees); per-tensor casts and squares would write the gradient out twice in fp32.
        acc = torch.float64 if any(t.dtype == torch.float64 for t in leaves) else torch.float32
        total = torch.stack(torch._foreach_norm(leaves, 2, dtype=acc)).square().sum()
    else:
        total = torch.zeros(())
    if info is not None and info.sharded:
        total = info.psum(total)
    return total.sqrt()


def _tp_global_norm(tree, info: ShardInfo) -> torch.Tensor:
    """:func:`global_norm` of ``{group: buffer or LeafGrads}`` with some leaves split over a
    tensor-parallel axis: two partial square sums (split, replicated), both summed over the
    shards, the split one over tp as well."""
    split = info.tp_split
    parts: tuple[list, list] = ([], [])  # squares of the split leaves, of the rest
    for name, g in tree.items():
        if isinstance(g, LeafGrads):
            for path, t in zip(g.paths, g.grads):
                parts[path not in split].append(t.reshape(-1))
            continue
        flat = g.reshape(-1)
        for i, keep in enumerate((lambda p: p in split, lambda p: p not in split)):
            parts[i].extend(flat[a:b] for a, b in _runs(info, name, flat.numel(), keep))
    tensors = parts[0] + parts[1]
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    device = tensors[0].device if tensors else None
    sums = torch.stack([torch.stack(torch._foreach_norm(p, 2, dtype=acc)).square().sum() if p
                        else torch.zeros((), dtype=acc, device=device) for p in parts])
    if info.sharded:
        sums = info.psum(sums)
    return (info.tp_psum(sums[0]) + sums[1]).sqrt()


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale updates by ``min(1, max_norm / global_norm)``.

    Under ZeRO the squared norm of each rank's shard is summed over the shard axis with one
    all-reduce of a scalar, so every rank clips by the norm of the whole gradient.
    """
    if not max_norm > 0:
        raise ValueError(f"clip_by_global_norm needs max_norm > 0, got {max_norm=}")

    def factor_of(norm: torch.Tensor) -> torch.Tensor:
        # optax: trigger = norm < max_norm; clipped = u / norm * max_norm otherwise.
        return torch.where(norm < max_norm, torch.ones_like(norm), max_norm / norm)

    def update(updates, state, params=None, info: ShardInfo | None = None, **_):
        factor = factor_of(global_norm(updates, info))
        return tree_map(lambda u: u * factor.to(u.dtype), updates), state

    def scale_by(updates, prior, info=None):
        # The norm of the updates once multiplied by `prior`, without forming them.
        norm = global_norm(updates, info)
        return factor_of(norm * (prior.to(norm.device).abs() if isinstance(prior, torch.Tensor) else abs(prior)))

    return GradientTransformation(lambda p: EmptyState(), update, Traits(scale=scale_by))


def clip(max_delta: float) -> GradientTransformation:
    """Clip every element of the updates to ``[-max_delta, max_delta]``."""
    _nonneg("max_delta", max_delta)

    def update(updates, state, params=None, **_):
        return tree_map(lambda u: u.clamp(-max_delta, max_delta), updates), state

    return GradientTransformation(lambda p: EmptyState(), update)


def clip_by_block_rms(threshold: float) -> GradientTransformation:
    """Divide each leaf's update by ``max(1, rms(update) / threshold)``.

    Under ZeRO the RMS is the whole leaf's: the squared sums of its pieces are added over the
    shards (one all-reduce of a vector for all leaves).
    """
    _positive("threshold", threshold)

    def update(updates, state, params=None, info: ShardInfo | None = None, **_):
        pc = pieces(updates, info)
        flat = [u.reshape(-1).to(torch.promote_types(u.dtype, torch.float32)) for u in pc.leaves]
        sq = _leaf_sums(pc, info, lambda i, a, b: flat[i][a:b].square().sum().reshape(1), 1)[:, 0]
        n = torch.tensor(_leaf_numels(pc, info), dtype=sq.dtype, device=sq.device)
        denom = torch.clamp((sq / n).sqrt() / threshold, min=1.0)
        return pc.rebuild(_per_segment(pc, info, denom, lambda u, d: u / d)), state

    return GradientTransformation(lambda p: EmptyState(), update)


# --- momentum and adaptive -------------------------------------------------------------------
class TraceState(NamedTuple):
    trace: Any  # tree like params: the momentum buffer


def trace(decay: float, nesterov: bool = False, accumulator_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Momentum: ``t = g + decay * t``; the update is ``t`` (or ``g + decay * t`` with nesterov).

    ``accumulator_dtype``: the dtype ``t`` is kept in (default: the params').
    """
    _nonneg("decay", decay)
    _dtype("accumulator_dtype", accumulator_dtype)

    def init(params):
        return TraceState(_zeros(params, accumulator_dtype))

    def update(updates, state, params=None, **_):
        t = tree_map(lambda g, tr: g + decay * tr.to(g.dtype), updates, state.trace)
        out = tree_map(lambda g, tr: g + decay * tr, updates, t) if nesterov else t
        if accumulator_dtype is not None:
            t = tree_map(lambda x: x.to(accumulator_dtype), t)
        return out, TraceState(t)

    return GradientTransformation(init, update)


class EmaState(NamedTuple):
    count: torch.Tensor  # () int32, updates applied so far
    ema: Any  # tree like params: the moving average


def ema(decay: float, debias: bool = True, accumulator_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Exponential moving average of the updates, ``e = (1 - decay) g + decay e``; the update is
    ``e`` (``debias``: divided by ``1 - decay**t``)."""
    _unit("decay", decay)
    _dtype("accumulator_dtype", accumulator_dtype)

    def init(params):
        return EmaState(_count0(params), _zeros(params, accumulator_dtype))

    def update(updates, state, params=None, **_):
        count = state.count + 1
        new = tree_map(lambda g, e: (1 - decay) * g + decay * e, updates, state.ema)
        out = new
        if debias:
            bc = _bias_correction(decay, count)
            out = tree_map(lambda e: e / bc.to(e.dtype), new)
        if accumulator_dtype is not None:
            new = tree_map(lambda x: x.to(accumulator_dtype), new)
        return out, EmaState(count, new)

    return GradientTransformation(init, update)


class ScaleByAdamState(NamedTuple):
    count: torch.Tensor  # () int32, updates applied so far
    mu: Any  # tree like params (mu_dtype): first moment
    nu: Any  # tree like params (their dtype): second moment


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """Adam's bias-corrected ``m_hat / (sqrt(v_hat + eps_root) + eps)``.

    Args:
        eps_root: added to ``v_hat`` inside the square root.
        mu_dtype: the dtype of the first moment (default: the params'); the second moment keeps
            the params' dtype, as in optax.
        nesterov: NAdam's look-ahead first moment (Dozat, 2016), as optax's.

    With ``eps_root=0`` and no nesterov the update is computed in torch.optim's operation order
    (``m / (sqrt(v) / sqrt(bc2) + eps) / bc1``).
    """
    _check_moments(b1, b2, eps, eps_root, mu_dtype)
    plain = not nesterov and isinstance(eps_root, (int, float)) and eps_root == 0

    def init(params):
        return ScaleByAdamState(_count0(params), _zeros(params, mu_dtype), _zeros(params))

    def update(updates, state, params=None, **_):
        count = state.count + 1
        # Bias corrections in fp64, as torch.optim does in Python floats: in fp32, 1 - 0.999**1
        # loses ~1e-5 of its value to cancellation.
        bc1 = _bias_correction(b1, count)
        bc2 = _bias_correction(b2, count)
        bc2_sqrt = bc2.sqrt()
        bc1_next = _bias_correction(b1, count + 1) if nesterov else None

        def one(g, mu, nu):
            g = g.to(nu.dtype)
            m = mu.to(nu.dtype).lerp(g, 1 - b1)
            v = nu * b2 + (1 - b2) * g * g
            if plain:
                out = m / (v.sqrt() / bc2_sqrt.to(v.dtype) + eps) / bc1.to(v.dtype)
            else:
                m_hat = m / bc1.to(v.dtype)
                if nesterov:
                    m_hat = b1 * (m / bc1_next.to(v.dtype)) + (1 - b1) * (g / bc1.to(v.dtype))
                out = m_hat / ((v / bc2.to(v.dtype) + eps_root).sqrt() + eps)
            return out, m.to(mu.dtype), v

        out, mu, nu = _map(one, 3, updates, state.mu, state.nu)
        return out, ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init, update)


class ScaleByAmsgradState(NamedTuple):
    count: torch.Tensor  # () int32, updates applied so far
    mu: Any  # tree like params (mu_dtype): first moment
    nu: Any  # tree like params: second moment
    nu_max: Any  # tree like params: running maximum of the (bias-corrected) second moment


def scale_by_amsgrad(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
) -> GradientTransformation:
    """AMSGrad (Reddi et al., 2018): Adam dividing by the running maximum of ``v_hat``.

    ``bias_correction_mu`` / ``bias_correction_nu`` off give the paper's uncorrected form.
    """
    _check_moments(b1, b2, eps, eps_root, mu_dtype)

    def init(params):
        return ScaleByAmsgradState(_count0(params), _zeros(params, mu_dtype), _zeros(params), _zeros(params))

    def update(updates, state, params=None, **_):
        count = state.count + 1
        bc1, bc2 = _bias_correction(b1, count), _bias_correction(b2, count)

        def one(g, mu, nu, nu_max):
            m = (1 - b1) * g + b1 * mu.to(nu.dtype)
            v = (1 - b2) * (g * g) + b2 * nu
            m_hat = m / bc1.to(m.dtype) if bias_correction_mu else m
            v_eff = v / bc2.to(v.dtype) if bias_correction_nu else v
            v_max = torch.maximum(nu_max, v_eff)
            return m_hat / ((v_max + eps_root).sqrt() + eps), m.to(mu.dtype), v, v_max

        out, mu, nu, nu_max = _map(one, 4, updates, state.mu, state.nu, state.nu_max)
        return out, ScaleByAmsgradState(count, mu, nu, nu_max)

    return GradientTransformation(init, update)


def scale_by_adamax(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """AdaMax (Kingma & Ba, 2015, §7): ``m_hat / u`` with ``u = max(|g| + eps, b2 u)``.

    The state is :class:`ScaleByAdamState` (``nu`` holds the infinity norm ``u``).
    """
    _check_moments(b1, b2, eps)

    def init(params):
        return ScaleByAdamState(_count0(params), _zeros(params), _zeros(params))

    def update(updates, state, params=None, **_):
        count = state.count + 1
        bc1 = _bias_correction(b1, count)

        def one(g, mu, nu):
            m = (1 - b1) * g + b1 * mu
            u = torch.maximum(g.abs() + eps, b2 * nu)
            return (m / bc1.to(m.dtype)) / u, m, u

        out, mu, nu = _map(one, 3, updates, state.mu, state.nu)
        return out, ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init, update)


def scale_by_radam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    threshold: float = 5.0,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """Rectified Adam (Liu et al., 2020, arXiv 1908.03265): Adam's step scaled by the variance
    rectification ``r`` once the approximated SMA length ``rho_t`` reaches ``threshold``; the
    bias-corrected momentum alone before that. The state is :class:`ScaleByAdamState`.

    ``rho_t`` is computed in fp64 (optax: fp32, where it is off by ~0.01 near the threshold).
    """
    _check_moments(b1, b2, eps, eps_root)
    ro_inf = 2.0 / (1.0 - b2) - 1.0

    def init(params):
        return ScaleByAdamState(_count0(params), _zeros(params), _zeros(params))

    def update(updates, state, params=None, **_):
        count = state.count + 1
        c = count.to(torch.float64)
        b2t = b2**c
        ro = ro_inf - 2 * c * b2t / (1 - b2t)
        rect = ((ro - 4.0) * (ro - 2.0) * ro_inf / ((ro_inf - 4.0) * (ro_inf - 2.0) * ro)).sqrt()  # NaN below 4: unused
        use = ro >= threshold
        bc1, bc2 = _bias_correction(b1, count), _bias_correction(b2, count)
        bc1_next = _bias_correction(b1, count + 1) if nesterov else None

        def one(g, mu, nu):
            m = (1 - b1) * g + b1 * mu
            v = (1 - b2) * (g * g) + b2 * nu
            m_hat = m / bc1.to(m.dtype)
            if nesterov:
                m_hat = b1 * (m / bc1_next.to(m.dtype)) + (1 - b1) * (g / bc1.to(m.dtype))
            step = rect.to(m.dtype) * m_hat / ((v / bc2.to(v.dtype) + eps_root).sqrt() + eps)
            return torch.where(use, step, m_hat), m, v

        out, mu, nu = _map(one, 3, updates, state.mu, state.nu)
        return out, ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init, update)


class ScaleByRssState(NamedTuple):
    sum_of_squares: Any  # tree like params: the running sum of squared gradients


def scale_by_rss(initial_accumulator_value: float = 0.1, eps: float = 1e-7) -> GradientTransformation:
    """Divide by the root of the sum of all squared gradients so far (Adagrad's scaling):
    ``g * rsqrt(s + eps)`` where ``s > 0``, else 0."""
    _nonneg("initial_accumulator_value", initial_accumulator_value)
    _nonneg("eps", eps)

    def init(params):
        return ScaleByRssState(_full(params, initial_accumulator_value))

    def update(updates, state, params=None, **_):
        def one(g, s):
            s = g * g + s
            return torch.where(s > 0, (s + eps).rsqrt(), torch.zeros_like(s)) * g, s

        out, ss = _map(one, 2, updates, state.sum_of_squares)
        return out, ScaleByRssState(ss)

    return GradientTransformation(init, update)


class ScaleByRmsState(NamedTuple):
    count: torch.Tensor  # () int32, updates applied so far (read only with bias_correction)
    nu: Any  # tree like params: moving average of squared gradients


def scale_by_rms(
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
) -> GradientTransformation:
    """RMSProp's scaling: ``g / sqrt(nu + eps)`` (or ``g / (sqrt(nu) + eps)`` with
    ``eps_in_sqrt=False``), ``nu`` the moving average of ``g**2`` (bias-corrected on request).

    The state always carries the count (optax keeps it only with ``bias_correction``).
    """
    _unit("decay", decay)
    _nonneg("eps", eps)
    _nonneg("initial_scale", initial_scale)

    def init(params):
        return ScaleByRmsState(_count0(params), _full(params, initial_scale))

    def update(updates, state, params=None, **_):
        count = state.count + 1
        bc = _bias_correction(decay, count) if bias_correction else None

        def one(g, nu):
            v = (1 - decay) * (g * g) + decay * nu
            v_hat = v / bc.to(v.dtype) if bias_correction else v
            s = (v_hat + eps).rsqrt() if eps_in_sqrt else 1 / (v_hat.sqrt() + eps)
            return s * g, v

        out, nu = _map(one, 2, updates, state.nu)
        return out, ScaleByRmsState(count, nu)

    return GradientTransformation(init, update)


class ScaleByRStdDevState(NamedTuple):
    count: torch.Tensor  # () int32, updates applied so far (read only with bias_correction)
    mu: Any  # tree like params: moving average of gradients
    nu: Any  # tree like params: moving average of squared gradients


def scale_by_stddev(
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
) -> GradientTransformation:
    """Centered RMSProp's scaling: like :func:`scale_by_rms`, by ``nu - mu**2`` (the variance)."""
    _unit("decay", decay)
    _nonneg("eps", eps)
    _nonneg("initial_scale", initial_scale)

    def init(params):
        return ScaleByRStdDevState(_count0(params), _zeros(params), _full(params, initial_scale))

    def update(updates, state, params=None, **_):
        count = state.count + 1
        bc = _bias_correction(decay, count) if bias_correction else None

        def one(g, mu, nu):
            m = (1 - decay) * g + decay * mu
            v = (1 - decay) * (g * g) + decay * nu
            m_hat, v_hat = (m / bc.to(m.dtype), v / bc.to(v.dtype)) if bias_correction else (m, v)
            var = v_hat - m_hat * m_hat
            s = (var + eps).rsqrt() if eps_in_sqrt else 1 / (var.sqrt() + eps)
            return s * g, m, v

        out, mu, nu = _map(one, 3, updates, state.mu, state.nu)
        return out, ScaleByRStdDevState(count, mu, nu)

    return GradientTransformation(init, update)


def _decay_rate_pow(i: torch.Tensor, exponent: float = 0.8) -> torch.Tensor:
    """Adafactor's second-moment decay at step ``i`` (0-based): ``1 - (i + 1)**-exponent``."""
    return 1.0 - (i.to(torch.float64) + 1) ** (-exponent)


def _factored_dims(shape: Sequence[int], factored: bool, min_dim_size_to_factor: int) -> tuple[int, int] | None:
    """``(second largest dim, largest dim)`` of a leaf whose second moment is factored, or None."""
    if not factored or len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda d: shape[d])  # stable, as numpy's on short arrays
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return order[-2], order[-1]


class FactoredState(NamedTuple):
    count: torch.Tensor  # () int32, updates applied so far
    v_row: Any  # tree like params: a factored leaf's row statistics (largest dim removed); else (1,)
    v_col: Any  # tree like params: its column statistics (second largest dim removed); else (1,)
    v: Any  # tree like params: an unfactored leaf's second moment (its shape); else (1,)


def scale_by_factored_rms(
    factored: bool = True,
    decay_rate: float = 0.8,
    step_offset: int = 0,
    min_dim_size_to_factor: int = 128,
    epsilon: float = 1e-30,
    decay_rate_fn: Callable[[torch.Tensor, float], torch.Tensor] = _decay_rate_pow,
) -> GradientTransformation:
    """Adafactor's scaling (Shazeer & Stern, 2018, arXiv 1804.04235): divide by the root of a
    moving average of ``g**2 + epsilon`` that, for a leaf whose two largest dims are both at
    least ``min_dim_size_to_factor``, is stored factored as row and column means.

    Under the engine every tree node is a flat buffer, so factored statistics (which need a
    leaf's whole matrix, and a state shaped by it before the first step) cannot be kept: a leaf
    that would be factored is an error naming it; pass ``factored=False`` (per-element second
    moments, what this computes for every leaf it does not factor).
    """
    _unit("decay_rate", decay_rate)
    _nonneg("epsilon", epsilon)
    if isinstance(min_dim_size_to_factor, bool) or not isinstance(min_dim_size_to_factor, int) or min_dim_size_to_factor < 1:
        raise ValueError(f"min_dim_size_to_factor must be an int >= 1, got {min_dim_size_to_factor=}")

    def dims(shape):
        return _factored_dims(shape, factored, min_dim_size_to_factor)

    def init(params):
        def one(p):
            d = dims(p.shape)
            tiny = torch.zeros(1, dtype=p.dtype, device=p.device)
            if d is None:
                return tiny, tiny.clone(), torch.zeros_like(p)
            d1, d0 = d
            shape = list(p.shape)
            row = torch.zeros(shape[:d0] + shape[d0 + 1:], dtype=p.dtype, device=p.device)
            col = torch.zeros(shape[:d1] + shape[d1 + 1:], dtype=p.dtype, device=p.device)
            return row, col, tiny

        v_row, v_col, v = _map(one, 3, params)
        return FactoredState(_count0(params), v_row, v_col, v)

    def update(updates, state, params=None, info: ShardInfo | None = None, **_):
        if params is None:
            raise ValueError("scale_by_factored_rms needs params")
        if info is not None and factored:
            for g in updates:
                for s in info.layouts[g].slots:
                    if dims(s.shape) is not None:
                        raise ValueError(
                            f"adafactor / scale_by_factored_rms: leaf {s.path!r} of shape {s.shape} would get factored "
                            f"second moments (both of its two largest dims >= {min_dim_size_to_factor=}), which need "
                            "the leaf's whole matrix; under the engine the optimizer sees flat shards whose state is "
                            "made before any leaf shape is known. Pass factored=False (per-element second moments)"
                        )
        d = decay_rate_fn(state.count - step_offset, decay_rate)

        def one(g, v_row, v_col, v, p):
            dt = d.to(g.dtype) if isinstance(d, torch.Tensor) else d
            sq = g * g + epsilon
            fd = dims(p.shape)
            if fd is None:
                v = dt * v + (1.0 - dt) * sq
                return g * v ** -0.5, v_row, v_col, v
            d1, d0 = fd
            v_row = dt * v_row + (1.0 - dt) * sq.mean(dim=d0)
            v_col = dt * v_col + (1.0 - dt) * sq.mean(dim=d1)
            reduced_d1 = d1 - 1 if d1 > d0 else d1
            row_factor = (v_row / v_row.mean(dim=reduced_d1, keepdim=True)) ** -0.5
            col_factor = v_col ** -0.5
            return g * row_factor.unsqueeze(d0) * col_factor.unsqueeze(d1), v_row, v_col, v

        out, v_row, v_col, v = _map(one, 4, updates, state.v_row, state.v_col, state.v, params)
        return out, FactoredState(state.count + 1, v_row, v_col, v)

    return GradientTransformation(init, update)


def scale_by_param_block_rms(min_scale: float = 1e-3) -> GradientTransformation:
    """Multiply each leaf's update by the RMS of that leaf's parameters, at least ``min_scale``
    (under ZeRO the whole leaf's RMS, added over the shards)."""
    _nonneg("min_scale", min_scale)

    def update(updates, state, params=None, info: ShardInfo | None = None, **_):
        if params is None:
            raise ValueError("scale_by_param_block_rms needs params")
        pc = pieces(updates, info)
        flat = [p.reshape(-1).to(torch.promote_types(p.dtype, torch.float32)) for p in pc.align(params)]
        sq = _leaf_sums(pc, info, lambda i, a, b: flat[i][a:b].square().sum().reshape(1), 1)[:, 0]
        n = torch.tensor(_leaf_numels(pc, info), dtype=sq.dtype, device=sq.device)
        rms = (sq / n).sqrt()
        rms = torch.where(rms <= min_scale, torch.full_like(rms, min_scale), rms)
        return pc.rebuild(_per_segment(pc, info, rms, lambda u, r: u * r)), state

    return GradientTransformation(lambda p: EmptyState(), update)


class ApplyEvery(NamedTuple):
    count: torch.Tensor  # () int32, calls since the last emitted update (mod k)
    grad_acc: Any  # tree like params: the running sum since then


def apply_every(k: int = 1) -> GradientTransformation:
    """Sum the updates over ``k`` calls and emit the sum on every ``k``-th call (zeros between).

    Unlike :func:`funzero.optim.multi_steps` this sits inside a chain: the transforms before it
    still update their state on every call.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"apply_every needs an integer k >= 1, got {k=}")

    def init(params):
        return ApplyEvery(_count0(params), _zeros(params))

    def update(updates, state, params=None, **_):
        c = state.count % k
        keep, emit = c != 0, c == k - 1
        acc = tree_map(lambda g, a: keep.to(a.dtype) * a + g, updates, state.grad_acc)
        out = tree_map(lambda a: emit.to(a.dtype) * a, acc)
        return out, ApplyEvery((state.count + 1) % k, acc)

    return GradientTransformation(init, update)


# --- optimizers -------------------------------------------------------------------------------
def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    accumulator_dtype: torch.dtype | None = None,
    *,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """SGD with optional (Nesterov) momentum, as optax's and ``torch.optim.SGD``.

    Args:
        momentum: ``None`` or 0: no momentum buffer.
        accumulator_dtype: the momentum buffer's dtype (default: the params').
        weight_decay: funzero's addition, torch.optim's L2 decay: ``weight_decay * params`` is
            added to the gradient before the momentum.

    References: Sutskever et al., 2013, "On the importance of initialization and momentum".
    """
    _nonneg("momentum", momentum)
    _nonneg("weight_decay", weight_decay)
    if nesterov and not (momentum or 0) > 0:
        raise ValueError(f"nesterov needs momentum > 0, got {momentum=}")
    parts = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))  # L2: added to the gradient before momentum
    if momentum:
        parts.append(trace(momentum, nesterov, accumulator_dtype))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = False,
    fused: bool = True,
) -> GradientTransformation:
    """Adam (Kingma & Ba, 2015), as optax's and ``torch.optim.Adam`` without weight decay.

    It is :func:`adamw` with ``weight_decay=0`` (so it keeps the fused update); the arguments
    are :func:`scale_by_adam`'s.
    """
    return adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay=0.0, nesterov=nesterov, fused=fused)


def nadam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """NAdam (Dozat, 2016): :func:`adam` with ``nesterov=True``."""
    return adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=True)


def _decay_cuts(decayed: list[tuple[int, int]], n: int, weight_decay) -> list[tuple[int, int, Any]]:
    """Alternate decayed / undecayed ``(start, stop, decay)`` runs covering ``[0, n)``."""
    cuts, pos = [], 0
    for a, b in decayed:
        if a > pos:
            cuts.append((pos, a, 0.0))
        cuts.append((a, b, weight_decay))
        pos = b
    if pos < n:
        cuts.append((pos, n, 0.0))
    return cuts


def _fused_adamw(learning_rate, b1, b2, eps, weight_decay, rule) -> FusedUpdate:
    """AdamW's fused pass (``funzero.ops.adamw_`` over flat buffers, ``adamw_leaves_`` over
    :class:`LeafGrads`), as the record the engine reads."""

    def fused_apply(grads, state, master, *, param_out=None, grad_scale=None, found_inf=None, info=None, to_state=None):
        from funzero import ops

        if to_state is not None:
            grads = to_state(grads)

        adam_state, empty, sched = state
        step = adam_state.count + 1
        lr = _value(learning_rate, sched.count)
        keep = rule.decide(master, info)  # per leaf path; under the engine the model's
        for k, g in grads.items():
            if isinstance(g, LeafGrads):  # one rank: each leaf's gradient read where it lies
                m_, mu_, nu_ = (t.view(-1) for t in (master[k], adam_state.mu[k], adam_state.nu[k]))
                ops.adamw_leaves_(
                    m_, list(g.grads), list(g.offsets), mu_, nu_, None if param_out is None else param_out[k].view(-1),
                    lr=_on(lr, m_.device), step=_on(step, m_.device), beta1=b1, beta2=b2, eps=eps,
                    weight_decay=[weight_decay if keep(path) else 0.0 for path in g.paths],
                    grad_scale=grad_scale, found_inf=found_inf,
                )
                continue
            n = g.numel()
            cuts = _decay_cuts(_runs(info, k, n, keep), n, weight_decay)
            # The kernel works on flat 1-D buffers; leaves of any shape are viewed flat.
            m_, g_, mu_, nu_ = (t.view(-1) for t in (master[k], g, adam_state.mu[k], adam_state.nu[k]))
            po = None if param_out is None else param_out[k].view(-1)
            # Counts kept on the host (placement rules putting some groups on the device) are
            # read as numbers there: no device sync, no copy.
            step_k, lr_k = _on(step, m_.device), _on(lr, m_.device)
            for a, b, wd in cuts:
                ops.adamw_(
                    m_[a:b],
                    g_[a:b],
                    mu_[a:b],
                    nu_[a:b],
                    None if po is None else po[a:b],
                    lr=lr_k, step=step_k, beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
                    grad_scale=grad_scale, found_inf=found_inf,
                )
        advance = 1 if found_inf is None else (found_inf == 0).to(torch.int32)
        return (
            ScaleByAdamState(adam_state.count + advance, adam_state.mu, adam_state.nu),
            empty,
            ScaleByScheduleState(sched.count + advance),
        )

    # Elementwise per buffer: an engine may call it group by group ({g: grad} at a time), with
    # the same incoming state each time; the moments update in place, the counts come back
    # advanced (fused_apply({}, state, {}) returns the new state alone). It reads LeafGrads (the
    # engine's one-rank gradients) as they are.
    fused = FusedUpdate(
        fused_apply,
        groupwise=lambda state: Groupwise(None, fused_apply, state, lambda _, new: new),
        takes_leaves=True,
    )
    return fused


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    weight_decay: ScalarOrSchedule = 1e-2,
    mask: Mask = None,
    *,
    nesterov: bool = False,
    fused: bool = True,
) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay, as optax's and
    ``torch.optim.AdamW``. Arguments in optax's order.

    **The default ``weight_decay`` is 1e-2 (torch.optim.AdamW's), not optax's 1e-4**: funzero's
    engine tests and examples were written against torch.optim; pass ``weight_decay=1e-4`` for
    optax's default.

    Args:
        learning_rate: a float, a 0-d tensor, or a schedule ``count -> lr``.
        eps_root, mu_dtype, nesterov: as :func:`scale_by_adam` (NAdamW with ``nesterov``).
        weight_decay: decoupled decay rate (``p -= lr * weight_decay * p``); a schedule too.
        mask: which leaves decay (see :func:`add_decayed_weights`); ``None``: all.
        fused: let the engine update master, moments and the low-precision parameter copy in
            one fused pass (``funzero.ops.adamw_``: a Triton kernel on GPU, torch's fused kernel
            on CPU). The unfused path computes the same function through this chain. The fused
            pass needs number hyperparameters (learning rate: any), ``eps_root=0``, no
            nesterov and fp32 moments; otherwise the chain runs.

    Example:
        >>> tx = chain(clip_by_global_norm(1.0), adamw(warmup_cosine(3e-4, 200, 10_000), weight_decay=0.1))
    """
    _nonneg("weight_decay", weight_decay)
    inner = chain(
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
    plain = not nesterov and isinstance(eps_root, (int, float)) and eps_root == 0 and mu_dtype in (None, torch.float32)
    if not fused or not plain or not all(isinstance(v, (int, float)) for v in (b1, b2, eps, weight_decay)):
        # The fused kernel takes b1/b2/eps/decay as constants; tensors (inject_hyperparams) take
        # the unfused chain. The learning rate may be a tensor or schedule either way.
        return inner
    return GradientTransformation(inner.init, inner.update,
                                  Traits(fused=_fused_adamw(learning_rate, b1, b2, eps, weight_decay, LeafRule(mask, where="adamw"))))


def nadamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    weight_decay: ScalarOrSchedule = 1e-2,
    mask: Mask = None,
) -> GradientTransformation:
    """NAdamW: :func:`adamw` with ``nesterov=True`` (same weight-decay default, 1e-2)."""
    return adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov=True)


def scale_by_lion(b1: float = 0.9, b2: float = 0.99, mu_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Lion's direction ``sign(b1 m + (1-b1) g)``; then ``m = b2 m + (1-b2) g`` (Chen et al., 2023).

    The state is :class:`TraceState` (``trace`` is optax's ``mu``), in ``mu_dtype`` (default:
    the params').
    """
    _unit("b1", b1)
    _unit("b2", b2)
    _dtype("mu_dtype", mu_dtype)

    def init(params):
        return TraceState(_zeros(params, mu_dtype))

    def update(updates, state, params=None, **_):
        def one(g, t):
            cd = torch.promote_types(g.dtype, t.dtype)
            g, tc = g.to(cd), t.to(cd)
            return torch.sign(tc * b1 + g * (1 - b1)), (tc * b2 + g * (1 - b2)).to(t.dtype)

        out, mu = _map(one, 2, updates, state.trace)
        return out, TraceState(mu)

    return GradientTransformation(init, update)


def lion(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: torch.dtype | None = None,
    weight_decay: ScalarOrSchedule = 1e-3,
    mask: Mask = None,
) -> GradientTransformation:
    """Lion: sign momentum with decoupled weight decay (Chen et al., 2023, arXiv 2302.06675)."""
    return chain(scale_by_lion(b1, b2, mu_dtype), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate))


def scale_by_trust_ratio(min_norm: float = 0.0, trust_coefficient: float = 1.0, eps: float = 0.0) -> GradientTransformation:
    """Scale each *leaf's* update by ``trust_coefficient * ||param|| / (||update|| + eps)``
    (LAMB's layer-wise trust ratio; 1 where either norm is 0), both norms at least ``min_norm``.

    Under ZeRO a leaf can straddle shards: per-leaf squared norms are summed over the shard axis
    with one all-reduce of a vector of ``2 * num_leaves`` scalars.
    """
    _nonneg("min_norm", min_norm)
    _nonneg("eps", eps)

    def update(updates, state, params=None, info: ShardInfo | None = None, **_):
        if params is None:
            raise ValueError("scale_by_trust_ratio needs params")
        pc = pieces(updates, info)
        flat = []
        for u, p in zip(pc.leaves, pc.align(params)):
            dt = torch.promote_types(u.dtype, torch.float32)
            flat.append((p.to(dt).reshape(-1), u.to(dt).reshape(-1)))
        sums = _leaf_sums(pc, info, lambda i, a, b: torch.stack([flat[i][0][a:b].pow(2).sum(), flat[i][1][a:b].pow(2).sum()]), 2)
        p_norm, u_norm = sums[:, 0].sqrt(), sums[:, 1].sqrt()
        p_norm = torch.clamp(p_norm, min=min_norm)
        if min_norm:
            u_norm = torch.clamp(u_norm, min=min_norm)
        ratio = p_norm / (u_norm + eps)
        if trust_coefficient != 1:
            ratio = trust_coefficient * p_norm / (u_norm + eps)
        ratio = torch.where((p_norm == 0) | (u_norm == 0), torch.ones_like(p_norm), ratio)
        return pc.rebuild(_per_segment(pc, info, ratio, lambda u, r: u * r)), state

    return GradientTransformation(lambda p: EmptyState(), update)


def lamb(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Mask = None,
) -> GradientTransformation:
    """LAMB (You et al., 2020, arXiv 1904.00962): Adam direction + decay, scaled per leaf by trust ratio."""
    return chain(
        scale_by_adam(b1, b2, eps, eps_root),
        add_decayed_weights(weight_decay, mask),
        scale_by_trust_ratio(),
        scale_by_learning_rate(learning_rate),
    )


def adagrad(learning_rate: ScalarOrSchedule, initial_accumulator_value: float = 0.1, eps: float = 1e-7) -> GradientTransformation:
    """Adagrad (Duchi et al., 2011): :func:`scale_by_rss`, then the learning rate."""
    return chain(scale_by_rss(initial_accumulator_value, eps), scale_by_learning_rate(learning_rate))


def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
) -> GradientTransformation:
    """RMSProp (Hinton's lecture 6e): :func:`scale_by_rms` (``centered``: :func:`scale_by_stddev`),
    the learning rate, then optional (Nesterov) momentum, as optax's."""
    if nesterov and not (momentum or 0) > 0:
        raise ValueError(f"nesterov needs momentum > 0, got {momentum=}")
    by = scale_by_stddev if centered else scale_by_rms
    return chain(
        by(decay, eps, initial_scale, eps_in_sqrt, bias_correction),
        scale_by_learning_rate(learning_rate),
        trace(momentum, nesterov) if momentum is not None else identity(),
    )


def adafactor(
    learning_rate: ScalarOrSchedule | None = None,
    min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    momentum: float | None = None,
    dtype_momentum: torch.dtype = torch.float32,
    weight_decay_rate: ScalarOrSchedule | None = None,
    eps: float = 1e-30,
    factored: bool = True,
    weight_decay_mask: Mask = None,
) -> GradientTransformation:
    """Adafactor (Shazeer & Stern, 2018, arXiv 1804.04235), as optax's chain:
    :func:`scale_by_factored_rms`, :func:`clip_by_block_rms` (``clipping_threshold``), the
    learning rate, :func:`scale_by_param_block_rms`, :func:`ema` momentum, decoupled weight
    decay, and a sign flip.

    Under the engine, leaves are segments of flat shards: the per-leaf RMS clipping and
    parameter scale are whole-leaf (added over shards), but factored second moments are not
    possible; a leaf that would be factored is an error naming it (``factored=False``, or a
    ``min_dim_size_to_factor`` above the leaf's dims, runs per-element second moments).
    """
    _dtype("dtype_momentum", dtype_momentum)
    parts = [scale_by_factored_rms(factored, decay_rate, decay_offset, min_dim_size_to_factor, eps)]
    if clipping_threshold is not None:
        parts.append(clip_by_block_rms(clipping_threshold))
    if learning_rate is not None:
        parts.append(scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        parts.append(scale_by_param_block_rms())
    if momentum is not None:
        parts.append(ema(momentum, debias=False, accumulator_dtype=dtype_momentum))
    if weight_decay_rate is not None:
        parts.append(add_decayed_weights(weight_decay_rate, weight_decay_mask))
    parts.append(scale(-1.0))
    return chain(*parts)


def radam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    threshold: float = 5.0,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """RAdam (Liu et al., 2020): :func:`scale_by_radam`, then the learning rate."""
    return chain(scale_by_radam(b1, b2, eps, eps_root, threshold, nesterov=nesterov), scale_by_learning_rate(learning_rate))


def adamax(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """AdaMax (Kingma & Ba, 2015, §7): :func:`scale_by_adamax`, then the learning rate."""
    return chain(scale_by_adamax(b1, b2, eps), scale_by_learning_rate(learning_rate))


def amsgrad(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
) -> GradientTransformation:
    """AMSGrad (Reddi et al., 2018): :func:`scale_by_amsgrad`, then the learning rate."""
    return chain(
        scale_by_amsgrad(b1, b2, eps, eps_root, mu_dtype, bias_correction_mu, bias_correction_nu),
        scale_by_learning_rate(learning_rate),
    )
