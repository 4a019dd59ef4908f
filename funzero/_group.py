"""The one group path: each group passes a gather whose gradient is a reduce, just in time.

For every stage, eager and compiled, a forward pre-hook on each group's *owner* (the smallest
module containing all its leaves, aliases included) hands the owner its group's parameters, and
a forward hook takes them back::

    params, as the spec holds them ──gather──▶ full buffer ──unpack──▶ leaf views in the modules
    the reduced gradient ◀──reduce (the gather's transpose)── full gradient ◀── autograd

What the gather and the reduce are follows from the plan's :class:`~funzero._plan.StateSpecs`
(:class:`GroupComm`): a sharded params spec all-gathers (and gathers again in backward instead
of keeping the buffer alive, eager and compiled); a replicated one is the identity. A grads spec of
``Shard`` reduce-scatters, ``Replicate`` all-reduces; the axes the specs replicate over
(hierarchical sharding) all-reduce what that leaves; with ``reduce="step"`` backward reduces
nothing and the step does, once per optimizer step. On an axis of one rank every collective is
the identity. No code here knows a stage number.

The operation takes one of three forms, chosen per group and per call from the specs (never
from a stage):

* ``op``: :class:`GroupOp`, an ``autograd.Function``. Its differentiable *anchor* is a
  zero-stride view of one element, shaped and typed like the gradient it receives (no memory of
  its own); the group's buffer goes in as a non-differentiable source.
* ``direct``: nothing moves in either direction (one rank with parameters on the device, or a
  reduce deferred to the step): the anchor is the params buffer itself, and its gradient is the
  group's flat gradient.
* ``leaves``: one rank, eager, everything on the device, and an optimizer that reads leaf
  gradients in place (``FusedUpdate.takes_leaves``): each leaf is its own fresh tensor and the
  gradients stay as autograd made them (:class:`~funzero.optim.LeafGrads`), so the flat gradient,
  a full copy, is never formed. Measured: 1.0-1.8% faster eager steps on an H100 (GPT-2 350M and
  1.5B, benchmarks/NOTES.md runs 12-13); compiled steps gained nothing from it and peaked 1 GB
  higher, so they never take it.

Design note (the footguns this module guards):

* **Why just in time.** The autograd engine runs ready nodes newest first. Views or collectives
  made before forward would have their backward (the group's reduce, its copy to the host) run
  only at the very end of backward. Made in the owner's pre-hook, a group's nodes are newer than
  everything before the owner and older than everything inside it, so they run as soon as the
  group's backward is done: the reduce of block i overlaps the backward of blocks i-1, i-2, ...
* **Why saved-tensor hooks.** Autograd would keep every gathered weight alive until backward
  through the tensors it saves (``linear`` saves its weight). A pack hook replaces any saved view
  of a gathered buffer by ``(group, size, stride, offset)``; the unpack hook gathers the group
  again the first time backward needs it and keeps it until the group's reduce (the gather's
  backward) has run. ``torch.func.grad`` refuses saved-tensor hooks, one reason the step
  differentiates with ``torch.autograd.grad``. Pointer identity (``data_ptr`` of the gathered
  storage) recognises saved views; it is consulted only while the buffer it names is alive.
* **Under torch.compile** dynamo cannot trace saved-tensor hooks; the compiler is told instead
  (SimpleFSDP's approach). The step runs the model's forward inside one
  ``torch.utils.checkpoint`` region whose selective policy (:func:`regather_policy`) marks the
  parameter all-gathers, their waits and every view op *must recompute* and everything else
  *must save*; the backward (``autograd.grad`` and each gather's reduce) is annotated
  ``phase: backward``. The partitioner's remat pass for a forward-loss-backward graph then copies
  each gather, and the views of it that backward reads (the weight's ``t()`` a matmul saved,
  say), into backward, and the forward copy dies after its owner's forward. Views are in the
  policy because a view the model made of a gathered weight is what autograd saves: were only
  the gather recomputed, that saved view would keep the forward buffer alive. Recomputing a view
  costs nothing; activations stay saved. Measured (CPU, 2 ranks, tiny GPT): at each forward
  gather the compiled step holds the root's group and one block, as eager does; before, every
  group by the last block's gather. Inductor still places a backward re-gather where its
  memory-ordering pass likes (for the tiny model, the root group's one before the last block's
  forward ends: one group more than eager there).
* **A parameter is available during its owner's forward.** Leaves no block owns (embeddings, the
  final norm: the ``rest`` group) belong to the root and stay for the whole forward. A model that
  reads a module's parameter outside that module's forward (and outside its ancestors') reads the
  placeholder the state left in the module.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from funzero._collectives import all_gather, all_reduce, reduce_scatter
from funzero.optim import LeafGrads
from shardspec import Mesh, is_sharded

__all__ = ["GatherTracker", "GroupComm", "GroupHooks", "GroupOp", "Run", "forward_regathered", "gradient_like",
           "group_modes", "regather_policy", "track_gathered"]


# --- what a group's gather and reduce are, from the specs ---------------------------------------
@dataclass(frozen=True)
class GroupComm:
    """How a group's buffer crosses the data-parallel axes, read off the plan's specs: gathered
    over the shard axis, its gradient averaged over every data-parallel rank."""

    mesh: Mesh
    specs: object  # StateSpecs
    reduce_dtype: torch.dtype | None
    compute: torch.device

    @property
    def axis(self) -> str:
        return self.specs.axis

    @property
    def num_shards(self) -> int:
        return self.mesh.size(self.axis)

    @property
    def num_ranks(self) -> int:
        """Data-parallel ranks a gradient is averaged over (shards x replicas)."""
        return math.prod([self.mesh.size(a) for a in self.specs.data_axes])

    def gathers(self, offloaded_params: bool) -> bool:
        """Whether forward gathers: shards on other ranks, or shards on the host to bring in."""
        return is_sharded(self.specs.params) and (self.num_shards > 1 or offloaded_params)

    def reduces_in_backward(self) -> bool:
        return self.specs.reduce == "backward" and self.num_ranks > 1

    def fetch(self, src: torch.Tensor) -> torch.Tensor:
        """This rank's shard on the compute device (a host-to-device copy if offloaded)."""
        return src if src.device == self.compute else src.to(self.compute, non_blocking=True)

    def gather(self, src: torch.Tensor) -> torch.Tensor:
        """The full buffer from what this rank holds under the params spec."""
        if is_sharded(self.specs.params):
            return all_gather(self.fetch(src), self.mesh, self.axis, tag="param")
        return src.view_as(src)

    def reduce(self, grad: torch.Tensor) -> torch.Tensor:
        """A group's full gradient reduced to the grads spec, in the reduce dtype: reduce-scattered
        over the shard axis if the spec shards it, all-reduced over the axes it replicates."""
        x = grad if self.reduce_dtype is None else grad.to(self.reduce_dtype)
        if is_sharded(self.specs.grads):
            x = reduce_scatter(x, self.mesh, self.axis, tag="grad")
        return all_reduce(x, self.mesh, self.specs.replicated_axes("grads"), tag="grad")

    def reduce_in_backward(self, grad: torch.Tensor) -> torch.Tensor:
        """What the gather's backward does: reduce now, or leave it to the step."""
        return self.reduce(grad) if self.specs.reduce == "backward" else grad

    def grad_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        """The dtype a group's gradient arrives in: reduced gradients in the reduce dtype (fp32 by
        default under bf16: exact sums, and what the fp32 master wants); a rank that reduces
        nothing keeps the param dtype."""
        return (self.reduce_dtype or param_dtype) if self.num_ranks > 1 else param_dtype


