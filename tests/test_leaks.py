"""What runs leave behind (issue 22): NVMe stores, temporary copies, and collectives that hang.

Real processes throughout: a run that exits, a run killed with SIGKILL, a live process holding a
store's lock, two gloo ranks of which one never joins a collective.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import funzero as fz
from funzero import optim, testing
from funzero._placement import _nvme
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One rank trains a step with its optimizer state on NVMe in sys.argv[1], says so, and then
# exits or (with sys.argv[2] == "wait") waits to be killed.
_RUN = textwrap.dedent("""
    import sys, time
    import funzero as fz
    from funzero import optim, testing
    from tests._models import GROUPS, batches, lm_loss, tiny_gpt
    model = tiny_gpt()
    plan = fz.zero(2, groups=GROUPS, placement={"opt_state": "nvme:" + sys.argv[1]})
    tx = optim.adamw(1e-2)
    state = fz.init(model, tx, plan)
    state, _ = fz.train_step(model, lm_loss, tx, plan)(state, batches(1)[0])
    print("store", state.binding.placement.nvme().dir, len(testing.nvme_files(state)), flush=True)
    if sys.argv[2] == "wait":
        time.sleep(120)
""")


def _start(nvme_dir, mode: str) -> tuple[subprocess.Popen, str]:
    """A run of ``_RUN`` in a new process; returns it and its rank directory once it trained."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _RUN, str(nvme_dir), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()
    if not line.startswith("store "):
        proc.kill()
        raise AssertionError(f"the run did not start: {line}{proc.communicate()[1]}")
    _, rank_dir, n = line.split()
    assert int(n) > 0 and os.path.isdir(rank_dir)
    return proc, rank_dir


def _nvme_state(nvme_dir, where: str = "whole"):
    """A state with its optimizer state on NVMe and its step. ``where`` the update runs: "whole"
    (every copy begun before any is committed; stage 3 with the parameters on NVMe too) or
    "pipelined" (the host update writes the copies group by group; a bf16 master)."""
    model = tiny_gpt()
    placement = {"opt_state": f"nvme:{nvme_dir}"}
    if where == "whole":
        placement["params"] = f"nvme:{nvme_dir}"
    plan = fz.zero(3 if where == "whole" else 2, groups=GROUPS, placement=placement)
    tx = optim.adamw(1e-2)
    state = fz.init(model, tx, plan, precision=fz.bf16() if where == "pipelined" else fz.fp32())
    step = fz.train_step(model, lm_loss, tx, plan)
    assert testing.route(step, state).pipelined == (where == "pipelined")
    return state, step


def _store_of(state) -> str:
    return os.path.dirname(state.binding.placement.nvme().dir)


