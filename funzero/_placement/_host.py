"""``cpu``: host memory, and the host update that serves every offloaded kind (``cpu``, ``nvme``).

For optimizer state placed on the host the update is pipelined per group, in the order backward
produced the gradients:

    device stream  ... backward ─┐
    D2H stream                   ├ grad g0 ─ grad g1 ─ grad g2 ─ ...            (pinned buffers)
    worker thread                │    update g0 ── update g1 ── update g2 ...  (funzero.ops.adamw_, GIL released)
    H2D stream                   │              param g0 ──── param g1 ── ...  (pinned staging)

so the CPU update of group i overlaps the device-to-host copy of group i+1 and the host-to-device
copy of group i-1. The host update is the bottleneck of an offloaded step (it is bound by host
memory bandwidth); everything else hides behind it. Groups whose state stays on the device
(placement rules) update on the device's stream meanwhile.

With ``zero(..., async_update=True)`` (exact) the step returns once the update is under way.
The next forward waits group by group (:meth:`HostUpdate.wait_group`, from the group's forward
pre-hook): the group's update is done, its parameters are copied in, the device stream waits for
that copy. The worker takes, among the groups whose gradient has landed, the one the next
forward needs first, so the update overlaps the next forward:

    worker thread   ... update g5 ─ update g0 ─ update g1 ─ update g2 ...
    device stream   backward ─┘ (step returns) forward g0 ─ forward g1 ─ forward g2 ...

With ``zero(..., delayed_update=True)`` (ZeRO-Offload's one-step delayed parameter update, off by
default because it changes the numerics) the step does not wait for its own update: step t's
update runs on the CPU while step t+1's forward and backward run on the device, and its new
parameters are copied in at the end of step t+1's backward. Step t+1's gradient is therefore
taken at the parameters from before step t's update. :func:`funzero.sync` (also called by
``save_state`` and ``gather_params``) waits for the update still running.

Footguns this file guards:

* A buffer is never reused while a copy may still read or write it: each group's host-to-device
  copy is recorded as an event that the next update of that group's staging buffer waits for;
  a device gradient is kept alive for its copy with ``record_stream``; the next device-to-host
  copy of a group starts only after the previous update of that group has read it.
* Copies wait on an event recorded after backward, not on the whole device stream, so the
  parameter copies (which the next forward waits for) cannot make the gradient copies wait too.
* An exception in the worker is raised in the caller, at the next point that waits for it.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import os
import queue
import threading
import time
from collections.abc import Callable
import optree
import torch

from funzero._placement._kind import Kind

__all__ = ["Cpu", "HostUpdate"]


class Cpu(Kind):
    """Host memory. Leaves that travel to the device at every step (stage-3 parameter shards,
    gathered just in time) are pinned; the optimizer's master and moments never leave the host
    (gradients come in and parameters go out through pinned staging buffers), so they are not:
    pinning them would only cost page-locked memory, which the caching host allocator also
    rounds up to a power of two per buffer."""

    name = "cpu"
    tier = "cpu"
    offloaded = True

    @classmethod
    def parse(cls, text: str) -> str | None:
        return "" if text == "cpu" else None

    def pinned(self, key: str) -> bool:
        return key == "params" and torch.cuda.is_available()

    def empty(self, key: str, n: int, dtype: torch.dtype, *, name: str) -> torch.Tensor:
        return torch.empty(n, dtype=dtype, pin_memory=self.pinned(key))

    def holds(self, key: str, t: torch.Tensor) -> bool:
        from funzero._placement._nvme import is_file_backed

        return t.device.type == "cpu" and (t.is_pinned() or not self.pinned(key)) and not is_file_backed(t)


def _threads() -> int:
    """Threads for the host update: all cores but one (the thread that launches device work)."""
    env = os.environ.get("FUNZERO_HOST_THREADS")
    if env:
        return max(1, int(env))
    return max(1, torch.get_num_threads() - 1)


class _Job:
    """One step's host update: groups go in when their gradient copy is issued, come out updated.

    ``order`` (group -> position in forward), when given, makes the worker take, among the
    groups whose gradient is on the host, the one the next forward needs first (the async
    update); otherwise groups update in the order their copies were issued.
    """

    def __init__(self, groups: list[str], order: dict[str, int] | None = None) -> None:
        self.groups = groups
        self.order = order
        self.issued: set[str] = set()
        self.avail: list = []  # gradient copy issued, not yet taken by the worker
        self.cond = threading.Condition()
        self.done: queue.SimpleQueue = queue.SimpleQueue()  # updated, in completion order
        self.d2h: dict[str, torch.cuda.Event] = {}
        self.error: BaseException | None = None

    def put(self, g: str | None) -> None:
        """``g``'s gradient copy is issued (``None``: the step failed, stop waiting)."""
        with self.cond:
            self.avail.append(g)
            self.cond.notify()

    def take(self) -> str | None:
        with self.cond:
            while not self.avail:
                self.cond.wait()
            if self.order is None or None in self.avail:
                g = None if None in self.avail else self.avail[0]
            else:
                def key(h):
                    ev = self.d2h.get(h)
                    return (ev is not None and not ev.query(), self.order[h])

                g = min(self.avail, key=key)
            self.avail.remove(g)
            return g

    def next_done(self) -> str:
        """The next group whose update finished (raises the worker's exception)."""
        g = self.done.get()
        if self.error is not None:
            raise RuntimeError("the host optimizer update failed") from self.error
        return g

    def completed(self):
        """Each group once, as its update finishes."""
        for _ in self.groups:
            yield self.next_done()


