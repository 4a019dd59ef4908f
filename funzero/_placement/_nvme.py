"""``nvme:<dir>``: state leaves in memory-mapped files (ZeRO-Infinity). Copy, update, rename.

One file per state leaf under ``<dir>/funzero-<run>-<store>/rank<r>/``. An update never writes a
file the current state points at: :meth:`Nvme.begin_write` copies the leaf to
``<name>.<n>.tmp``, the update writes the copy, :meth:`Nvme.commit` renames it over ``<name>``
(``os.replace`` is atomic), so a crash mid-step leaves the previous state whole; a write that
raises (a full disk, or any error in the update: :meth:`Nvme.abort`) removes its copy. The page
cache is the buffer: reads of the next group are advised ahead (``POSIX_FADV_WILLNEED``) while
the current one updates, and written files are flushed and dropped from the cache behind
(``POSIX_FADV_DONTNEED``) by a bounded pool of I/O threads. The update itself is the host's
(``_host.py``): NVMe leaves live in host memory pages backed by files.

Each binding's files live in a *store* of its own, ``funzero-<run>-<store>/`` under the user's
directory (:class:`_Store`). The store holds a ``lock`` file locked (``flock``) for as long as the
store lives, so the lock of a killed process is released by the kernel. The store is removed
when its owner is garbage collected or the process exits (normally, or as a
``multiprocessing`` child), and the first use of a directory removes every store in it whose lock
can be taken (a dead run's); a locked store belongs to a live run and is left alone. Store names
are random, so a store is never reused.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import itertools
import multiprocessing.util
import os
import re
import shutil
import tempfile
import time
import uuid
import weakref

import torch

from funzero._placement._kind import Kind

__all__ = ["Nvme", "filename", "is_file_backed", "sweep"]

_RUN = uuid.uuid4().hex[:8]
_STORE_NAME = re.compile(r"funzero-[0-9a-f]{8}-[0-9a-f]{12}")
_STAGING = ".funzero-new-"  # a store being made: its lock is taken before it gets its name
_LOCK = "lock"


def filename(t: torch.Tensor) -> str | None:
    """The file a tensor's storage maps, or None."""
    name = getattr(t.untyped_storage(), "filename", None)
    return name or None


def is_file_backed(t: torch.Tensor) -> bool:
    return filename(t) is not None


def _remove_if_dead(path: str, *, staging: bool) -> bool:
    """Remove the store at ``path`` if no live process holds its lock; whether it was removed."""
    try:
        fd = os.open(os.path.join(path, _LOCK), os.O_RDWR)
    except FileNotFoundError:
        # A store named as ours but without a lock was left by a version without locks; a
        # staging directory without one is being made right now.
        if staging or not os.path.isdir(path):
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live run's store
        # Between creating its lock file and locking it, a staging store looks dead: spare young ones.
        if staging and time.time() - os.fstat(fd).st_mtime < 60:
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def sweep(root: str) -> list[str]:
    """Remove the stores under ``root`` that no live process holds; return their names."""
    removed = []
    for name in sorted(os.listdir(root)):
        staging = name.startswith(_STAGING)
        if (staging or _STORE_NAME.fullmatch(name)) and _remove_if_dead(os.path.join(root, name), staging=staging):
            removed.append(name)
    return removed


def _unlink(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def _removed_on_error(tmp: str):
    """Remove the temporary file ``tmp`` if the block raises (anything: ENOSPC, an interrupt)."""
    try:
        yield
    except BaseException:
        _unlink(tmp)
        raise


class _Store:
    """One binding's directory under ``root``, made with its lock held; :meth:`remove` once.

    It is made under a staging name and renamed once locked, so a store under its final name is
    always either locked (live) or dead.
    """

    def __init__(self, root: str) -> None:
        os.makedirs(root, exist_ok=True)
        sweep(root)
        staging = tempfile.mkdtemp(prefix=_STAGING, dir=root)
        self.fd: int | None = None
        try:
            self.fd = os.open(os.path.join(staging, _LOCK), os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)  # blocking: a sweeper holds it only for a moment
            self.path = os.path.join(root, f"funzero-{_RUN}-{uuid.uuid4().hex[:12]}")
            os.rename(staging, self.path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if self.fd is not None:
                os.close(self.fd)
            raise
        self.pid = os.getpid()  # a forked child must not remove its parent's store
        self.pool: cf.ThreadPoolExecutor | None = None

    def remove(self) -> None:
        if self.fd is None or os.getpid() != self.pid:
            return
        if self.pool is not None:
            self.pool.shutdown(wait=True)  # writes behind still flushing files of the store
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self.fd)  # only now: until the files are gone the store is live
        self.fd = None


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
        self.dir: str | None = None  # <store>/rank<r>, made on first use
        self._io_threads = io_threads
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pending: list[cf.Future] = []
        self._counter = itertools.count()
        self._remove = None  # removes the store (once), when this kind is done with

    def _ready(self) -> None:
        if self._pool is not None:
            return
        try:
            store = _Store(self.root)
        except OSError as e:
            raise ValueError(f"nvme directory {self.root!r} is not writable: {e.strerror or e}") from None
        # Removed when this kind is collected or at exit; multiprocessing children end in
        # os._exit, past atexit, so they are also told through multiprocessing's own finalizers.
        self._remove = weakref.finalize(self, store.remove)
        multiprocessing.util.Finalize(self, store.remove, exitpriority=0)
        self.dir = os.path.join(store.path, f"rank{self.rank}")
        try:
            os.makedirs(self.dir)
            probe = os.path.join(self.dir, ".probe")
            with open(probe, "wb") as f:
                f.write(b"x")
            os.remove(probe)
        except OSError as e:
            self.close()
            raise ValueError(f"nvme directory {self.root!r} is not writable: {e.strerror or e}") from None
        self._pool = store.pool = cf.ThreadPoolExecutor(max_workers=self._io_threads, thread_name_prefix="funzero-nvme")

    def close(self) -> None:
        """Remove this kind's store and every file in it (the state's leaves are gone with it)."""
        if self._remove is not None:
            self._remove()
        self._pool, self._pending, self.dir = None, [], None

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
        with _removed_on_error(tmp):
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
        with _removed_on_error(tmp):  # a full disk fails here: no partial copy stays behind
            shutil.copyfile(path, tmp)
            return torch.from_file(tmp, shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)

    def abort(self, written: torch.Tensor) -> None:
        """Drop a copy from :meth:`begin_write` that will not be committed (the update failed)."""
        tmp = filename(written)
        if tmp is not None and tmp.endswith(".tmp"):
            _unlink(tmp)

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
        with _removed_on_error(tmp):
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
