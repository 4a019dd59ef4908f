"""The update: the optimizer applied to this rank's part of each group, where its state lives.

Two strategies, chosen from the optimizer's declared capabilities and the placement, never from
a stage:

* **whole**: one pass over every group where the (uniformly placed) state lives: on the device's
  stream, or on the host with gradients streamed to it (an optimizer that cannot run group by
  group). A kind that writes copies (NVMe) gets its leaves copied first and committed after.
* **groupwise, offloaded**: an optimizer that runs group by group (``FusedUpdate.groupwise``)
  with some of its state off the device takes the host's pipelined update
  (``funzero._placement._host``); groups kept on the device update there meanwhile.

Afterwards, where the parameters are replicated but the optimizer state is sharded (stages 1-2
on several ranks), every rank all-gathers the updated shards into its full parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optree
import torch

from funzero._collectives import all_gather
from funzero._placement import update_offloaded
from funzero.optim import GradientTransformation, ShardInfo, tree_map

__all__ = ["UpdateJob", "apply_tx", "groupwise", "update"]


@dataclass
class UpdateJob:
    """What one step's update works on.

    Attributes:
        tx: the transform to apply (gradient accumulation already taken off).
        opt_state: its state.
        master: ``{group: fp32 master}`` over this rank's optimizer region, or None (fp32 params).
        params: the state's params buffers (full, or this rank's shard).
        params_own: the part of each params buffer this rank's optimizer state covers.
        info: how the buffers map to leaves (:class:`~funzero.optim.ShardInfo`).
        gather: ``gather(groups)``: all-gather the updated shards into the full params buffers,
            or None where nothing needs it.
        forward_order: ``{group: position in forward}`` (the async update's priority).
        committed: ``{id(old leaf): new leaf}`` of the leaves the host update committed (NVMe
            files renamed into place), filled by whoever runs the group updates of this step
            (from backward, or after it) and read when the new state is assembled.
    """

    tx: GradientTransformation
    opt_state: Any
    master: dict | None
    params: dict
    params_own: dict
    info: ShardInfo
    gather: Callable[[list], None] | None
    forward_order: dict
    committed: dict = field(default_factory=dict)


def gather_into(plan, b, params: dict) -> Callable[[list], None] | None:
    """``gather(groups)`` for ``UpdateJob.gather`` (None where the specs need no gather)."""
    if not (b.specs.regather and plan.num_shards > 1):
        return None

    def gather(groups) -> None:
        for g in groups:
            full = params[g]
            all_gather(b.layouts[g].shard(full, b.rank), plan.mesh, plan.axis, tag="param", out=full)

    return gather


def groupwise(job: UpdateJob):
    """The optimizer's per-group form for this state, where the update can take it: a fused
    optimizer declaring ``groupwise`` over an fp32 master."""
    fused = job.tx.traits.fused
    if fused is None or fused.groupwise is None or job.master is None:
        return None
    if not all(t.dtype == torch.float32 for t in job.master.values()):
        return None
    return fused.groupwise(job.opt_state)


def pipelined(placement, gw) -> bool:
    """Whether the update takes the host's pipelined path: optimizer state (partly) off the
    device, parameters not in files, and a per-group form of the optimizer."""
    return gw is not None and placement.offloaded("opt_state") and not placement.copies("params")


def update(plan, b, job: UpdateJob, grads: dict, grad_scale, found_inf) -> tuple[Any, dict | None, dict]:
    """Update this rank's part of the master (or params) where it lives; refresh the params.

    Returns ``(new optimizer state, new master, new params)``: the incoming buffers updated in
    place, except leaves of a kind that commits copies (NVMe), which come back as the new files.
    """
    pl = b.placement
    gw = groupwise(job)
    if pipelined(pl, gw):
        new_opt, master = _offloaded(pl, job, gw, grads, grad_scale, found_inf, plan)
        return new_opt, master, job.params
    if pl.kind("opt_state") == "mixed":
        raise ValueError(
            "placement rules that split opt_state between the device and the host need an "
            "optimizer whose update runs group by group (funzero.optim.adamw with float "
            "hyperparameters, optionally after stateless transforms such as "
            "clip_by_global_norm in a chain), an fp32 master (bf16 or fp16 precision), and "
            f"no parameters on NVMe; got placement={dict(plan.placement)!r}"
        )
    if plan.delayed_update:
        raise ValueError(
            "delayed_update=True needs an optimizer whose update runs group by group "
            "(funzero.optim.adamw with float hyperparameters, optionally after stateless "
            "transforms such as clip_by_global_norm in a chain) and an fp32 master (bf16 or "
            "fp16 precision)"
        )
    begun: list = []  # (kind, copy) of every copy begun, so that a failure drops them all
    if not (pl.copies("opt_state") or pl.copies("params")):
        return _whole(b, job, grads, grad_scale, found_inf, begun)  # nothing to drop (and traceable)
    try:
        return _whole(b, job, grads, grad_scale, found_inf, begun)
    except BaseException:
        for kind, copy in begun:
            kind.abort(copy)  # a committed copy has no file left under its name: a no-op
        raise


@torch.compiler.disable  # host-side orchestration: a graph break in a compiled step
def _offloaded(pl, job, gw, grads, grad_scale, found_inf, plan):
    return update_offloaded(pl, pl.host, job, gw, grads, grad_scale, found_inf,
                            delayed=plan.delayed_update, ahead=plan.async_update)


def _begin(kind, tree, begun: list):
    """``(tree of writable buffers, [copy])`` for the leaves of a kind that writes copies; each
    copy is also appended to ``begun`` as ``(kind, copy)`` as soon as it exists."""
    if tree is None or not kind.copies:
        return tree, []
    pending = []

    def begin(t):
        if isinstance(t, torch.Tensor) and t.dim() > 0 and kind.holds("opt_state", t):
            kind.prefetch(t)
            copy = kind.begin_write(t)
            begun.append((kind, copy))
            pending.append(copy)
            return copy
        return t

    return optree.tree_map(begin, tree, namespace="funzero"), pending


def _commit(kind, pending: list, *trees):
    """``trees`` with every copy from :func:`_begin` committed (renamed over its file) once."""
    if not pending:
        return trees
    final = {id(c): kind.commit(c) for c in pending}

    def swap(t):
        return final.get(id(t), t) if isinstance(t, torch.Tensor) else t

    return tuple(None if tree is None else optree.tree_map(swap, tree, namespace="funzero") for tree in trees)


def _whole(b, job: UpdateJob, grads: dict, grad_scale, found_inf, begun: list):
    pl = b.placement
    opt_kind = pl.uniform("opt_state")
    master, opt_state, params_own = job.master, job.opt_state, job.params_own
    # Never update a leaf a kind must keep whole (NVMe files): update copies, commit when done.
    master, pending_master = _begin(opt_kind, master, begun)
    opt_state, pending_opt = _begin(opt_kind, opt_state, begun)
    params_kind = pl.uniform("params")
    params_own, pending_params = (_begin(params_kind, params_own, begun)
                                  if params_kind is not None and params_kind.copies else (params_own, []))
    target = master if master is not None else params_own
    if master is None:
        param_out = None
    elif all(t.device == target[g].device for g, t in params_own.items()):
        param_out = params_own  # same memory (device, or stage-3 params on the host)
    else:  # host update, device params: write a pinned staging copy, then copy it over
        param_out = {g: torch.empty(t.numel(), dtype=t.dtype, pin_memory=torch.cuda.is_available())
                     for g, t in params_own.items()}
    state_dev = next(iter(target.values())).device
    host = opt_kind.offloaded
    if host:
        grad_scale = None if grad_scale is None else grad_scale.to(state_dev)
        found_inf = None if found_inf is None else found_inf.to(state_dev)
    new_opt = apply_tx(job.tx, grads, opt_state, target, param_out=param_out, grad_scale=grad_scale,
                       found_inf=found_inf, info=job.info,
                       to_state=(lambda gr: stream_to(gr, state_dev)) if host else None)
    if param_out is not None and param_out is not params_own:
        for g, t in params_own.items():
            t.copy_(param_out[g], non_blocking=True)
    new_params = job.params
    master, new_opt = _commit(opt_kind, pending_master + pending_opt, master, new_opt)
    if pending_params:
        (new_params,) = _commit(params_kind, pending_params, params_own)
    if job.gather is not None:
        job.gather(list(b.layouts))
    return new_opt, master, new_params


def apply_tx(tx: GradientTransformation, grads: dict, opt_state, target: dict, *, param_out, grad_scale, found_inf,
             info: ShardInfo, to_state=None):
    """``tx`` applied to ``target`` in place (and written in the parameter dtype to
    ``param_out``); returns the new optimizer state. The fused pass where the optimizer has one
    and the target is fp32; otherwise ``update`` followed by the addition, with ``grad_scale``
    applied first and ``found_inf`` making the step a no-op. ``to_state`` moves gradients to
    where the state lives (host state); state leaves keep their buffers there (pinned or
    file-backed memory is reused, not replaced)."""
    fused = tx.traits.fused
    # The fused kernels keep fp32 master/moments; other dtypes (fp64 tests) take the chain.
    if fused is not None and all(t.dtype == torch.float32 for t in target.values()):
        return fused.apply(grads, opt_state, target, param_out=param_out, grad_scale=grad_scale,
                           found_inf=found_inf, info=info, to_state=to_state)
    if to_state is not None:
        grads = to_state(grads)
    if grad_scale is not None:
        grads = {g: x * grad_scale.to(x.dtype) for g, x in grads.items()}
    updates, new_opt = tx.update(grads, opt_state, target, info=info)
    if found_inf is not None:
        skip = found_inf != 0
        new_opt = tree_map(lambda new, old: torch.where(skip, old, new), new_opt, opt_state)
        updates = tree_map(lambda u: torch.where(skip, torch.zeros_like(u), u), updates)
    for g, u in updates.items():
        target[g].add_(u.to(target[g].dtype))
        if param_out is not None:
            param_out[g].copy_(target[g])
    if to_state is not None:  # keep the placed (pinned / file-backed) buffers: copy new values into them
        new_opt = tree_map(lambda old, new: old.copy_(new) if old.dim() > 0 else new, opt_state, new_opt)
    return new_opt


class _Streamed(dict):
    """Gradients on their way to the host: each group waits for its own copy on first access,
    so the update of group i runs while the copies of groups i+1... are still in flight."""

    def __init__(self, data: dict, events: dict) -> None:
        super().__init__(data)
        self._events = events

    def _wait(self, k):
        ev = self._events.pop(k, None)
        if ev is not None:
            ev.synchronize()

    def __getitem__(self, k):
        self._wait(k)
        return super().__getitem__(k)

    def items(self):
        for k in list(self.keys()):
            yield k, self[k]

    def values(self):
        for k in list(self.keys()):
            yield self[k]


def stream_to(grads: dict, device: torch.device) -> dict:
    """Copy each group's gradient to ``device``: device-to-host into pinned memory, asynchronously."""
    first = next(iter(grads.values()))
    if first.device == device:
        return grads
    if first.device.type != "cuda" or device.type != "cpu":
        return {g: x.to(device) for g, x in grads.items()}
    out, events = {}, {}
    for g, x in grads.items():
        buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        buf.copy_(x, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        out[g], events[g] = buf, ev
    return _Streamed(out, events)
