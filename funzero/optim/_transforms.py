"""Gradient transformations: the ~10-line building blocks and the optimizers chained from them.

All work on trees ``{name: tensor}``: under ZeRO each entry is one group's flat shard and
``info`` (:class:`ShardInfo`) maps it back to leaves; without ``info`` each entry is a leaf.
Arguments are validated when a transform is built, never inside the step.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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
    tree_map,
)
from funzero.optim._schedules import Schedule

__all__ = [
    "ScaleByAdamState",
    "ScaleByScheduleState",
    "TraceState",
    "adam",
    "adamw",
    "add_decayed_weights",
    "clip_by_global_norm",
    "global_norm",
    "lamb",
    "lion",
    "masked",
    "partition",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_schedule",
    "scale_by_trust_ratio",
    "sgd",
    "trace",
]

ScalarOrSchedule = float | torch.Tensor | Schedule
Mask = Callable[[str], bool] | str | Sequence[str] | None


# --- helpers ---------------------------------------------------------------------------------
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# Messages are built only on failure: the builders also run inside traced steps
# (inject_hyperparams), where formatting a closure would break the graph.
def _nonneg(name: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {name}={value}")


def _unit(name: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {name}={value}")


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


def _count0(tree) -> torch.Tensor:
    leaves = [t for t in tree.values()] if isinstance(tree, dict) else []
    device = leaves[0].device if leaves else None
    return torch.zeros((), dtype=torch.int32, device=device)


def _mask_fn(mask: Mask) -> Callable[[str], bool] | None:
    """Normalise a mask spec: a callable on leaf paths, a regex, or a list of regexes."""
    if mask is None or callable(mask):
        return mask
    pats = [mask] if isinstance(mask, str) else list(mask)
    try:
        rx = [re.compile(p) for p in pats]
    except re.error as e:
        raise ValueError(f"mask regex {pats!r} is invalid: {e}") from None
    return lambda path: any(r.search(path) for r in rx)


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


def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True) -> GradientTransformation:
    """Multiply by ``-learning_rate`` (a float, a 0-d tensor, or a schedule)."""
    _nonneg("learning_rate", learning_rate)
    m = -1.0 if flip_sign else 1.0
    if callable(learning_rate):
        return scale_by_schedule(lambda count: m * learning_rate(count))
    return scale_by_schedule(lambda count: m * learning_rate)


def add_decayed_weights(weight_decay: float | torch.Tensor = 0.0, mask: Mask = None) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates (decoupled decay), on leaves ``mask`` selects."""
    _nonneg("weight_decay", weight_decay)
    keep = _mask_fn(mask) or (lambda path: True)

    def update(updates, state, params=None, info: ShardInfo | None = None, **_):
        if params is None:
            raise ValueError("add_decayed_weights needs params")
        out = {}
        for name, u in updates.items():
            p = params[name]
            runs = _runs(info, name, u.numel(), keep)
            if runs == [(0, u.numel())]:
                out[name] = u + weight_decay * p.to(u.dtype)
            else:
                u = u.clone()
                for a, b in runs:
                    u[a:b] += weight_decay * p[a:b].to(u.dtype)
                out[name] = u
        return out, state

    return GradientTransformation(lambda p: EmptyState(), update)


def masked(inner: GradientTransformation, mask: Mask) -> GradientTransformation:
    """Apply ``inner`` only to leaves ``mask`` selects; others pass through unchanged.

    The inner state covers whole buffers (its values on unselected leaves are computed but
    never used): under ZeRO a leaf is a slice of a flat shard, not a tree node of its own.
    """
    keep = _mask_fn(mask)
    _check(keep is not None, "masked() needs a mask")

    def update(updates, state, params=None, info: ShardInfo | None = None, **kw):
        new, state = inner.update(updates, state, params, info=info, **kw)
        out = {}
        for name, u in updates.items():
            runs = _runs(info, name, u.numel(), keep)
            if runs == [(0, u.numel())]:
                out[name] = new[name]
            elif not runs:
                out[name] = u
            else:
                o = u.clone()
                for a, b in runs:
                    o[a:b] = new[name][a:b]
                out[name] = o
        return out, state

    return GradientTransformation(inner.init, update)