class _Ahead:
    """An async update still running: its groups' parameters are copied in as the next forward
    reaches them (:meth:`HostUpdate.wait_group`)."""

    def __init__(self, job: _Job, params: dict, gather: Callable[[str], None] | None) -> None:
        self.job, self.params, self.gather = job, params, gather
        self.copied: set[str] = set()  # copy to the device issued
        self.ready: set[str] = set()  # and waited for by the device stream (and gathered)


class HostUpdate:
    """Pinned buffers, two copy streams and one worker thread: one binding's host update.

    Made by the binding's :class:`~funzero._placement.Placement` the first time a step needs it,
    and kept there (the state's static part), not in any module-level table.

    ``observers`` (for tests, through ``funzero.testing``) are called as ``fn(event, group)``
    with ``event`` one of ``"issue"`` (a gradient copy to the host was issued) and
    ``"update"`` (the group's host update ran); ``slowdown`` (seconds) delays each group update.
    """

    def __init__(self, compute: torch.device) -> None:
        self.cuda = compute.type == "cuda"
        self.d2h = torch.cuda.Stream(compute) if self.cuda else None
        self.h2d = torch.cuda.Stream(compute) if self.cuda else None
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="funzero-host-update")
        self.threads = _threads()
        self.grad_host: dict[str, torch.Tensor] = {}
        self.stage: dict[str, torch.Tensor] = {}
        self.h2d_done: dict[str, torch.cuda.Event] = {}
        self.job: _Job | None = None  # a delayed update whose parameters are not copied in yet
        self.job_params: dict[str, torch.Tensor] = {}
        self.live: _Job | None = None  # an update streaming from inside backward
        self.ahead: _Ahead | None = None  # an async update the next forward waits for per group
        # seconds spent: by the worker updating groups, by the next forward waiting for them
        self.stats = {"update_s": 0.0, "forward_wait_s": 0.0}
        self.finish: Callable[[], None] | None = None  # after copying in (stages 1-2: all-gather)
        self.observers: list[Callable[[str, str], None]] = []
        self.slowdown = 0.0

    def _tell(self, event: str, g: str) -> None:
        for fn in self.observers:
            fn(event, g)

    # --- buffers and copies ---------------------------------------------------------------------
    def _pinned(self, cache: dict, g: str, like: torch.Tensor) -> torch.Tensor:
        buf = cache.get(g)
        if buf is None or buf.numel() != like.numel() or buf.dtype != like.dtype:
            buf = cache[g] = torch.empty(like.numel(), dtype=like.dtype, pin_memory=self.cuda)
        return buf

    def _to_host(self, g: str, x: torch.Tensor, job: _Job) -> None:
        """Copy group ``g``'s flat gradient out (asynchronously from a GPU)."""
        buf = self._pinned(self.grad_host, g, x)
        src = x.reshape(-1)
        if not self.cuda or src.device.type != "cuda":
            buf.copy_(src)
            return
        with torch.cuda.stream(self.d2h):
            buf.copy_(src, non_blocking=True)
            src.record_stream(self.d2h)
            job.d2h[g] = self.d2h.record_event()

    def _to_params(self, g: str, dst: torch.Tensor) -> None:
        src = self.stage[g]
        if src.data_ptr() == dst.data_ptr():  # host params updated in place (exact, stage 3)
            return
        if not self.cuda or dst.device.type != "cuda":
            dst.view(-1).copy_(src)
            return
        with torch.cuda.stream(self.h2d):
            dst.view(-1).copy_(src, non_blocking=True)
            self.h2d_done[g] = self.h2d.record_event()

    # --- the step -------------------------------------------------------------------------------
    def _issue(self, job: _Job, g: str, grad: torch.Tensor, param: torch.Tensor, delayed: bool) -> None:
        """Start group ``g``'s gradient copy and hand the group to the worker."""
        self._tell("issue", g)
        if g not in self.stage or self.stage[g].numel() != param.numel():
            self.stage[g] = self._stage_for(param, delayed)
        self._to_host(g, grad, job)
        job.issued.add(g)
        job.put(g)

    def begin(self, groups: list[str], params: dict[str, torch.Tensor], update, order=None) -> "_Stream":
        """Stream this step's update from inside backward (not with ``delayed``).

        Returns a :class:`_Stream` to call as each group's gradient becomes final; :meth:`run`
        then only copies the parameters back as groups finish. ``order``: see :class:`_Job`.
        """
        job = self.live = _Job(list(groups), order)
        self.pool.submit(self._work, job, update)
        return _Stream(self, job, set(groups), params)

    def run(
        self,
        grads: dict[str, torch.Tensor],
        params: dict[str, torch.Tensor],
        update: Callable[[str, torch.Tensor, torch.Tensor], None],
        *,
        delayed: bool,
        finish: Callable[[], None] | None = None,
        meanwhile: Callable[[], None] | None = None,
        ahead: Callable[[str], None] | bool = False,
        order: dict[str, int] | None = None,
    ) -> None:
        """Update every group of ``grads`` on the host and refresh ``params`` from the result.

        ``update(g, grad_on_host, param_out)`` updates group ``g``'s host state and writes its new
        parameters (params' dtype) into ``param_out``. Without ``delayed`` the new parameters are
        in ``params`` (for the device stream) when this returns; with it, the parameters of the
        previous call's update are, and this call's update is still running. ``finish()`` runs
        whenever new parameters have been copied in (here, and in :meth:`sync`).
        ``meanwhile()`` runs once the gradient copies are issued, before waiting for the host: the
        update of groups whose state is on the device (never delayed).
        With ``ahead`` (the async update) this returns once the update is under way; the next
        forward calls :meth:`wait_group` per group (``ahead`` may be ``gather(g)``, what
        ``finish`` does for one group, run once the group's parameters are in). ``order``: see
        :class:`_Job`.
        """
        self.drain_ahead()  # groups the last forward did not reach
        if self.cuda:
            after_backward = torch.cuda.current_stream().record_event()
            self.d2h.wait_event(after_backward)
            self.h2d.wait_event(after_backward)
        job, self.live = self.live, None
        copied_in = not delayed  # new parameters land in params during this call
        if job is not None:  # streamed from backward: copy out whatever backward did not
            for g in grads:
                if g not in job.issued:
                    self._issue(job, g, grads[g], params[g], False)
        else:
            prev, self.job = self.job, None
            job = _Job(list(grads), order)
            if prev is not None:  # delayed: in the order the previous update finished groups
                copied_in = True
                for g in prev.completed():
                    self._to_params(g, self.job_params[g])  # stage[g] holds its new params
                    self._issue(job, g, grads[g], params[g], delayed)  # grad_host[g] is free again
            else:
                for g in grads:
                    self._issue(job, g, grads[g], params[g], delayed)
            self.pool.submit(self._work, job, update)
        grads = None  # the copies hold what they need (record_stream)
        if meanwhile is not None:
            meanwhile()
        if delayed:
            self.job, self.job_params = job, dict(params)
        elif ahead:
            self.ahead = _Ahead(job, dict(params), ahead if callable(ahead) else None)
            self.finish = None
            return
        else:
            for g in job.completed():
                self._to_params(g, params[g])
        if self.cuda:
            torch.cuda.current_stream().wait_stream(self.h2d)
        self.finish = finish
        if finish is not None and copied_in:
            finish()

    def _stage_for(self, param: torch.Tensor, delayed: bool) -> torch.Tensor:
        # Host parameters (stage 3, params on the host) take the update directly, unless the
        # update runs while the next forward reads them (delayed).
        if param.device.type == "cpu" and not delayed and param.is_contiguous():
            return param.view(-1)
        return torch.empty(param.numel(), dtype=param.dtype, pin_memory=self.cuda)

    def _work(self, job: _Job, update) -> None:
        from funzero import ops

        try:
            with ops.host_threads(self.threads):
                for _ in job.groups:
                    g = job.take()
                    if g is None:  # the step failed before backward finished
                        return
                    ev = job.d2h.get(g)
                    if ev is not None:
                        ev.synchronize()  # the gradient has landed
                    ev = self.h2d_done.get(g)
                    if ev is not None:
                        ev.synchronize()  # the last copy out of the staging buffer has finished
                    t0 = time.perf_counter()
                    if self.slowdown:
                        time.sleep(self.slowdown)
                    update(g, self.grad_host[g], self.stage[g])
                    self.stats["update_s"] += time.perf_counter() - t0
                    self._tell("update", g)
                    job.done.put(g)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            job.error = e
            for _ in job.groups:
                job.done.put(None)

    def wait_group(self, g: str) -> None:
        """The async update's group ``g``: wait for its host update, copy its parameters in (and
        those of every group finished before it), and make the device stream wait for the copy.
        Called by the next forward just before the group's parameters are first used."""
        a = self.ahead
        if a is None or g not in a.params or g in a.ready:
            return
        t0 = time.perf_counter()
        while g not in a.copied:
            h = a.job.next_done()
            self._to_params(h, a.params[h])
            a.copied.add(h)
        self.stats["forward_wait_s"] += time.perf_counter() - t0
        if self.cuda and g in self.h2d_done:
            torch.cuda.current_stream().wait_event(self.h2d_done[g])
        if a.gather is not None:
            a.gather(g)
        a.ready.add(g)
        if len(a.ready) == len(a.params):
            self.ahead = None

    def drain_ahead(self) -> None:
        """Finish the async update: every group, in the order of its parameters."""
        a = self.ahead
        if a is not None:
            for g in list(a.params):
                self.wait_group(g)

    @property
    def pending(self) -> bool:
        """Whether an async or delayed update is still to be waited for."""
        return self.ahead is not None or self.job is not None

    def sync(self) -> None:
        """Finish a delayed or async update: wait for it and copy its parameters in."""
        self.drain_ahead()
        job, self.job = self.job, None
        if job is None:
            return
        for g in job.completed():
            self._to_params(g, self.job_params[g])
        if self.cuda:
            torch.cuda.current_stream().wait_stream(self.h2d)
        if self.finish is not None:
            self.finish()


