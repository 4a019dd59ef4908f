"""Non-finite steps: what a train step does when its loss or a gradient holds an inf or a NaN.

The decision has two halves, kept apart so that the step never waits on the host:

* **On the device** (every precision): the step folds "some gradient or the loss is not finite" into
  one 0-d flag, takes its maximum over the ranks (so every rank decides alike) and hands it to the
  update, which then writes nothing (the mechanism fp16's loss scaling already used). The state's
  ``step`` counts updates applied: a skipped step leaves it where it was.
* **On the host** (``nonfinite="raise"`` and the ``max_skips`` bound): the flag of each step is
  read lazily. On the CPU it is read as the step ends (reading it costs nothing there); on a GPU it
  is copied to pinned memory behind the step and judged once the copy has landed, at the end of a
  later call (at most :data:`LAG` calls later; ``Step.check_nonfinite()`` judges every flag still
  in flight). While the host has not yet seen a skip it will raise for, the device keeps skipping:
  a per-step counter of consecutive skips, past the limit, forces the flag on. So the error comes
  with a state that is the last finite one, however late the host reads it.

The host judge runs outside any compiled graph without breaking it: it is registered as one of
dynamo's reorderable logging functions, which a compiled frame calls after its graph with the
graph's tensors (and before the frame's other side effects, so the state handed to the call that
raises is not marked donated).
"""

from __future__ import annotations

import itertools
import weakref
from collections import deque
from dataclasses import dataclass

import torch

__all__ = ["NonFiniteError", "NonFinitePolicy", "Guard", "LAG"]

POLICIES = ("skip", "raise", "ignore")
LAG = 2  # a GPU flag is waited for once this many newer ones are in flight behind it


class NonFiniteError(FloatingPointError):
    """A train step's policy stops the run on a non-finite loss or gradient (``nonfinite="raise"``,
    or more than ``max_skips`` consecutive skipped steps)."""


@dataclass(frozen=True)
class NonFinitePolicy:
    """``mode``: ``"skip"`` (drop the update), ``"raise"`` (drop it and raise
    :class:`NonFiniteError`) or ``"ignore"`` (apply it: no check at all); ``max_skips``: the
    consecutive skipped steps tolerated under ``"skip"`` before :class:`NonFiniteError` (None: no
    bound)."""

    mode: str = "skip"
    max_skips: int | None = 100

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or self.mode not in POLICIES:
            raise ValueError(f"nonfinite must be one of {', '.join(map(repr, POLICIES))}, got nonfinite={self.mode!r}")
        m = self.max_skips
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(f"max_skips must be an int >= 0 or None (no bound), got max_skips={m!r}")

    @property
    def guarded(self) -> bool:
        """Whether the step checks and skips at all."""
        return self.mode != "ignore"

    @property
    def limit(self) -> int | None:
        """Consecutive skips tolerated before the host raises (None: never raises)."""
        if self.mode == "raise":
            return 0
        return self.max_skips if self.mode == "skip" else None


_KEYS = itertools.count()
_GUARDS: "weakref.WeakValueDictionary[int, Guard]" = weakref.WeakValueDictionary()


class Guard:
    """One train step's host-side judge of its non-finite flags, and the device counter that keeps
    skipping until the judge has spoken."""

    def __init__(self, policy: NonFinitePolicy) -> None:
        self.policy = policy
        self.key = next(_KEYS)  # what the compiled step passes to observe() (a constant)
        _GUARDS[self.key] = self
        self.counter: torch.Tensor | None = None  # () int64 on the device: consecutive skips
        self.pending: deque = deque()  # (host copy of [state.step, skipped], event or None)
        self.run = 0  # consecutive skips the host has seen
        self.run_from = None  # state.step at the first of them

    @property
    def observed(self) -> bool:
        return self.policy.limit is not None

    def prepare(self, device: torch.device) -> None:
        if self.observed and (self.counter is None or self.counter.device != device):
            self.counter = torch.zeros((), dtype=torch.int64, device=device)

    def force(self, found_inf: torch.Tensor) -> torch.Tensor:
        """``found_inf``, also on once the consecutive skips pass the limit (the host will raise
        for them); advances the device counter in place. Device-only: no host read."""
        if not self.observed:
            return found_inf
        c = self.counter
        found = torch.maximum(found_inf, (c > self.policy.limit).to(found_inf.dtype))
        c.copy_(torch.where(found != 0, c + 1, torch.zeros_like(c)))
        return found

    # --- the host side -------------------------------------------------------------------------
    def record(self, seen: torch.Tensor) -> None:
        """Queue one step's ``[state.step, skipped]`` and judge every flag that has arrived."""
        if seen.device.type == "cpu":
            self.pending.append((seen, None))
        else:
            if torch.cuda.is_current_stream_capturing():
                return  # a CUDA graph being recorded: only its device half replays
            buf = torch.empty(seen.shape, dtype=seen.dtype, pin_memory=True)
            buf.copy_(seen, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self.pending.append((buf, ev))
        self.drain(wait=False)

    def drain(self, wait: bool) -> None:
        """Judge the queued flags in order: those that have arrived, the ones more than
        :data:`LAG` behind, and (``wait``) all of them."""
        while self.pending:
            buf, ev = self.pending[0]
            if ev is not None and not ev.query():
                if not (wait or len(self.pending) > LAG):
                    return
                ev.synchronize()
            self.pending.popleft()
            self.judge(int(buf[0]), bool(buf[1]))

    def judge(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.run, self.run_from = 0, None
            return
        self.run += 1
        if self.run_from is None:
            self.run_from = step
        limit = self.policy.limit
        if limit is None or self.run <= limit:
            return
        run, since = self.run, self.run_from
        self.reset()
        if self.policy.mode == "raise":
            raise NonFiniteError(
                f"non-finite loss or gradient at step {since} (state.step): the update was skipped and the "
                "state is the one before it (train_step(..., nonfinite='raise'))"
            )
        raise NonFiniteError(
            f"{run} consecutive steps skipped for a non-finite loss or gradient, from step {since} (state.step) "
            f"on, more than max_skips={limit}: the state is the last finite one. Look for inf/NaN in the data "
            "or a diverging run (learning rate, loss scale); train_step(..., max_skips=None) lifts the bound"
        )

    def reset(self) -> None:
        """After an error: forget the flags in flight (steps the device forced to skip) and count
        from zero, so a caller who catches it can go on from the state it holds."""
        self.pending.clear()
        self.run, self.run_from = 0, None
        if self.counter is not None:
            self.counter.zero_()


def observe(seen: torch.Tensor, key: int) -> None:
    """The host judge of a step's flag (``seen``: ``[state.step, skipped]``), by guard key."""
    guard = _GUARDS.get(key)
    if guard is not None:
        guard.record(seen)


# A compiled step calls observe() after its graph rather than breaking the graph for it.
torch._dynamo.config.reorderable_logging_functions.add(observe)


def carry_loss(grads: dict, loss: torch.Tensor) -> dict:
    """A micro-step's non-finite loss carried into its gradient (under accumulation): one element
    of the first non-empty group turns NaN, so the accumulated gradient the optimizer step checks
    holds it. A finite loss leaves every bit as it was."""
    for g in grads.values():
        if isinstance(g, torch.Tensor) and g.numel():
            head = g.view(-1)[:1]
            head.copy_(torch.where(torch.isfinite(loss.to(head.device)), head, torch.full_like(head, float("nan"))))
            break
    return grads
