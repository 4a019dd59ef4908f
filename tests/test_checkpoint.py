"""Checkpoints reshard across stages and world sizes; a failed save loses nothing."""

from __future__ import annotations

import os

import pytest
import torch

import funzero as fz
from funzero import optim
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt

DT = torch.float64


def _make(stage):
    model = tiny_gpt(dtype=DT)
    plan = fz.zero(stage, groups=GROUPS)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.warmup_cosine(1e-2, 2, 10), weight_decay=0.1))
    state = fz.init(model, tx, plan, precision=fz.Precision(DT))
    return model, plan, tx, state


def _save_then_continue(rank, world, stage, ckpt):
    model, plan, tx, state = _make(stage)
    step = fz.train_step(model, lm_loss, tx, plan)
    data = batches(5)
    for b in data[:3]:
        state, _ = step(state, b)
    fz.save_state(state, plan, ckpt)
    saved = fz.gather_params(state, plan)
    for b in data[3:]:
        state, _ = step(state, b)
    return saved, fz.gather_params(state, plan), int(state.step)


def _load_then_continue(rank, world, stage, ckpt):
    model, plan, tx, state = _make(stage)
    state = fz.load_state(state, plan, ckpt)
    loaded = fz.gather_params(state, plan)
    step = fz.train_step(model, lm_loss, tx, plan)
    for b in batches(5)[3:]:
        state, _ = step(state, b)
    return loaded, fz.gather_params(state, plan), int(state.step)


def test_save_at_stage3_on_2_ranks_resume_anywhere(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    saved, want, steps = run_world(_save_then_continue, 2, 3, ckpt)[0]
    assert steps == 5
    for world, stage in ((4, 1), (1, 0), (2, 2), (4, 3)):
        loaded, got, n = run_world(_load_then_continue, world, stage, ckpt)[0]
        assert n == 5, (world, stage)
        for k in saved:
            assert torch.equal(loaded[k], saved[k]), (world, stage, k)  # bit for bit after the load
            rel = ((got[k] - want[k]).norm() / want[k].norm()).item()
            assert rel < 1e-10, (world, stage, k, rel)  # and training resumes where it left off


def _failing_save(rank, world, ckpt):
    import funzero._checkpoint as ck

    model, plan, tx, state = _make(2)
    step = fz.train_step(model, lm_loss, tx, plan)
    state, _ = step(state, batches(1)[0])
    fz.save_state(state, plan, ckpt)
    first = fz.gather_params(state, plan)
    state, _ = step(state, batches(2)[1])
    real = ck.save_file
    if rank == 1:  # the disk fills up on one rank, mid-save
        def broken(tensors, filename, *a, **k):
            raise OSError(28, "No space left on device", filename)

        ck.save_file = broken
    error = None
    try:
        fz.save_state(state, plan, ckpt)
    except (OSError, RuntimeError) as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        ck.save_file = real
    model2, plan2, tx2, fresh = _make(2)
    fresh = fz.load_state(fresh, plan2, ckpt)
    return error, first, fz.gather_params(fresh, plan2), sorted(os.listdir(ckpt))


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    results = run_world(_failing_save, 2, ckpt)
    for rank, (error, first, reloaded, entries) in enumerate(results):
        assert error is not None, rank  # every rank learns the save failed
        for k in first:
            assert torch.equal(reloaded[k], first[k]), (rank, k)
        assert len([e for e in entries if e.startswith("step-")]) == 1 and "LATEST" in entries, entries
    assert "No space left on device" in results[1][0]
    assert "failed on another rank" in results[0][0]


def test_load_errors_name_the_problem(tmp_path):
    model, plan, tx, state = _make(0)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        fz.load_state(state, plan, str(tmp_path / "nothing"))
    fz.save_state(state, plan, str(tmp_path / "a"))
    other = fz.init(tiny_gpt(dtype=DT, n_embd=32), optim.sgd(0.1), fz.zero(0, groups=GROUPS), precision=fz.Precision(DT))
    with pytest.raises(ValueError, match="group 'rest' does not match"):
        fz.load_state(other, fz.zero(0, groups=GROUPS), str(tmp_path / "a"))