def _lock_is_held(store: str) -> bool:
    """Whether some open file description other than a fresh one of ours holds ``store``'s lock."""
    fd = os.open(os.path.join(store, "lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# --- NVMe stores ------------------------------------------------------------------------------
def test_a_run_that_exits_leaves_no_store(tmp_path):
    proc, rank_dir = _start(tmp_path, "exit")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert not os.path.exists(rank_dir)
    assert os.listdir(tmp_path) == []


def _ranks_train(rank, world, nvme_dir):
    state, step = _nvme_state(nvme_dir)
    state, _ = step(state, batches(1)[0])
    return len(testing.nvme_files(state))


def test_ranks_of_a_world_remove_their_stores_when_they_exit(tmp_path):
    # multiprocessing children end in os._exit, past atexit: the stores must go all the same.
    assert all(n > 0 for n in run_world(_ranks_train, 2, str(tmp_path)))
    assert os.listdir(tmp_path) == []


def test_a_state_done_with_takes_its_store_along(tmp_path):
    state, step = _nvme_state(tmp_path)
    state, _ = step(state, batches(1)[0])
    store = _store_of(state)
    assert _lock_is_held(store) and testing.nvme_files(state)
    del state, step  # the model, and with it the binding, goes with the step
    gc.collect()
    assert not os.path.exists(store)
    state, _ = _nvme_state(tmp_path)
    store = _store_of(state)
    state.binding.placement.nvme().close()  # or at once
    assert not os.path.exists(store) and os.listdir(tmp_path) == []


def test_a_killed_runs_store_is_removed_by_the_next_init_in_its_directory(tmp_path):
    proc, rank_dir = _start(tmp_path, "wait")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    dead = os.path.dirname(rank_dir)
    assert os.listdir(rank_dir), "the killed run left its files (as a killed run does)"
    # A store left unlocked by hand, too, and a directory of the user's that is no store.
    by_hand = tmp_path / "funzero-0123abcd-0123456789ab"
    (by_hand / "rank0").mkdir(parents=True)
    (by_hand / "lock").write_text("")
    (tmp_path / "funzero-mine").mkdir()
    state, _ = _nvme_state(tmp_path)
    mine = os.path.basename(_store_of(state))
    assert sorted(os.listdir(tmp_path)) == sorted([mine, "funzero-mine"]), os.listdir(tmp_path)
    assert not os.path.exists(dead)


def test_a_live_runs_store_is_left_alone_and_not_reused(tmp_path):
    live = tmp_path / "funzero-0123abcd-0123456789ab"
    (live / "rank0").mkdir(parents=True)
    (live / "rank0" / "mu.bin").write_bytes(b"state of a live run")
    (live / "lock").write_text("")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True); time.sleep(120)", str(live / "lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        state, step = _nvme_state(tmp_path)
        state, _ = step(state, batches(1)[0])
        mine = _store_of(state)
        assert os.path.dirname(mine) == str(tmp_path) and mine != str(live)
        assert os.listdir(live / "rank0") == ["mu.bin"]
        assert (live / "rank0" / "mu.bin").read_bytes() == b"state of a live run"
        # Ours is locked just the same, so that a run starting now leaves it alone in turn.
        assert _lock_is_held(mine)
        other, _ = _nvme_state(tmp_path)
        assert os.path.isdir(mine) and os.path.isdir(live) and testing.nvme_files(state)
        assert _store_of(other) not in (mine, str(live))
    finally:
        holder.kill()
        holder.communicate()


# --- writes that fail -------------------------------------------------------------------------
def _full_disk_on_call(k: int):
    """A ``shutil.copyfile`` that writes half of the ``k``-th copy and then finds the disk full."""
    real = _nvme.shutil.copyfile
    calls = [0]

    def copyfile(src, dst, **kw):
        calls[0] += 1
        if calls[0] < k:
            return real(src, dst, **kw)
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read()[: os.path.getsize(src) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)

    return copyfile


def _contents(rank_dir: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(rank_dir)):
        with open(os.path.join(rank_dir, name), "rb") as f:
            out[name] = f.read()
    return out


@pytest.mark.parametrize("where", ["pipelined", "whole"])
def test_a_write_that_fails_leaves_no_tmp_and_the_previous_files(where, tmp_path, monkeypatch):
    state, step = _nvme_state(tmp_path, where)
    state, _ = step(state, batches(2)[0])
    rank_dir = state.binding.placement.nvme().dir
    before = _contents(rank_dir)
    monkeypatch.setattr(_nvme.shutil, "copyfile", _full_disk_on_call(3))
    with pytest.raises(BaseException) as info:
        step(state, batches(2)[1])
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(x, OSError) and x.errno == errno.ENOSPC for x in chain), chain
    after = _contents(rank_dir)
    assert not [f for f in after if f.endswith(".tmp")], sorted(after)
    assert after == before


@pytest.mark.parametrize("where", ["pipelined", "whole"])
def test_a_commit_that_fails_leaves_no_tmp(where, tmp_path, monkeypatch):
    state, step = _nvme_state(tmp_path, where)
    rank_dir = state.binding.placement.nvme().dir
    real = os.replace
    calls = [0]

    def replace(src, dst, **kw):  # the second commit of the step fails
        calls[0] += str(src).endswith(".tmp")
        if calls[0] == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO), dst)
        return real(src, dst, **kw)

    monkeypatch.setattr(_nvme.os, "replace", replace)
    with pytest.raises(BaseException):
        step(state, batches(1)[0])
    monkeypatch.undo()
    assert not [f for f in os.listdir(rank_dir) if f.endswith(".tmp")], sorted(os.listdir(rank_dir))


# --- collectives that time out ----------------------------------------------------------------
def _one_rank_does_not_join(rank, world):
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from shardspec import Mesh

    def mesh_of(group):
        dm = DeviceMesh.from_group(group, "cpu", mesh_dim_names=("dp",))
        return Mesh(("dp",), (2,), device_type="cpu", device_mesh=dm)

    def timeout_of(group):
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()

    # A group made for an axis gets torch's default timeout; a mesh hands it the world's (180 s
    # in run_world, FUNZERO_TIMEOUT_S where Mesh.from_env starts the world).
    sub = dist.new_group([0, 1])
    made = timeout_of(sub)
    mesh_of(sub)._inherit_timeout()
    timeouts = (made, timeout_of(sub))
    mesh = mesh_of(dist.new_group([0, 1], timeout=datetime.timedelta(seconds=2)))
    if rank == 1:
        time.sleep(4)  # past rank 0's timeout, and alive: no "connection closed" instead
        return timeouts
    start = time.monotonic()
    try:
        fz.all_reduce(torch.ones(5), mesh, tag="grad")
    except RuntimeError as e:
        return timeouts, type(e).__name__, str(e), time.monotonic() - start
    return timeouts


def test_a_timed_out_collective_names_the_collective_and_the_group():
    (made, inherited), name, text, waited = run_world(_one_rank_does_not_join, 2, timeout=60)[0]
    assert (made, inherited) == (1800, 180)
    assert name == "CollectiveTimeout", text
    assert "all_reduce (tag 'grad')" in text and "mesh axis 'dp'" in text, text
    assert "global ranks [0, 1]" in text and "timeout 2 s" in text and "rank 0" in text, text
    assert waited < 10
