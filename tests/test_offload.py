"""Offload as placement: state leaves live where the plan says, and training is unchanged."""

from __future__ import annotations

import os

import optree
import pytest
import torch

import funzero as fz
from funzero import optim
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt

CASES = [  # (stage, placement) for every stage where the offload makes sense
    (1, {"opt_state": "cpu"}),
    (2, {"opt_state": "cpu"}),
    (3, {"opt_state": "cpu"}),
    (3, {"opt_state": "cpu", "params": "cpu"}),
    (1, {"opt_state": "nvme"}),
    (2, {"opt_state": "nvme"}),
    (3, {"opt_state": "nvme", "params": "cpu"}),
    (3, {"opt_state": "nvme", "params": "nvme"}),
]


def _leaves(tree):
    return [t for t in optree.tree_leaves(tree, namespace="funzero") if isinstance(t, torch.Tensor)]


def _check_placed(state, placement) -> list[str]:
    """Names of leaves that are not where the placement says."""
    pl = state.binding.placement
    bad = []
    for key, parts in (("params", [state.params]), ("opt_state", [state.master, state.opt_state])):
        for part in parts:
            for t in _leaves(part):
                if not pl.on_target(key, t):
                    bad.append(f"{key}: {tuple(t.shape)} on {t.device} file={fz._placement.NvmeStore.filename(t)}")
    return bad


def _train(rank, world, tmpdir, cases, steps):
    out = {}
    for i, (stage, placement) in enumerate(cases):
        placement = {k: (f"nvme:{tmpdir}/r{rank}c{i}" if v == "nvme" else v) for k, v in placement.items()}
        runs = {}
        for name, pl in (("default", {}), ("placed", placement)):
            model = tiny_gpt()
            plan = fz.zero(stage, groups=GROUPS, placement=pl)
            tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1, mask=r"weight$"))
            state = fz.init(model, tx, plan, precision=fz.bf16())
            step = fz.train_step(model, lm_loss, tx, plan)
            misplaced = [_check_placed(state, pl)]
            for b in batches(steps):
                state, _ = step(state, b)
                misplaced.append(_check_placed(state, pl))
            files = []
            if pl and state.binding.placement.store is not None:
                state.binding.placement.store.flush()
                d = state.binding.placement.store.dir
                files = sorted(os.listdir(d))
            runs[name] = (fz.gather_params(state, plan), misplaced, files, [t.clone() for t in _leaves(state.params)])
        out[(stage, str(placement))] = runs
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_offloaded_state_trains_bit_identically_and_stays_placed(world, tmp_path):
    res = run_world(_train, world, str(tmp_path), CASES, 3)[0]
    assert len(res) == len(CASES)
    for key, runs in res.items():
        want, _, _, want_params = runs["default"]
        got, misplaced, files, got_params = runs["placed"]
        assert all(not m for m in misplaced), (key, misplaced)
        for k in want:
            assert torch.equal(got[k], want[k]), (key, k)
        assert all(torch.equal(a, b) for a, b in zip(got_params, want_params)), key
        if "nvme" in key[1]:
            assert files and not any(f.endswith(".tmp") for f in files), (key, files)  # renamed, none left over


def test_bad_placements_fail_at_plan_or_init_with_the_value(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="opt_state='cpu' needs ZeRO stage >= 1"):
        fz.zero(0, placement={"opt_state": "cpu"})
    with pytest.raises(ValueError, match="params='cpu' needs ZeRO stage 3"):
        fz.zero(2, placement={"params": "cpu"})
    with pytest.raises(ValueError, match="'gpu' is not one of"):
        fz.zero(2, placement={"opt_state": "gpu"})
    with pytest.raises(ValueError, match="placement key 'grads'"):
        fz.zero(2, placement={"grads": "cpu"})
    with pytest.raises(ValueError, match="nvme needs a directory"):
        fz.zero(2, placement={"opt_state": "nvme:"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' but the mesh computes on cpu"):
            fz.init(tiny_gpt(), optim.sgd(0.1), fz.zero(2, placement={"opt_state": "cuda"}))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # running as root: a file where a directory should be instead
        ro = tmp_path / "file"
        ro.write_text("x")
    with pytest.raises(ValueError, match=f"nvme directory '{ro}' is not writable"):
        fz.init(tiny_gpt(), optim.adamw(1e-3), fz.zero(2, placement={"opt_state": f"nvme:{ro}"}))
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    with pytest.raises(ValueError, match=r"has 0.00 GiB free; the state needs"):
        fz.init(tiny_gpt(), optim.adamw(1e-3), fz.zero(2, placement={"opt_state": f"nvme:{tmp_path}/ok"}))
