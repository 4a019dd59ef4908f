"""DeepSpeed's learning-rate schedules as funzero schedules, checked against DeepSpeed itself."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from funzero import optim
from tests import _deepspeed_oracle as oracle

ORACLE = json.loads(oracle.PATH.read_text())
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _funzero_schedule(kind: str, params: dict, optimizer_lr: float):
    p = dict(params)
    if kind == "WarmupLR":
        p.setdefault("warmup_max_lr", optimizer_lr)
        return optim.warmup_lr(**p)
    total = p.pop("total_num_steps")
    if kind == "WarmupDecayLR":
        return optim.warmup_decay_lr(total, **p)
    return optim.warmup_cosine_lr(total, learning_rate=optimizer_lr, **p)


def _check_schedules(records):
    for rec in records:
        fn = _funzero_schedule(rec["type"], rec["params"], rec["optimizer_lr"])
        got = fn(torch.arange(len(rec["lr"])))  # one call on a tensor of counts: no Python branch on it
        assert got.dtype == torch.float32 and got.shape == (len(rec["lr"]),)
        for count, want in enumerate(rec["lr"]):
            assert float(got[count]) == pytest.approx(want, rel=2e-6, abs=1e-9), (rec["type"], rec["params"], count)
            assert float(fn(count)) == pytest.approx(want, rel=2e-6, abs=1e-9)  # a plain int count too


def test_schedules_match_deepspeed_update_for_update():
    """Recorded from DeepSpeed's scheduler classes as its engine drives them (the first update runs
    at the value set before the first scheduler step)."""
    assert ORACLE["deepspeed"].startswith("0.") and len(ORACLE["schedules"]) == len(oracle.SCHEDULES)
    _check_schedules(ORACLE["schedules"])
    if HAVE_DEEPSPEED:  # and live, against the installed DeepSpeed
        _check_schedules(oracle.deepspeed_schedules())


def test_schedules_compile_into_one_graph():
    fn = optim.warmup_cosine_lr(50, learning_rate=0.1, warmup_num_steps=10, warmup_type="linear")
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    counts = torch.arange(60)
    assert torch.equal(compiled(counts), fn(counts))


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match=r"warmup_num_steps must be a positive integer, got warmup_num_steps=0"):
        optim.warmup_lr(warmup_num_steps=0)
    with pytest.raises(ValueError, match=r"warmup_type must be 'log' or 'linear', got warmup_type='cosine'"):
        optim.warmup_decay_lr(10, warmup_type="cosine")
    with pytest.raises(ValueError, match=r"total_num_steps must be a non-negative integer, got total_num_steps=2.5"):
        optim.warmup_cosine_lr(2.5)
