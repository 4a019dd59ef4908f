"""Reproduce the ZeRO paper's memory numbers with funzero's memory model.

    python papers/zero/reproduce.py            # Table 1 and Figure 1, ours beside the paper's
    python papers/zero/reproduce.py --seed     # the 70B table of shared/seeds/000_*.txt, checked
    python papers/zero/reproduce.py --plot     # memory_vs_gpus.png next to this file

Source: S. Rajbhandari, J. Rasley, O. Ruwase, Y. He, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", SC20, arXiv:1910.02054. Table 1 ("per-device memory consumption of
different optimizations in ZeRO-DP as a function of DP degree") and Figure 1 (Ψ = 7.5B, N_d = 64,
K = 12). Their setting is mixed-precision Adam: fp16 parameters and gradients (2 + 2 bytes per
parameter) and K = 12 bytes of optimizer state (fp32 master, momentum, variance).

Our numbers come from ``funzero.estimate_memory`` (the engine's own layouts, one group,
``funzero.fp16()`` and ``adamw``, whose ``init`` gives the 12 bytes), ``model_states["total"]``.

Units and rounding, found by checking every cell: the paper's GB is 10^9 bytes (with 2^30 the
baseline would read 111.8, not 120). Cells printed with decimals are rounded half up (41.25 ->
41.3, 30.35 -> 30.4); cells printed as integers have their fraction dropped (513.5 -> 513,
4187.5 -> 4187, 2013.67 -> 2013).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal

import torch

from funzero import Precision, bf16, estimate_memory, fp16

HERE = pathlib.Path(__file__).resolve().parent

CITATION = "Rajbhandari et al., ZeRO, SC20 / arXiv:1910.02054"
MODELS = {"7.5B": 7_500_000_000, "128B": 128_000_000_000, "1T": 1_000_000_000_000}
DP_DEGREES = (1, 4, 16, 64, 256, 1024)
STAGES = {"P_os": 1, "P_os+g": 2, "P_os+g+p": 3}  # the paper's names -> ZeRO stage

# Table 1 of arXiv:1910.02054, as printed (GB); columns P_os, P_os+g, P_os+g+p.
TABLE1: dict[str, dict[int, tuple[str, str, str]]] = {
    "7.5B": {
        1: ("120", "120", "120"),
        4: ("52.5", "41.3", "30"),
        16: ("35.6", "21.6", "7.5"),
        64: ("31.4", "16.6", "1.88"),
        256: ("30.4", "15.4", "0.47"),
        1024: ("30.1", "15.1", "0.12"),
    },
    "128B": {
        1: ("2048", "2048", "2048"),
        4: ("896", "704", "512"),
        16: ("608", "368", "128"),
        64: ("536", "284", "32"),
        256: ("518", "263", "8"),
        1024: ("513", "257", "2"),
    },
    "1T": {
        1: ("16000", "16000", "16000"),
        4: ("7000", "5500", "4000"),
        16: ("4750", "2875", "1000"),
        64: ("4187", "2218", "250"),
        256: ("4046", "2054", "62.5"),
        1024: ("4011", "2013", "15.6"),
    },
}

# Figure 1 of arXiv:1910.02054: Ψ = 7.5B, N_d = 64, K = 12 (GB per device).
FIGURE1_PSI, FIGURE1_N = 7_500_000_000, 64
FIGURE1 = {"baseline": ("120", 0), "P_os": ("31.4", 1), "P_os+g": ("16.6", 2), "P_os+g+p": ("1.9", 3)}

# shared/seeds/000_*.txt: "Memory / GPU (70B)" per stage, 8 GPUs (stage 3 says "on 8 GPUs").
SEED_PSI, SEED_N = 70_000_000_000, 8
SEED_TABLE = {0: "560 GB", 1: "~400 GB", 2: "~200 GB", 3: "~10 GB on 8 GPUs"}


def model_states_bytes(num_params: int, stage: int, num_shards: int, precision: Precision | None = None) -> int:
    """Per-device model-state bytes as the paper counts them, from funzero's estimator."""
    est = estimate_memory(
        num_params, stage=stage, num_shards=num_shards, precision=precision or fp16(), tx="adamw", num_groups=1
    )
    return est.model_states["total"]


def convention(printed: str) -> str:
    """How the paper rounds a cell: ``round`` for cells with decimals, ``truncate`` for integers."""
    return "round" if "." in printed else "truncate"


def as_printed(value_bytes: int, printed: str, *, unit: int = 10**9) -> str:
    """``value_bytes`` in ``unit`` with as many decimals as ``printed``, by the paper's convention."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    q = Decimal(1).scaleb(-decimals)
    mode = ROUND_HALF_UP if convention(printed) == "round" else ROUND_DOWN
    return str((Decimal(value_bytes) / Decimal(unit)).quantize(q, rounding=mode))


def table1_rows(unit: int = 10**9) -> list[dict]:
    """Every Table 1 cell: model, N, column, the paper's text, ours (exact GB) and ours as printed."""
    rows = []
    for model, psi in MODELS.items():
        for n in DP_DEGREES:
            for (name, stage), printed in zip(STAGES.items(), TABLE1[model][n]):
                b = model_states_bytes(psi, stage, n)
                rows.append(dict(model=model, n=n, column=name, paper=printed, ours=b / unit,
                                 ours_printed=as_printed(b, printed, unit=unit)))
    return rows


