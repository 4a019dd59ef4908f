"""Weights in and out, for models of any size.

In: :func:`open_weights` opens Hugging Face-layout safetensors (one file, or an index and its
shards) or a funzero checkpoint as a :class:`WeightSource`, which reads any flat range of a
tensor and only the bytes that range needs, so each rank reads only what its specs say it
holds. :func:`map_keys` pairs the model's leaves with the source's keys (ties, missing and extra
keys, shapes).

Out: :func:`gather_weights` and :func:`save_weights` gather the state's parameters one group at a
time (from the fp32 master where there is one), so no rank ever holds more than one group in
full; ``save_weights`` writes each leaf into its safetensors shard as its group arrives (a
shard's header is known before its data: shapes and dtypes come from the layouts).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import struct
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open

from funzero import _checkpoint as ck
from funzero._collectives import all_gather
from funzero._plan import Plan
from funzero._state import TrainState
from shardspec import is_sharded

__all__ = ["WeightSource", "gather_weights", "map_keys", "open_weights", "read_range", "save_weights"]

# safetensors' dtype names
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


# --- reading -------------------------------------------------------------------------------


class WeightSource:
    """Named tensors that can be read range by range.

    ``read(key, lo, hi)`` returns elements ``[lo, hi)`` of the tensor flattened row-major, as a
    1-D CPU tensor in the stored dtype, reading only what that range needs. A source is a
    context manager (``close`` on exit).
    """

    origin: str = "weights"

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def read(self, key: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "WeightSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def _range(self, key: str, lo: int, hi: int | None) -> tuple[tuple[int, ...], int, int]:
        if key not in self:
            raise ValueError(f"{self.origin} has no tensor {key!r}")
        shape = self.shape(key)
        n = math.prod(shape)
        hi = n if hi is None else hi
        if not 0 <= lo <= hi <= n:
            raise ValueError(f"range [{lo}, {hi}) is outside {key!r} of shape {shape} ({n} elements) in {self.origin}")
        return shape, lo, hi


class _Safetensors(WeightSource):
    """Tensors in safetensors files, each key in the file ``files`` names (memory-mapped)."""

    def __init__(self, files: Mapping[str, str], origin: str) -> None:
        self.origin = origin
        self._file_of = dict(files)
        self._handles: dict[str, Any] = {}
        for key, file in self._file_of.items():
            if key not in self._handle(file, key).keys():
                raise ValueError(f"{origin} names key {key!r} in {file!r}, which does not have it")

    def _handle(self, file: str, key: str):
        if file not in self._handles:
            if not os.path.isfile(file):
                raise ValueError(f"{self.origin}: file {file!r} (holding key {key!r}) is missing")
            try:
                self._handles[file] = safe_open(file, framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ValueError(f"{self.origin}: {file!r} (holding key {key!r}) is not a safetensors file: {e}") from None
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def _slice(self, key: str):
        if key not in self._file_of:
            raise ValueError(f"{self.origin} has no tensor {key!r}")
        return self._handle(self._file_of[key], key).get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        name = self._slice(key).get_dtype()
        if name not in _ST_DTYPES:
            raise ValueError(f"{key!r} in {self._file_of[key]!r} has dtype {name!r}, which torch cannot hold")
        return _ST_DTYPES[name]

    def read(self, key: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        shape, lo, hi = self._range(key, lo, hi)
        if not shape:
            return self._handle(self._file_of[key], key).get_tensor(key).reshape(1)[lo:hi]
        if lo == hi:
            return torch.empty(0, dtype=self.dtype(key))
        sl = self._slice(key)
        # One read per box of the range: a partial row, whole rows, a partial row.
        parts = [sl[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].reshape(-1)
                 for offsets, sizes in ck.flat_boxes(shape, lo, hi)]
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)

    def close(self) -> None:
        self._handles.clear()


class _Tensors(WeightSource):
    """A mapping of tensors as a source (weights already in memory)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.origin = "the given tensors"
        self._t = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._t)

    def __contains__(self, key: str) -> bool:
        return key in self._t

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._t[key].dtype

    def read(self, key: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        _, lo, hi = self._range(key, lo, hi)
        return self._t[key].detach().reshape(-1)[lo:hi].to("cpu")


class _Checkpoint(WeightSource):
    """The parameters of one step of a funzero checkpoint, in full-tensor coordinates whatever
    world size wrote them: the fp32 master where the checkpoint has one (the exact values),
    else the parameters. Every chunk read is checked against its crc32."""

    def __init__(self, path: str) -> None:
        self.origin = f"checkpoint {path!r}"
        self.path = path
        self._index = ck.read_index(path)
        self._md = ck.read_metadata(path)
        entries = self._index["entries"]
        part = "master" if any(r["nest"][0] == "master" for r in entries.values()) else "params"
        self._recs = {r["nest"][1]: (fqn, r) for fqn, r in entries.items() if r["nest"][0] == part and len(r["nest"]) == 2}
        self._pieces: dict[str, list] = {}

    def keys(self) -> list[str]:
        return list(self._recs)

    def __contains__(self, key: str) -> bool:
        return key in self._recs

    @property
    def aliases(self) -> dict[str, tuple[str, ...]]:
        """``{leaf: every name of the same parameter}`` of the model that wrote the checkpoint."""
        return {p: tuple(n) for p, n in self._index.get("aliases", {}).items()}

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._recs:
            raise ValueError(f"{self.origin} has no tensor {key!r}")
        return tuple(self._recs[key][1]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        if key not in self._recs:
            raise ValueError(f"{self.origin} has no tensor {key!r}")
        return ck._DTYPES[self._recs[key][1]["dtype"]]

    def read(self, key: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        _, lo, hi = self._range(key, lo, hi)
        fqn, rec = self._recs[key]
        if key not in self._pieces:
            self._pieces[key] = ck.leaf_pieces(self.path, fqn, rec, self._md)
        out = torch.empty(hi - lo, dtype=self.dtype(key))
        targets, pos = [], 0  # the range as boxes of the whole tensor, each a view of ``out``
        for offsets, sizes in ck.flat_boxes(self.shape(key), lo, hi):
            n = math.prod(sizes)
            targets.append((offsets, out[pos : pos + n].view(sizes)))
            pos += n
        pieces = [p for p in self._pieces[key]
                  if any(ck.overlap(o, v.shape, p.offsets, p.sizes) is not None for o, v in targets)]
        ck.check_files(pieces)

        def sink(p, t):
            for offsets, view in targets:
                ck.copy_overlap(view, offsets, t, p.offsets)

        error = ck.read_pieces(self.path, pieces, sink, metadata=self._md)
        if error is not None:
            raise error
        return out


def _read_hf_index(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"weights index {path!r} is unreadable: {e}") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise ValueError(f"weights index {path!r} has no weight_map of tensor names to file names")
    folder = os.path.dirname(path)
    for key, file in wm.items():
        if os.path.basename(file) != file or not file:
            raise ValueError(f"weights index {path!r} names file {file!r} for key {key!r}: not a file name in {folder!r}")
    return {k: os.path.join(folder, v) for k, v in wm.items()}


def open_weights(spec) -> WeightSource:
    """A :class:`WeightSource` over ``spec``.

    Args:
        spec: a ``.safetensors`` file; a directory in Hugging Face layout (``model.safetensors``,
            or ``model.safetensors.index.json`` and its shards: each key read from the shard the
            index names); a checkpoint directory written by :func:`funzero.save_state` (the
            parameters of its latest complete step, or of the step directory given); a mapping
            of tensors; or a ``WeightSource`` (returned as it is).

    Raises:
        ValueError: a missing file, a malformed index, a key the index names but its shard lacks
            (naming the file and the key), or a directory holding none of these.

    Example:
        >>> with open_weights("Llama-3.2-1B/") as src:
        ...     row = src.read("model.embed_tokens.weight", 0, 2048)
    """
    if isinstance(spec, WeightSource):
        return spec
    if isinstance(spec, Mapping):
        return _Tensors(spec)
    path = os.fspath(spec)
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"weights file {path!r} is not a .safetensors file")
        try:
            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"weights file {path!r} is not a safetensors file: {e}") from None
        return _Safetensors({k: path for k in keys}, f"weights file {path!r}")
    if not os.path.isdir(path):
        raise ValueError(f"weights {path!r} do not exist")
    if os.path.isfile(os.path.join(path, ck.INDEX)):
        return _Checkpoint(path)
    if os.path.exists(os.path.join(path, "LATEST")):
        return _Checkpoint(ck.latest_step(path))
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        return _Safetensors(_read_hf_index(index), f"weights index {index!r}")
    single = os.path.join(path, SINGLE_NAME)
    if os.path.isfile(single):
        return open_weights(single)
    raise ValueError(f"{path!r} holds no {SINGLE_NAME}, {INDEX_NAME} or funzero checkpoint")


def _shapes(keys) -> dict[str, tuple[int, ...] | None]:
    if isinstance(keys, WeightSource):
        return {k: keys.shape(k) for k in keys.keys()}
    if isinstance(keys, Mapping):
        out = {}
        for k, v in keys.items():
            out[k] = None if v is None else tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(int(s) for s in v)
        return out
    return {k: None for k in keys}


def map_keys(source_keys, model_keys, aliases: Mapping[str, Iterable[str]] | None = None, *,
             skip: Iterable[str] = ()) -> dict[str, str]:
    """Which source key each model leaf loads from: ``{model leaf path: source key}``.

    Names are the module's own state-dict keys. A tied parameter (``aliases``: ``{path: every
    name of the same parameter}``, as ``Binding.aliases``) loads once, from whichever of its
    names the source has (the first, in the module's order, when it has several).

    Args:
        source_keys: a :class:`WeightSource`, ``{key: shape or tensor}``, or key names.
        model_keys: ``{leaf path: shape or tensor}`` or leaf paths (shapes are checked where both
            sides give them).
        aliases: the model's ties.
        skip: source keys the model knows but does not load here (its buffers): not "extra".

    Raises:
        ValueError: a model leaf the source lacks, a source key no leaf uses, or a shape
            mismatch, naming the key (and both shapes).
    """
    src = _shapes(source_keys)
    model = _shapes(model_keys)
    aliases = {p: tuple(n) for p, n in (aliases or {}).items()}
    skip = set(skip)
    out, used, missing = {}, set(), []
    for path, shape in model.items():
        names = aliases.get(path, ())
        names = names if path in names else (path, *names)
        found = [n for n in names if n in src]
        if not found:
            missing.append(path if len(names) == 1 else f"{path} (tied: {', '.join(names)})")
            continue
        for n in found:
            if shape is not None and src[n] is not None and tuple(src[n]) != tuple(shape):
                raise ValueError(f"weight {n!r} has shape {tuple(src[n])} in the source; the model's {path!r} "
                                 f"has shape {tuple(shape)}")
        used.update(found)
        out[path] = found[0]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(f"the weights have no {missing[0]!r}{more}")
    extra = [k for k in src if k not in used and k not in skip]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise ValueError(f"the weights have {extra[0]!r}{more}, which the model has no leaf for")
    return out


def read_range(source: WeightSource, layout, keys: Mapping[str, str], lo: int, hi: int,
               out: torch.Tensor) -> torch.Tensor:
    """Elements ``[lo, hi)`` of ``layout``'s flat buffer, read from ``source`` into ``out``.

    What a rank calls to fill the part of a group it holds (``layout.shard_range(rank)``)
    without reading the rest: each leaf overlapping the range is read for its overlap only, and
    cast to ``out``'s dtype. Padding between and after leaves is left as ``out`` has it.

    Args:
        keys: ``{leaf path: source key}``, as from :func:`map_keys`.
        out: ``(hi - lo,)``, any device and floating dtype.
    """
    if out.shape != (hi - lo,):
        raise ValueError(f"group {layout.name!r}: out has shape {tuple(out.shape)}, want ({hi - lo},)")
    for s in layout.slots:
        a, z = max(lo, s.offset), min(hi, s.offset + s.numel)
        if a < z:
            out[a - lo : z - lo].copy_(source.read(keys[s.path], a - s.offset, z - s.offset))
    return out


# --- gathering -----------------------------------------------------------------------------


def _full_group(state: TrainState, plan: Plan | None, g: str, to_rank: int | None) -> torch.Tensor | None:
    """Group ``g``'s full padded buffer (the fp32 master where there is one) on ``to_rank`` (every
    rank when None); None elsewhere. A collective where the buffer is sharded."""
    b = state.binding
    use_master = state.master is not None
    spec = b.specs.opt_state if use_master else b.specs.params
    src = (state.master if use_master else state.params)[g].detach()
    if not (is_sharded(spec) and b.num_shards > 1):
        return src if to_rank is None or b.rank == to_rank else None
    if plan is None:
        raise ValueError("gathering the weights of a sharded state needs the plan (its mesh)")
    shard = src.to(plan.mesh.device)
    if to_rank is None:
        return all_gather(shard, plan.mesh, plan.axis, tag="gather_weights")
    # Point to point into the destination's buffer: no rank but ``to_rank`` holds the group, and
    # it holds it once (gloo's gather would stage a second full copy).
    group = plan.mesh.group(plan.axis)
    n = b.num_shards
    if b.rank != to_rank:
        dist.isend(shard.contiguous(), dst=dist.get_global_rank(group, to_rank), group=group).wait()
        return None
    full = torch.empty(b.layouts[g].padded, dtype=shard.dtype, device=shard.device)
    parts = full.chunk(n)
    works = [dist.irecv(parts[r], src=dist.get_global_rank(group, r), group=group) for r in range(n) if r != to_rank]
    parts[to_rank].copy_(shard)
    for w in works:
        w.wait()
    return full


def _groups(state: TrainState, plan: Plan | None, to_rank: int | None) -> Iterator[tuple[str, torch.Tensor | None]]:
    """``(group, full buffer or None)`` one group at a time; each buffer should be dropped before
    the next is asked for."""
    state.check_alive("gathering the weights")
    b = state.binding
    if to_rank is not None and not (isinstance(to_rank, int) and 0 <= to_rank < b.num_shards):
        raise ValueError(f"to_rank must be None or a rank in [0, {b.num_shards}), got {to_rank=}")
    b.placement.sync()  # a delayed host update still running would be read half-done
    for g in b.layouts:
        yield g, _full_group(state, plan, g, to_rank)


def gather_weights(state: TrainState, plan: Plan | None = None, *, to_rank: int | None = None,
                   names: str = "leaves", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The full parameters, gathered one group at a time; a collective where they are sharded.

    Args:
        plan: the plan the state was made with (needed where parameters are sharded).
        to_rank: None: every rank gets them; a rank: only that rank does (the others get ``{}``,
            and never hold a gathered group).
        names: ``"leaves"``: ``{leaf path: tensor}``, a tied parameter once (under its first
            name); ``"state_dict"``: every name ``model.state_dict()`` lists, tied names sharing
            one tensor (so ``model.load_state_dict(...)`` accepts it).
        dtype: cast to this dtype (default: the master's where there is one, so the values are
            exact; else the parameters').
    """
    if names not in ("leaves", "state_dict"):
        raise ValueError(f"names must be 'leaves' or 'state_dict', got {names=}")
    b = state.binding
    out: dict[str, torch.Tensor] = {}
    for g, full in _groups(state, plan, to_rank):
        if full is not None:
            _copy_leaves(b, g, full, dtype, names, out)
        del full  # before the next group is gathered
    return out


def _copy_leaves(b, g: str, full: torch.Tensor, dtype, names: str, out: dict) -> None:
    # A function of its own, so that no view of ``full`` outlives it.
    for path, v in b.layouts[g].unpack(full).items():
        t = _whole(b, path, v).to(dtype or v.dtype, copy=True)
        for name in (b.aliases.get(path, (path,)) if names == "state_dict" else (path,)):
            out[name] = t


# --- writing Hugging Face layout -----------------------------------------------------------

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size) -> int:
    """Bytes from ``5GB`` (decimal, as Hugging Face), ``2GiB``, ``500MB`` or an int."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b)?\s*", str(size), re.IGNORECASE)
        if m is None or (m.group(2) or "b").lower() not in _UNITS:
            raise ValueError(f"max_shard_size must be bytes or a size like '5GB', got {size!r}")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    if n < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def _plan_files(items: list[tuple[str, tuple[int, ...], int]], max_bytes: int) -> list[list[tuple[str, tuple, int]]]:
    """Greedy shards in write order; a tensor larger than the limit gets a file of its own."""
    files: list[list] = [[]]
    size = 0
    for item in items:
        if files[-1] and size + item[2] > max_bytes:
            files.append([])
            size = 0
        files[-1].append(item)
        size += item[2]
    return files


def _header(entries: list[tuple[str, tuple, int]], dtype: torch.dtype) -> bytes:
    """A safetensors header for ``entries`` stored back to back, in order."""
    head: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape, nbytes in entries:
        head[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


class _ShardWriter:
    """Rank 0's side of :func:`save_weights`: files planned up front, tensors appended as their
    group arrives, each file written to a temporary name and renamed at the end."""

    def __init__(self, directory: str, files: list[list], dtype: torch.dtype) -> None:
        self.directory = directory
        self.dtype = dtype
        n = len(files)
        self.names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.files = files
        self.token = uuid.uuid4().hex[:8]
        self.order = [(i, name) for i, entries in enumerate(files) for name, _, _ in entries]
        self.next = 0
        self.handle = None
        self.current = -1
        self.tmps: list[str] = []

    def _tmp(self, i: int) -> str:
        return os.path.join(self.directory, f".{self.names[i]}.{self.token}.tmp")

    def write(self, name: str, t: torch.Tensor) -> None:
        i, expected = self.order[self.next]
        assert name == expected, (name, expected)  # groups arrive in the planned order
        if i != self.current:
            self._close()
            self.current = i
            self.tmps.append(self._tmp(i))
            self.handle = open(self.tmps[-1], "wb")
            self.handle.write(_header(self.files[i], self.dtype))
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            self.handle.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.next += 1

    def _close(self) -> None:
        if self.handle is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            self.handle = None

    def finish(self) -> list[str]:
        assert self.next == len(self.order)
        self._close()
        written = list(self.names)
        if len(self.names) > 1:
            weight_map = {name: self.names[i] for i, entries in enumerate(self.files) for name, _, _ in entries}
            total = sum(nb for entries in self.files for _, _, nb in entries)
            params = sum(math.prod(s) for entries in self.files for _, s, _ in entries)
            index = {"metadata": {"total_parameters": params, "total_size": total},
                     "weight_map": dict(sorted(weight_map.items()))}
            ck._write_atomic(os.path.join(self.directory, INDEX_NAME), json.dumps(index, indent=2) + "\n")
            written.append(INDEX_NAME)
        for i, tmp in enumerate(self.tmps):
            os.replace(tmp, os.path.join(self.directory, self.names[i]))
        self.tmps = []
        for f in os.listdir(self.directory):  # weights of an earlier save with another sharding
            if f not in written and (_WEIGHT_FILE.fullmatch(f) or f == INDEX_NAME):
                os.remove(os.path.join(self.directory, f))
        return written

    def abort(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        for tmp in self.tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


def _whole(b, path: str, v: torch.Tensor) -> torch.Tensor:
    """Leaf ``path``'s whole tensor from this rank's ``v``: gathered over the tensor-parallel axis
    where the model is split there (a collective of that axis), else ``v``."""
    return v if b.tp is None else b.tp.full(path, v)


def _write_leaves(writer: _ShardWriter | None, b, g: str, full: torch.Tensor, dtype: torch.dtype, tied: str) -> None:
    # A function of its own, so that no view of ``full`` outlives it; one leaf is cast at a time.
    # ``writer`` None: a tensor-parallel peer of the writer, which takes part in the gathers only.
    for path, v in b.layouts[g].unpack(full).items():
        t = _whole(b, path, v).to(dtype)
        for name in (b.aliases.get(path, (path,)) if tied == "all" else (path,)):
            if writer is not None:
                writer.write(name, t)
        del t


def _save_config(config, directory: str, dtype: torch.dtype) -> list[str]:
    config = copy.deepcopy(config)
    config.dtype = dtype  # what from_pretrained(dtype="auto") should load
    config.save_pretrained(directory)
    return ["config.json"]


def save_weights(state: TrainState, plan: Plan, directory: str, *, max_shard_size="5GB",
                 dtype: torch.dtype | None = None, tied: str = "hf", config=None) -> list[str]:
    """Write the parameters in Hugging Face layout; a collective over ``plan``'s ranks.

    ``model.safetensors`` when one shard suffices, else ``model-00001-of-0000N.safetensors`` and
    ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), under the module's
    state-dict names. Streaming: one group at a time is gathered to rank 0 (from the fp32 master
    where there is one), cast, written, and dropped; no rank holds more than one group in full.
    Rank 0 writes; files appear under their names only when all are written. With ``config``
    (a Hugging Face model's ``model.config``) the directory is what ``save_pretrained`` writes,
    and ``from_pretrained(directory)`` loads it.

    Args:
        directory: created if needed; weight files of an earlier save there are replaced.
        max_shard_size: bytes per file (``"5GB"``, ``"500MB"``, ``"2GiB"`` or an int); a file
            is closed before the tensor that would take it past the limit.
        dtype: the stored dtype (default: the parameters' dtype).
        tied: ``"hf"``: a tied parameter once, under its first name in the module (the name
            ``save_pretrained`` keeps, e.g. ``model.embed_tokens.weight`` and not
            ``lm_head.weight``; ``from_pretrained`` ties the other); ``"all"``: under every name,
            so that ``load_state_dict(strict=True)`` on an untied copy works.
        config: anything with ``save_pretrained(directory)`` (a ``PretrainedConfig``), written
            by rank 0 after the weights, with the stored dtype as its ``dtype``.

    Returns:
        the names of the files written (on every rank).

    Raises:
        ValueError: bad arguments. RuntimeError / OSError: writing failed (on every rank; the
            previous weight files in ``directory`` are left as they were).
    """
    if tied not in ("hf", "all"):
        raise ValueError(f"tied must be 'hf' or 'all', got {tied=}")
    if config is not None and not callable(getattr(config, "save_pretrained", None)):
        raise ValueError(f"config must have save_pretrained(directory) (a transformers config), got {type(config).__name__}")
    max_bytes = parse_size(max_shard_size)
    b = state.binding
    out_dtype = dtype or b.precision.param_dtype
    if out_dtype not in _ST_NAMES:
        raise ValueError(f"dtype {out_dtype} cannot be stored in safetensors")
    size = torch.empty((), dtype=out_dtype).element_size()
    group = plan.mesh.group_over(plan.data_axes)
    rank = plan.data_rank  # one writer; every replica's shard group still gathers to its rank 0
    writes = rank == 0 and (b.tp is None or b.tp.rank == 0)  # tensor parallelism: one writer of all
    if b.tp is not None and plan.mesh.size() > 1:
        group = dist.group.WORLD  # every rank votes: tp peers gather, one rank writes
    shape_of = (lambda s: s.shape) if b.tp is None else (lambda s: b.tp.shapes.get(s.path, s.shape))
    error: BaseException | None = None
    writer = None
    try:
        items = [(name, shape_of(s), math.prod(shape_of(s)) * size) for lay in b.layouts.values() for s in lay.slots
                 for name in (b.aliases.get(s.path, (s.path,)) if tied == "all" else (s.path,))]
        if writes:
            os.makedirs(directory, exist_ok=True)
            writer = _ShardWriter(directory, _plan_files(items, max_bytes), out_dtype)
    except Exception as e:  # noqa: BLE001 - every rank still takes part in every gather
        error = e
    # Every rank takes part in every gather, whatever failed where, so none waits forever.
    for g, full in _groups(state, plan, to_rank=0):
        # tp peers gather whatever failed; a replica's shard rank 0 that is not the writer skips
        if full is not None and (b.tp is not None or (rank == 0 and error is None)):
            try:
                _write_leaves(writer if error is None else None, b, g, full, out_dtype, tied)
            except Exception as e:  # noqa: BLE001
                error = e
        del full  # before the next group is gathered
    written: list[str] = []
    if writes and error is None:
        try:
            written = writer.finish()
            if config is not None:
                written += _save_config(config, directory, out_dtype)
        except Exception as e:  # noqa: BLE001
            error = e
    if writer is not None and error is not None:
        writer.abort()
    votes = ck._agree(group, error, written)
    ck._check_votes(votes, error, "save_weights", RuntimeError)
    return votes[0][1]
