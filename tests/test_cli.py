"""The ``funzero`` command: estimates, plans, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from funzero import choose_stage, estimate_memory, gpt_activations
from funzero.cli import main
from funzero.models import gpt_config


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_estimate_by_count_prints_every_stage_and_offload(capsys):
    code, out, err = _run(capsys, "estimate", "--params", "70B", "--gpus", "8")
    assert code == 0 and err == ""
    assert "70,000,000,000 parameters; N = 8 ranks" in out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    # stage 0: none; 1, 2: none/cpu/nvme; 3: none/cpu/cpu+params/nvme/nvme+params
    assert len(rows) == 1 + 3 + 3 + 5
    first = [c.strip() for c in rows[0].strip("│").split("│")]
    assert first[:3] == ["0", "none", "1,120.0"]  # 16 bytes x 70B: the paper's baseline
    stage3 = [[c.strip() for c in r.strip("│").split("│")] for r in rows if r.strip("│").split("│")[0].strip() == "3"]
    assert {r[2] for r in stage3} == {"140.0"}  # 16Ψ/N, whatever the placement


def test_estimate_offload_filter_and_nodes(capsys):
    code, out, _ = _run(capsys, "estimate", "--params", "7B", "--gpus", "4", "--nodes", "2", "--offload", "cpu")
    assert code == 0
    assert "N = 8 ranks (4 GPUs x 2 nodes)" in out
    offloads = {[c.strip() for c in r.strip("│").split("│")][1] for r in out.splitlines() if r.startswith("│")}
    assert offloads == {"none", "cpu", "cpu+params"}


def test_estimate_a_real_model_with_activations(capsys, tmp_path):
    code, out, _ = _run(capsys, "estimate", "--model", "gpt2-xl", "--gpus", "4", "--batch", "8")
    assert code == 0
    # 1.56B: GPT-2 XL with the vocabulary padded to 50304 and the lm_head tied (counted once)
    assert "gpt2-xl (1,557,686,400 parameters)" in out
    assert "activations" in out
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 128, "block_size": 32}))
    code, out, _ = _run(capsys, "estimate", "--model", str(cfg), "--offload", "none")
    assert code == 0 and "tiny.json (" in out


def test_plan_picks_the_fastest_fit_and_says_why(capsys):
    code, out, err = _run(capsys, "plan", "--gpu-gb", "80", "--cpu-gb", "128", "--params", "13B", "--gpus", "4")
    assert code == 0 and err == ""
    assert "Choice: stage 3, offload none" in out
    assert "stage 2/none needs GPU" in out and "1.5x" in out
    code, out, _ = _run(capsys, "plan", "--gpu-gb", "80", "--params", "1B", "--gpus", "8")
    assert code == 0 and "Choice: stage 0, offload none" in out
    code, out, _ = _run(capsys, "plan", "--gpu-gb", "40", "--cpu-gb", "1000", "--params", "7B", "--gpus", "1")
    assert code == 0 and "Choice: stage 1, offload cpu" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["estimate", "--params", "7Q"], "'7Q'"),
        (["estimate", "--params", "0"], "'0'"),
        (["estimate", "--params", "7B", "--gpus", "zero"], "'zero'"),
        (["estimate", "--params", "7B", "--gpus", "0"], "'0'"),
        (["estimate", "--params", "7B", "--offload", "tape"], "'tape'"),
        (["estimate", "--model", "gpt5"], "'gpt5'"),
        (["estimate", "--model", "missing.json"], "'missing.json'"),
        (["estimate", "--params", "7B", "--batch", "8"], "--batch needs --model"),
        (["plan", "--gpu-gb", "-80", "--params", "7B"], "'-80'"),
        (["plan", "--gpu-gb", "80", "--reserve-gb", "90", "--params", "7B"], "'90'"),
        (["plan", "--params", "7B"], "--gpu-gb"),
        (["estimate"], "--params"),
        (["plan", "--gpu-gb", "80", "--params", "70B", "--gpus", "64", "--tp", "3"], "--tp 3 does not divide --gpus 64"),
        (["plan", "--gpu-gb", "80", "--params", "70B", "--gpus", "64", "--tp", "8", "--sp", "3"],
         "--sp 3 does not divide the 8 ranks left by --tp 8 of 64 GPUs"),
        (["plan", "--gpu-gb", "80", "--params", "70B", "--gpus", "64", "--tp", "8", "--replicate", "3"],
         "--replicate '3' does not divide the 8 ranks"),
        (["estimate", "--params", "7B", "--tp", "0"], "'0'"),
        (["estimate", "--model", "gpt2", "--gpus", "8", "--tp", "8"],
         "--tp 8: module 'blocks.0.attn': n_head = 12 does not divide over 8 tensor-parallel ranks"),
        (["estimate", "--model", "gpt2", "--gpus", "8", "--tp", "4", "--sp", "2"],
         "--sp 2: sp=2 does not divide the 3 attention heads per tensor-parallel rank (of 4)"),
        (["estimate", "--model", "gpt2", "--gpus", "4", "--sp", "4", "--batch", "2", "--seq", "1022"],
         "--sp 4 does not divide --seq 1022"),
    ],
)
def test_bad_input_is_one_line_naming_the_value(capsys, argv, needle):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and needle in err, err


def test_bad_config_file_names_the_field(capsys, tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"n_layers": 2}))
    code, _, err = _run(capsys, "estimate", "--model", str(cfg))
    assert code == 2 and "'n_layers'" in err and err.count("\n") == 1


def _cells(out: str) -> list[list[str]]:
    return [[c.strip() for c in r.strip("│").split("│")] for r in out.splitlines() if r.startswith("│")]


def test_plan_with_tp_splits_the_gpus_and_prints_per_gpu_model_states(capsys):
    """``--gpus 64 --tp 8``: dp = 8, and the planner picks the stage and replicas; what it prints
    is choose_stage's answer for the same layout."""
    code, out, err = _run(capsys, "plan", "--gpu-gb", "80", "--params", "70B", "--gpus", "64", "--tp", "8")
    assert code == 0 and err == ""
    assert "64 GPUs (64 GPUs x 1 node) = dp 8 x tp 8" in out
    want = choose_stage("70B", gpus=64, tp=8, gpu_bytes=80e9, reserve_bytes=8e9, gpus_per_node=64, precision="bf16")
    e = want.best.estimate
    assert (f"Choice: stage {e.stage}, offload {want.best.offload} on dp 8 x tp 8, each group sharded over "
            f"{e.num_shards} ranks x {e.num_replicas} replicas") in out
    assert f"Per GPU at the choice: model states {e.model_states['total'] / 1e9:,.2f} GB" in out
    rows = _cells(out)
    assert [r[2] for r in rows] == [f"{c.estimate.num_shards} x {c.num_replicas}" for c in want.candidates]
    code, out, _ = _run(capsys, "plan", "--gpu-gb", "80", "--params", "70B", "--gpus", "64", "--tp", "8",
                        "--replicate", "1")
    assert code == 0 and {r[2] for r in _cells(out)} == {"8 x 1"}


