"""The host update, pipelined: gradients stream out, groups update on the CPU, parameters stream back.

For optimizer state placed on the host (``placement={"opt_state": "cpu"}``, or NVMe files, which
the update copies, updates and renames per group). Per group, in the order backward produced them:

    device stream  ... backward ─┐
    D2H stream                   ├ grad g0 ─ grad g1 ─ grad g2 ─ ...            (pinned buffers)
    worker thread                │    update g0 ── update g1 ── update g2 ...  (funzero.ops.adamw_, GIL released)
    H2D stream                   │              param g0 ──── param g1 ── ...  (pinned staging)

so the CPU update of group i overlaps the device-to-host copy of group i+1 and the host-to-device
copy of group i-1. The host update is the bottleneck of an offloaded step (it is bound by host
memory bandwidth); everything else hides behind it.

With ``zero(..., async_update=True)`` (exact) the step returns once the update is under way.
The next forward waits group by group (:meth:`HostUpdater.wait_group`, from a forward pre-hook
on each module that owns parameters): the group's update is done, its parameters are copied in,
the device stream waits for that copy. The worker takes, among the groups whose gradient has
landed, the one the next forward needs first, so the update overlaps the next forward:

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
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable

import torch

__all__ = ["HostUpdater", "sync"]

_UPDATERS: dict[int, "HostUpdater"] = {}


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
    reaches them (:meth:`HostUpdater.wait_group`)."""

    def __init__(self, job: _Job, params: dict, gather: Callable[[str], None] | None) -> None:
        self.job, self.params, self.gather = job, params, gather
        self.copied: set[str] = set()  # copy to the device issued
        self.ready: set[str] = set()  # and waited for by the device stream (and gathered)


class _Parts:
    """A group's gradient as its leaves' gradients: ``parts = [(offset, grad)]`` into a flat buffer
    of ``numel()`` elements whose other elements (padding) are zero.

    ``numel()``/``element_size()`` describe that flat gradient (what the memory model counts);
    ``held_nbytes()`` is what the leaves' gradients hold, less by the padding, and nothing once
    their copy to the host is issued (they are dropped then).
    """

    def __init__(self, parts: list, numel: int, dtype: torch.dtype) -> None:
        self.parts, self.size, self.dtype = parts, numel, dtype

    def numel(self) -> int:
        return self.size

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def held_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.parts)


class HostUpdater:
    """Pinned buffers, two copy streams and one worker thread for one binding's host update."""

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

    @staticmethod
    def of(binding, compute: torch.device) -> "HostUpdater":
        key = id(binding)
        up = _UPDATERS.get(key)
        if up is None:
            up = _UPDATERS[key] = HostUpdater(compute)
            weakref.finalize(binding, _UPDATERS.pop, key, None)
        return up

    # --- buffers and copies ---------------------------------------------------------------------
    def _pinned(self, cache: dict, g: str, like: torch.Tensor) -> torch.Tensor:
        buf = cache.get(g)
        if buf is None or buf.numel() != like.numel() or buf.dtype != like.dtype:
            buf = cache[g] = torch.empty(like.numel(), dtype=like.dtype, pin_memory=self.cuda)
        return buf

    def _to_host(self, g: str, x, job: _Job) -> None:
        """Copy group ``g``'s gradient out: a flat tensor, or ``_Parts`` (one tensor per leaf)."""
        if isinstance(x, _Parts):
            buf = self.grad_host.get(g)
            if buf is None or buf.numel() != x.numel() or buf.dtype != x.dtype:
                # padding between and after the leaves stays zero: only the leaves are written
                buf = self.grad_host[g] = torch.zeros(x.numel(), dtype=x.dtype, pin_memory=self.cuda)
            pieces = [(buf[a : a + t.numel()], t.reshape(-1)) for a, t in x.parts]
        else:
            buf = self._pinned(self.grad_host, g, x)
            pieces = [(buf, x.reshape(-1))]
        if not self.cuda or not any(t.device.type == "cuda" for _, t in pieces):
            for dst, src in pieces:
                dst.copy_(src)
            return
        with torch.cuda.stream(self.d2h):
            for dst, src in pieces:
                dst.copy_(src, non_blocking=True)
                src.record_stream(self.d2h)
            job.d2h[g] = self.d2h.record_event()
        if isinstance(x, _Parts):
            # The leaves' gradients may go now: record_stream keeps their memory from reuse until
            # the copy has read them, and nothing else reads them.
            x.parts = []

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
        if g not in self.stage or self.stage[g].numel() != param.numel():
            self.stage[g] = self._stage_for(param, delayed)
        self._to_host(g, grad, job)
        job.issued.add(g)
        job.put(g)

    def begin(self, groups: list[str], params: dict[str, torch.Tensor], update, order=None) -> Callable:
        """Stream this step's update from inside backward (not with ``delayed``).

        Returns ``hook(g, grad)`` to call as each group's gradient becomes final; :meth:`run`
        then only copies the parameters back as groups finish. ``order``: see :class:`_Job`.
        """
        job = self.live = _Job(list(groups), order)
        self.pool.submit(self._work, job, update)

        hosted = set(groups)

        def hook(g: str, grad) -> None:
            """``grad``: the group's flat gradient, or ``_Parts`` (its leaves' gradients)."""
            if g not in hosted:  # its state is on the device: it updates after backward
                return
            dev = grad.parts[0][1].device if isinstance(grad, _Parts) else grad.device
            if self.cuda and dev.type == "cuda":
                self.d2h.wait_stream(torch.cuda.current_stream(dev))  # backward's stream
            self._issue(job, g, grad, params[g], False)

        def abort() -> None:
            self.live = None
            job.put(None)

        hook.abort = abort
        return hook

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
                    update(g, self.grad_host[g], self.stage[g])
                    self.stats["update_s"] += time.perf_counter() - t0
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


@torch.compiler.disable  # host-side waiting: a graph break in a compiled step
def sync(state):
    """Wait for work a step left running (the delayed or async host update); returns ``state``.

    Needed only with ``zero(..., delayed_update=True)`` or ``async_update=True`` before reading
    ``state.params``, ``state.master`` or ``state.opt_state`` yourself; ``save_state`` and
    ``gather_params`` call it. A collective in
    stages 1-2 on several ranks (the new parameter shards are all-gathered): call it on every rank.
    """
    up = _UPDATERS.get(id(state.binding))
    if up is not None:
        up.sync()
    return state