def figure1_rows(unit: int = 10**9) -> list[dict]:
    rows = []
    for name, (printed, stage) in FIGURE1.items():
        b = model_states_bytes(FIGURE1_PSI, stage, FIGURE1_N)
        rows.append(dict(column=name, paper=printed, ours=b / unit, ours_printed=as_printed(b, printed, unit=unit)))
    return rows


def seed_rows() -> list[dict]:
    """The seed's 70B / 8-GPU table beside three accountings computed by the estimator."""
    rows = []
    pure_bf16 = Precision(torch.bfloat16)  # bf16 params, grads and Adam moments, no master: 8 B/param
    for stage, claim in SEED_TABLE.items():
        k12 = estimate_memory(SEED_PSI, stage=stage, num_shards=SEED_N, precision=bf16(), tx="adamw", num_groups=1)
        k4 = estimate_memory(SEED_PSI, stage=stage, num_shards=SEED_N, precision=pure_bf16, tx="adamw", num_groups=1)
        engine = estimate_memory(SEED_PSI, stage=stage, num_shards=SEED_N, precision=bf16(), tx="adamw")
        rows.append(dict(stage=stage, seed=claim, paper_k12=k12.model_states["total"] / 1e9,
                         pure_bf16=k4.model_states["total"] / 1e9, engine_gpu=engine.gpu / 1e9))
    return rows


def _print_table1() -> bool:
    ok = True
    print(f"Table 1 of {CITATION}: per-device model-state memory, GB (1e9 bytes)")
    print(f"{'model':>6} {'N_d':>5} | " + " | ".join(f"{c:^24}" for c in STAGES))
    print(f"{'':>6} {'':>5} | " + " | ".join(f"{'paper':>7} {'ours':>9} {'as pr.':>6}" for _ in STAGES))
    rows = table1_rows()
    for i in range(0, len(rows), 3):
        cells = rows[i : i + 3]
        line = f"{cells[0]['model']:>6} {cells[0]['n']:>5} | "
        parts = []
        for r in cells:
            mark = "" if r["ours_printed"] == r["paper"] else " !"
            ok &= not mark
            parts.append(f"{r['paper']:>7} {r['ours']:>9.3f} {r['ours_printed']:>6}{mark}")
        print(line + " | ".join(parts))
    print()
    print(f"Figure 1 (Ψ = 7.5B, N_d = {FIGURE1_N}, K = 12), GB")
    for r in figure1_rows():
        mark = "" if r["ours_printed"] == r["paper"] else " !"
        ok &= not mark
        print(f"  {r['column']:<9} paper {r['paper']:>5}   ours {r['ours']:8.4f} -> {r['ours_printed']}{mark}")
    print()
    print("every cell reproduced" if ok else "MISMATCH: cells marked ! differ")
    return ok


def _print_seed() -> None:
    print(f"Seed table (shared/seeds/000_*.txt), Ψ = 70B, {SEED_N} GPUs, per GPU, GB")
    print(f"{'stage':>5} | {'seed says':>16} | {'2+2+12 (paper)':>14} | {'2+2+4 (all bf16)':>16} | {'funzero GPU peak':>16}")
    for r in seed_rows():
        print(f"{r['stage']:>5} | {r['seed']:>16} | {r['paper_k12']:>14.1f} | {r['pure_bf16']:>16.1f} | {r['engine_gpu']:>16.1f}")


def plot(path: pathlib.Path = HERE / "memory_vs_gpus.png") -> pathlib.Path:
    """Model-state memory per GPU against GPUs, every stage, for 7.5B and 70B (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpus = [2**i for i in range(0, 11)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    labels = {0: "stage 0 (DDP)", 1: "stage 1 (P_os)", 2: "stage 2 (P_os+g)", 3: "stage 3 (P_os+g+p)"}
    for ax, (name, psi) in zip(axes, (("7.5B", 7_500_000_000), ("70B", 70_000_000_000))):
        for stage in (0, 1, 2, 3):
            ys = [model_states_bytes(psi, stage, n, bf16()) / 1e9 for n in gpus]
            ax.plot(gpus, ys, marker="o", ms=3, label=labels[stage])
        ax.axhline(80, color="k", ls="--", lw=1)
        ax.text(gpus[-1], 80 * 1.12, "80 GB (one H100)", fontsize=8, ha="right")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("GPUs (data-parallel ranks)")
        ax.set_title(f"Ψ = {name}, bf16 + Adam (2 + 2 + 12 bytes/param)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("model states per GPU (GB = 1e9 B)")
    axes[0].legend(fontsize=8)
    fig.suptitle("ZeRO model-state memory per GPU (funzero.estimate_memory; activations not included)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", action="store_true", help="check the seed's 70B table")
    p.add_argument("--plot", action="store_true", help=f"write {HERE / 'memory_vs_gpus.png'}")
    args = p.parse_args(argv)
    ok = _print_table1()
    if args.seed:
        print()
        _print_seed()
    if args.plot:
        print(f"\nwrote {plot()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
