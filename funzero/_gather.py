"""Stage 3's just-in-time parameters: gather a group before its owner module runs, drop it after,
and gather it again in backward instead of keeping it alive between forward and backward.

Design note (the footguns this module guards):

* **Why module hooks.** ``functional_call`` wants every parameter up front; handing it all the
  gathered groups would hold the full model from the first layer on. A forward pre-hook on each
  group's *owner* (the smallest module containing all its leaves, aliases included) gathers the
  group and swaps the views in; a forward hook swaps the meta placeholders back and drops the
  buffer. Leaves that no block owns (embeddings, final norm: the ``rest`` group) belong to the
  root and stay gathered for the whole forward: at most two groups are live at once.
* **Why saved-tensor hooks, and why not torch.func.** Autograd would keep every gathered weight
  alive until backward through the tensors it saves (``linear`` saves its weight). A pack hook
  replaces any saved view of a gathered buffer by ``(group, size, stride, offset)``; the unpack
  hook re-gathers the group the first time backward needs it and keeps it until the group's
  reduce-scatter (the gather's backward) has run. ``torch.func.grad`` refuses saved-tensor hooks,
  which is one reason the step differentiates with ``torch.autograd.grad`` (see ``_step.py``).
* **Under torch.compile** dynamo cannot trace saved-tensor hooks, so the compiled step gathers just
  in time in forward but lets the compiler keep each gathered group until its last use in
  backward; memory is then that of stage 2 for parameters during the step.
* **Pointer identity** (``data_ptr`` of the gathered storage) recognises saved views; it is only
  consulted during forward, while the buffer it names is alive and registered.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from funzero._collectives import CommSpec, GatherShard, all_gather

__all__ = ["Stage3Hooks", "track_gathered"]

class _Active(threading.local):
    # Set on each thread's first touch, so that "no step is running" reads the same before the
    # first step and after any: a compiled step guards on it, and a missing attribute recompiles.
    def __init__(self) -> None:
        self.run = None


_ACTIVE = _Active()


@dataclass
class GatherTracker:
    """Counts gathered stage-3 buffers alive at the moment of each new gather.

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


_TRACKERS: list[GatherTracker] = []


@contextlib.contextmanager
def track_gathered():
    """Record how many stage-3 gathered groups are alive at once (eager steps only)."""
    t = GatherTracker()
    _TRACKERS.append(t)
    try:
        yield t
    finally:
        _TRACKERS.remove(t)


def _track(buf: torch.Tensor) -> None:
    for t in _TRACKERS:
        t.add(buf)


def _untrack(buf: torch.Tensor) -> None:
    for t in _TRACKERS:
        t.drop(buf)


@dataclass(frozen=True)
class _Saved:
    group: str
    size: tuple
    stride: tuple
    offset: int


class Stage3Hooks:
    """Hooks on a model's group owners; inert unless a step has activated them."""

    def __init__(self, model: nn.Module, binding, spec: CommSpec, compute: torch.device) -> None:
        self.binding = binding
        self.spec = spec
        self.compute = compute
        self._slots: dict[str, list[tuple[nn.Module, str, str]]] = {}
        by_owner: dict[str, list[str]] = {}
        for g, owner in binding.owners.items():
            by_owner.setdefault(owner, []).append(g)
            slots = []
            for path in binding.layouts[g].paths:
                for alias in binding.aliases[path]:
                    mp, _, leaf = alias.rpartition(".")
                    slots.append((model.get_submodule(mp), leaf, path))
            self._slots[g] = slots
        self._handles = []
        for owner, groups in by_owner.items():
            mod = model.get_submodule(owner)
            self._handles.append(mod.register_forward_pre_hook(self._pre(tuple(groups))))
            self._handles.append(mod.register_forward_hook(self._post(tuple(groups)), always_call=True))

    # --- per-step context -------------------------------------------------------------------
    @contextlib.contextmanager
    def activate(self, anchors: dict, sources: dict, *, regather: bool):
        run = _Run(self, anchors, sources, regather)
        prev = _ACTIVE.run
        _ACTIVE.run = run
        try:
            if regather:
                with torch.autograd.graph.saved_tensors_hooks(run.pack, run.unpack):
                    yield run
            else:
                yield run
        finally:
            _ACTIVE.run = prev

    def _pre(self, groups):
        def hook(module, args):
            run = _ACTIVE.run
            if run is None or run.hooks is not self:
                return None
            for g in groups:
                run.gather(g)
            return None

        return hook

    def _post(self, groups):
        def hook(module, args, output):
            run = _ACTIVE.run
            if run is None or run.hooks is not self:
                return None
            for g in groups:
                run.release(g)
            return None

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class _Run:
    """One step's gathers: which buffers are live, and the re-gathered ones for backward."""

    def __init__(self, hooks: Stage3Hooks, anchors, sources, regather: bool) -> None:
        self.hooks = hooks
        self.anchors = anchors
        self.sources = sources
        self.regather = regather
        self.ptr_to_group: dict[int, str] = {}
        self.depth: dict[str, int] = {}
        self.ghosts: dict[str, list] = {}
        self.backward_bufs: dict[str, torch.Tensor] = {}

    def gather(self, g: str) -> None:
        self.depth[g] = self.depth.get(g, 0) + 1
        if self.depth[g] > 1:  # re-entrant call of the same owner: already gathered
            return
        lay = self.hooks.binding.layouts[g]
        full = GatherShard.apply(self.anchors[g], self.fetch(g), self.hooks.spec, self, g)
        _track(full)
        if self.regather:
            self.ptr_to_group[full.untyped_storage().data_ptr()] = g
        views = lay.unpack(full)
        ghosts = []
        for mod, name, path in self.hooks._slots[g]:
            ghosts.append((mod, name, mod._parameters[name]))
            mod._parameters[name] = views[path]
        self.ghosts[g] = ghosts

    def fetch(self, g: str) -> torch.Tensor:
        """This rank's shard of ``g`` on the compute device (a host-to-device copy if offloaded)."""
        src = self.sources[g]
        if src.device != self.hooks.compute:
            src = src.to(self.hooks.compute, non_blocking=True)
        return src

    def release(self, g: str) -> None:
        self.depth[g] -= 1
        if self.depth[g] > 0:
            return
        ghosts = self.ghosts.pop(g)
        if _TRACKERS and ghosts:
            mod, name, _ = ghosts[0]
            self._untrack(g, mod._parameters[name])  # a view of the gathered buffer
        for mod, name, old in ghosts:
            mod._parameters[name] = old
        for ptr, gg in list(self.ptr_to_group.items()):
            if gg == g:
                del self.ptr_to_group[ptr]

    # --- saved-tensor hooks (eager only) -------------------------------------------------------
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
            spec = self.hooks.spec
            buf = all_gather(self.fetch(s.group), spec.mesh, spec.axis, tag="param")
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
        if buf.untyped_storage().data_ptr() != self.sources[g].untyped_storage().data_ptr():
            _untrack(buf)
