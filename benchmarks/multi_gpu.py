"""Several GPUs of one host: funzero ZeRO-1/2/3 against DeepSpeed and FSDP2, side by side.

    torchrun --standalone --nproc-per-node=8 benchmarks/multi_gpu.py          # everything
    torchrun --standalone --nproc-per-node=2 benchmarks/multi_gpu.py --smoke  # CPU/gloo check of the script

Keep NVLink multicast off on the lent machines (NCCL_NVLS_ENABLE=0 is set below if unset).

1. Correctness on NCCL: a small fp32 GPT trained 5 AdamW steps at every stage 0-3 (global batch
   split over the ranks); the gathered parameters against a single-GPU PyTorch reference computed
   on every rank from the same global batch (TF32 off). Prints the worst relative error.
2. Throughput and memory: GPT-2 1.5B and a ~7B GPT-shaped model (32 layers x 4096; our GPT, not
   Llama's SwiGLU/RoPE), bf16, per-GPU micro-batch --batch, T=1024:
     fz{1,2,3}-compile   funzero stage k, whole step compiled; suffixes: -ovl inductor's overlap
                         scheduler (fails to compile on torch 2.11: the pass asserts on the
                         auto-functionalized adamw_ custom op), -bf16r gradients reduced in bf16
                         (DeepSpeed's default)
     ds-zero{1,2,3}      DeepSpeed (see train_step.py)
     fsdp2               torch.distributed.fsdp.fully_shard per block and on the root, each block
                         compiled (torchtitan's recipe), bf16 params / fp32 reduce, fused AdamW
   Columns: tokens/s per GPU, MFU (989 TFLOP/s bf16 peak per GPU), peak memory per GPU above what
   was allocated before the system was built, and for funzero the bytes each rank moves per step
   (its collective counter, read on one eager step) and the peak `funzero.estimate_memory` predicts.
3. A profiler trace of two fz2 and fz3 steps under $OUT (chrome trace, gzip): reduce-scatters
   should overlap backward compute.

DeepSpeed keeps GPU memory after its engine is dropped: run each ds-zero system in its own
process (``--systems ds-zero2 --no-correctness``) when memory is tight. ``--plot a.json b.json``
draws tokens/s per GPU from result files (no GPU, no process group).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import train_step as ts  # noqa: E402

import funzero as fz  # noqa: E402
from funzero.models import GPT, GPTConfig  # noqa: E402
from funzero import estimate_memory, gpt_activations  # noqa: E402
from shardspec import Mesh  # noqa: E402


def log(msg):
    if dist.get_rank() == 0:
        ts.log(msg)


def correctness(device, smoke: bool) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64 if smoke else 128, fused=False)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 256, (2 * world, cfg.block_size + 1), generator=g).to(device) for _ in range(5)]
    batches = [(d[:, :-1], d[:, 1:]) for d in data]
    ref = ts.make_model(cfg, device)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    for x, y in batches:
        opt.zero_grad()
        ref(x, y).backward()
        opt.step()
    want = {k: v.detach() for k, v in ref.named_parameters()}
    worst = {}
    for stage in (0, 1, 2, 3):
        model = ts.make_model(cfg, device)
        plan = fz.zero(stage, groups=[r"blocks\.(\d+)\."])
        tx = fz.optim.adamw(1e-3, weight_decay=0.1)
        state = fz.init(model, tx, plan)
        step = fz.train_step(model, lambda apply, b: apply(*b), tx, plan)
        for b in batches:
            state, _ = step(state, b)
        got = fz.gather_params(state, plan)
        rel = {k: ((got[k] - v).norm() / v.norm()).item() for k, v in want.items()}
        # Biases are reported apart: where a gradient is exactly zero in exact arithmetic (the key
        # part of c_attn.bias), Adam turns summation-order noise into full steps.
        worst[stage] = dict(weights=max(r for k, r in rel.items() if k.endswith("weight")), all=max(rel.values()))
    log(f"correctness (fp32, {world} ranks, vs one-GPU PyTorch): worst relative error per stage {worst}")
    return worst


def fsdp2_system(cfg, data, device):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = ts.make_model(GPTConfig(**{**cfg.__dict__, "fused": False}), device)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(block)
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=ts.LR, betas=ts.BETAS, eps=ts.EPS, weight_decay=ts.WD, fused=device.type == "cuda")

    def step(i):
        x, y = data[i]
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# inductor's overlap scheduler (GPU only): moves each collective's wait as late as its first use
# allows and issues collectives early, within a bound on the extra memory that holds alive.
OVERLAP = {"aten_distributed_optimizations.enable_overlap_scheduling": True}


def throughput(system, cfg, batch, args, device) -> dict:
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(1234 + rank)  # each rank its own micro-batch
    tokens = torch.randint(0, cfg.vocab_size, (args.steps, batch, args.seq + 1), generator=g).to(device)
    data = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    t_build = time.perf_counter()
    moved = predicted = None
    losses = []
    if system.startswith("fz"):
        stage = int(system[2])
        model = ts.make_model(cfg, device)
        plan = fz.zero(stage, groups=[r"blocks\.(\d+)\."], batch="local")
        tx = fz.optim.adamw(ts.LR, b1=ts.BETAS[0], b2=ts.BETAS[1], eps=ts.EPS, weight_decay=ts.WD)
        # -bf16r: gradients reduced in bf16, as DeepSpeed does by default (half the bytes; fp32 otherwise)
        reduce_dtype = torch.bfloat16 if "-bf16r" in system else torch.float32
        precision = fz.bf16(reduce_dtype=reduce_dtype) if device.type == "cuda" else fz.fp32()
        state = fz.init(model, tx, plan, precision=precision)
        acts = gpt_activations(cfg, batch=batch, seq=args.seq, dtype=precision.param_dtype)
        predicted = estimate_memory(model, plan=plan, precision=precision, tx=tx, activations=acts,
                                    compiled="compile" in system).gpu / 2**30
        eager = fz.train_step(model, lambda apply, b: apply(*b), tx, plan)
        fn = torch.compile(eager, options=OVERLAP if "-ovl" in system else None) if "compile" in system else eager
        box = {"state": state}

        def step(i, f=fn):
            box["state"], m = f(box["state"], data[i])
            return m["loss"]  # the mean over every rank's micro-batch

        with fz.count_comm() as c:  # counts eager steps only; the compiled one moves the same
            losses.append(step(0, eager))
        moved = c.total(tag="param", what="bytes") + c.total(tag="grad", what="bytes")
    elif system.startswith("ds-zero"):
        step = ts.deepspeed_system(cfg, data, device, int(system[-1]), batch)
    elif system == "fsdp2":
        step = fsdp2_system(cfg, data, device)
    else:
        raise ValueError(system)
    warm = args.steps - args.timed
    losses += [step(i) for i in range(len(losses), warm)]
    ts.sync(device)
    warm_s = time.perf_counter() - t_build
    t0 = time.perf_counter()
    for i in range(warm, args.steps):
        losses.append(step(i))
    ts.sync(device)
    dist.barrier()
    ms = (time.perf_counter() - t0) * 1e3 / args.timed
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else 0.0
    first_last = torch.stack([losses[0], losses[-1]]).float()
    if not system.startswith("fz"):  # the others report their own rank's loss: average them
        dist.all_reduce(first_last)
        first_last /= dist.get_world_size()
    if args.trace and system.startswith(("fz2-compile", "fz3-compile", "fsdp2")) and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(0)
            step(1)
            torch.cuda.synchronize()
        if rank == 0:
            kernels = ts.save_trace(prof, os.path.join(args.out, f"trace_{system}.json"), steps=2)
            log(f"{system} per step: GPU kernels {kernels['kernel_ms']:.1f} ms, collectives {kernels['comm_ms']:.1f} ms, "
                f"of which no compute overlaps {kernels['comm_not_overlapped_ms']:.1f} ms")
    with torch.device("meta"):
        flops = GPT(cfg).flops_per_token()
    tok = batch * args.seq / (ms / 1e3)
    peak_t = torch.tensor([peak], device=device)
    dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
    return dict(system=system, layers=cfg.n_layer, width=cfg.n_embd, world=dist.get_world_size(), batch_per_gpu=batch,
                ms=ms, tokens_per_s_per_gpu=tok, mfu=tok * flops / ts.PEAK_FLOPS, peak_gib_max=peak_t.item(),
                predicted_peak_gib=predicted, bytes_moved_per_step=moved, loss_first=first_last[0].item(),
                loss_last=first_last[1].item(),
                warm_s=warm_s)


def table(rows) -> str:
    head = (f"{'model':>5} {'system':>12} {'world':>5} {'ms/step':>8} {'tok/s/GPU':>10} {'MFU':>6} "
            f"{'peak GiB':>8} {'est GiB':>8} {'GB moved':>8} {'loss0':>7} {'lossN':>7} {'warm s':>7}")
    out = [head, "-" * len(head)]
    for r in rows:
        if "system" not in r:
            continue
        if "error" in r:
            out.append(f"{r.get('model', ''):>5} {r['system']:>12}  {r['error'][:90]}")
            continue
        est = f"{r['predicted_peak_gib']:8.2f}" if r.get("predicted_peak_gib") is not None else f"{'-':>8}"
        gb = f"{r['bytes_moved_per_step'] / 1e9:8.2f}" if r.get("bytes_moved_per_step") is not None else f"{'-':>8}"
        out.append(f"{r['model']:>5} {r['system']:>12} {r['world']:>5} {r['ms']:8.1f} {r['tokens_per_s_per_gpu']:10.0f} "
                   f"{r['mfu']:6.1%} {r['peak_gib_max']:8.2f} {est} {gb} {r.get('loss_first', float('nan')):7.3f} "
                   f"{r['loss_last']:7.3f} {r['warm_s']:7.0f}")
    return "\n".join(out)


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "tokens_per_s_per_gpu" in r]
    models = list(dict.fromkeys(r["model"] for r in ok))
    systems = list(dict.fromkeys(r["system"] for r in ok))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        got = {r["system"]: r for r in ok if r["model"] == m}
        names = [s for s in systems if s in got]
        bars = ax.bar(names, [got[s]["tokens_per_s_per_gpu"] for s in names],
                      color=["tab:blue" if s.startswith("fz") else "tab:gray" for s in names])
        ax.bar_label(bars, [f"{got[s]['mfu']:.0%}" for s in names], fontsize=8)
        first = got[names[0]]
        ax.set_title(f"{m}: {first['world']} GPUs, {first['batch_per_gpu']} sequences per GPU")
        ax.set_ylabel("tokens/s per GPU (label: MFU)")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default="fz1-compile,fz2-compile,fz3-compile,fsdp2,ds-zero1,ds-zero2,ds-zero3")
    p.add_argument("--models", default="1.5b,7b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--timed", type=int, default=6)
    p.add_argument("--trace", action="store_true", default=True)
    p.add_argument("--out", default=os.environ.get("OUT") or "runs")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--correctness", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--plot", nargs="+", metavar="JSON", help="draw multi_gpu.png from result files and exit")
    args = p.parse_args(argv)
    if args.plot:
        rows = [r for f in args.plot for r in json.load(open(f))]
        print(table(rows))
        plot(rows, os.path.join(args.out, "multi_gpu.png"))
        return
    mesh = Mesh.from_env(("dp",), device_type="cpu" if args.smoke else None)
    device = mesh.device
    os.makedirs(args.out, exist_ok=True)
    rows = [dict(correctness=correctness(device, args.smoke))] if args.correctness else []
    models = {"1.5b": ts.gpt_config("gpt2-xl", block_size=args.seq), "7b": GPTConfig(block_size=args.seq, n_layer=32, n_head=32, n_embd=4096)}
    if args.smoke:
        args.seq, args.steps, args.timed, args.batch = 32, 4, 2, 2
        models = {"tiny": GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=2, n_embd=64)}
    for m in args.models.split(",") if not args.smoke else ["tiny"]:
        for s in args.systems.split(","):
            log(f"{m} {s} ...")
            try:
                r = throughput(s, models[m], args.batch, args, device)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                r = dict(system=s, error=f"{type(e).__name__}: {e}")
            r["model"] = m
            ts.cleanup()
            rows.append(r)
            log(json.dumps(r))
            if dist.get_rank() == 0:
                with open(os.path.join(args.out, "multi_gpu.json"), "w") as f:
                    json.dump(rows, f, indent=1)
    log("\n" + table(rows))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