def group_modes(comm: GroupComm, placement, layouts, *, leaves: bool = False) -> dict[str, str]:
    """``{group: "op" | "direct" | "leaves"}``: ``leaves`` for every group when the caller says
    the one-rank leaf form applies; else ``op`` where the group's gather or reduce moves
    anything, ``direct`` where nothing moves."""
    if leaves:
        return {g: "leaves" for g in layouts}
    return {g: "op" if comm.gathers(placement.offloaded("params", g)) or comm.reduces_in_backward() else "direct"
            for g in layouts}


def gradient_like(comm: GroupComm, layout, mode: str, param_dtype: torch.dtype) -> tuple[int, torch.dtype]:
    """``(numel, dtype)`` of the gradient a group of ``mode`` has at the end of backward: the
    reduced gradient (``op``) in the dtype it arrives in, or the flat local one."""
    if mode == "op":
        numel = comm.specs.held("grads", layout) if comm.reduces_in_backward() else layout.padded
        return numel, comm.grad_dtype(param_dtype)
    return layout.padded, param_dtype


class GroupOp(torch.autograd.Function):
    """Forward: the group's full buffer (gathered if the params spec shards it). Backward: the
    gradient reduced as the specs say, shaped and typed like the anchor. ``run`` is told when a
    group's reduce is done, so a copy gathered again for backward can go right then."""

    @staticmethod
    def forward(anchor, source, comm: GroupComm, run=None, group=None):
        return comm.gather(source)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.comm, ctx.run, ctx.group = inputs[2], inputs[3], inputs[4]
        ctx.anchor_dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad):
        with backward_phase(ctx.run is not None and ctx.run.recompute):
            g = ctx.comm.reduce_in_backward(grad)
        if ctx.run is not None:
            ctx.run.done(ctx.group)
        return g.to(ctx.anchor_dtype), None, None, None, None


