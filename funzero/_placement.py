"""Placement: on which memory each part of the state lives. Offload is nothing more than this.

``placement={"opt_state": "cpu"}`` keeps the fp32 master and the optimizer's moments in host
memory (ZeRO-Offload); ``"nvme:/path"`` keeps them in files (ZeRO-Infinity);
``{"params": "cpu"}`` keeps stage-3 parameter shards in pinned host memory and gathers them onto
the device just in time. Values: ``"device"`` (default: the mesh's device), ``"cuda"``, ``"cpu"``,
``"nvme:<dir>"``.

NVMe state is a set of memory-mapped files, one per state leaf. An update never writes a file the
current state points at: it copies the leaf to ``<name>.tmp``, updates the copy and renames it
over ``<name>`` (``os.replace`` is atomic), so a crash mid-step leaves the previous state whole.
The page cache is the buffer: reads of the next group are advised ahead
(``POSIX_FADV_WILLNEED``) while the current one updates, and written files are flushed and
dropped from the cache behind (``POSIX_FADV_DONTNEED``) by a bounded pool of I/O threads.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import shutil
import uuid
from dataclasses import dataclass, field

import torch

__all__ = ["Placement", "NvmeStore", "validate_placement"]

_TARGETS = ("params", "opt_state")


def _parse(where: str) -> tuple[str, str | None]:
    if where in ("device", "cuda", "cpu"):
        return where, None
    if where.startswith("nvme:"):
        path = where[5:]
        if not path:
            raise ValueError(f"placement {where!r}: nvme needs a directory, e.g. 'nvme:/local/scratch'")
        return "nvme", path
    raise ValueError(f"placement {where!r} is not one of 'device', 'cuda', 'cpu', 'nvme:<dir>'")


def validate_placement(placement: dict[str, str], stage: int) -> dict[str, str]:
    """Check a placement mapping against the ZeRO stage; return it normalised.

    Raises:
        ValueError: an unknown key or device, or an offload the stage cannot do (naming both).
    """
    out = {}
    for key, where in placement.items():
        if key not in _TARGETS:
            raise ValueError(f"placement key {key!r} is not one of {_TARGETS}")
        if not isinstance(where, str):
            raise ValueError(f"placement[{key!r}] must be a string, got {where!r}")
        kind, _ = _parse(where)
        if kind in ("cpu", "nvme") and key == "opt_state" and stage == 0:
            raise ValueError(
                f"placement opt_state={where!r} needs ZeRO stage >= 1 (stage 0 keeps a full optimizer "
                "state on every rank; offloading it is what stage 1 with offload does)"
            )
        if kind in ("cpu", "nvme") and key == "params" and stage != 3:
            raise ValueError(
                f"placement params={where!r} needs ZeRO stage 3 (stages 0-2 compute with full "
                f"parameters held on the device), got stage={stage}"
            )
        out[key] = where
    return out


@dataclass
class Placement:
    """A validated placement resolved against the compute device."""

    params: str = "device"
    opt_state: str = "device"
    compute: torch.device = field(default_factory=lambda: torch.device("cpu"))
    store: "NvmeStore | None" = None

    @staticmethod
    def resolve(placement: dict[str, str], compute: torch.device, *, rank: int = 0) -> "Placement":
        p = Placement(placement.get("params", "device"), placement.get("opt_state", "device"), compute)
        for key in _TARGETS:
            kind, path = _parse(getattr(p, key))
            if kind == "cuda" and compute.type != "cuda":
                raise ValueError(f"placement {key}='cuda' but the mesh computes on {compute}")
            if kind == "nvme":
                if p.store is not None and p.store.root != path:
                    raise ValueError("params and opt_state must use the same nvme directory")
                p.store = p.store or NvmeStore(path, rank=rank)
        return p

    def kind(self, key: str) -> str:
        k, _ = _parse(getattr(self, key))
        return "device" if k in ("device", "cuda") else k

    def host(self, key: str) -> bool:
        """Whether ``key`` lives off the compute device (cpu or nvme)."""
        return self.kind(key) != "device" and not (self.kind(key) == "cpu" and self.compute.type == "cpu")

    def memory_device(self, key: str) -> torch.device:
        """Where tensors of ``key`` are allocated (nvme: host memory backed by files)."""
        return self.compute if self.kind(key) == "device" else torch.device("cpu")

    def pinned(self, key: str) -> bool:
        """Host leaves of ``key`` are pinned only if they are copied to or from the device.

        Stage-3 parameter shards travel to the device at every gather, so they are pinned.
        The optimizer's master and moments never leave the host (gradients come in and
        parameters go out through pinned staging buffers), so they are not: pinning them would
        only cost page-locked memory, which the caching host allocator also rounds up to a
        power of two per buffer.
        """
        return key == "params" and self.kind(key) == "cpu" and torch.cuda.is_available()

    def empty(self, key: str, n: int, dtype: torch.dtype, *, name: str) -> torch.Tensor:
        """A new buffer for a state leaf of ``key``."""
        kind = self.kind(key)
        if kind == "nvme":
            assert self.store is not None
            return self.store.create(name, n, dtype)
        if kind == "cpu":
            return torch.empty(n, dtype=dtype, pin_memory=self.pinned(key))
        return torch.empty(n, dtype=dtype, device=self.compute)

    def place(self, key: str, t: torch.Tensor, *, name: str) -> torch.Tensor:
        """``t`` in a buffer where ``key`` lives (0-d scalars stay in memory).

        A host tensor that already satisfies the placement is kept as it is (no second copy:
        at init the optimizer's zeros are made on the host already).
        """
        if t.dim() == 0:
            return t.to(self.memory_device(key) if self.kind(key) != "nvme" else "cpu")
        if self.kind(key) == "cpu" and t.device.type == "cpu" and (t.is_pinned() or not self.pinned(key)):
            return t
        out = self.empty(key, t.numel(), t.dtype, name=name).view(t.shape)
        out.copy_(t)
        return out

    def on_target(self, key: str, t: torch.Tensor) -> bool:
        """Whether tensor ``t`` is where ``key`` says (checked leaf by leaf in tests)."""
        kind = self.kind(key)
        if t.dim() == 0:
            return t.device.type in ("cpu", self.compute.type)
        if kind == "nvme":
            return t.device.type == "cpu" and NvmeStore.is_file_backed(t)
        if kind == "cpu":
            return t.device.type == "cpu" and (t.is_pinned() or not self.pinned(key))
        return t.device == self.compute or (t.device.type == self.compute.type == "cpu")


class NvmeStore:
    """File-backed state leaves under ``<root>/funzero-<run>/rank<r>/``.

    Raises:
        ValueError: at construction, if the directory cannot be created or written.
    """

    _RUN = uuid.uuid4().hex[:8]

    def __init__(self, root: str, *, rank: int = 0, io_threads: int = 4) -> None:
        self.root = root
        self.dir = os.path.join(root, f"funzero-{self._RUN}-{id(self):x}", f"rank{rank}")
        try:
            os.makedirs(self.dir, exist_ok=True)
            probe = os.path.join(self.dir, ".probe")
            with open(probe, "wb") as f:
                f.write(b"x")
            os.remove(probe)
        except OSError as e:
            raise ValueError(f"nvme directory {root!r} is not writable: {e.strerror or e}") from None
        self._pool = cf.ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="funzero-nvme")
        self._pending: list[cf.Future] = []
        self._counter = itertools.count()

    def check_space(self, nbytes: int) -> None:
        free = shutil.disk_usage(self.dir).free
        # An update writes a new copy of a leaf before the old one is released: 2x headroom.
        if free < 2 * nbytes:
            raise ValueError(
                f"nvme directory {self.root!r} has {free / 2**30:.2f} GiB free; the state needs "
                f"{nbytes / 2**30:.2f} GiB plus as much again while a step writes its new copy"
            )

    def _path(self, name: str) -> str:
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        return os.path.join(self.dir, safe + ".bin")

    def create(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A new zero-filled file-backed tensor of ``n`` elements for leaf ``name``."""
        path = self._path(name)
        tmp = f"{path}.{next(self._counter)}.tmp"
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        with open(tmp, "wb") as f:
            f.truncate(nbytes)
        os.replace(tmp, path)
        return torch.from_file(path, shared=True, size=n, dtype=dtype)

    def prefetch(self, t: torch.Tensor) -> None:
        """Advise the kernel to read ``t``'s file ahead of need."""
        path = self.filename(t)
        if path and hasattr(os, "posix_fadvise"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def begin_update(self, t: torch.Tensor) -> tuple[torch.Tensor, str, str]:
        """A writable copy of leaf ``t`` in a temporary file: ``(copy, tmp path, final path)``."""
        path = self.filename(t)
        assert path is not None, "not a file-backed leaf"
        tmp = f"{path}.{next(self._counter)}.tmp"
        shutil.copyfile(path, tmp)
        return torch.from_file(tmp, shared=True, size=t.numel(), dtype=t.dtype).view(t.shape), tmp, path

    def commit(self, copy: torch.Tensor, tmp: str, path: str) -> torch.Tensor:
        """Atomically make the updated copy the leaf's file; return the leaf mapped at its name.

        The file is then flushed and dropped from the page cache behind, by at most a bounded
        number of pending writes.
        """
        os.replace(tmp, path)
        leaf = torch.from_file(path, shared=True, size=copy.numel(), dtype=copy.dtype).view(copy.shape)
        self._pending = [f for f in self._pending if not f.done()]
        if len(self._pending) >= 8:  # bounded write-behind
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(self._drain, path))
        return leaf

    @staticmethod
    def _drain(path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def flush(self) -> None:
        for f in self._pending:
            f.result()
        self._pending.clear()

    @staticmethod
    def filename(t: torch.Tensor) -> str | None:
        name = getattr(t.untyped_storage(), "filename", None)
        return name or None

    @staticmethod
    def is_file_backed(t: torch.Tensor) -> bool:
        return NvmeStore.filename(t) is not None
