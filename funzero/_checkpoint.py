"""Sharded checkpoints that reshard: save at one (stage, world size), load at another.

A checkpoint is a directory of steps::

    <dir>/LATEST                  the name of the newest complete step (replaced atomically)
    <dir>/step-<n>-<token>/       one complete checkpoint
        index.json                layouts, and for every saved piece: key, file, [lo, hi)
        r<rank>-g<group>.safetensors

Every per-group buffer of the state (params, master, each optimizer-state leaf keyed by group)
is saved as the pieces the ranks hold, in *unpadded flat coordinates* of its group, so a piece
means the same thing at any world size and any stage: loading reads, for each buffer of the
target state, the pieces that overlap the range this rank now holds. Replicated buffers and
scalars (step counts, the loss scaler) are written by rank 0 alone.

Nothing is lost on failure: ranks write into a fresh ``step-*`` directory; only when every rank
has finished does rank 0 point ``LATEST`` at it (``os.replace`` of a small file), so a save that
fails leaves ``LATEST`` and the directory it names as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

import optree
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from funzero._plan import Plan
from funzero._state import TrainState

__all__ = ["load_state", "save_state"]

_PARTS = ("params", "master", "opt_state", "scaler", "step")


def _entries(state: TrainState):
    """``(key, tensor, group or None)`` for every tensor leaf of the state."""
    groups = state.binding.layouts
    for part in _PARTS:
        tree = getattr(state, part)
        if tree is None:
            continue
        if isinstance(tree, torch.Tensor):
            yield part, tree, None
            continue
        paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace="funzero")
        for path, leaf in zip(paths, leaves):
            if not isinstance(leaf, torch.Tensor):
                continue
            g = path[-1] if path and isinstance(path[-1], str) and path[-1] in groups and leaf.dim() > 0 else None
            yield part + ":" + ".".join(map(str, path)), leaf, g


def _range(t: torch.Tensor, layout, rank: int) -> tuple[int, int]:
    """The padded flat range of its group that buffer ``t`` holds on ``rank``."""
    if t.numel() == layout.padded:
        return 0, layout.padded
    if t.numel() == layout.shard_numel:
        return layout.shard_range(rank)
    raise ValueError(f"buffer of group {layout.name!r} has {t.numel()} elements: neither full nor a shard")


def _world(plan: Plan) -> tuple[int, int, Any]:
    group = plan.mesh.group(plan.axis)
    return plan.num_shards, plan.rank, group


def save_state(state: TrainState, plan: Plan, directory: str, *, keep: int = 2) -> str:
    """Write ``state`` as a new checkpoint step under ``directory``; a collective over ``plan``'s ranks.

    Args:
        state: the state to save (not modified).
        plan: the plan it was made with (its mesh names the ranks that write).
        directory: the checkpoint directory (created if needed).
        keep: complete steps to keep; older ones are deleted after the new one is in place.

    Returns:
        the path of the new step directory.
    """
    state.check_alive("save_state")
    state.binding.placement.sync()  # a delayed host update still running would be saved half-done
    n, rank, group = _world(plan)
    b = state.binding
    token = [uuid.uuid4().hex[:8] if rank == 0 else None]
    if group is not None:
        dist.broadcast_object_list(token, src=dist.get_global_rank(group, 0), group=group)
    name = f"step-{int(state.step)}-{token[0]}"
    path = os.path.join(directory, name)
    os.makedirs(path, exist_ok=True)
    pieces: list[dict] = []
    ok = True
    try:
        by_group: dict[str | None, dict[str, torch.Tensor]] = {}
        for key, t, g in _entries(state):
            if g is None:
                if rank == 0:
                    by_group.setdefault(None, {})[key] = t.detach().to("cpu").clone().contiguous()
                    pieces.append(dict(key=key, group=None, file=f"r0-scalars.safetensors", lo=0, hi=0))
                continue
            lay = b.layouts[g]
            lo, hi = _range(t, lay, rank)
            if hi - lo == lay.padded and rank != 0:
                continue  # replicated: rank 0 writes it
            hi_data = min(hi, lay.numel)
            if hi_data <= lo:
                continue  # this rank holds only padding
            piece = t.detach().reshape(-1)[: hi_data - lo].to("cpu").clone()
            gi = list(b.layouts).index(g)
            by_group.setdefault(g, {})[key] = piece
            pieces.append(dict(key=key, group=g, file=f"r{rank}-g{gi}.safetensors", lo=lo, hi=hi_data, dtype=str(t.dtype)))
        for g, tensors in by_group.items():
            fname = "r0-scalars.safetensors" if g is None else f"r{rank}-g{list(b.layouts).index(g)}.safetensors"
            save_file(tensors, os.path.join(path, fname))
    except Exception:
        ok = False
        raise
    finally:
        # Every rank learns whether every rank succeeded before anything is published.
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        everyone = [pieces]
        if group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
            gathered: list = [None] * n
            dist.all_gather_object(gathered, pieces, group=group)
            everyone = gathered
        if flag.item() == 0:
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)
        elif rank == 0:
            index = dict(
                stage=b.stage,
                num_shards=b.num_shards,
                layouts={g: dict(numel=lay.numel, slots=[[s.path, list(s.shape), s.offset] for s in lay.slots]) for g, lay in b.layouts.items()},
                pieces=[p for ps in everyone for p in ps],
            )
            _write_atomic(os.path.join(path, "index.json"), json.dumps(index))
            _write_atomic(os.path.join(directory, "LATEST"), name)
            _prune(directory, keep)
        if group is not None:
            dist.barrier(group=group)
        if flag.item() == 0 and ok:
            raise RuntimeError("checkpoint save failed on another rank; the previous checkpoint is intact")
    return path


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_latest(directory: str) -> str:
    with open(os.path.join(directory, "LATEST")) as f:
        return f.read().strip()


def _prune(directory: str, keep: int) -> None:
    latest = _read_latest(directory)
    steps = sorted(
        (d for d in os.listdir(directory) if d.startswith("step-") and os.path.isfile(os.path.join(directory, d, "index.json"))),
        key=lambda d: os.path.getmtime(os.path.join(directory, d)),
    )
    for d in steps[: max(0, len(steps) - keep)]:
        if d != latest:
            shutil.rmtree(os.path.join(directory, d), ignore_errors=True)


def load_state(state: TrainState, plan: Plan, directory: str) -> TrainState:
    """Fill ``state`` (made by ``funzero.init`` for any stage and world size) from the latest checkpoint.

    Args:
        state: a state with the target layout; its buffers are overwritten in place.
        plan: the plan ``state`` was made with.
        directory: a directory written by :func:`save_state`.

    Returns:
        ``state``, filled.

    Raises:
        ValueError: no complete checkpoint, or one whose groups differ from the state's (naming the
            group), or a state leaf the checkpoint does not have (naming it).
    """
    try:
        name = _read_latest(directory)
    except FileNotFoundError:
        raise ValueError(f"no complete checkpoint in {directory!r} (no LATEST file)") from None
    path = os.path.join(directory, name)
    with open(os.path.join(path, "index.json")) as f:
        index = json.load(f)
    b = state.binding
    _, rank, _ = _world(plan)
    for g, lay in b.layouts.items():
        saved = index["layouts"].get(g)
        mine = dict(numel=lay.numel, slots=[[s.path, list(s.shape), s.offset] for s in lay.slots])
        if saved != mine:
            raise ValueError(f"checkpoint group {g!r} does not match the state's layout (different model or group rules)")
    by_key: dict[str, list[dict]] = {}
    for p in index["pieces"]:
        by_key.setdefault(p["key"], []).append(p)
    handles: dict[str, Any] = {}

    def read(p):
        if p["file"] not in handles:
            handles[p["file"]] = safe_open(os.path.join(path, p["file"]), framework="pt")
        return handles[p["file"]].get_tensor(p["key"])

    with torch.no_grad():
        for key, t, g in _entries(state):
            if key not in by_key:
                raise ValueError(f"checkpoint has no {key!r}")
            if g is None:
                t.copy_(read(by_key[key][0]).to(t.device))
                continue
            lo, hi = _range(t, b.layouts[g], rank)
            flat = t.reshape(-1)
            for p in by_key[key]:
                a, z = max(lo, p["lo"]), min(hi, p["hi"])
                if a >= z:
                    continue
                src = read(p)[a - p["lo"] : z - p["lo"]]
                flat[a - lo : z - lo].copy_(src.to(device=flat.device, dtype=flat.dtype))
    return state
