"""The train step: ``step(state, batch) -> (state, metrics)``, one program for every stage.

Design note:

* **Gradients come from ``torch.autograd.grad``** over ``torch.func.functional_call``, on fresh
  leaves made inside the step, so the step stays a pure function of ``(state, batch)``. Not
  ``torch.func.grad``: measured on torch 2.13, (1) torch.func refuses the saved-tensor hooks that
  let stage 3 re-gather in backward, and (2) under ``torch.compile`` dynamo's ``torch.func.grad``
  differentiates through a custom ``autograd.Function``'s forward and silently drops its
  backward, i.e. the gradient reduce-scatter would vanish. ``torch.autograd.grad`` keeps the
  custom backward under compile, and traces into one graph where dynamo allows it
  (``torch._dynamo.config.trace_autograd_ops``, set here when the running torch has it).
* **The reduce is the gradient of the gather.** Each group's differentiable *anchor* (its fp32
  master shard where there is one and communication happens, else the param buffer itself) goes
  through a collective ``autograd.Function`` (``_collectives.py``) whose backward reduces the
  group's gradient. That is the traced (compiled) form and stage 3's. Eager steps of stages 0-2
  differentiate each leaf instead and reduce a group from a hook when its last leaf's gradient
  is ready (``forward_backward_leaves``): the autograd engine runs ready nodes newest first, so
  the anchors' backward, made before forward, would otherwise run only at the end of backward.
* **Donation.** The incoming state's buffers are updated in place (fused optimizer kernels, the
  in-place all-gather of stages 1-2); do not use it after the call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import optree
import torch
from torch import nn
from torch.func import functional_call

from funzero._collectives import (
    AllReduceGrad,
    CommSpec,
    ScatterGrad,
    all_gather,
    all_reduce,
    reduce_grad,
)
from funzero._gather import Stage3Hooks
from funzero._plan import Plan
from funzero._state import BINDINGS, TrainState
from funzero.optim import GradientTransformation, ShardInfo, tree_map
from funzero.optim._base import LeafGrads, gradient_tensors

__all__ = ["train_step"]

if hasattr(torch._dynamo.config, "trace_autograd_ops"):
    # Lets dynamo put torch.autograd.grad into the step's graph (torch >= 2.13); older versions
    # break the graph there and compile forward/backward and the update separately.
    torch._dynamo.config.trace_autograd_ops = True

LossFn = Callable[[Callable[..., Any], Any], Any]


def _local_batch(batch: Any, plan: Plan) -> Any:
    """This rank's slice of dim 0 of every tensor in a global batch."""
    n = plan.num_shards
    if plan.batch == "local" or n == 1:
        return batch
    r = plan.rank
    paths, leaves, spec = optree.tree_flatten_with_path(batch, namespace="funzero")
    out = []
    for path, x in zip(paths, leaves):
        if not isinstance(x, torch.Tensor):
            out.append(x)
            continue
        name = ".".join(map(str, path)) or "batch"
        if x.dim() == 0 or x.shape[0] % n:
            raise ValueError(
                f"batch leaf {name!r} has shape {tuple(x.shape)}: dim 0 must divide over {n} ranks"
            )
        b = x.shape[0] // n
        out.append(x[r * b : (r + 1) * b])
    return optree.tree_unflatten(spec, out)