def test_estimate_with_tp_and_sp_counts_slices_and_activations(capsys):
    code, out, _ = _run(capsys, "estimate", "--params", "70B", "--gpus", "64", "--tp", "8", "--offload", "none")
    assert code == 0
    stage3 = estimate_memory("70B", stage=3, num_shards=8, tp=8, precision="bf16")
    assert [r[2] for r in _cells(out) if r[0] == "3"] == [f"{stage3.model_states['total'] / 1e9:,.2f}"]
    code, out, _ = _run(capsys, "estimate", "--model", "gpt2-medium", "--gpus", "8", "--tp", "2", "--sp", "2",
                        "--batch", "8", "--offload", "none")
    assert code == 0 and "= dp 2 x tp 2 x sp 2, ZeRO over dp x sp" in out
    acts = gpt_activations(gpt_config("gpt2-medium"), batch=8, tp=2, sp=2)
    assert {r[6] for r in _cells(out)} == {f"{acts.peak / 1e9:,.2f}"}


def test_tp_that_does_not_divide_a_dimension_names_the_leaf(capsys, tmp_path):
    cfg = tmp_path / "odd.json"
    cfg.write_text(json.dumps({"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 129, "block_size": 32}))
    code, out, err = _run(capsys, "estimate", "--model", str(cfg), "--gpus", "2", "--tp", "2")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--tp 2: leaf 'wte.weight' of shape (129, 64): dim 0 (129) does not divide over 2 ranks" in err


def test_impossible_budget_exits_nonzero_with_one_line(capsys):
    code, out, err = _run(capsys, "plan", "--gpu-gb", "8", "--cpu-gb", "16", "--params", "1T", "--gpus", "4")
    assert code == 1
    assert err.count("\n") == 1 and "no stage or offload fits 8 GB per GPU" in err
    assert "needs GPU" in out  # the table still shows what each candidate needs


def _console_script() -> list[str]:
    exe = pathlib.Path(sys.executable).with_name("funzero")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "funzero.cli"]


def test_the_installed_command_runs_in_a_fresh_process():
    """``python -m funzero.cli`` and the console script, started side by side (imports dominate)."""
    env = {**os.environ, "COLUMNS": "200"}
    good = [sys.executable, "-m", "funzero.cli", "estimate", "--params", "7B", "--gpus", "8", "--offload", "none"]
    bad = [*_console_script(), "plan", "--gpu-gb", "80", "--params", "7Q"]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in (good, bad)]
    (ok_out, ok_err), (bad_out, bad_err) = (p.communicate(timeout=120) for p in procs)
    assert procs[0].returncode == 0, ok_err
    assert "7,000,000,000 parameters" in ok_out
    assert procs[1].returncode == 2 and bad_out == ""
    assert bad_err.strip().splitlines() == [
        "funzero: error: --params: cannot parse '7Q' as a parameter count; write it like 70B, 1.5B, 350M or 7e9"
    ]
