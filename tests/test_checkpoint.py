"""Checkpoints (torch.distributed.checkpoint): bit-exact resume, resharding across world sizes and
stages, readable by plain DCP, a failed or killed save loses nothing, asynchronous saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import optree
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import funzero as fz
from funzero import optim
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISIONS = {"fp64": lambda: fz.Precision(torch.float64), "bf16": fz.bf16, "fp16": fz.fp16}


def _make(stage, precision="fp64", placement=None, seed=0):
    model = tiny_gpt(seed=seed, dtype=torch.float64 if precision == "fp64" else torch.float32)
    plan = fz.zero(stage, groups=GROUPS, placement=placement or {})
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.warmup_cosine(1e-2, 2, 10), weight_decay=0.1))
    state = fz.init(model, tx, plan, precision=PRECISIONS[precision]())
    return model, plan, tx, state


def _tensors(state):
    """Every tensor this rank holds, in a fixed order (copies)."""
    parts = (state.step, state.params, state.master, state.opt_state, state.scaler)
    return [t.detach().clone() for t in optree.tree_leaves(parts, namespace="funzero") if isinstance(t, torch.Tensor)]


def _full(step_dir, out):
    """A checkpoint step as one {params, master, opt_state, ...} dict in full coordinates, read
    the way a user without funzero would (DCP's own converter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        dcp_to_torch_save(step_dir, out)
    return torch.load(out)


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in _flat(v, f"{prefix}{k}/").items()}
    return {prefix[:-1]: tree}


# --- resume is bit-exact -------------------------------------------------------------------

RESUME = [  # (stage, precision, placement)
    (1, "bf16", None),
    (2, "fp16", None),
    (3, "bf16", None),
    (3, "fp16", None),
    (1, "fp16", {"opt_state": "cpu"}),
    (2, "bf16", {"opt_state": "nvme"}),
    (3, "bf16", {"opt_state": "cpu", "params": "cpu"}),
]


def _resume(rank, world, root):
    out = []
    for i, (stage, precision, placement) in enumerate(RESUME):
        placement = {k: f"nvme:{root}/nvme{rank}-{i}" if v == "nvme" else v for k, v in (placement or {}).items()}
        ckpt = f"{root}/ckpt{i}"
        model, plan, tx, state = _make(stage, precision, placement)
        step = fz.train_step(model, lm_loss, tx, plan)
        data = batches(4)
        for b in data[:2]:
            state, _ = step(state, b)
        saved = _tensors(state)
        fz.save_state(state, plan, ckpt)
        for b in data[2:]:
            state, _ = step(state, b)
        want = _tensors(state)

        model2, plan2, tx2, fresh = _make(stage, precision, placement, seed=7)
        fresh = fz.load_state(fresh, plan2, ckpt)
        loaded = _tensors(fresh)
        step2 = fz.train_step(model2, lm_loss, tx2, plan2)
        for b in data[2:]:
            fresh, _ = step2(fresh, b)
        got = _tensors(fresh)
        out.append((len(saved) == len(loaded) and all(torch.equal(a, b) for a, b in zip(saved, loaded)),
                    len(want) == len(got) and all(torch.equal(a, b) for a, b in zip(want, got)),
                    not all(torch.equal(a, b) for a, b in zip(saved, want))))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_resume_is_bit_exact_at_every_stage_precision_and_placement(world, tmp_path):
    for rank, results in enumerate(run_world(_resume, world, str(tmp_path))):
        for case, (loaded, resumed, moved) in zip(RESUME, results):
            assert moved, case  # training changed the state, so the comparison means something
            assert loaded, (rank, case)  # every tensor, bit for bit, right after the load
            assert resumed, (rank, case)  # and two more steps land exactly where the first run did


# --- resharding ----------------------------------------------------------------------------


def _save_run(rank, world, stage, ckpt, out):
    """Train 3 steps and save; report the parameters then and 2 steps later."""
    model, plan, tx, state = _make(stage)
    step = fz.train_step(model, lm_loss, tx, plan)
    data = batches(5)
    for b in data[:3]:
        state, _ = step(state, b)
    fz.save_state(state, plan, ckpt)
    saved = fz.gather_params(state, plan)
    for b in data[3:]:
        state, _ = step(state, b)
    return saved, fz.gather_params(state, plan)


