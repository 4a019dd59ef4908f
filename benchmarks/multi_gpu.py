"""Several GPUs of one host: funzero ZeRO-1/2/3 against DeepSpeed and FSDP2, side by side; and,
with ``--model``, funzero's second mesh axes (tensor, sequence, replicate x shard) on a Hugging Face
Llama against FSDP2 + tensor parallelism and DeepSpeed AutoTP / Ulysses.

    torchrun --standalone --nproc-per-node=8 benchmarks/multi_gpu.py          # the GPT systems
    torchrun --standalone --nproc-per-node=8 benchmarks/multi_gpu.py --model 8b --systems fz3-compile,fz3-compile-tp2,fsdp2-tp2
    torchrun --standalone --nproc-per-node=2 benchmarks/multi_gpu.py --smoke  # CPU/gloo check of the script
    torchrun --standalone --nproc-per-node=4 benchmarks/multi_gpu.py --smoke --model tiny --systems fz3-eager,fz3-eager-tp2,fsdp2-tp2

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
4. ``--model tiny|1b|8b``: the Llama systems of ``llama_parallel.py`` instead of 1-3 (names, method
   and peers in its docstring): fz{k}-{eager,compile}[-tpN|-spN|-hsdpN], fsdp2[-tpN|-hsdpN],
   ds-zero{k}[-autotpN|-spN]. Every system trains the same meta-built Llama from the same initial
   values on the same global batches (``--batch`` sequences per GPU times the world). Columns:
   tokens/s per GPU, MFU, step time, peak GPU memory during the steps and while building, bytes
   funzero moves a step, the first and last losses, and the last loss against the reference's (the
   first plain-dp funzero row): a peer set up wrongly shows there. ``multi_gpu.json`` and
   ``multi_gpu_llama.png`` under ``--out``.

DeepSpeed keeps GPU memory after its engine is dropped: run each ds-zero system in its own
process (``--systems ds-zero2 --no-correctness``) when memory is tight. ``--plot a.json b.json``
merges result files (the loss column across them), prints the tables and draws the charts (no
GPU, no process group).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import traceback

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import llama_parallel as lp  # noqa: E402
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


def run_steps(step, losses: list, args, device, t_build: float) -> tuple[float, float]:
    """Steps ``len(losses)..--steps`` of ``step(i)``, appending each loss; returns the mean ms of
    the last ``--timed`` (wall clock between two synchronizes, ranks aligned by a barrier) and the
    seconds from ``t_build`` to the end of the warm-up steps."""
    warm = args.steps - args.timed
    losses += [step(i) for i in range(len(losses), warm)]
    ts.sync(device)
    warm_s = time.perf_counter() - t_build
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(warm, args.steps):
        losses.append(step(i))
    ts.sync(device)
    dist.barrier()
    return (time.perf_counter() - t0) * 1e3 / args.timed, warm_s


def throughput(system, cfg, batch, args, device) -> dict:
    if re.search(r"-(tp|sp|hsdp|autotp)\d+$", system):
        raise ValueError(f"{system!r} is a Llama system: give --model (tiny, 1b or 8b)")
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
    ms, warm_s = run_steps(step, losses, args, device, t_build)
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


def llama_throughput(system: str, args, device) -> dict:
    """One Llama system (``llama_parallel``) on ``--model``: the row. Every system trains on the
    same global batches; losses are means over the global batch (averaged over ranks where a system
    reports its own rank's); peak memory is the largest ``max_memory_allocated`` over ranks during
    the steps, above what was allocated before the system was built, and ``build_gib_max`` the same
    while it was built (a whole model on each rank, for DeepSpeed)."""
    spec = lp.parse(system)
    world = dist.get_world_size()
    row = dict(system=system, family="llama", model=args.model, layout=spec.layout_label(world), world=world,
               global_batch=args.batch * world, batch_per_gpu=args.batch, seq=args.seq, steps=args.steps)
    if spec.family == "ds" and (why := lp.deepspeed_unavailable()):
        log(f"{system}: skipped: {why}")
        return {**row, "status": f"skipped: {why}"}
    config = lp.llama_config(args.model, args.seq)
    g = torch.Generator().manual_seed(1234)  # the same global batches on every rank
    batches = [t.to(device) for t in torch.randint(0, config.vocab_size, (args.steps, args.batch * world, args.seq), generator=g)]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    t_build = time.perf_counter()
    step, notes = lp.build(spec, config, batches, device)
    losses, moved = [], None
    if cuda:
        torch.cuda.synchronize()
        build_peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        torch.cuda.reset_peak_memory_stats()
    if spec.family == "fz":
        with fz.count_comm() as c:  # one eager step: a Python-side count, not traced under compile
            losses.append(step.eager(0))
        moved = c.total(what="bytes")
    try:
        ms, warm_s = run_steps(step, losses, args, device, t_build)
    finally:
        getattr(step, "close", lambda: None)()  # a system that patched something process-wide
    all_losses = torch.stack(losses).float()
    if spec.family != "fz":  # the peers report their own rank's mean: average over the ranks
        dist.all_reduce(all_losses)
        all_losses /= world
    memory = torch.tensor([(torch.cuda.max_memory_allocated() - base) / 2**30, build_peak] if cuda else [0.0, 0.0],
                          device=device)
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    tok = args.batch * args.seq / (ms / 1e3)
    losses = all_losses.tolist()
    return {**row, "status": "ok", "ms": ms, "tokens_per_s_per_gpu": tok,
            "mfu": tok * lp.flops_per_token(config, args.seq) / ts.PEAK_FLOPS, "peak_gib_max": memory[0].item(),
            "build_gib_max": memory[1].item(), "bytes_moved_per_step": moved, "loss_first": losses[0],
            "loss_last": losses[-1], "losses": losses, "finite": all(math.isfinite(v) for v in losses),
            "warm_s": warm_s, "notes": notes}


def llama_table(rows) -> str:
    """The Llama rows: speed, memory and the loss after the last step against the reference's."""
    rows = [r for r in rows if r.get("family") == "llama"]
    refs = sorted({r["ref_system"] for r in rows if "ref_system" in r})
    head = (f"{'model':>5} {'system':>18} {'layout':>14} {'ms/step':>8} {'tok/s/GPU':>10} {'MFU':>6} {'peak GiB':>8} "
            f"{'build GiB':>9} {'GB moved':>8} {'loss0':>8} {'lossN':>8} {'vs ref':>9} {'warm s':>6}")
    out = [f"loss reference: {', '.join(refs) or 'none (no funzero row)'}", head, "-" * len(head)]
    for r in rows:
        lead = f"{r['model']:>5} {r['system']:>18} {r['layout']:>14}"
        if r.get("status") != "ok":
            out.append(f"{lead}  {r.get('status') or r.get('error', '')}"[:200])
            continue
        gb = f"{r['bytes_moved_per_step'] / 1e9:8.3f}" if r.get("bytes_moved_per_step") is not None else f"{'-':>8}"
        vs = f"{r['loss_vs_ref']:+9.1e}" if "loss_vs_ref" in r else f"{'-':>9}"
        out.append(f"{lead} {r['ms']:8.1f} {r['tokens_per_s_per_gpu']:10.0f} {r['mfu']:6.1%} {r['peak_gib_max']:8.2f} "
                   f"{r['build_gib_max']:9.2f} {gb} {r['loss_first']:8.4f} {r['loss_last']:8.4f} {vs} {r['warm_s']:6.0f}")
    return "\n".join(out)


def table(rows) -> str:
    head = (f"{'model':>5} {'system':>12} {'world':>5} {'ms/step':>8} {'tok/s/GPU':>10} {'MFU':>6} "
            f"{'peak GiB':>8} {'est GiB':>8} {'GB moved':>8} {'loss0':>7} {'lossN':>7} {'warm s':>7}")
    out = [head, "-" * len(head)]
    for r in rows:
        if "system" not in r or r.get("family") == "llama":
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

    ok = [r for r in rows if "tokens_per_s_per_gpu" in r and r.get("family") != "llama"]
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


def llama_plot(rows, path: str) -> None:
    """Per Llama model: tokens/s per GPU, peak GiB per GPU and the last loss against the
    reference's, a bar per system (funzero blue, peers grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("family") == "llama" and r.get("status") == "ok"]
    models = list(dict.fromkeys(r["model"] for r in ok))
    fig, axes = plt.subplots(len(models), 3, figsize=(15, 0.4 * max(len(ok), 8) + 1.5), squeeze=False)
    for row_axes, m in zip(axes, models):
        rs = [r for r in ok if r["model"] == m]
        names = [f"{r['system']} ({r['layout']})" for r in rs]
        colors = ["tab:blue" if r["system"].startswith("fz") else "tab:gray" for r in rs]
        for ax, key, label in zip(row_axes, ("tokens_per_s_per_gpu", "peak_gib_max", "loss_vs_ref"),
                                  ("tokens/s per GPU", "peak GiB per GPU (steps)", "last loss / reference's - 1")):
            ax.barh(names, [r.get(key) or 0.0 for r in rs], color=colors)
            ax.set_xlabel(label)
            ax.invert_yaxis()
            if key != "tokens_per_s_per_gpu":
                ax.set_yticklabels([])
        r0 = rs[0]
        row_axes[0].set_title(f"Llama {m}: {r0['world']} ranks, global batch {r0['global_batch']} x {r0['seq']} tokens")
        row_axes[2].set_title(f"reference: {r0.get('ref_system', 'none')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def charts(rows, out: str) -> None:
    """multi_gpu.png (GPT rows) and multi_gpu_llama.png (Llama rows), where there are such rows."""
    for name, draw, has in (("multi_gpu.png", plot, lambda r: "tokens_per_s_per_gpu" in r and r.get("family") != "llama"),
                            ("multi_gpu_llama.png", llama_plot, lambda r: r.get("family") == "llama" and r.get("status") == "ok")):
        if any(map(has, rows)):
            try:
                draw(rows, os.path.join(out, name))
            except Exception as e:  # noqa: BLE001 - the JSON is the result; a missing chart is said
                print(f"{name} not drawn: {type(e).__name__}: {e}", flush=True)


LLAMA_SYSTEMS = "fz3-compile,fz3-compile-tp2,fz3-compile-sp2,fz3-compile-hsdp2,fsdp2,fsdp2-tp2,fsdp2-hsdp2,ds-zero1-autotp2"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=None, help="comma list (default: every GPT system; with --model, "
                   f"{LLAMA_SYSTEMS})")
    p.add_argument("--models", default="1.5b,7b", help="the GPT models (without --model)")
    p.add_argument("--model", choices=sorted(lp.MODELS), help="a Llama shape: run the Llama systems on it "
                   "(llama_parallel.py) instead of the GPT models")
    p.add_argument("--batch", type=int, default=None, help="sequences per GPU (GPT: 8; Llama: the model's, "
                   "times the world is the global batch)")
    p.add_argument("--seq", type=int, default=None, help="tokens a sequence (GPT: 1024; Llama: the model's)")
    p.add_argument("--steps", type=int, default=None, help="12 (smoke: 4)")
    p.add_argument("--timed", type=int, default=None, help="the last steps timed: 6 (smoke: 2)")
    p.add_argument("--trace", action="store_true", default=True)
    p.add_argument("--out", default=os.environ.get("OUT") or "runs", help="results directory")
    p.add_argument("--smoke", action="store_true", help="the CPU (gloo) with the tiny GPT, or with --model tiny")
    p.add_argument("--correctness", action=argparse.BooleanOptionalAction, default=None,
                   help="the GPT's fp32 check of every stage (default: on without --model)")
    p.add_argument("--plot", nargs="+", metavar="JSON", help="draw multi_gpu.png from result files and exit")
    args = p.parse_args(argv)
    if args.plot:
        rows = [r for f in args.plot for r in json.load(open(f))]
        os.makedirs(args.out, exist_ok=True)
        lp.agreement(rows)
        if any(r.get("family") != "llama" and "system" in r for r in rows):
            print(table(rows))
        if any(r.get("family") == "llama" for r in rows):
            print(llama_table(rows))
        charts(rows, args.out)
        with open(os.path.join(args.out, "multi_gpu.json"), "w") as f:
            json.dump(rows, f, indent=1)
        return
    if args.smoke and args.model not in (None, "tiny"):
        raise SystemExit(f"--smoke runs the tiny Llama on the CPU, not --model {args.model}")
    args.steps = args.steps or (4 if args.smoke else 12)
    args.timed = args.timed or (2 if args.smoke else 6)
    if not 0 < args.timed < args.steps:
        raise SystemExit(f"--timed {args.timed} must be in 1..{args.steps - 1} (the first steps warm up)")
    mesh = Mesh.from_env(("dp",), device_type="cpu" if args.smoke else None)
    device = mesh.device
    os.makedirs(args.out, exist_ok=True)
    if args.correctness is None:
        args.correctness = args.model is None
    rows = [dict(correctness=correctness(device, args.smoke))] if args.correctness else []
    if args.model:
        _, batch, seq = lp.MODELS[args.model]
        args.batch, args.seq = args.batch or batch, args.seq or seq
        runs = [(args.model, s, lambda s=s: llama_throughput(s, args, device)) for s in (args.systems or LLAMA_SYSTEMS).split(",")]
    else:
        args.batch, args.seq = args.batch or 8, args.seq or 1024
        models = {"1.5b": ts.gpt_config("gpt2-xl", block_size=args.seq), "7b": GPTConfig(block_size=args.seq, n_layer=32, n_head=32, n_embd=4096)}
        if args.smoke:
            args.seq, args.batch = 32, 2
            models = {"tiny": GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=2, n_embd=64)}
        systems = (args.systems or "fz1-compile,fz2-compile,fz3-compile,fsdp2,ds-zero1,ds-zero2,ds-zero3").split(",")
        runs = [(m, s, lambda m=m, s=s: throughput(s, models[m], args.batch, args, device))
                for m in (args.models.split(",") if not args.smoke else ["tiny"]) for s in systems]
    for m, s, run in runs:
        log(f"{m} {s} ...")
        try:
            r = run()
        except Exception as e:  # noqa: BLE001 - the row says what went wrong; the next system runs
            traceback.print_exc()
            r = dict(system=s, error=f"{type(e).__name__}: {e}", status=f"error: {type(e).__name__}: {e}")
            if args.model:
                r.update(family="llama", layout="")
        r["model"] = m
        ts.cleanup()
        rows.append(r)
        lp.agreement(rows)
        log(json.dumps(r))
        if dist.get_rank() == 0:
            with open(os.path.join(args.out, "multi_gpu.json"), "w") as f:
                json.dump(rows, f, indent=1)
    log("\n" + (llama_table(rows) if args.model else table(rows)))
    if dist.get_rank() == 0:
        charts(rows, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
