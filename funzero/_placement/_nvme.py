"""``nvme:<dir>``: state leaves in memory-mapped files (ZeRO-Infinity). Copy, update, rename.

One file per state leaf under ``<dir>/funzero-<run>/rank<r>/``. An update never writes a file
the current state points at: :meth:`Nvme.begin_write` copies the leaf to ``<name>.<n>.tmp``, the
update writes the copy, :meth:`Nvme.commit` renames it over ``<name>`` (``os.replace`` is
atomic), so a crash mid-step leaves the previous state whole. The page cache is the buffer:
reads of the next group are advised ahead (``POSIX_FADV_WILLNEED``) while the current one
updates, and written files are flushed and dropped from the cache behind
(``POSIX_FADV_DONTNEED``) by a bounded pool of I/O threads. The update itself is the host's
(``_host.py``): NVMe leaves live in host memory pages backed by files.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import shutil
import uuid

import torch

from funzero._placement._kind import Kind

__all__ = ["Nvme", "filename", "is_file_backed"]

_RUN = uuid.uuid4().hex[:8]


def filename(t: torch.Tensor) -> str | None:
    """The file a tensor's storage maps, or None."""
    name = getattr(t.untyped_storage(), "filename", None)
    return name or None


def is_file_backed(t: torch.Tensor) -> bool:
    return filename(t) is not None


class Nvme(Kind):
    """File-backed state leaves. The directory is made (and probed) on first use.

    Raises:
        ValueError: at first use, if the directory cannot be created or written.
    """

    name = "nvme"
    tier = "nvme"
    offloaded = True
    copies = True

    def __init__(self, compute: torch.device, *, rank: int = 0, arg: str | None = None, io_threads: int = 4) -> None:
        super().__init__(compute, rank=rank, arg=arg)
        self.root = arg
        self.dir = os.path.join(arg or "", f"funzero-{_RUN}-{id(self):x}", f"rank{rank}")
        self._io_threads = io_threads
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pending: list[cf.Future] = []
        self._counter = itertools.count()

    def _ready(self) -> None:
        if self._pool is not None:
            return
        try:
            os.makedirs(self.dir, exist_ok=True)
            probe = os.path.join(self.dir, ".probe")
            with open(probe, "wb") as f:
                f.write(b"x")
            os.remove(probe)
        except OSError as e:
            raise ValueError(f"nvme directory {self.root!r} is not writable: {e.strerror or e}") from None
        self._pool = cf.ThreadPoolExecutor(max_workers=self._io_threads, thread_name_prefix="funzero-nvme")

    @classmethod
    def parse(cls, text: str) -> str | None:
        if text == "nvme":
            return ""  # a directory is needed to train; an estimate needs none
        if not text.startswith("nvme:"):
            return None
        if not text[5:]:
            raise ValueError(f"placement {text!r}: nvme needs a directory, e.g. 'nvme:/local/scratch'")
        return text[5:]

    def check(self, key: str) -> None:
        if not self.arg:
            raise ValueError(f"placement {key}='nvme' needs a directory to train: 'nvme:/local/scratch'")

    def check_space(self, nbytes: int) -> None:
        self._ready()
        free = shutil.disk_usage(self.dir).free
        # An update writes a new copy of a leaf before the old one is released: 2x headroom.
        if free < 2 * nbytes:
            raise ValueError(
                f"nvme directory {self.root!r} has {free / 2**30:.2f} GiB free; the state needs "
                f"{nbytes / 2**30:.2f} GiB plus as much again while a step writes its new copy"
            )

    # --- storage ----------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        return os.path.join(self.dir, safe + ".bin")

    def empty(self, key: str, n: int, dtype: torch.dtype, *, name: str) -> torch.Tensor:
        """A new zero-filled file-backed tensor of ``n`` elements for leaf ``name``."""
        self._ready()
        path = self._path(name)
        tmp = f"{path}.{next(self._counter)}.tmp"
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        with open(tmp, "wb") as f:
            f.truncate(nbytes)
        os.replace(tmp, path)
        return torch.from_file(path, shared=True, size=n, dtype=dtype)

    def holds(self, key: str, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and is_file_backed(t)

    # --- copy, update, rename -------------------------------------------------------------
    def prefetch(self, t: torch.Tensor) -> None:
        """Advise the kernel to read ``t``'s file ahead of need."""
        path = filename(t)
        if path and hasattr(os, "posix_fadvise"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def begin_write(self, t: torch.Tensor) -> torch.Tensor:
        """A writable copy of leaf ``t`` in a temporary file next to it."""
        path = filename(t)
        if path is None:
            return t
        tmp = f"{path}.{next(self._counter)}.tmp"
        shutil.copyfile(path, tmp)
        return torch.from_file(tmp, shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)

    def commit(self, written: torch.Tensor) -> torch.Tensor:
        """Atomically make the updated copy the leaf's file; return the leaf mapped at its name.

        The file is then flushed and dropped from the page cache behind, by at most a bounded
        number of pending writes.
        """
        tmp = filename(written)
        if tmp is None or not tmp.endswith(".tmp"):
            return written
        path = tmp.rsplit(".", 2)[0]
        self._ready()
        os.replace(tmp, path)
        leaf = torch.from_file(path, shared=True, size=written.numel(), dtype=written.dtype).view(written.shape)
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