class _Engine:
    """Everything the step needs that is fixed when it is built."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, tx: GradientTransformation, plan: Plan, has_aux: bool):
        self.model, self.loss_fn, self.tx, self.plan, self.has_aux = model, loss_fn, tx, plan, has_aux
        self.multi = tx.traits.accumulate
        self.inner = self.multi.inner if self.multi is not None else tx
        self.hooks: Stage3Hooks | None = None
        self.binding = None
        self.swaps: dict[int, torch.Tensor] = {}  # NVMe leaves renamed by this step's host update
        self.waits: tuple = (None, [])  # (binding, [(module, pre-hook)]) for async_update
        self.leaf_grads = True  # eager one-rank steps hand AdamW the leaves' gradients (leafwise)

    def prepare(self, state: TrainState) -> None:
        if self.binding is not state.binding:
            self.prepare_binding(state.binding)

    def prepare_binding(self, b) -> None:
        p = self.plan
        if b.num_shards != p.num_shards:
            raise ValueError(
                f"state was initialised for {b.num_shards} ranks on axis {p.axis!r}, the plan's mesh has {p.num_shards}"
            )
        if b.stage != p.stage:
            raise ValueError(f"state was initialised for ZeRO stage {b.stage}, the plan is stage {p.stage}")
        if b.rank != p.rank:
            raise ValueError(f"state belongs to rank {b.rank}, this process is rank {p.rank}")
        self.binding = b
        self.spec = CommSpec(p.mesh, p.axis, b.precision.reduce_dtype)
        # Stage 3 gathers groups just in time when there is something to gather: shards on other
        # ranks, or shards that live on the host.
        self.gathered = p.params_sharded and (p.num_shards > 1 or b.placement.host("params"))
        if self.gathered:
            if self.hooks is not None:
                self.hooks.remove()
            self.hooks = Stage3Hooks(self.model, b, self.spec, b.placement.compute)

    # --- forward and backward -----------------------------------------------------------------
    def leafwise(self, state: TrainState) -> bool:
        """Whether this step differentiates each leaf and hands the optimizer :class:`LeafGrads`:
        an eager step on one rank (nothing to reduce, so no flat gradient is needed), everything
        on the device, and an optimizer that reads leaves in its fused pass
        (``fused_apply.leafwise``).

        Not compiled steps: measured on torch 2.11 (H100, GPT-2 1.5B and 350M, benchmarks/NOTES.md)
        the compiled step gained nothing from it (the flat copy went, but with one graph input per
        leaf inductor's partitioner recomputed layer norms in backward) and peaked 1 GB higher.
        ``leaf_grads = False`` on the engine turns it off (for comparisons).
        """
        p, b = self.plan, state.binding
        target = state.master if state.master is not None else state.params
        return (
            self.leaf_grads
            and not torch.compiler.is_compiling()
            and p.num_shards == 1
            and not self.gathered
            and self.multi is None
            and self.inner.traits.fused is not None
            and self.inner.traits.fused.takes_leaves
            and not b.placement.offloaded("opt_state")
            and not b.placement.offloaded("params")
            and all(t.dtype == torch.float32 for t in target.values())
        )

    def anchors(self, state: TrainState) -> dict:
        """The tensors to differentiate: one per group, shaped like the gradient it receives.

        Where forward computes with the differentiated buffer itself (one rank, or stage 1) that
        buffer is the anchor. Otherwise the anchor is a zero-stride view of one element: it costs
        no memory, and its dtype (the master's where gradients are reduced across ranks) is the
        dtype the gradient arrives in.
        """
        p, b = self.plan, state.binding
        n = p.num_shards
        direct = not self.gathered and (n == 1 or not p.reduce_in_backward)
        prec = b.precision
        dtype = _grad_dtype(prec, n)
        out = {}
        for g, lay in b.layouts.items():
            if direct:
                out[g] = state.params[g].detach().requires_grad_()
            else:
                numel = lay.shard_numel if p.grads_sharded else lay.padded
                out[g] = torch.zeros((), dtype=dtype, device=b.placement.compute).expand(numel).requires_grad_()
        return out

    def loss_of(self, leaves: dict, batch: Any, loss_scale: torch.Tensor | None):
        """``loss_fn`` with ``leaves`` as the model's parameters: ``(loss, aux, the loss to
        differentiate)`` (times the fp16 loss scale, if any)."""
        model = self.model

        def apply(*args, **kwargs):
            return functional_call(model, leaves, args, kwargs, tie_weights=True, strict=False)

        out = self.loss_fn(apply, batch)
        loss, aux = out if self.has_aux else (out, None)
        return loss, aux, (loss * loss_scale if loss_scale is not None else loss)

    def forward_backward(self, state: TrainState, batch: Any, loss_scale: torch.Tensor | None):
        p, b = self.plan, state.binding
        hook = self.stream_hook(state)
        n = p.num_shards
        if not self.gathered and not torch.compiler.is_compiling() and (
            (n == 1 and hook is not None) or (n > 1 and p.reduce_in_backward)
        ):
            return self.forward_backward_leaves(state, batch, loss_scale, hook)
        if p.async_update:
            from funzero._offload import sync

            sync(state)  # this forward cannot wait group by group
        if self.leafwise(state):
            return self.forward_backward_leafwise(state, batch, loss_scale)
        anchors = self.anchors(state)
        leaves: dict[str, torch.Tensor] = {}
        if not self.gathered:
            for g, lay in b.layouts.items():
                a, src = anchors[g], state.params[g]
                if n > 1 and p.reduce_in_backward and not p.grads_sharded:
                    full = AllReduceGrad.apply(a, src, self.spec)
                elif n > 1 and p.grads_sharded:
                    full = ScatterGrad.apply(a, src, self.spec)
                else:
                    full = a  # differentiate the param buffer itself
                leaves.update(lay.unpack(full))
        if hook is not None:
            for g, a in anchors.items():
                a.register_hook(functools.partial(_stream_grad, hook, g))

        def run():
            loss, aux, scaled = self.loss_of(leaves, batch, loss_scale)
            return loss, aux, torch.autograd.grad(scaled, list(anchors.values()))

        try:
            if self.gathered:
                regather = not torch.compiler.is_compiling()
                with self.hooks.activate(anchors, state.params, regather=regather):
                    loss, aux, grads = run()
            else:
                loss, aux, grads = run()
        except BaseException:
            if hook is not None:
                hook.abort()  # the worker stops waiting for gradients that will not come
            raise
        return dict(zip(anchors, grads)), loss.detach(), aux

    def forward_backward_leafwise(self, state: TrainState, batch: Any, loss_scale):
        """One rank, eager: differentiate each leaf (a view of its group's buffer) and
        keep the gradients as autograd made them (:class:`LeafGrads`); the optimizer's fused pass
        reads them in place, so the flat gradient (a full copy) is never formed."""
        b = state.binding
        leaves = _fresh_leaves(b, state.params)
        loss, aux, scaled = self.loss_of(leaves, batch, loss_scale)
        grads = torch.autograd.grad(scaled, list(leaves.values()), allow_unused=True, materialize_grads=True)
        by_path = dict(zip(leaves, grads))
        out_grads = {}
        for g, lay in b.layouts.items():
            out_grads[g] = LeafGrads([s.path for s in lay.slots], [by_path[s.path] for s in lay.slots],
                                     [s.offset for s in lay.slots], lay.padded)
        return out_grads, loss.detach(), aux

    def forward_backward_leaves(self, state: TrainState, batch: Any, loss_scale, hook):
        """Eager steps without stage-3 gathers: differentiate each leaf, finish each group at once.

        The autograd engine runs ready nodes newest first, and the views that split a group's
        flat buffer into leaves (or the collective that hands the buffer to forward) are made
        before forward, so their backward, which forms the group's gradient and reduces it,
        would wait for the very end of backward: no reduce and no copy to the host would overlap
        backward. A leaf's own gradient is ready as soon as its last use in backward has run (leaf
        accumulation runs first), so a hook per leaf finishes each group when its last leaf is
        done: the group's flat gradient is formed and reduced over ranks (stages 0 and 2), or, on
        one rank, handed leaf by leaf to the host update (``hook``). Each hook hands autograd a
        zero-stride zero in place of the leaf's gradient, so nothing is held twice.
        """
        from funzero._offload import _Parts

        p, b = self.plan, state.binding
        n = p.num_shards
        prec = b.precision
        hosted = set(_host_groups(b)) if hook is not None else set()
        leaves = _fresh_leaves(b, state.params)
        done: dict[str, Any] = {}
        pending: dict[str, list] = {g: [] for g in b.layouts}
        zeros: dict = {}

        def finish(g: str) -> None:
            lay, t = b.layouts[g], state.params[g]
            parts = pending.pop(g)
            if n == 1 and g in hosted:
                out = _Parts([(s.offset, x) for s, x in parts], lay.padded, t.dtype)
            else:
                out = torch.zeros(lay.padded, dtype=t.dtype, device=t.device)
                for s, x in parts:
                    out[s.offset : s.offset + s.numel].copy_(x.reshape(-1))
                del parts
                if n > 1:  # what ScatterGrad / AllReduceGrad do in their backward
                    out = reduce_grad(out, self.spec, sharded=p.grads_sharded).to(_grad_dtype(prec, n))
            done[g] = out
            if g in hosted:
                hook(g, out)

        def on_grad(g: str, slot, grad: torch.Tensor) -> torch.Tensor:
            pending[g].append((slot, grad))
            if len(pending[g]) == len(b.layouts[g].slots):
                finish(g)
            key = (grad.dtype, grad.device)
            if key not in zeros:
                zeros[key] = torch.zeros((), dtype=grad.dtype, device=grad.device)
            return zeros[key].expand(grad.shape)  # what autograd keeps for this leaf: no memory

        for g, lay in b.layouts.items():
            for slot in lay.slots:
                leaves[slot.path].register_hook(functools.partial(on_grad, g, slot))
        waits = self.async_waits(b) if p.async_update else []
        try:
            loss, aux, scaled = self.loss_of(leaves, batch, loss_scale)
            torch.autograd.grad(scaled, list(leaves.values()), allow_unused=True)
        except BaseException:
            if hook is not None:
                hook.abort()
            raise
        finally:
            for h in waits:
                h.remove()
        del leaves
        for g in b.layouts:  # groups with a leaf backward never reached, in the same order on every rank
            if g not in done:
                finish(g)
        return {g: done[g] for g in b.layouts}, loss.detach(), aux

    def async_waits(self, b) -> list:
        """With an async update still running: a forward pre-hook on every module that owns a
        parameter (tied names included) waits for its groups' new parameters (returns the hooks'
        handles; none when nothing is pending)."""
        from funzero._offload import _UPDATERS

        up = _UPDATERS.get(id(b))
        if up is None or up.ahead is None:
            return []
        if self.waits[0] is not b:
            group_of = {s.path: g for g, lay in b.layouts.items() for s in lay.slots}
            named = list(self.model.named_parameters(remove_duplicate=False))
            laid_out = {id(t): group_of[name] for name, t in named if name in group_of}  # tied: one name
            owners: dict[str, list] = {}
            for name, t in named:
                g = group_of.get(name, laid_out.get(id(t)))
                mod = owners.setdefault(name.rpartition(".")[0], [])
                if g is not None and g not in mod:
                    mod.append(g)
            waits = []
            for mod, groups in owners.items():
                if not groups:
                    continue

                @torch.compiler.disable  # a compiled module: a graph break here, not a traced wait
                def wait(module, args, groups=tuple(groups)):
                    for g in groups:
                        up.wait_group(g)

                waits.append((self.model.get_submodule(mod), wait))
            self.waits = (b, waits)
        return [m.register_forward_pre_hook(fn) for m, fn in self.waits[1]]

    # --- the update ----------------------------------------------------------------------------
    def finish_reduce(self, grads: dict, state: TrainState) -> dict:
        """Stage 1 reduces once per optimizer step, here; the other stages did so in backward."""
        p = self.plan
        if p.reduce_in_backward or p.num_shards == 1:
            return grads
        out = {}
        for g in list(grads):
            x = grads.pop(g)  # drop each full gradient as soon as its shard exists
            out[g] = reduce_grad(x, self.spec, sharded=True)
            del x
        return out

    def apply_update(self, state: TrainState, grads: dict, opt_state: Any, grad_scale, found_inf):
        """Update this rank's part of the master (or params) where it lives; refresh the params.

        Returns ``(new optimizer state, new master, new params)``: the incoming buffers updated in
        place, except NVMe leaves, which come back as the renamed files.
        """
        p, b = self.plan, state.binding
        pl = b.placement
        parts = self.split(state, opt_state)
        if parts is not None:
            return self.host_update(state, grads, opt_state, grad_scale, found_inf, parts)
        host = pl.host("opt_state")

        params_own = {g: p.opt_view(t, b.layouts[g]) for g, t in state.params.items()}
        master = state.master
        store = pl.store
        pending, pending_params = [], []
        if store is not None:
            # Never update a file the current state points at: update copies, rename when done.
            master, opt_state, pending = _nvme_begin(store, master, opt_state)
            if "nvme" in pl.kinds("params"):
                params_own, _, pending_params = _nvme_begin(store, params_own, None)
        target = master if master is not None else params_own
        if master is None:
            param_out = None
        elif all(t.device == target[g].device for g, t in params_own.items()):
            param_out = params_own  # same memory (device, or stage-3 params on the host)
        else:  # host update, device params: write a pinned staging copy, then copy it over
            param_out = {g: torch.empty(t.numel(), dtype=t.dtype, pin_memory=torch.cuda.is_available()) for g, t in params_own.items()}
        info = self.info(b)
        state_dev = next(iter(target.values())).device

        def to_state(gr: dict) -> dict:
            return _stream_to(gr, state_dev)

        if host:
            grad_scale = None if grad_scale is None else grad_scale.to(state_dev)
            found_inf = None if found_inf is None else found_inf.to(state_dev)
        tx = self.inner
        # The fused kernels keep fp32 master/moments; other dtypes (fp64 tests) take the chain.
        fusable = all(t.dtype == torch.float32 for t in target.values())
        if tx.traits.fused is not None and fusable:
            new_opt = tx.traits.fused.apply(
                grads, opt_state, target, param_out=param_out, grad_scale=grad_scale, found_inf=found_inf,
                info=info, to_state=to_state if host else None,
            )
        else:
            if host:
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
            if host:  # keep the placed (pinned / file-backed) buffers: copy new values into them
                new_opt = tree_map(lambda old, new: old.copy_(new) if old.dim() > 0 else new, opt_state, new_opt)
        if param_out is not None and param_out is not params_own:
            for g, t in params_own.items():
                t.copy_(param_out[g], non_blocking=True)
        new_params = state.params
        if store is not None:
            master, new_opt = _nvme_commit(store, pending, master, new_opt)
            if "nvme" in pl.kinds("params"):
                new_params, _ = _nvme_commit(store, pending_params, params_own, None)
        if p.opt_sharded and not p.params_sharded and p.num_shards > 1:
            self.gather_updated(b, state.params)
        return new_opt, master, new_params

    def gather_one(self, b, params: dict, g: str) -> None:
        self.gather_updated(b, {g: params[g]})

    def gather_updated(self, b, params: dict) -> None:
        """Stages 1-2 hold full params: every rank gathers the updated shards, in place."""
        p = self.plan
        for g, full in params.items():
            all_gather(b.layouts[g].shard(full, b.rank), p.mesh, p.axis, tag="param", out=full)

    def info(self, b) -> ShardInfo:
        p, pl = self.plan, b.placement
        return ShardInfo(
            b.layouts,
            b.rank,
            sharded=p.opt_sharded and p.num_shards > 1,
            psum=lambda x: all_reduce(x.to(pl.compute), p.mesh, p.axis, op="sum", tag="norm").to(x.device),
        )

    def pipelined(self, state: TrainState) -> bool:
        """Whether the update takes the pipelined host path (``_offload.py``): optimizer state in
        host memory or NVMe files (parameters not in files), an fp32 master, and an optimizer
        whose update runs group by group."""
        return self.split(state, state.opt_state if self.multi is None else self.multi.inner_state(state.opt_state)) is not None

    def split(self, state: TrainState, opt_state: Any):
        """``(prefix, per-group update, its state, join)`` for the pipelined host update, or None."""
        pl = state.binding.placement
        fa = self.inner.traits.fused
        parts = None if fa is None else fa.groupwise
        ok = (
            pl.offloaded("opt_state")
            and "nvme" not in pl.kinds("params")
            and state.master is not None
            and all(t.dtype == torch.float32 for t in state.master.values())
            and parts is not None
        )
        parts = parts(opt_state) if ok else None
        if parts is None and pl.kind("opt_state") == "mixed":
            raise ValueError(
                "placement rules that split opt_state between the device and the host need an "
                "optimizer whose update runs group by group (funzero.optim.adamw with float "
                "hyperparameters, optionally after stateless transforms such as "
                "clip_by_global_norm in a chain), an fp32 master (bf16 or fp16 precision), and "
                f"no parameters on NVMe; got placement={dict(self.plan.placement)!r}"
            )
        if self.plan.delayed_update and parts is None:
            raise ValueError(
                "delayed_update=True needs an optimizer whose update runs group by group "
                "(funzero.optim.adamw with float hyperparameters, optionally after stateless "
                "transforms such as clip_by_global_norm in a chain) and an fp32 master (bf16 or "
                "fp16 precision)"
            )
        return parts

    def group_update(self, state: TrainState, last, last_state, grad_scale, found_inf):
        """``update(g, grad_on_host, param_out)``: one group's host update (run by the worker).

        NVMe state: the group's files are copied, the copies updated and renamed over the files
        (a crash leaves the previous state whole); the renamed leaves are recorded in
        ``self.swaps`` (``id(old leaf) -> new leaf``) for the step to put into the new state. The
        next group's files are advised for read-ahead while this one updates.
        """
        master, info = state.master, self.info(state.binding)
        store = state.binding.placement.store
        if store is None:

            def update(g: str, grad: torch.Tensor, out: torch.Tensor) -> None:
                last({g: grad}, last_state, {g: master[g]}, param_out={g: out},
                     grad_scale=grad_scale, found_inf=found_inf, info=info)

            return update

        order = list(reversed(state.binding.layouts))  # the order backward produces groups
        swaps = self.swaps

        def files_of(g: str, tree) -> list:
            paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace="funzero")
            return [(path, t) for path, t in zip(paths, leaves)
                    if isinstance(t, torch.Tensor) and t.dim() > 0 and g in path and store.is_file_backed(t)]

        def update(g: str, grad: torch.Tensor, out: torch.Tensor) -> None:
            nxt = order[(order.index(g) + 1) % len(order)]
            for _, t in files_of(nxt, (master, last_state)):
                store.prefetch(t)
            pending = {}
            for _, t in files_of(g, (master, last_state)):
                pending[id(t)] = (t, *store.begin_update(t))

            def mine(t):
                return pending[id(t)][1] if isinstance(t, torch.Tensor) and id(t) in pending else t

            st = optree.tree_map(mine, last_state, namespace="funzero")
            last({g: grad}, st, {g: mine(master[g])}, param_out={g: out},
                 grad_scale=grad_scale, found_inf=found_inf, info=info)
            for old, copy, tmp, path in pending.values():
                swaps[id(old)] = store.commit(copy, tmp, path)

        return update

    def stream_hook(self, state: TrainState):
        """``hook(g, grad)`` that starts group g's host update from inside backward, or None.

        Eager steps only (a compiled backward is one graph), and only where a group's gradient is
        final when backward produces it and the update needs nothing global: no clipping prefix,
        no fp16 overflow check, no accumulation, not stage 1 on several ranks (it reduces after
        backward), not the delayed update (it waits for the previous one first).
        """
        p = self.plan
        if (
            torch.compiler.is_compiling()
            or p.delayed_update
            or self.multi is not None
            or state.binding.precision.loss_scaling is not None
            or (p.num_shards > 1 and not p.reduce_in_backward)
        ):
            return None
        parts = self.split(state, state.opt_state)
        if parts is None or parts[0] is not None:
            return None
        from funzero._offload import HostUpdater

        b = state.binding
        params_own = {g: p.opt_view(t, b.layouts[g]) for g, t in state.params.items()}
        update = self.group_update(state, parts[1], parts[2], None, None)
        order = _forward_order(b) if p.async_update else None
        return HostUpdater.of(b, b.placement.compute).begin(_host_groups(b), params_own, update, order)

    @torch.compiler.disable
    def host_update(self, state: TrainState, grads: dict, opt_state: Any, grad_scale, found_inf, parts):
        """The update of host-placed optimizer state, pipelined per group (``_offload.py``)."""
        from funzero._offload import HostUpdater

        p, b = self.plan, state.binding
        master, info = state.master, self.info(b)
        prefix, last, last_state, join = parts
        new_prefix = None
        if prefix is not None:  # e.g. clipping: over all groups, on the device, before the copies
            grads, new_prefix, grad_scale = prefix(grads, master, info, grad_scale)
        # The host reads these anyway: one sync, with fp16 loss scaling or folded clipping only.
        host_scale = None if grad_scale is None else grad_scale.to("cpu")
        host_inf = None if found_inf is None else found_inf.to("cpu")
        update = self.group_update(state, last, last_state, host_scale, host_inf)
        params_own = {g: p.opt_view(t, b.layouts[g]) for g, t in state.params.items()}
        # The new optimizer state (counts advanced; moments are updated in place, group by group).
        new_opt = join(new_prefix, last({}, last_state, {}, found_inf=host_inf, info=info))
        hosted = _host_groups(b)
        on_device = [g for g in b.layouts if g not in hosted]
        gather = p.opt_sharded and not p.params_sharded and p.num_shards > 1
        finish = None
        if gather:
            finish = functools.partial(self.gather_updated, b, {g: state.params[g] for g in hosted})

        def meanwhile() -> None:
            """Groups whose state stays on the device update there while the host works."""
            if not on_device:
                return
            out = {}
            for g in on_device:  # stage-3 params on the host: written through a device copy
                t = params_own[g]
                out[g] = t if t.device == master[g].device else torch.empty_like(t, device=master[g].device)
            last({g: grads[g] for g in on_device}, last_state, {g: master[g] for g in on_device}, param_out=out,
                 grad_scale=grad_scale, found_inf=found_inf, info=info)
            for g in on_device:
                if out[g] is not params_own[g]:
                    params_own[g].copy_(out[g])
            if gather:
                self.gather_updated(b, {g: state.params[g] for g in on_device})

        ahead, order = False, None
        if p.async_update:
            ahead = functools.partial(self.gather_one, b, state.params) if gather else True
            order = _forward_order(b)
        HostUpdater.of(b, b.placement.compute).run(
            {g: grads[g] for g in hosted}, {g: params_own[g] for g in hosted}, update,
            delayed=p.delayed_update, finish=finish, meanwhile=meanwhile, ahead=ahead, order=order,
        )
        if self.swaps:  # NVMe: the new state maps the renamed files
            swaps, self.swaps = self.swaps, {}

            def swap(t):
                return swaps.get(id(t), t) if isinstance(t, torch.Tensor) else t

            master = {g: swap(t) for g, t in master.items()}
            new_opt = optree.tree_map(swap, new_opt, namespace="funzero")
        return new_opt, master, state.params

    def nonfinite(self, grads: dict) -> torch.Tensor:
        """1.0 if any rank's gradient holds an inf/NaN (one all-reduce of a scalar), else 0.0.

        One read of each gradient, no temporaries (``funzero.ops.nonfinite_``).
        """
        from funzero import ops

        tensors = gradient_tensors(grads)
        flag = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
        ops.nonfinite_(tensors, flag)
        return all_reduce(flag, self.plan.mesh, self.plan.axis, op="max", tag="metrics")

    def __call__(self, state: TrainState, batch: Any):
        self.prepare(state)
        p, b = self.plan, state.binding
        batch = _local_batch(batch, p)
        cfg = b.precision.loss_scaling
        loss_scale = state.scaler.scale if cfg is not None else None
        grads, loss, aux = self.forward_backward(state, batch, loss_scale)
        metrics: dict[str, Any] = {}
        opt_state = state.opt_state
        if self.multi is not None:
            ready, grads, opt_state = self.multi.add(opt_state, grads)
            if not ready:
                new_state = state.replace(opt_state=opt_state)
                metrics["loss"] = all_reduce(loss, p.mesh, p.axis, op="avg", tag="metrics")
                metrics["applied"] = torch.zeros((), dtype=torch.bool, device=loss.device)
                return new_state, _with_aux(metrics, aux)
            inner_state = self.multi.inner_state(opt_state)
        else:
            inner_state = opt_state
        grads = self.finish_reduce(grads, state)
        grad_scale = found_inf = None
        if cfg is not None:
            found_inf = self.nonfinite(grads)
            grad_scale = (1.0 / state.scaler.scale).to(torch.float32)
        new_inner, master, params = self.apply_update(state, grads, inner_state, grad_scale, found_inf)
        if self.multi is not None:
            new_opt = self.multi.with_inner_state(opt_state, new_inner)
            metrics["applied"] = torch.ones((), dtype=torch.bool, device=loss.device)
        else:
            new_opt = new_inner
        scaler = state.scaler
        step = state.step + 1
        if cfg is not None:
            from funzero._scaler import update_scaler

            scaler = update_scaler(state.scaler, found_inf, cfg)
            step = state.step + (found_inf == 0).to(state.step.dtype)
            metrics["skipped"] = found_inf != 0
            metrics["loss_scale"] = state.scaler.scale
        metrics["loss"] = all_reduce(loss, p.mesh, p.axis, op="avg", tag="metrics")
        new_state = state.replace(step=step, params=params, master=master, opt_state=new_opt, scaler=scaler)
        return new_state, _with_aux(metrics, aux)


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


def _stream_to(grads: dict, device: torch.device) -> dict:
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


def _nvme_begin(store, master, opt_state):
    """Writable temporary copies of every file-backed leaf of the master and optimizer state."""
    pending = []

    def begin(t):
        if isinstance(t, torch.Tensor) and t.dim() > 0 and store.is_file_backed(t):
            store.prefetch(t)
            copy, tmp, path = store.begin_update(t)
            pending.append((copy, tmp, path))
            return copy
        return t

    master = None if master is None else {g: begin(t) for g, t in master.items()}
    opt_state = None if opt_state is None else optree.tree_map(begin, opt_state, namespace="funzero")
    return master, opt_state, pending


def _nvme_commit(store, pending, master, opt_state):
    """Rename the updated copies over the leaves' files; the new state maps them by name."""
    final = {id(copy): store.commit(copy, tmp, path) for copy, tmp, path in pending}

    def swap(t):
        return final.get(id(t), t) if isinstance(t, torch.Tensor) else t

    master = None if master is None else {g: swap(t) for g, t in master.items()}
    return master, None if opt_state is None else optree.tree_map(swap, opt_state, namespace="funzero")