def partition(transforms: dict[str, GradientTransformation], labels: Callable[[str], str] | Sequence[tuple[str, str]]) -> GradientTransformation:
    """Apply a different transform to each class of leaves (optax's ``multi_transform``).

    Args:
        transforms: ``{label: transform}``.
        labels: ``path -> label``, or ordered ``(regex, label)`` rules (first match wins; a leaf
            no rule matches is an error naming it).

    Each transform's state covers whole buffers (see :func:`masked`); outputs are taken per leaf.
    """
    if not transforms:
        raise ValueError("partition() needs at least one transform")
    if callable(labels):
        label_of = labels
    else:
        rules = [(re.compile(p), lab) for p, lab in labels]
        for _, lab in rules:
            _check(lab in transforms, f"partition: label {lab!r} has no transform (have {sorted(transforms)})")

        def label_of(path: str) -> str:
            for rx, lab in rules:
                if rx.search(path):
                    return lab
            raise ValueError(f"partition: leaf {path!r} is matched by no label rule")

    def init(params):
        return {k: t.init(params) for k, t in transforms.items()}

    def update(updates, state, params=None, info: ShardInfo | None = None, **kw):
        news, states = {}, {}
        for lab, t in transforms.items():
            news[lab], states[lab] = t.update(updates, state[lab], params, info=info, **kw)
        out = {}
        for name, u in updates.items():
            o = torch.empty_like(news[next(iter(transforms))][name])
            if info is None:
                lab = label_of(name)
                _check(lab in transforms, f"partition: leaf {name!r} has label {lab!r}, which has no transform")
                out[name] = news[lab][name]
                continue
            covered = 0
            for path, a, b in info.segments(name):
                lab = label_of(path)
                _check(lab in transforms, f"partition: leaf {path!r} has label {lab!r}, which has no transform")
                o[a:b] = news[lab][name][a:b]
                covered += b - a
            if covered < u.numel():  # padding: belongs to no leaf, carries zeros
                mask = torch.ones(u.numel(), dtype=torch.bool, device=u.device)
                for _, a, b in info.segments(name):
                    mask[a:b] = False
                o[mask] = 0
            out[name] = o
        return out, states

    return GradientTransformation(init, update)


def global_norm(tree, info: ShardInfo | None = None) -> torch.Tensor:
    """L2 norm over every element of the tree (fp32), summed across shards when sharded.

    A value may be :class:`LeafGrads` (a group's gradient as separate leaves)."""
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


# --- momentum and adaptive -------------------------------------------------------------------
class TraceState(NamedTuple):
    trace: dict  # {name: (n,) like params}, the momentum buffer


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Momentum: ``t = g + decay * t``; the update is ``t`` (or ``g + decay * t`` with nesterov)."""
    _nonneg("decay", decay)

    def init(params):
        return TraceState(_zeros(params))

    def update(updates, state, params=None, **_):
        t = tree_map(lambda g, tr: g + decay * tr.to(g.dtype), updates, state.trace)
        out = tree_map(lambda g, tr: g + decay * tr, updates, t) if nesterov else t
        return out, TraceState(t)

    return GradientTransformation(init, update)


class ScaleByAdamState(NamedTuple):
    count: torch.Tensor  # () int32, updates applied so far
    mu: dict  # {name: (n,) fp32} first moment
    nu: dict  # {name: (n,) fp32} second moment


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, mu_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Adam's bias-corrected ``m_hat / (sqrt(v_hat) + eps)``, in torch.optim's operation order.

    Moments are kept in ``mu_dtype`` (default: the dtype of the params they track; under
    mixed precision that is the fp32 master).
    """
    _unit("b1", b1)
    _unit("b2", b2)
    _nonneg("eps", eps)

    def init(params):
        return ScaleByAdamState(_count0(params), _zeros(params, mu_dtype), _zeros(params, mu_dtype))

    def update(updates, state, params=None, **_):
        count = state.count + 1
        # Bias corrections in fp64, as torch.optim does in Python floats: in fp32, 1 - 0.999**1
        # loses ~1e-5 of its value to cancellation.
        c = count.to(torch.float64)
        bc1 = 1 - b1**c
        bc2_sqrt = (1 - b2**c).sqrt()
        mu, nu, out = {}, {}, {}
        for k, g in updates.items():
            g = g.to(state.mu[k].dtype)
            m = state.mu[k].lerp(g, 1 - b1)
            v = state.nu[k] * b2 + (1 - b2) * g * g
            out[k] = m / (v.sqrt() / bc2_sqrt.to(v.dtype) + eps) / bc1.to(v.dtype)
            mu[k], nu[k] = m, v
        return out, ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init, update)