# --- compiled steps: tell the partitioner to gather again in backward ---------------------------
def regather_policy(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy of a compiled step that gathers: recompute the parameter
    all-gathers, their waits, host-to-device copies (offloaded shards) and views; save the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    c10d = torch.ops._c10d_functional
    if op in (c10d.all_gather_into_tensor.default, c10d.wait_tensor.default) or getattr(op, "is_view", False):
        return CheckpointPolicy.MUST_RECOMPUTE
    if op is torch.ops.aten._to_copy.default and kwargs.get("device") not in (None, args[0].device):
        return CheckpointPolicy.MUST_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE


def forward_regathered(fn, *args):
    """``fn(*args)`` (the model's forward and loss) in one checkpoint region whose policy is
    :func:`regather_policy`: under torch.compile each group's gather happens again in backward."""
    import functools

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    # A partial, not a lambda: dynamo accepts context_fn only in this form.
    ctx = functools.partial(create_selective_checkpoint_contexts, regather_policy)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=ctx)


def backward_phase(on: bool):
    """Marks what runs inside as backward for the remat pass (one contiguous region: without it a
    custom Function's backward, traced in forward, would split the region at every reduce)."""
    if on and hasattr(torch.fx.traceback, "annotate"):
        return torch.fx.traceback.annotate({"phase": "backward"})
    return contextlib.nullcontext()


# --- counting live gathered buffers (tests, benchmarks) ----------------------------------------
@dataclass
class GatherTracker:
    """Counts gathered buffers alive at the moment of each new gather.

    A collective backend may hold its output for a moment after the call returns (gloo's worker
    thread drops its reference asynchronously), so a buffer the engine has already let go of
    can still be alive at the next gather. Before counting, the tracker gives such buffers up to
    ``settle`` seconds to go; one still alive after that (held by autograd, say) is counted.
    """

    refs: list = field(default_factory=list)
    released: list = field(default_factory=list)
    peak: int = 0
    gathers: int = 0
    settle: float = 0.25

    def drop(self, buf: torch.Tensor) -> None:
        """The engine holds ``buf`` no longer."""
        self.released.append(StorageWeakRef(buf.untyped_storage()))

    def add(self, buf: torch.Tensor) -> None:
        deadline = time.monotonic() + self.settle
        while any(not r.expired() for r in self.released) and time.monotonic() < deadline:
            time.sleep(0.0005)
        self.released = [r for r in self.released if not r.expired()]
        self.refs = [r for r in self.refs if not r.expired()]
        self.refs.append(StorageWeakRef(buf.untyped_storage()))
        self.gathers += 1
        self.peak = max(self.peak, len(self.refs))

    @property
    def live(self) -> int:
        return sum(not r.expired() for r in self.refs)


_TRACKERS: list[GatherTracker] = []  # observers, not training state


@contextlib.contextmanager
def track_gathered():
    """Record how many gathered (stage-3) groups are alive at once (eager steps only)."""
    t = GatherTracker()
    _TRACKERS.append(t)
    try:
        yield t
    finally:
        _TRACKERS.remove(t)