def _fresh_leaves(b, params: dict) -> dict[str, torch.Tensor]:
    """Each leaf as a view of its group's buffer, detached and requiring grad (eager steps)."""
    return {path: v.detach().requires_grad_() for g, t in params.items() for path, v in b.layouts[g].unpack(t).items()}


def _grad_dtype(prec, n: int) -> torch.dtype:
    """The dtype a group's gradient arrives in: reduced gradients in the reduce dtype (fp32 by
    default under bf16: exact sums, and what the fp32 master wants); a rank that reduces nothing
    keeps the param dtype."""
    return (prec.reduce_dtype or prec.param_dtype) if n > 1 else prec.param_dtype


def _forward_order(b) -> dict[str, int]:
    """Each group's position in forward: the order of its parameters in the model (the usual
    model registers its modules in the order forward runs them)."""
    return {g: i for i, g in enumerate(b.layouts)}


def _host_groups(b) -> list[str]:
    """The groups whose optimizer state lives in host memory or files: the host updates them."""
    return [g for g in b.layouts if b.placement.offloaded("opt_state", g)]


def _stream_grad(hook, g: str, grad: torch.Tensor) -> None:
    hook(g, grad)  # returns None: the gradient itself is unchanged


def _with_aux(metrics: dict, aux: Any) -> dict:
    if aux is not None:
        metrics["aux"] = optree.tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, aux)
    return metrics