def sgd(learning_rate: ScalarOrSchedule, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> GradientTransformation:
    """SGD with optional (Nesterov) momentum and L2 weight decay, as ``torch.optim.SGD``.

    References: Sutskever et al., 2013, "On the importance of initialization and momentum".
    """
    _nonneg("momentum", momentum)
    _nonneg("weight_decay", weight_decay)
    if nesterov and not momentum > 0:
        raise ValueError(f"nesterov needs momentum > 0, got {momentum=}")
    parts = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))  # L2: added to the gradient before momentum
    if momentum:
        parts.append(trace(momentum, nesterov))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)


def adam(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam (Kingma & Ba, 2015), as ``torch.optim.Adam`` without weight decay."""
    return adamw(learning_rate, b1, b2, eps, weight_decay=0.0)


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    mask: Mask = None,
    *,
    fused: bool = True,
) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay, as ``torch.optim.AdamW``.

    Args:
        learning_rate: a float, a 0-d tensor, or a schedule ``count -> lr``.
        weight_decay: decoupled decay rate (``p -= lr * weight_decay * p``).
        mask: leaves to decay (callable on leaf paths, regex or list of regexes); ``None``: all.
        fused: let the engine update master, moments and the low-precision parameter copy in
            one fused pass (``funzero.ops.adamw_``: a Triton kernel on GPU, torch's fused kernel
            on CPU). The unfused path computes the same function through this chain.

    Example:
        >>> tx = chain(clip_by_global_norm(1.0), adamw(warmup_cosine(3e-4, 200, 10_000), weight_decay=0.1))
    """
    _nonneg("weight_decay", weight_decay)
    inner = chain(scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate))
    if not fused or not all(isinstance(v, (int, float)) for v in (b1, b2, eps, weight_decay)):
        # The fused kernel takes b1/b2/eps/decay as constants; tensors (inject_hyperparams) take
        # the unfused chain. The learning rate may be a tensor or schedule either way.
        return inner
    keep = _mask_fn(mask) or (lambda path: True)

    def fused_apply(grads, state, master, *, param_out=None, grad_scale=None, found_inf=None, info=None, to_state=None):
        from funzero import ops

        if to_state is not None:
            grads = to_state(grads)

        adam_state, empty, sched = state
        step = adam_state.count + 1
        lr = _value(learning_rate, sched.count)
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
            decayed = _runs(info, k, n, keep)
            # Alternate decayed / undecayed runs covering the whole buffer.
            cuts, pos = [], 0
            for a, b in decayed:
                if a > pos:
                    cuts.append((pos, a, 0.0))
                cuts.append((a, b, weight_decay))
                pos = b
            if pos < n:
                cuts.append((pos, n, 0.0))
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
    return GradientTransformation(inner.init, inner.update, Traits(fused=fused))


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> GradientTransformation:
    """Lion's direction ``sign(b1 m + (1-b1) g)``; then ``m = b2 m + (1-b2) g`` (Chen et al., 2023)."""
    _unit("b1", b1)
    _unit("b2", b2)

    def init(params):
        return TraceState(_zeros(params))

    def update(updates, state, params=None, **_):
        out, mu = {}, {}
        for k, g in updates.items():
            g = g.to(state.trace[k].dtype)
            out[k] = torch.sign(state.trace[k] * b1 + g * (1 - b1))
            mu[k] = state.trace[k] * b2 + g * (1 - b2)
        return out, TraceState(mu)

    return GradientTransformation(init, update)


