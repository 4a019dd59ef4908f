"""Run a function on a real multi-process gloo group (separate processes, no mocks).

Ranks are forked from a forkserver that has imported torch, funzero and transformers once, so a
world starts in a fraction of a second instead of each rank importing them afresh (on 2 cores
that was 3-10 s a world, minutes over the suite). Each rank is still a new process with the
caller's environment; ``fresh=True`` spawns clean interpreters instead, for tests whose
environment must be read at import (e.g. the CPU kernels torch dispatches) and for tests that
measure a rank's resident memory (a forked rank's depends on what the server had loaded).
"""

from __future__ import annotations

import datetime
import io
import os
import queue as queue_mod
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What the forkserver imports once; the ranks it forks start with these loaded.
_PRELOAD = ["torch", "torch.distributed", "funzero", "transformers", "tests._models"]


def _context(fresh: bool):
    if fresh:
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _entry(rank, world_size, port, fn, args, queue, env):
    os.environ.clear()
    os.environ.update(env)  # the caller's, not the forkserver's from when it started
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=180)
        )
        out = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(out, buf)  # bytes, not shared-memory handles that die with this process
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the child's traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(fn, world_size: int, *args, timeout: float = 300.0, fresh: bool = False) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result.

    ``world_size == 1`` runs in a spawned process too, with a one-rank process group, so that
    "one rank" means the same launcher-free code path users get (``Mesh.from_env``).
    """
    ctx = _context(fresh)
    queue = ctx.Queue()
    port = _free_port()
    env = dict(os.environ)
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, env)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    for _ in range(world_size):
        try:
            rank, status, payload = queue.get(timeout=timeout)
        except queue_mod.Empty:
            for p in procs:
                p.kill()
            raise TimeoutError(f"{fn.__name__} on {world_size} ranks gave no result in {timeout}s") from None
        if status == "error":
            errors.append(f"rank {rank}:\n{payload}")
        else:
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