# --- the hooks, installed once per step and model ----------------------------------------------
class GroupHooks:
    """Forward pre- and post-hooks on every group owner; inert unless a :class:`Run` is active."""

    def __init__(self, model: nn.Module, binding) -> None:
        self.binding = binding
        self.run: Run | None = None
        self.slots: dict[str, list[tuple[nn.Module, str, str]]] = {}
        by_owner: dict[str, list[str]] = {}
        for g, owner in binding.owners.items():
            by_owner.setdefault(owner, []).append(g)
            slots = []
            for path in binding.layouts[g].paths:
                for alias in binding.aliases[path]:
                    mp, _, leaf = alias.rpartition(".")
                    slots.append((model.get_submodule(mp), leaf, path))
            self.slots[g] = slots
        self._handles = []
        for owner, groups in by_owner.items():
            mod = model.get_submodule(owner)
            self._handles.append(mod.register_forward_pre_hook(self._pre(tuple(groups))))
            self._handles.append(mod.register_forward_hook(self._post(tuple(groups)), always_call=True))

    @contextlib.contextmanager
    def activate(self, run: "Run"):
        prev, self.run = self.run, run
        try:
            if run.regather:
                with torch.autograd.graph.saved_tensors_hooks(run.pack, run.unpack):
                    yield run
            else:
                yield run
        finally:
            self.run = prev

    def _pre(self, groups):
        def hook(module, args):
            run = self.run
            if run is not None:
                for g in groups:
                    run.enter(g)
            return None

        return hook

    def _post(self, groups):
        def hook(module, args, output):
            run = self.run
            if run is not None:
                for g in groups:
                    run.exit(g)
            return None

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass(frozen=True)
class _Saved:
    group: str
    size: tuple
    stride: tuple
    offset: int


