"""Placement: on which memory each part of the state lives. Offload is nothing more than this.

``placement={"opt_state": "cpu"}`` keeps the fp32 master and the optimizer's moments in host
memory (ZeRO-Offload); ``"nvme:/path"`` keeps them in files (ZeRO-Infinity);
``{"params": "cpu"}`` keeps stage-3 parameter shards in pinned host memory and gathers them onto
the device just in time. Values: ``"device"`` (default: the mesh's device), ``"cuda"``, ``"cpu"``,
``"nvme:<dir>"``.

A value may also be a list of **leaf-path rules**, ``[(regex, where), ...]``, matched against the
parameters' leaf paths (``re.search``, first match wins)::

    placement={"opt_state": [(r"h\\.[0-7]\\.", "device"), ("", "cpu")]}

keeps the optimizer state of blocks 0-7 on the GPU and the rest on the host (DeepSpeed calls a
partial optimizer offload "Offload++"). State is stored per group (the plan's ``groups``), so a
rule places whole groups: every leaf of a group must land in the same place, every leaf must be
matched by some rule, and every rule must match some leaf; each mistake is a ``ValueError``
naming the leaf, group or rule. 0-d leaves (step counts) live in host memory when any group of
their part does. Groups whose optimizer state stays on the device update there, on the main
stream, while the host updates the others (``_offload.py``).

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
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Placement", "NvmeStore", "validate_placement", "group_of_path"]

_TARGETS = ("params", "opt_state")
_HOST = ("cpu", "nvme")


def _parse(where: str) -> tuple[str, str | None]:
    if where in ("device", "cuda", "cpu"):
        return where, None
    if where.startswith("nvme:"):
        path = where[5:]
        if not path:
            raise ValueError(f"placement {where!r}: nvme needs a directory, e.g. 'nvme:/local/scratch'")
        return "nvme", path
    raise ValueError(f"placement {where!r} is not one of 'device', 'cuda', 'cpu', 'nvme:<dir>'")


def _rules(key: str, where) -> tuple[tuple[str, str], ...]:
    """``where`` as rules: a string is the one rule that matches everything."""
    if isinstance(where, str):
        return (("", where),)
    if isinstance(where, Mapping) or not isinstance(where, Sequence) or not where:
        raise ValueError(
            f"placement[{key!r}] must be a string or a non-empty list of (regex, where) rules, got {where!r}"
        )
    out = []
    for rule in where:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and all(isinstance(x, str) for x in rule)):
            raise ValueError(f"placement[{key!r}] rule {rule!r} is not a (regex, where) pair of strings")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"placement[{key!r}] rule {rule[0]!r} is not a valid regex: {e}") from None
        out.append((rule[0], rule[1]))
    return tuple(out)


def validate_placement(placement: Mapping, stage: int) -> dict:
    """Check a placement mapping against the ZeRO stage; return it normalised (rules as tuples).

    Raises:
        ValueError: an unknown key, device or malformed rule, or an offload the stage cannot do
            (naming the key and value).
    """
    out = {}
    for key, where in placement.items():
        if key not in _TARGETS:
            raise ValueError(f"placement key {key!r} is not one of {_TARGETS}")
        rules = _rules(key, where)
        for _, w in rules:  # _rules has checked that each target is a string
            kind, _ = _parse(w)
            if kind in _HOST and key == "opt_state" and stage == 0:
                raise ValueError(
                    f"placement opt_state={w!r} needs ZeRO stage >= 1 (stage 0 keeps a full optimizer "
                    "state on every rank; offloading it is what stage 1 with offload does)"
                )
            if kind in _HOST and key == "params" and stage != 3:
                raise ValueError(
                    f"placement params={w!r} needs ZeRO stage 3 (stages 0-2 compute with full "
                    f"parameters held on the device), got stage={stage}"
                )
        out[key] = where if isinstance(where, str) else rules
    return out


def _resolve_groups(key: str, where, layouts: Mapping) -> dict[str, str]:
    """``{group: where}`` for one part of the state, from a string or leaf-path rules."""
    if isinstance(where, str):
        return {g: where for g in layouts}
    rules = [(re.compile(rx), w, rx) for rx, w in where]
    used = [False] * len(rules)
    out: dict[str, str] = {}
    first: dict[str, str] = {}
    for g, lay in layouts.items():
        for path in lay.paths:
            for i, (crx, w, _) in enumerate(rules):
                if crx.search(path):
                    used[i] = True
                    break
            else:
                raise ValueError(
                    f"placement[{key!r}]: leaf {path!r} is matched by no rule; end the rules with "
                    "a catch-all such as ('', 'cpu')"
                )
            if g in out and out[g] != w:
                raise ValueError(
                    f"placement[{key!r}] puts group {g!r} in two places: leaf {first[g]!r} on "
                    f"{out[g]!r}, leaf {path!r} on {w!r}; a group's state lives in one place "
                    "(change the rules, or the plan's groups=)"
                )
            out.setdefault(g, w)
            first.setdefault(g, path)
    for (_, _, rx), hit in zip(rules, used):
        if not hit:
            raise ValueError(f"placement[{key!r}] rule {rx!r} matches no leaf path (none an earlier rule did not take)")
    return out


def group_of_path(path: Sequence, groups: Mapping) -> str | None:
    """The group a state leaf belongs to: the last element of its tree path that names a group."""
    for part in reversed(tuple(path)):
        if isinstance(part, str) and part in groups:
            return part
    return None


@dataclass
class Placement:
    """A validated placement resolved against the compute device and the groups.

    ``where[key][group]`` is where that group's part ``key`` lives (``"device"``, ``"cpu"``,
    ...). Methods take the group; without one they answer for the part as a whole (``host``:
    any group off the device).
    """

    params: object = "device"
    opt_state: object = "device"
    compute: torch.device = field(default_factory=lambda: torch.device("cpu"))
    store: "NvmeStore | None" = None
    where: dict[str, dict[str, str]] = field(default_factory=dict)

    @staticmethod
    def resolve(placement: Mapping, compute: torch.device, *, rank: int = 0, layouts: Mapping | None = None) -> "Placement":
        p = Placement(placement.get("params", "device"), placement.get("opt_state", "device"), compute)
        layouts = layouts or {}
        for key in _TARGETS:
            spec = getattr(p, key)
            p.where[key] = _resolve_groups(key, spec, layouts)
            for w in (p.where[key].values() if not isinstance(spec, str) else [spec]):
                kind, path = _parse(w)
                if kind == "cuda" and compute.type != "cuda":
                    raise ValueError(f"placement {key}='cuda' but the mesh computes on {compute}")
                if kind == "nvme":
                    if p.store is not None and p.store.root != path:
                        raise ValueError("all nvme placements must use the same directory")
                    p.store = p.store or NvmeStore(path, rank=rank)
        return p

    def _where(self, key: str, g: str | None) -> str:
        spec = getattr(self, key)
        if isinstance(spec, str):
            return spec
        if g is None:
            ws = list(self.where[key].values())
            kinds = {self.kind(key, h) for h in self.where[key]}
            return ws[0] if len(kinds) == 1 else "mixed"
        return self.where[key][g]

    def kind(self, key: str, g: str | None = None) -> str:
        """``device``, ``cpu`` or ``nvme`` for group ``g``; without ``g``, for the whole part
        (``mixed`` when rules put its groups in different places)."""
        w = self._where(key, g)
        if w == "mixed":
            return w
        k, _ = _parse(w)
        return "device" if k in ("device", "cuda") else k

    def _groups(self, key: str) -> list:
        return list(self.where.get(key) or [None])

    def kinds(self, key: str) -> set[str]:
        """Every kind (``device``, ``cpu``, ``nvme``) some group of ``key`` lives in."""
        return {self.kind(key, g) for g in self._groups(key)}

    def offloaded(self, key: str, g: str | None = None) -> bool:
        """Whether group ``g`` (without ``g``: any group) of ``key`` lives in host memory or files."""
        if g is None:
            return any(self.kind(key, h) in _HOST for h in self._groups(key))
        return self.kind(key, g) in _HOST

    def host(self, key: str, g: str | None = None) -> bool:
        """Whether group ``g`` (without ``g``: any group) of ``key`` lives off the compute device."""
        if g is None:
            return any(self._host_kind(self.kind(key, h)) for h in self._groups(key))
        return self._host_kind(self.kind(key, g))

    def _host_kind(self, kind: str) -> bool:
        return kind in _HOST and not (kind == "cpu" and self.compute.type == "cpu")

    def memory_device(self, key: str, g: str | None = None) -> torch.device:
        """Where tensors of ``key`` are allocated (nvme: host memory backed by files); 0-d leaves
        (``g`` None) are in host memory if any group of ``key`` is."""
        if g is None:
            return torch.device("cpu") if self.offloaded(key) else self.compute
        return self.compute if self.kind(key, g) == "device" else torch.device("cpu")

    def pinned(self, key: str, g: str | None = None) -> bool:
        """Host leaves of ``key`` are pinned only if they are copied to or from the device.

        Stage-3 parameter shards travel to the device at every gather, so they are pinned.
        The optimizer's master and moments never leave the host (gradients come in and
        parameters go out through pinned staging buffers), so they are not: pinning them would
        only cost page-locked memory, which the caching host allocator also rounds up to a
        power of two per buffer.
        """
        return key == "params" and self.kind(key, g) == "cpu" and torch.cuda.is_available()

    def empty(self, key: str, n: int, dtype: torch.dtype, *, name: str, g: str | None = None) -> torch.Tensor:
        """A new buffer for a state leaf of ``key`` (group ``g``)."""
        kind = self.kind(key, g)
        if kind == "nvme":
            assert self.store is not None
            return self.store.create(name, n, dtype)
        if kind == "cpu":
            return torch.empty(n, dtype=dtype, pin_memory=self.pinned(key, g))
        return torch.empty(n, dtype=dtype, device=self.compute)

    def place(self, key: str, t: torch.Tensor, *, name: str, g: str | None = None) -> torch.Tensor:
        """``t`` in a buffer where group ``g`` of ``key`` lives (0-d scalars stay in memory).

        A host tensor that already satisfies the placement is kept as it is (no second copy:
        at init the optimizer's zeros are made on the host already).
        """
        if t.dim() == 0:
            return t.to(self.memory_device(key))
        kind = self.kind(key, g)
        if kind == "mixed":
            raise ValueError(
                f"state leaf {name!r} belongs to no group, so placement rules for {key!r} cannot "
                "place it; use one place for the whole part"
            )
        if kind == "device" and t.device == self.compute:
            return t
        if kind == "cpu" and t.device.type == "cpu" and (t.is_pinned() or not self.pinned(key, g)):
            return t
        out = self.empty(key, t.numel(), t.dtype, name=name, g=g).view(t.shape)
        out.copy_(t)
        return out

    def on_target(self, key: str, t: torch.Tensor, g: str | None = None) -> bool:
        """Whether tensor ``t`` of group ``g`` is where ``key`` says (checked leaf by leaf in tests)."""
        if t.dim() == 0:
            return t.device.type in ("cpu", self.compute.type)
        kind = self.kind(key, g)
        if kind == "nvme":
            return t.device.type == "cpu" and NvmeStore.is_file_backed(t)
        if kind == "cpu":
            return t.device.type == "cpu" and (t.is_pinned() or not self.pinned(key, g)) and not NvmeStore.is_file_backed(t)
        return (t.device == self.compute or (t.device.type == self.compute.type == "cpu")) and not NvmeStore.is_file_backed(t)


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
