"""Optimizer state on the host: funzero's placement against DeepSpeed ZeRO-Offload, one GPU.

    python benchmarks/offload.py                       # GPT-2 1.5B, B=8, T=1024, bf16
    python benchmarks/offload.py --largest              # also: a ~6B GPT, 10 steps, CPU offload
    python benchmarks/offload.py --nvme /local/scratch  # also: GPT-2 1.5B with NVMe-backed state
                                                       #   (--nvme-model gpt2-medium: 350M)

Same method as ``train_step.py`` (same model, data, optimizer hyperparameters; CUDA events around
the timed steps). Peers in this run:
  ds-zero2-offload   DeepSpeed ZeRO-2, ``offload_optimizer: {device: cpu, pin_memory: true}``,
                     its DeepSpeedCPUAdam (JIT-built here), bf16
  fz2-eager-offload  funzero stage 2, ``placement={"opt_state": "cpu"}``, eager step
  fz2-compile-offload  the same step under torch.compile
  ...-gpuK           leaf-path placement rules: the optimizer state of the embeddings and of
                     blocks 0..K-1 stays on the GPU (their gradients arrive last in backward),
                     the rest on the host (DeepSpeed's partial offload, "Offload++", as rules)
  ...-dpu            with ZeRO-Offload's one-step delayed parameter update (``delayed_update=True``;
                     changes the numerics, so its loss is not comparable step for step)
  ...-async          ``zero(..., async_update=True)``: the step returns while the host update
                     runs; the next forward waits for each group's new parameters as it reaches
                     the group (exact: the same numbers)
  ...-noguard        ``train_step(..., nonfinite="ignore")``: no inf/NaN check, so an eager
                     step's host update starts from inside backward, group by group (the default
                     check needs every gradient first; DeepSpeed's bf16 offload checks nothing)
  ...-ckK            activation checkpointing of blocks 0..K-1 (``GPTConfig(recompute=K)``): their
                     activations are recomputed in backward, GPU memory that -gpuK can spend on
                     optimizer state instead
  ...-cb             every transformer block compiled on its own (``block.compile()``; the step
                     stays eager, so gradients still stream during backward); ``ds-zero2-offload-cb``
                     is DeepSpeed on the same compiled blocks
  --adam             host AdamW alone, Gparam/s: DeepSpeedCPUAdam (fp32 grads), torch fused
                     (``torch.optim.AdamW(fused=True)``, fp32 grads), funzero's host kernel (bf16
                     grads in, bf16 params out)
Peak memory is GPU memory (``max_memory_allocated`` above what earlier systems in the process left
allocated); host memory is read from /proc (RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
import train_step as ts  # noqa: E402

import funzero as fz  # noqa: E402
from funzero.models import GPTConfig  # noqa: E402


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def gpu_share(k: int) -> list[tuple[str, str]]:
    """Leaf-path rules: the optimizer state of blocks 0..k-1 and of the embeddings/final norm stays
    on the GPU, the other blocks' goes to the host. Backward produces those groups' gradients
    last, so their (fast) device update shortens the tail the host would otherwise add."""
    rules = [(r"^blocks\.(" + "|".join(map(str, range(k))) + r")\.", "device")] if k else []
    return rules + [(r"^blocks\.", "cpu"), ("", "device")]


def run(system, cfg, batch, args, device, placement=None):
    # What earlier systems left allocated (DeepSpeed keeps some after its engine is dropped) is
    # not this system's: peaks are counted above it.
    base = torch.cuda.memory_allocated()
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, cfg.vocab_size, (args.steps, batch, args.seq + 1), generator=g).to(device)
    data = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    cb = "-cb" in system
    ck = re.search(r"-ck(\d+)", system)
    if ck:
        cfg = GPTConfig(**{**cfg.__dict__, "recompute": int(ck.group(1))})
    if system.startswith("ds-zero2-offload"):
        step = ts.deepspeed_system(cfg, data, device, 2, batch, offload=True, compile_blocks=cb)
    else:
        stage = int(system[2])
        placement = placement or {"opt_state": "cpu"}
        share = re.search(r"-gpu(\d+)", system)
        if share:
            placement = {"opt_state": gpu_share(int(share.group(1)))}
        step = ts.funzero_system(cfg, data, device, stage, compiled="compile" in system,
                                 placement=placement, delayed_update="-dpu" in system, compile_blocks=cb,
                                 async_update="-async" in system,
                                 nonfinite="ignore" if "-noguard" in system else "skip")
    losses = []
    warm = args.steps - args.timed
    for i in range(warm):
        losses.append(step(i))
    torch.cuda.synchronize()
    t_warm = time.perf_counter() - t0
    def worker_s(k: str) -> float:
        box = getattr(step, "box", None)  # funzero systems: their live state (DeepSpeed has none)
        return fz.testing.host_stats(box["state"])[k] if box is not None else 0.0

    before = {k: worker_s(k) for k in ("update_s", "forward_wait_s")}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(warm, args.steps):
        losses.append(step(i))
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / args.timed
    # funzero's host worker: ms per step updating groups, and ms per step the next forward waited
    host = {f"host_{k[:-2]}_ms": (worker_s(k) - before[k]) * 1e3 / args.timed for k in before}
    n = sum(p.numel() for p in ts.GPT(cfg).parameters()) if cfg.n_layer <= 48 and cfg.n_embd <= 1600 else None
    return dict(
        system=system, layers=cfg.n_layer, width=cfg.n_embd, params=n, batch=batch, seq=args.seq, ms=ms,
        tokens_per_s=batch * args.seq / (ms / 1e3), peak_gib=(torch.cuda.max_memory_allocated() - base) / 2**30,
        left_by_earlier_gib=base / 2**30,
        host_rss_gib=rss_gib(), loss_first=float(losses[0]), loss_last=float(losses[-1]), warmup_s=t_warm,
        finite=all(torch.isfinite(torch.as_tensor(float(x))) for x in losses), **host,
    )


def host_adam(n: int, reps: int = 5) -> list[dict]:
    """Host AdamW over ``n`` fp32 params: DeepSpeedCPUAdam vs torch fused vs each of funzero's kernel
    variants (rows ``funzero[variant,threads=N]``)."""
    import statistics

    from funzero import ops

    hp = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    rows = []

    def timed(name, threads, fn):
        fn()  # warm: page faults, builds
        ts_ = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts_.append(time.perf_counter() - t0)
        ms = statistics.median(ts_) * 1e3
        rows.append(dict(system=name, threads=threads, n=n, ms=ms, gparams_per_s=n / ms / 1e6))
        ts.log(json.dumps(rows[-1]))

    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n, generator=g) * 0.02)
    p.grad = torch.randn(n, generator=g) * 1e-3
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam([p], adamw_mode=True, **hp)
        timed("deepspeed-cpuadam (fp32 grad)", threads, opt.step)
        del opt
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rows.append(dict(system="deepspeed-cpuadam (fp32 grad)", error=f"{type(e).__name__}: {e}"))
    opt = torch.optim.AdamW([p], fused=True, **hp)
    timed("torch fused (fp32 grad)", threads, opt.step)
    del opt
    master, mu, nu = p.detach().clone(), torch.zeros(n), torch.zeros(n)
    grad, out = p.grad.to(torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    step = [0]

    def fz_step():
        step[0] += 1
        ops.adamw_(master, grad, mu, nu, out, lr=hp["lr"], step=step[0], beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)

    # every kernel variant (bit-identical, different memory access) at all cores, all but one, and
    # torch's thread count (physical cores where torch counts those)
    from funzero.ops import _cpu_adamw

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    info = dict(default_variant=_cpu_adamw.DEFAULT_VARIANT, nt_bytes=_cpu_adamw.nt_bytes(), cpus=cpus,
                torch_threads=threads)
    ts.log(f"funzero host kernel (bf16 grad, bf16 out): {json.dumps(info)}")
    for variant in _cpu_adamw.VARIANTS:
        for t in sorted({cpus, max(1, cpus - 1), threads}, reverse=True):
            with ops.host_threads(t), _cpu_adamw.host_variant(variant):
                timed(f"funzero[{variant},threads={t}]", t, fz_step)
            rows[-1].update(info, variant=variant)
    return rows


def plot(rows: list[dict], path: str) -> None:
    """Bar chart of tokens/s per system, GPU peak memory annotated (skipped without matplotlib)."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [r["system"] for r in ok]
    bars = ax.barh(names, [r["tokens_per_s"] for r in ok], color=["#888" if n.startswith("ds") else "#2a6" for n in names])
    for b, r in zip(bars, ok):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {r['tokens_per_s']:,.0f} tok/s, {r['peak_gib']:.1f} GiB",
                va="center", fontsize=8)
    ax.set_xlabel("tokens/s (higher is better)")
    ax.set_title(f"optimizer state on the host, {ok[0]['params'] / 1e9:.2f}B params, B={ok[0]['batch']}", fontsize=9)
    ax.set_xlim(0, max(r["tokens_per_s"] for r in ok) * 1.45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default="fz2-compile-offload,fz2-compile-offload-dpu,fz2-eager-offload,fz2-eager-offload-noguard,ds-zero2-offload")
    p.add_argument("--adam", type=float, default=0, help="also time host AdamW alone over this many million params")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--timed", type=int, default=6)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--largest", action="store_true", help="also train a ~6B GPT for 10 steps with CPU offload")
    p.add_argument("--largest-layers", type=int, default=29)
    p.add_argument("--largest-system", default="fz2-eager-offload", help="the funzero system of the --largest run")
    p.add_argument("--nvme", default="", help="directory for an NVMe-offload run")
    p.add_argument("--nvme-model", default="gpt2-xl", help="GPT-2 preset of the NVMe run (gpt2-medium: 350M)")
    p.add_argument("--nvme-batch", type=int, default=8)
    p.add_argument("--nvme-shape", default="", help="LAYERS,WIDTH of a GPT for the NVMe run instead of --nvme-model")
    p.add_argument("--nvme-steps", type=int, default=4, help="steps of the NVMe run (half of them timed)")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    os.makedirs(args.out, exist_ok=True)
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29534", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():
        os.environ.setdefault(k, v)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl")
    cfg = ts.gpt_config("gpt2-xl", block_size=args.seq)
    rows = []

    def record(r):
        rows.append(r)
        ts.log(json.dumps(r))
        with open(os.path.join(args.out, "offload.json"), "w") as f:
            json.dump(rows, f, indent=1)

    adam_rows = []
    if args.adam:  # first: it also builds DeepSpeed's CPUAdam that ds-zero2-offload uses
        adam_rows = host_adam(int(args.adam * 1e6))
        with open(os.path.join(args.out, "offload_adam.json"), "w") as f:
            json.dump(adam_rows, f, indent=1)
        ts.cleanup()
    jobs = [(s, cfg, args.batch, None) for s in args.systems.split(",") if s]
    if args.nvme:
        nv = ts.gpt_config(args.nvme_model, block_size=args.seq)
        if args.nvme_shape:
            layers, width = map(int, args.nvme_shape.split(","))
            nv = GPTConfig(block_size=args.seq, n_layer=layers, n_head=width // 128, n_embd=width)
        jobs.append(("fz2-eager-nvme", nv, args.nvme_batch, {"opt_state": f"nvme:{args.nvme}"}))
    if args.largest:
        big = GPTConfig(block_size=args.seq, n_layer=args.largest_layers, n_head=32, n_embd=4096)
        jobs.append((f"{args.largest_system}-largest", big, 4, {"opt_state": "cpu"}))
    for system, c, batch, placement in jobs:
        ts.log(f"{system} ...")
        a = argparse.Namespace(**vars(args))
        if "largest" in system or "nvme" in system:
            a.steps, a.timed = (10, 5) if "largest" in system else (args.nvme_steps, args.nvme_steps // 2)
        try:
            r = run(system.replace("-largest", "").replace("-nvme", ""), c, batch, a, device, placement)
            r["system"] = system
            if r["params"] is None:
                r["params"] = 12 * c.n_layer * c.n_embd**2 + (c.vocab_size + c.block_size) * c.n_embd + 13 * c.n_layer * c.n_embd
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            r = dict(system=system, error=f"{type(e).__name__}: {e}")
        ts.cleanup()
        record(r)
    if adam_rows:
        print(f"{'host AdamW':>42} {'threads':>8} {'ms':>8} {'Gparam/s':>9}")
        for r in adam_rows:
            if "error" in r:
                print(f"{r['system']:>42}  ERROR {r['error'][:80]}")
            else:
                print(f"{r['system']:>42} {r['threads']:>8} {r['ms']:8.1f} {r['gparams_per_s']:9.2f}")
    plot(rows, os.path.join(args.out, "offload.png"))
    head = (f"{'system':>26} {'params':>8} {'ms/step':>9} {'tok/s':>8} {'GPU GiB':>8} {'host GiB':>9} {'loss0':>7} "
            f"{'lossN':>7} {'host upd ms':>11} {'fwd wait ms':>11}")
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['system']:>26}  ERROR {r['error'][:90]}")
        else:
            print(f"{r['system']:>26} {r['params'] / 1e9:7.2f}B {r['ms']:9.1f} {r['tokens_per_s']:8.0f} {r['peak_gib']:8.2f} {r['host_rss_gib']:9.1f} {r['loss_first']:7.3f} {r['loss_last']:7.3f} {r.get('host_update_ms', 0):11.1f} {r.get('host_forward_wait_ms', 0):11.1f}")


if __name__ == "__main__":
    main()