def lion(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.99, weight_decay: float = 1e-3, mask: Mask = None) -> GradientTransformation:
    """Lion: sign momentum with decoupled weight decay (Chen et al., 2023, arXiv 2302.06675)."""
    return chain(scale_by_lion(b1, b2), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate))


def scale_by_trust_ratio(min_norm: float = 0.0, eps: float = 0.0) -> GradientTransformation:
    """Scale each *leaf's* update by ``||param|| / ||update||`` (LAMB's layer-wise trust ratio).

    Under ZeRO a leaf can straddle shards: per-leaf squared norms are summed over the shard axis
    with one all-reduce of a vector of ``2 * num_leaves`` scalars.
    """

    def update(updates, state, params=None, info: ShardInfo | None = None, **_):
        if params is None:
            raise ValueError("scale_by_trust_ratio needs params")
        segs = {k: (info.segments(k) if info is not None else [(k, 0, u.numel())]) for k, u in updates.items()}
        sq = []
        for k, u in updates.items():
            dt = torch.promote_types(u.dtype, torch.float32)
            p, uf = params[k].to(dt).reshape(-1), u.to(dt).reshape(-1)
            for _, a, b in segs[k]:
                sq.append(torch.stack([p[a:b].pow(2).sum(), uf[a:b].pow(2).sum()]))
        sums = torch.stack(sq) if sq else torch.zeros(0, 2)
        if info is not None and info.sharded:
            # All leaves' sums in one collective; pieces of one leaf on other ranks add up.
            sums = _leafwise_psum(sums, segs, info)
        p_norm, u_norm = sums[:, 0].sqrt(), sums[:, 1].sqrt()
        p_norm = torch.clamp(p_norm, min=min_norm)
        ratio = torch.where((p_norm == 0) | (u_norm == 0), torch.ones_like(p_norm), p_norm / (u_norm + eps))
        out, i = {}, 0
        for k, u in updates.items():
            o = u.clone()
            for _, a, b in segs[k]:
                o[a:b] = u[a:b] * ratio[i].to(u.dtype)
                i += 1
            out[k] = o
        return out, state

    return GradientTransformation(lambda p: EmptyState(), update)


def _leafwise_psum(sums: torch.Tensor, segs: dict, info: ShardInfo) -> torch.Tensor:
    """Sum per-leaf partial sums over shards: scatter to a per-leaf table, psum, gather back."""
    keys = {(g, path): j for j, (g, path) in enumerate((g, s.path) for g, lay in info.layouts.items() for s in lay.slots)}
    table = torch.zeros(len(keys), 2, dtype=sums.dtype, device=sums.device)
    idx = [keys[(k, path)] for k, ss in segs.items() for path, _, _ in ss]
    index = torch.tensor(idx, device=sums.device, dtype=torch.long)
    table = table.index_add(0, index, sums)
    table = info.psum(table)
    return table[index]


def lamb(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.0, mask: Mask = None) -> GradientTransformation:
    """LAMB (You et al., 2020, arXiv 1904.00962): Adam direction + decay, scaled per leaf by trust ratio."""
    return chain(
        scale_by_adam(b1, b2, eps),
        add_decayed_weights(weight_decay, mask),
        scale_by_trust_ratio(),
        scale_by_learning_rate(learning_rate),
    )