def _load_run(rank, world, stage, ckpt, again):
    """Load at another (world, stage), save it again, train 2 steps."""
    model, plan, tx, state = _make(stage, seed=3)
    state = fz.load_state(state, plan, ckpt)
    path = fz.save_state(state, plan, again)
    step = fz.train_step(model, lm_loss, tx, plan)
    for b in batches(5)[3:]:
        state, _ = step(state, b)
    return path, fz.gather_params(state, plan), int(state.step)


@pytest.mark.slow
def test_reshards_across_world_sizes_and_stages(tmp_path):
    """2 ranks -> 1 and 1 -> 2, stage 3 -> 1 and 1 -> 3: every tensor (parameters, master,
    optimizer moments and counts, step) reads back bit for bit in full coordinates, and training
    resumes where it left off."""
    a = str(tmp_path / "a")
    saved, want = run_world(_save_run, 2, 3, a, None)[0]
    b = str(tmp_path / "b")
    path_b, got, n = run_world(_load_run, 1, 1, a, b)[0]  # 2 -> 1, stage 3 -> 1
    c = str(tmp_path / "c")
    path_c, got2, n2 = run_world(_load_run, 2, 3, b, c)[0]  # 1 -> 2, stage 1 -> 3
    full = [_full(fz._checkpoint.latest_step(d), str(tmp_path / f"{i}.pt")) for i, d in enumerate((a, b, c))]
    flat = [_flat(f) for f in full]
    assert set(flat[0]) == set(flat[1]) == set(flat[2]) and len(flat[0]) > 3 * len(saved)
    for k in flat[0]:
        assert torch.equal(flat[0][k], flat[1][k]) and torch.equal(flat[0][k], flat[2][k]), k
    with fz.open_weights(a) as src:  # and so does the weight reader, in full coordinates
        for k, v in saved.items():
            assert torch.equal(full[0]["params"][k], v), k  # plain DCP reads the parameters a 2-rank save wrote
            assert torch.equal(src.read(k), v.reshape(-1)), k
    assert n == n2 == 5
    for k in want:
        for g in (got, got2):
            rel = ((g[k] - want[k]).norm() / want[k].norm()).item()
            assert rel < 1e-10, (k, rel)  # a different reduction order, the same trajectory