class _Stream:
    """Hands groups to a host update that started before backward, as their gradients become final."""

    def __init__(self, host: HostUpdate, job: _Job, hosted: set, params: dict) -> None:
        self.host, self.job, self.hosted, self.params = host, job, hosted, params

    def __call__(self, g: str, grad: torch.Tensor) -> None:
        if g not in self.hosted:  # its state is on the device: it updates after backward
            return
        if self.host.cuda and grad.device.type == "cuda":
            self.host.d2h.wait_stream(torch.cuda.current_stream(grad.device))  # backward's stream
        self.host._issue(self.job, g, grad, self.params[g], False)

    def abort(self) -> None:
        """The step failed: the worker stops waiting for gradients that will not come."""
        self.host.live = None
        self.job.put(None)


# --- the pipelined update of a step -------------------------------------------------------------
def _files_of(pl, key: str, g: str, tree) -> list[torch.Tensor]:
    """The leaves of group ``g`` in ``tree`` whose kind writes copies (NVMe files)."""
    kind = pl.kind_of(key, g)
    if not kind.copies:
        return []
    paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace="funzero")
    return [t for path, t in zip(paths, leaves) if isinstance(t, torch.Tensor) and t.dim() > 0 and g in path
            and kind.holds(key, t)]


def group_update(pl, master: dict, gw, grad_scale, found_inf, info, swaps: dict) -> Callable:
    """``update(g, grad_on_host, param_out)``: one group's host update (run by the worker).

    Leaves of a kind that writes copies (NVMe) are copied, the copies updated and committed
    (renamed over the files: a crash leaves the previous state whole); the committed leaves are
    recorded in ``swaps`` (``id(old leaf) -> new leaf``) for the step to put into the new state.
    The next group's leaves are advised for read-ahead while this one updates.
    """
    order = list(reversed(list(master)))  # the order backward produces groups

    def update(g: str, grad: torch.Tensor, out: torch.Tensor) -> None:
        nxt = order[(order.index(g) + 1) % len(order)]
        for t in _files_of(pl, "opt_state", nxt, (master, gw.state)):
            pl.kind_of("opt_state", nxt).prefetch(t)
        kind = pl.kind_of("opt_state", g)
        pending: dict = {}

        def mine(t):
            return pending[id(t)][1] if isinstance(t, torch.Tensor) and id(t) in pending else t

        try:
            for t in _files_of(pl, "opt_state", g, (master, gw.state)):
                pending[id(t)] = (t, kind.begin_write(t))
            st = optree.tree_map(mine, gw.state, namespace="funzero")
            gw.apply({g: grad}, st, {g: mine(master[g])}, param_out={g: out},
                     grad_scale=grad_scale, found_inf=found_inf, info=info)
            for old, copy in pending.values():
                swaps[id(old)] = kind.commit(copy)
        except BaseException:
            for _, copy in pending.values():
                kind.abort(copy)  # no copy is left behind (a committed one has no file of its name)
            raise

    return update