class Run:
    """One forward and backward through the group path.

    Args:
        hooks: the step's :class:`GroupHooks`.
        comm: the binding's :class:`GroupComm`.
        params: the state's params buffers (``{group: full buffer or this rank's shard}``).
        modes: ``{group: "op" | "direct" | "leaves"}``.
        stream: ``fn(group, gradient)`` called as each group's gradient is final, or None.
        regather: gather sharded groups again in backward (eager) instead of keeping them.
        recompute: the compiled form of ``regather``: the step runs the forward under
            :func:`forward_regathered`, and the backward is marked for the remat pass.
    """

    def __init__(self, hooks: GroupHooks, comm: GroupComm, params: dict, modes: dict, *, stream=None,
                 regather: bool = False, recompute: bool = False, before_use=None) -> None:
        b = hooks.binding
        self.hooks, self.comm, self.params, self.modes = hooks, comm, params, modes
        self.layouts = b.layouts
        self.regather = regather
        self.recompute = recompute
        self.before_use = before_use
        self.anchors: dict[str, torch.Tensor] = {}
        for g, lay in b.layouts.items():
            if modes[g] == "direct":
                self.anchors[g] = params[g].detach().requires_grad_()
            elif modes[g] == "op":
                numel, dtype = gradient_like(comm, lay, "op", b.precision.param_dtype)
                self.anchors[g] = torch.zeros((), dtype=dtype, device=comm.compute).expand(numel).requires_grad_()
            if stream is not None and g in self.anchors:
                self.anchors[g].register_hook(_StreamGrad(stream, g))
        self.views: dict[str, dict[str, torch.Tensor]] = {}  # direct and leaves: made once per run
        self.depth: dict[str, int] = {}
        self.ghosts: dict[str, list] = {}
        self.ptr_to_group: dict[int, str] = {}
        self.backward_bufs: dict[str, torch.Tensor] = {}

    # --- forward: hand a group to its owner, take it back -----------------------------------------
    def enter(self, g: str) -> None:
        self.depth[g] = self.depth.get(g, 0) + 1
        if self.depth[g] > 1:  # re-entrant call of the same owner: already in place
            return
        if self.before_use is not None:
            self.before_use(g)
        views = self._views(g)
        ghosts = []
        for mod, name, path in self.hooks.slots[g]:
            ghosts.append((mod, name, mod._parameters[name]))
            mod._parameters[name] = views[path]
        self.ghosts[g] = ghosts

    def _views(self, g: str) -> dict[str, torch.Tensor]:
        mode, lay = self.modes[g], self.layouts[g]
        if mode == "op":  # a new gather at every entry (stage 3 drops the buffer after each use)
            full = GroupOp.apply(self.anchors[g], self.params[g], self.comm, self, g)
            if is_sharded(self.comm.specs.params):
                _track(full)
            if self.regather:
                self.ptr_to_group[full.untyped_storage().data_ptr()] = g
            return lay.unpack(full)
        if g not in self.views:
            if mode == "direct":
                self.views[g] = lay.unpack(self.anchors[g])
            else:  # leaves: each leaf a fresh tensor whose gradient autograd keeps as it is
                self.views[g] = {p: v.detach().requires_grad_() for p, v in lay.unpack(self.params[g]).items()}
        return self.views[g]

    def exit(self, g: str) -> None:
        self.depth[g] -= 1
        if self.depth[g] > 0:
            return
        ghosts = self.ghosts.pop(g)
        if _TRACKERS and ghosts and self.modes[g] == "op" and is_sharded(self.comm.specs.params):
            mod, name, _ = ghosts[0]
            self._untrack(g, mod._parameters[name])  # a view of the gathered buffer
        for mod, name, old in ghosts:
            mod._parameters[name] = old
        for ptr, gg in list(self.ptr_to_group.items()):
            if gg == g:
                del self.ptr_to_group[ptr]

    # --- backward --------------------------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        if not self.ptr_to_group or t.device.type == "meta":
            return t
        g = self.ptr_to_group.get(t.untyped_storage().data_ptr())
        if g is None:
            return t
        return _Saved(g, tuple(t.size()), tuple(t.stride()), t.storage_offset())

    def unpack(self, s):
        if not isinstance(s, _Saved):
            return s
        buf = self.backward_bufs.get(s.group)
        if buf is None:
            buf = self.comm.gather(self.params[s.group])
            _track(buf)
            self.backward_bufs[s.group] = buf
        return buf.as_strided(s.size, s.stride, s.offset)

    def done(self, g: str) -> None:
        """The group's gradient has been reduced: its backward copy is no longer needed."""
        buf = self.backward_bufs.pop(g, None)
        if buf is not None and _TRACKERS:
            self._untrack(g, buf)

    def _untrack(self, g: str, buf: torch.Tensor) -> None:
        # With nothing to gather (one rank, parameters in place) the "gathered" buffer is the
        # state's own shard, alive by design: not something to wait for.
        if buf.untyped_storage().data_ptr() != self.params[g].untyped_storage().data_ptr():
            for t in _TRACKERS:
                t.drop(buf)

    def gradients(self, loss: torch.Tensor) -> dict:
        """``{group: gradient}`` of ``loss``: the reduced flat gradient (``op``), the flat local
        gradient (``direct``), or :class:`LeafGrads` (``leaves``). A group whose backward never
        ran gets zeros, reduced like the others (every rank issues the same collectives, in the
        same order)."""
        leafy = [g for g in self.layouts if self.modes[g] == "leaves"]
        for g in leafy:
            self._views(g)  # groups no module entered still need their leaves
        inputs = [a for a in self.anchors.values()]
        inputs += [v for g in leafy for v in self.views[g].values()]
        with backward_phase(self.recompute):
            grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=bool(leafy))
        out = {}
        it = iter(grads)
        for g, a in self.anchors.items():
            x = next(it)
            if x is None:
                x = torch.zeros(a.shape, dtype=a.dtype, device=a.device)
                if self.modes[g] == "op" and self.comm.reduces_in_backward():
                    x = self.comm.reduce(torch.zeros(self.layouts[g].padded, dtype=self.params[g].dtype,
                                                     device=self.comm.compute)).to(a.dtype)
            out[g] = x
        for g in leafy:
            lay = self.layouts[g]
            out[g] = LeafGrads([s.path for s in lay.slots], [next(it) for _ in lay.slots],
                               [s.offset for s in lay.slots], lay.padded)
        return {g: out[g] for g in self.layouts}


class _StreamGrad:
    """A tensor hook handing a group's final gradient on (returns None: the gradient is unchanged)."""

    def __init__(self, stream, g: str) -> None:
        self.stream, self.g = stream, g

    def __call__(self, grad: torch.Tensor) -> None:
        self.stream(self.g, grad)


def _track(buf: torch.Tensor) -> None:
    for t in _TRACKERS:
        t.add(buf)