def test_plain_dcp_load_reads_the_parameters_in_their_shapes(tmp_path):
    model, plan, tx, state = _make(2)
    state, _ = fz.train_step(model, lm_loss, tx, plan)(state, batches(1)[0])
    path = fz.save_state(state, plan, str(tmp_path))
    want = fz.gather_params(state, plan)
    target = {"params": {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in want.items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, checkpoint_id=path)
    for k, v in want.items():
        assert torch.equal(target["params"][k], v), k
    step_dir_files = sorted(os.listdir(path))
    assert step_dir_files == [".metadata", "__0_0.distcp", "funzero.json"], step_dir_files


# --- a failed save -------------------------------------------------------------------------


FAILURES = [(1, "data"), (0, "data"), (0, "index")]  # (failing rank, what fails there)


def _failing_save(rank, world, root):
    from torch.distributed.checkpoint import FileSystemWriter

    import funzero._checkpoint as ck

    class FullDisk(FileSystemWriter):
        def write_data(self, plan_, planner):
            raise OSError(28, "No space left on device", self.path)

    def broken(path, text):
        raise OSError(28, "No space left on device", path)

    out = []
    for i, (failing, where) in enumerate(FAILURES):
        t0 = time.monotonic()
        ckpt = f"{root}/ckpt{i}"
        model, plan, tx, state = _make(2)
        step = fz.train_step(model, lm_loss, tx, plan)
        data = batches(3)
        state, _ = step(state, data[0])
        first = fz.save_state(state, plan, ckpt)
        first_params = fz.gather_params(state, plan)
        state, _ = step(state, data[1])
        real_writer, real_atomic = ck._storage_writer, ck._write_atomic
        if rank == failing:  # the disk fills up on one rank, mid-save
            if where == "data":
                ck._storage_writer = FullDisk
            else:
                ck._write_atomic = broken
        error = None
        try:
            fz.save_state(state, plan, ckpt)
        except (OSError, RuntimeError) as e:
            error = f"{type(e).__name__}: {e}"
        finally:
            ck._storage_writer, ck._write_atomic = real_writer, real_atomic
        after_failure = sorted(os.listdir(ckpt)), ck.latest_step(ckpt)
        _, plan2, _, fresh = _make(2, seed=5)
        fresh = fz.load_state(fresh, plan2, ckpt)
        reloaded = fz.gather_params(fresh, plan2)
        # Training and saving go on as if nothing had happened.
        state, _ = step(state, data[2])
        last = fz.save_state(state, plan, ckpt)
        _, plan3, _, again = _make(2, seed=6)
        again = fz.load_state(again, plan3, ckpt)
        ok = all(torch.equal(a, b) for a, b in zip(_tensors(state), _tensors(again)))
        intact = all(torch.equal(first_params[k], reloaded[k]) for k in first_params)
        out.append((error, first, after_failure, intact, last, ck.latest_step(ckpt), ok, time.monotonic() - t0))
    return out


@pytest.mark.slow
def test_a_save_failing_on_one_rank_raises_on_every_rank_and_training_goes_on(tmp_path):
    """The data write failing on rank 1 or rank 0, or rank 0 failing to publish: every rank
    raises (none waits in a barrier), the previous step stays the latest and loads, and one more
    step and save then work, each scenario within 60 s."""
    results = run_world(_failing_save, 2, str(tmp_path), timeout=200)
    for rank, scenarios in enumerate(results):
        for (failing, where), (error, first, (entries, latest), intact, last, now, ok, seconds) in zip(FAILURES, scenarios):
            case = (rank, failing, where)
            assert error is not None and "No space left on device" in error, (case, error)  # on every rank
            assert latest == first and intact, case  # LATEST did not move; the previous step loads
            assert [e for e in entries if e.startswith("step-")] == [os.path.basename(first)], (case, entries)
            assert ok and last != first and now == last, case
            assert seconds < 60, (case, seconds)
            if rank != failing:
                assert f"failed on rank {failing}" in error and "previous checkpoint is intact" in error, error


# --- a killed save -------------------------------------------------------------------------

_KILLED = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {root!r})
    import funzero as fz
    import funzero._checkpoint as ck
    from tests.test_checkpoint import _make, _tensors
    from tests._models import batches, lm_loss
    ckpt, where = sys.argv[1], sys.argv[2]
    model, plan, tx, state = _make(3)
    step = fz.train_step(model, lm_loss, tx, plan)
    state, _ = step(state, batches(1)[0])
    fz.save_state(state, plan, ckpt)
    torch.save(_tensors(state), os.path.join(ckpt, "..", "first.pt"))
    state, _ = step(state, batches(2)[1])
    if where == "data":  # killed while DCP writes the pieces
        import torch.distributed.checkpoint.filesystem as fs
        real, calls = fs._write_item, [0]
        def dying(*a, **k):
            calls[0] += 1
            if calls[0] == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        fs._write_item = dying
    else:  # killed after DCP's metadata, before funzero's index and LATEST
        def dying(path, text):
            os.kill(os.getpid(), signal.SIGKILL)
        ck._write_atomic = dying
    fz.save_state(state, plan, ckpt)
    print("not killed")