def update_offloaded(pl, host: HostUpdate, job, gw, grads: dict, grad_scale, found_inf, *, delayed: bool, ahead: bool):
    """The update of a step whose optimizer state lives (at least partly) off the device,
    pipelined per group. Returns ``(new optimizer state, new master)``; the parameters are
    updated in place (or, with ``ahead`` or ``delayed``, will be).

    ``job`` is the step's :class:`funzero._update.UpdateJob`.
    """
    master, info = job.master, job.info
    prefix, last, last_state, join = gw
    new_prefix = None
    if prefix is not None:  # e.g. clipping: over all groups, on the device, before the copies
        grads, new_prefix, grad_scale = prefix(grads, master, info, grad_scale)
    # The host reads these anyway: one sync, with folded clipping or the non-finite flag (every
    # step unless nonfinite="ignore"; the counts below are advanced on the host from it).
    host_scale = None if grad_scale is None else grad_scale.to("cpu")
    host_inf = None if found_inf is None else found_inf.to("cpu")
    swaps = job.committed
    update = group_update(pl, master, gw, host_scale, host_inf, info, swaps)
    params_own = job.params_own
    # The new optimizer state (counts advanced; moments are updated in place, group by group).
    new_opt = join(new_prefix, last({}, last_state, {}, found_inf=host_inf, info=info))
    hosted = [g for g in master if pl.offloaded("opt_state", g)]
    on_device = [g for g in master if g not in hosted]
    finish = None if job.gather is None else functools.partial(job.gather, hosted)

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
        if job.gather is not None:
            job.gather(on_device)

    order = job.forward_order if ahead else None
    if ahead and job.gather is not None:
        ahead = lambda g: job.gather([g])  # noqa: E731 - stages 1-2: all-gather each group once it is in
    host.run({g: grads[g] for g in hosted}, {g: params_own[g] for g in hosted}, update,
             delayed=delayed, finish=finish, meanwhile=meanwhile, ahead=ahead, order=order)
    if swaps:  # NVMe: the new state maps the committed files

        def swap(t):
            return swaps.get(id(t), t) if isinstance(t, torch.Tensor) else t

        master = {g: swap(t) for g, t in master.items()}
        new_opt = optree.tree_map(swap, new_opt, namespace="funzero")
    return new_opt, master

