"""The interface every placement kind implements (``device``, ``cpu``, ``nvme``).

A kind is where a state leaf's bytes live and what it takes to write them: ``init`` asks it for
buffers (:meth:`Kind.empty`, :meth:`Kind.place`), the update asks it for a writable buffer
before it writes a leaf and for the leaf the new state holds afterwards
(:meth:`Kind.begin_write`, :meth:`Kind.commit`, or :meth:`Kind.abort` when the update fails:
NVMe updates a copy and renames it over the file, the others write in place), the memory model asks it which memory tier its bytes are
counted in (:attr:`Kind.tier`). Whether a kind is *offloaded* (outside device memory) decides
how its groups are updated: on the device's stream, or by the host update (``_host.py``).

Adding a kind is one new module with a subclass, listed in ``KINDS`` (``_rules.py``).
"""

from __future__ import annotations

from typing import ClassVar

import torch

__all__ = ["Kind"]


class Kind:
    """One place state leaves can live, for one binding (its compute device and rank).

    Attributes:
        name: the kind, as placement values spell it (``"device"``, ``"cpu"``, ``"nvme"``).
        tier: the memory its bytes are counted in by the memory model: ``gpu``, ``cpu``, ``nvme``.
        offloaded: the state lives outside device memory and the host updates it.
        copies: an update writes a copy of each leaf and commits it (NVMe), not the leaf itself.
    """

    name: ClassVar[str]
    tier: ClassVar[str]
    offloaded: ClassVar[bool]
    copies: ClassVar[bool] = False  # begin_write returns a copy that commit makes the leaf

    def __init__(self, compute: torch.device, *, rank: int = 0, arg: str | None = None) -> None:
        self.compute = compute
        self.rank = rank
        self.arg = arg

    # --- the vocabulary ---------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> str | None:
        """``None`` if ``text`` does not name this kind, else its argument (``""`` if none).

        Raises:
            ValueError: ``text`` names this kind but is malformed (say, ``"nvme:"``).
        """
        raise NotImplementedError

    def check(self, key: str) -> None:
        """Raise ``ValueError`` if this kind cannot hold part ``key`` on this machine."""

    def same(self, other: "Kind") -> bool:
        """Whether ``other`` (of the same class) can share this instance."""
        return self.arg == other.arg

    # --- storage ----------------------------------------------------------------------------
    def memory_device(self) -> torch.device:
        """Where tensors of this kind are allocated."""
        return torch.device("cpu") if self.offloaded else self.compute

    def empty(self, key: str, n: int, dtype: torch.dtype, *, name: str) -> torch.Tensor:
        """A new buffer of ``n`` elements for the state leaf ``name`` of part ``key``."""
        return torch.empty(n, dtype=dtype, device=self.memory_device())

    def place(self, key: str, t: torch.Tensor, *, name: str) -> torch.Tensor:
        """``t`` in a buffer of this kind (``t`` itself where it already is one)."""
        if self.holds(key, t):
            return t
        out = self.empty(key, t.numel(), t.dtype, name=name).view(t.shape)
        out.copy_(t)
        return out

    def holds(self, key: str, t: torch.Tensor) -> bool:
        """Whether ``t`` is a buffer of this kind (checked leaf by leaf in tests)."""
        raise NotImplementedError

    # --- writing during an update -----------------------------------------------------------
    def prefetch(self, t: torch.Tensor) -> None:
        """``t`` will be read soon (NVMe reads ahead)."""

    def begin_write(self, t: torch.Tensor) -> torch.Tensor:
        """A buffer the update may write ``t``'s new value into: ``t`` itself unless the kind
        must keep the current value whole until the update is done."""
        return t

    def commit(self, written: torch.Tensor) -> torch.Tensor:
        """The leaf the new state holds, once ``written`` (from :meth:`begin_write`) is final."""
        return written

    def abort(self, written: torch.Tensor) -> None:
        """``written`` (from :meth:`begin_write`) will not be committed: the update failed."""

    def close(self) -> None:
        """Release what the kind holds outside the state (files, threads)."""
