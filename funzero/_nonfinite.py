"""Non-finite steps: what a train step does when its loss or a gradient holds an inf or a NaN.

The decision has two halves, kept apart so that the step never waits on the host:

* **On the device** (every precision): the step folds "some gradient or the loss is not finite" into
  one 0-d flag, takes its maximum over the ranks (so every rank decides alike) and hands it to the
  update, which then writes nothing (the mechanism fp16's loss scaling already used). The state's
  ``step`` counts updates applied: a skipped step leaves it where it was.
* **On the host** (``nonfinite="raise"`` and the ``max_skips`` bound): the flag of each step is
  read lazily, by an op of the step (``funzero::nonfinite_guard_``) that runs where the step needs
  the flag, so a compiled step stays one graph. On the CPU the flag is there already and is judged
  at once (reading it costs nothing); on a GPU it is copied to pinned memory behind the step and
  judged :data:`LAG` calls later, by call count, so that every rank raises in the same call
  (``Step.check_nonfinite()`` judges every flag still in flight). Until the host has judged a skip
  it will raise for, the device keeps skipping: a counter of consecutive skips, past the limit,
  forces the flag on. So the error always comes with the last finite state.

An error is raised inside a step before its update could write anything (and a skipped update
writes nothing anyway); the state handed to that call is not marked donated and stays usable.
"""

from __future__ import annotations

import itertools
import weakref
from collections import deque
from dataclasses import dataclass

import torch

__all__ = ["LAG", "Guard", "NonFiniteError", "NonFinitePolicy", "carry_loss"]

POLICIES = ("skip", "raise", "ignore")
LAG = 2  # calls between a GPU step and the judging of its flag (the copy has landed by then)


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
        self.key = next(_KEYS)  # how the guard op finds this guard (a constant of a compiled graph)
        _GUARDS[self.key] = self
        self.counter: torch.Tensor | None = None  # () int64 on the device: consecutive skips
        self.pending: deque = deque()  # (index, host copy of [state.step, skipped], event or None)
        self.calls = 0  # flags recorded
        self.run = 0  # consecutive skips the host has judged
        self.run_from = None  # state.step at the first of them

    @property
    def observed(self) -> bool:
        return self.policy.limit is not None

    def prepare(self, device: torch.device) -> None:
        if self.observed and (self.counter is None or self.counter.device != device):
            self.counter = torch.zeros((), dtype=torch.int64, device=device)

    def apply(self, found_inf: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """The step's flag after the policy: forced on past the limit; may raise for this step
        (CPU) or one :data:`LAG` calls back (GPU). A plain ``found_inf`` when nothing is judged."""
        if not self.observed:
            return found_inf
        return torch.ops.funzero.nonfinite_guard_(found_inf, self.counter, step.to(found_inf.device), self.key)

    # --- the host side -------------------------------------------------------------------------
    def record(self, seen: torch.Tensor) -> None:
        """Queue one step's ``[state.step, skipped]``; judge the flag of ``lag`` calls ago (and any
        older): the same call on every rank, so every rank raises in the same step."""
        if seen.device.type == "cpu":
            entry, lag = (seen, None), 0  # there already: judged now
        elif torch.cuda.is_current_stream_capturing():
            return  # a CUDA graph being recorded: only its device half replays
        else:
            buf = torch.empty(seen.shape, dtype=seen.dtype, pin_memory=True)
            buf.copy_(seen, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            entry, lag = (buf, ev), LAG
        self.pending.append((self.calls, *entry))
        self.calls += 1
        self.drain(upto=self.calls - 1 - lag)

    def drain(self, upto: int | None = None) -> None:
        """Judge, in order, the queued flags of calls ``<= upto`` (None: all), waiting for them."""
        while self.pending and (upto is None or self.pending[0][0] <= upto):
            _, buf, ev = self.pending.popleft()
            if ev is not None:
                ev.synchronize()
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


@torch.library.custom_op("funzero::nonfinite_guard_", mutates_args=("counter",))
def _guard_op(found_inf: torch.Tensor, counter: torch.Tensor, step: torch.Tensor, key: int) -> torch.Tensor:
    """``found_inf`` forced on while ``counter`` (consecutive skips, updated in place) is past the
    guard's limit; then the guard's host judge. An op, so that a compiled step runs the judge
    where the graph needs the flag, and the graph stays whole."""
    guard = _GUARDS[key]
    found = torch.maximum(found_inf, (counter > guard.policy.limit).to(found_inf.dtype))
    counter.copy_(torch.where(found != 0, counter + 1, torch.zeros_like(counter)))
    guard.record(torch.stack([step.to(torch.int64), (found != 0).to(torch.int64)]))
    return found


@_guard_op.register_fake
def _(found_inf, counter, step, key):
    return torch.empty_like(found_inf)


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