def train_step(
    model: nn.Module,
    loss_fn: LossFn,
    tx: GradientTransformation,
    plan: Plan,
    *,
    has_aux: bool = False,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """Build ``step(state, batch) -> (state, metrics)`` for ``model`` under ``plan``.

    Args:
        model: the module passed to :func:`funzero.init` (a template after ``init``).
        loss_fn: ``loss_fn(apply, batch) -> loss`` (or ``(loss, aux)`` with ``has_aux``), where
            ``apply(*args, **kwargs)`` runs the model with the state's parameters.
        tx: the optimizer passed to ``init``.
        plan: the plan passed to ``init``.

    Returns:
        A pure step: the incoming state is donated (updated in place) and must not be reused.
        ``metrics`` holds device tensors (``loss``: the mean over ranks; ``skipped`` with fp16;
        ``applied`` with gradient accumulation): nothing in the step waits on the host.

    Graph breaks under ``torch.compile``: none on torch >= 2.13 for stages 0-2 and one-rank
    stage 3; stage 3 on several ranks uses module hooks that dynamo traces, but re-gathering in
    backward is eager-only (see ``_gather.py``). Older torch breaks the graph at
    ``torch.autograd.grad``. Gradient accumulation branches on the host (one sync per micro-step).

    Example:
        >>> def loss_fn(apply, batch):
        ...     x, y = batch
        ...     return F.cross_entropy(apply(x).flatten(0, 1), y.flatten())
        >>> step = torch.compile(train_step(model, loss_fn, tx, plan))
        >>> state, metrics = step(state, batch)
    """
    engine = _Engine(model, loss_fn, tx, plan, has_aux)
    if model in BINDINGS:
        engine.prepare_binding(BINDINGS[model])

    def step(state: TrainState, batch: Any):
        return engine(state, batch)

    step.engine = engine  # for introspection in tests and benchmarks
    return step