""")


@pytest.mark.parametrize("where", ["data", "publish"])
def test_a_killed_save_leaves_the_previous_checkpoint_loadable(tmp_path, where):
    ckpt = str(tmp_path / "ckpt")
    script = tmp_path / "killed.py"
    script.write_text(_KILLED.format(root=ROOT))
    proc = subprocess.run([sys.executable, str(script), ckpt, where], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    steps = sorted(d for d in os.listdir(ckpt) if d.startswith("step-"))
    assert len(steps) == 2, steps  # the killed save left its directory behind
    killed = [d for d in steps if not os.path.exists(os.path.join(ckpt, d, "funzero.json"))]
    assert len(killed) == 1
    if where == "publish":
        assert os.path.exists(os.path.join(ckpt, killed[0], ".metadata"))  # DCP had finished
    _, plan, _, state = _make(3, seed=4)
    state = fz.load_state(state, plan, ckpt)
    first = torch.load(tmp_path / "first.pt")
    assert all(torch.equal(a, b) for a, b in zip(first, _tensors(state)))
    fz.save_state(state, plan, ckpt)  # the next save prunes what the killed one left
    assert killed[0] not in os.listdir(ckpt)


# --- asynchronous saves --------------------------------------------------------------------


def _async(rank, world, root):
    model, plan, tx, state = _make(3)
    step = fz.train_step(model, lm_loss, tx, plan)
    data = batches(4)
    state, _ = step(state, data[0])
    snapshot = _tensors(state)
    first = fz.save_state(state, plan, f"{root}/a", async_save=True)
    # The state changes at once (the step updates its buffers in place; and by hand).
    state, _ = step(state, data[1])
    with torch.no_grad():
        for t in state.params.values():
            t.mul_(-1.5)  # (padding stays 0: a checkpoint holds no padding)
    second_snapshot = _tensors(state)
    second = fz.save_state(state, plan, f"{root}/b", async_save=True)
    first_done = os.path.exists(os.path.join(first, "funzero.json"))  # the second save waited for it
    with torch.no_grad():
        for t in state.params.values():
            t.zero_()
    _, plan2, _, fresh = _make(3, seed=2)
    fresh = fz.load_state(fresh, plan2, f"{root}/b")  # waits for the second
    loaded_second = _tensors(fresh)
    fresh = fz.load_state(fresh, plan2, f"{root}/a")
    loaded_first = _tensors(fresh)
    return (all(torch.equal(a, b) for a, b in zip(snapshot, loaded_first)),
            all(torch.equal(a, b) for a, b in zip(second_snapshot, loaded_second)),
            first_done, fz._checkpoint.latest_step(f"{root}/b") == second)


@pytest.mark.slow
def test_async_save_snapshots_the_state_and_the_next_save_waits(tmp_path):
    for rank, (first_ok, second_ok, waited, latest_ok) in enumerate(run_world(_async, 2, str(tmp_path))):
        assert first_ok and second_ok and waited and latest_ok, rank


def test_async_save_on_one_process(tmp_path, monkeypatch):
    """One process, no process group: the background write still lands, and a failure in it is
    raised by the next call that waits."""
    import funzero._checkpoint as ck

    model, plan, tx, state = _make(1)
    snapshot = _tensors(state)
    fz.save_state(state, plan, str(tmp_path / "a"), async_save=True)
    for t in state.params.values():
        t.mul_(-1.5)  # (padding stays 0: a checkpoint holds no padding)
    fz.wait_saves()
    _, _, _, fresh = _make(1, seed=3)
    fresh = fz.load_state(fresh, plan, str(tmp_path / "a"))
    assert all(torch.equal(a, b) for a, b in zip(snapshot, _tensors(fresh)))

    def broken(path, text):
        raise OSError(5, "Input/output error", path)

    monkeypatch.setattr(ck, "_write_atomic", broken)
    fz.save_state(state, plan, str(tmp_path / "a"), async_save=True)  # fails in the background
    with pytest.raises(OSError, match="Input/output error"):
        fz.wait_saves()
    fz.wait_saves()  # reported once


def test_save_arguments_are_checked(tmp_path):
    _, plan, _, state = _make(0)
    with pytest.raises(ValueError, match="keep must be an int >= 1, got keep=0"):
        fz.save_state(state, plan, str(tmp_path), keep=0)


def test_keep_prunes_old_steps_and_the_index_records_every_piece(tmp_path):
    model, plan, tx, state = _make(2)
    step = fz.train_step(model, lm_loss, tx, plan)
    paths = []
    for b in batches(3):
        state, _ = step(state, b)
        paths.append(fz.save_state(state, plan, str(tmp_path), keep=2))
    steps = sorted(d for d in os.listdir(tmp_path) if d.startswith("step-"))
    assert steps == sorted(os.path.basename(p) for p in paths[1:])
    with open(os.path.join(paths[-1], "funzero.json")) as f:
        index = json.load(f)
    assert index["step"] == 3 and set(index["groups"]) == {"rest", "blocks.0", "blocks.1"}
    assert index["aliases"]["wte.weight"] == ["wte.weight", "lm_head.weight"]
    rec = index["entries"]["params.blocks.0.attn.c_attn.weight"]
    assert rec["shape"] == [72, 24] and rec["pieces"][0][:2] == [0, 72 * 24]  # one rank: one whole piece
