"""One GPU, full training steps: funzero against plain PyTorch, torch.compile and DeepSpeed.

    python benchmarks/train_step.py                                   # all systems, 124m 350m 1.5b
    python benchmarks/train_step.py --models 1.5b --systems torch-compile,fz2-compile
    python benchmarks/train_step.py --smoke                           # tiny model on the CPU

Every system trains the same GPT-2 (vocab 50304, T=1024) from the same initial weights on the
same random tokens, in bf16 compute with AdamW (lr 3e-4, betas 0.9/0.95, wd 0.1), in this one
process. Each runs ``--steps`` steps; the last ``--timed`` are timed with CUDA events around the
loop (one synchronisation at the end, none inside: metrics stay on the device). Columns:
ms/step, tokens/s, MFU = tokens/s x (6N + 12 L d T) / 989 TFLOP/s (H100 SXM dense bf16, the
convention of the PaLM paper's appendix B and of nanoGPT), peak memory
(``torch.cuda.max_memory_allocated``), and the loss at the first and last step.

Systems:
  torch-eager     GPT (torch ops) in fp32 params, autocast bf16, torch.optim.AdamW(fused=True)
  torch-compile   the same with torch.compile(model)
  ds-zero{1,2,3}  deepspeed.initialize, bf16, ZeRO stage k, torch's fused AdamW (no JIT build)
  fz{0,1,2,3}-eager / fz{k}-compile
                  funzero stage k, bf16 params + fp32 master, funzero.ops kernels in the model
                  and the fused flat AdamW; -compile wraps the whole step in fz.compile
                  (torch.compile with persistent row reductions up to 2048 elements)
  <system>@cdt    compiled with inductor's coordinate-descent tuning
  <system>@wide   a torch system compiled with fz.compile's heuristics as well
  <system>@narrow a funzero system compiled with plain torch.compile
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import shutil
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import funzero as fz  # noqa: E402
from funzero.models import GPT, GPTConfig, gpt_config  # noqa: E402

PEAK_FLOPS = 989e12  # H100 SXM dense bf16 (datasheet); the measured matmul ceiling is ~800
MODELS = {"124m": ("gpt2", 16), "350m": ("gpt2-medium", 16), "774m": ("gpt2-large", 8), "1.5b": ("gpt2-xl", 8)}
LR, BETAS, WD, EPS = 3e-4, (0.9, 0.95), 0.1, 1e-8
CLIP = 0.0  # --clip: clip the gradient's global norm to this (0: no clipping), in every system


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_model(cfg: GPTConfig, device, compile_blocks: bool = False) -> GPT:
    """The GPT on ``device``; ``compile_blocks`` compiles each transformer block on its own
    (``nn.Module.compile``): inductor's kernels and its activation choices inside a block, while
    the step around the model stays eager (every block shares one compiled graph)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg)
    if compile_blocks:
        for block in model.blocks:
            block.compile()
    return model


# The compiler per system: funzero systems take fz.compile, torch systems torch.compile;
# ``@wide`` / ``@narrow`` swap that for one run (see ``run``).
_OPTIONS = {"swap": False}


def compiler(funzero_system: bool):
    return fz.compile if funzero_system != _OPTIONS["swap"] else torch.compile


# --- systems: each returns (step(i) -> loss tensor, cleanup) ------------------------------------
def torch_system(cfg, data, device, compiled: bool, graphed: bool = False):
    """Plain PyTorch on the GPT (torch ops): see :func:`torch_step`."""
    model = make_model(GPTConfig(**{**cfg.__dict__, "fused": False}), device)
    return torch_step(model, lambda fwd, x, y: fwd(x, y), data, device, compiled, graphed)


def torch_step(model, forward, data, device, compiled: bool, graphed: bool = False):
    """Plain PyTorch: ``model``'s fp32 parameters, autocast bf16, fused AdamW; ``forward(module,
    *batch)`` gives the loss. ``graphed``: the whole step (forward, backward, optimizer) recorded
    as one CUDA graph after 3 warm-up steps, PyTorch's whole-network capture recipe (capturable
    AdamW, static input buffers)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=device.type == "cuda",
                            capturable=graphed)
    fwd = compiler(False)(model) if compiled else model

    def train(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not graphed):
            loss = forward(fwd, x, y)
        loss.backward()
        if CLIP:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
        opt.step()
        return loss.detach()

    def step(i):
        opt.zero_grad(set_to_none=True)
        return train(*data[i])

    if not graphed:
        return step
    box: dict = {}

    def graphed_step(i):
        if i < 3:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = step(i)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if "graph" not in box:
            box["x"], box["y"] = (t.clone() for t in data[i])
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            box["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(box["graph"]):
                box["loss"] = train(box["x"], box["y"])
        else:
            box["x"].copy_(data[i][0], non_blocking=True)
            box["y"].copy_(data[i][1], non_blocking=True)
        box["graph"].replay()
        return box["loss"].clone()

    return graphed_step


def deepspeed_system(cfg, data, device, stage: int, batch: int, *, offload: bool = False, compile_blocks: bool = False):
    """DeepSpeed's engine on the GPT (torch ops): see :func:`deepspeed_step`."""
    model = make_model(GPTConfig(**{**cfg.__dict__, "fused": False}), device, compile_blocks)
    return deepspeed_step(model, lambda engine, x, y: engine(x, y), data, stage, batch, offload=offload)


def deepspeed_config(stage: int, batch: int, *, offload: bool = False) -> dict:
    """The DeepSpeed config of every ``ds-zero{k}`` system: bf16, ZeRO stage ``stage`` with
    overlapped, contiguous gradients, AdamW; ``offload`` moves the optimizer to the CPU with its
    DeepSpeedCPUAdam."""
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    params = {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    else:  # torch's fused kernel through DeepSpeed: its strongest optimizer without a JIT build
        params.update(torch_adam=True, fused=True)
    config = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": params},
        "steps_per_print": 10**9,
        "gradient_clipping": CLIP,
        "wall_clock_breakdown": False,
    }
    return config


def deepspeed_step(model, forward, data, stage: int, batch: int, *, offload: bool = False, config: dict | None = None):
    """``deepspeed.initialize`` over ``model`` with :func:`deepspeed_config` (or ``config``);
    ``forward(engine, *batch)`` gives the loss."""
    import deepspeed

    config = config or deepspeed_config(stage, batch, offload=offload)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    def step(i):
        loss = forward(engine, *data[i])
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step


def funzero_system(cfg, data, device, stage: int, compiled: bool, placement=None, delayed_update=False,
                   compile_blocks: bool = False, async_update: bool = False, graphed: bool = False,
                   leaf_grads: bool = True, nonfinite: str = "skip"):
    model = make_model(cfg, device, compile_blocks)

    def loss_fn(apply, batch):
        x, y = batch
        return apply(x, y)

    return funzero_step(model, loss_fn, data, device, stage, compiled, groups=[r"blocks\.(\d+)\."], placement=placement,
                        delayed_update=delayed_update, async_update=async_update, graphed=graphed, leaf_grads=leaf_grads,
                        nonfinite=nonfinite)


def funzero_step(model, loss_fn, data, device, stage: int, compiled: bool, *, groups, placement=None,
                 delayed_update=False, async_update: bool = False, graphed: bool = False, leaf_grads: bool = True,
                 nonfinite: str = "skip"):
    """funzero stage ``stage`` over ``model`` (groups by the ``groups`` rules), bf16 params + fp32
    master on a GPU (fp32 on the CPU), its AdamW; ``compiled``: the whole step under fz.compile;
    ``nonfinite``: train_step's policy for a step with an inf/NaN ("skip", the default, checks)."""
    plan = fz.zero(stage, groups=groups, placement=placement or {}, delayed_update=delayed_update,
                   async_update=async_update)
    tx = fz.optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)
    if CLIP:
        tx = fz.optim.chain(fz.optim.clip_by_global_norm(CLIP), tx)
    state = fz.init(model, tx, plan, precision=fz.bf16() if device.type == "cuda" else fz.fp32())
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step_fn = fz.testing.set_leaf_grads(fz.train_step(model, loss_fn, tx, plan, nonfinite=nonfinite), leaf_grads)
    if compiled:
        step_fn = compiler(True)(step_fn)
    if graphed:
        step_fn = fz.cuda_graph(step_fn, warmup=3)
    box = {"state": state}

    def step(i):
        box["state"], metrics = step_fn(box["state"], data[i])
        return metrics["loss"]

    step.box = box  # the live state, for benchmarks that read its host update's figures
    return step


def build(system: str, cfg, data, device, batch):
    if system == "torch-eager":
        return torch_system(cfg, data, device, False)
    if system == "torch-compile":
        return torch_system(cfg, data, device, True)
    if system == "torch-compile-cg":
        return torch_system(cfg, data, device, True, graphed=True)
    if system.startswith("ds-zero"):
        return deepspeed_system(cfg, data, device, int(system[-1]), batch)
    if system.startswith("fz"):
        # fz<stage>-<eager|compile>[-offload|-cg|-flat][:<kernels joined by +, or none>]; -cg: fz.cuda_graph;
        # -flat: an eager one-rank step packs the flat gradient (funzero.testing.set_leaf_grads off), for comparison;
        # a trailing -noguard: train_step(nonfinite="ignore"), no inf/NaN check (the guard's cost, issue 22)
        name, _, kernels = system.partition(":")
        name, noguard = name.removesuffix("-noguard"), name.endswith("-noguard")  # nonfinite="ignore"
        stage, mode = int(name[2]), name.split("-", 1)[1]
        if kernels:
            ks = () if kernels == "none" else tuple(kernels.split("+"))
            cfg = GPTConfig(**{**cfg.__dict__, "kernels": ks})
        placement = {"opt_state": "cpu"} if mode.endswith("offload") else None
        return funzero_system(cfg, data, device, stage, compiled=mode.startswith("compile"), placement=placement,
                              graphed=mode.endswith("-cg"), leaf_grads=not mode.endswith("-flat"),
                              nonfinite="ignore" if noguard else "skip")
    raise ValueError(f"unknown system {system!r}")


def run(system, model_name, args, device) -> dict:
    """One system on one model. Options after ``@``, joined by ``+``: ``cdt`` compiles with
    inductor's coordinate-descent tuning of its generated kernels; ``wide`` compiles a torch system
    with ``fz.compile`` and ``narrow`` a funzero system with plain ``torch.compile``."""
    base, _, opts = system.partition("@")
    if opts:
        import torch._inductor.config as inductor_config

        given = set(opts.split("+"))
        unknown = given - {"cdt", "wide", "narrow"}
        if unknown:
            raise ValueError(f"unknown system option(s) {sorted(unknown)} in {system!r}")
        _OPTIONS["swap"] = bool(given & {"wide", "narrow"})
        try:
            with inductor_config.patch(coordinate_descent_tuning="cdt" in given):
                r = run(base, model_name, args, device)
        finally:
            _OPTIONS["swap"] = False
        r["system"] = system
        return r
    preset, batch = MODELS[model_name]
    batch = args.batch or batch
    cfg = gpt_config(preset, block_size=args.seq) if not args.smoke else GPTConfig(block_size=args.seq, vocab_size=512, n_layer=2, n_head=2, n_embd=64)
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, cfg.vocab_size, (args.steps, batch, args.seq + 1), generator=g).to(device)
    data = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    step = build(system, cfg, data, device, batch)
    losses = []
    warm = args.steps - args.timed
    for i in range(warm):
        losses.append(step(i))
    sync(device)
    t_warm = time.perf_counter() - t_build
    timed, ms = timed_steps(step, warm, args.steps, device)
    losses += timed
    if system in args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(warm, min(warm + 2, args.steps)):
                step(i)
            sync(device)
        print(f"--- profile of 2 steps: {model_name} {system} ---")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=int(os.environ.get("PROFILE_ROWS", "22")), max_name_column_width=60))
        summary = save_trace(prof, os.path.join(args.out, f"trace_{model_name}_{system}.json"), steps=2)
        print(json.dumps(summary, indent=1))
    model = GPT(GPTConfig(**{**cfg.__dict__}))  # CPU, only for the FLOP count
    flops_tok = model.flops_per_token()
    n_params = model.num_params()
    del model
    tok_s = batch * args.seq / (ms / 1e3)
    return dict(
        system=system, model=model_name, params=n_params, batch=batch, seq=args.seq, ms=ms, tokens_per_s=tok_s,
        mfu=tok_s * flops_tok / PEAK_FLOPS, peak_gib=(torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0),
        loss_first=float(losses[0]), loss_last=float(losses[-1]), warmup_s=t_warm,
    )


def timed_steps(step, first: int, stop: int, device) -> tuple[list, float]:
    """Run ``step(i)`` for ``first <= i < stop``; return the losses (device tensors) and the mean
    ms a step: CUDA events around the loop on a GPU (no host sync inside), wall clock on the CPU."""
    cuda = device.type == "cuda"
    start, end = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else (None, None)
    t0 = time.perf_counter()
    if cuda:
        start.record()
    losses = [step(i) for i in range(first, stop)]
    if cuda:
        end.record()
    sync(device)
    ms = start.elapsed_time(end) if cuda else (time.perf_counter() - t0) * 1e3
    return losses, ms / (stop - first)


def save_trace(prof, path: str, steps: int) -> dict:
    """Write ``prof``'s chrome trace to ``path + ".gz"``; return its :func:`kernel_summary`."""
    prof.export_chrome_trace(path)
    summary = kernel_summary(path, steps)
    with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as z:
        shutil.copyfileobj(f, z)
    os.remove(path)
    return summary


def kernel_summary(path: str, steps: int) -> dict:
    """Per step, from a chrome trace of ``steps`` steps: GPU kernels launched, their time, the
    GPU's idle time between the first and the last, and launches and time by kernel family
    (eager ATen elementwise, copies, memsets, Triton, cuBLAS, ...): where idle gaps come from."""
    with open(path) as f:
        ev = [e for e in json.load(f)["traceEvents"]
              if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    ev.sort(key=lambda e: e["ts"])
    families = {"aten-elementwise": "at::native::", "memcpy": "Memcpy", "memset": "Memset", "triton": "triton_",
                "cublas": "nvjet", "cudnn": "cudnn", "nccl": "nccl", "adamw": "adamw"}
    fam: dict[str, list[float]] = {}
    for e in ev:
        k = next((k for k, pat in families.items() if pat in e["name"]), "other")
        c = fam.setdefault(k, [0, 0.0])
        c[0] += 1
        c[1] += e["dur"]
    busy, end = 0.0, ev[0]["ts"]
    gaps = []
    for e in ev:
        a, b = e["ts"], e["ts"] + e["dur"]
        if a > end:
            gaps.append((a - end, e["name"][:50]))
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    span = end - ev[0]["ts"]
    gaps.sort(reverse=True)
    # Collectives (NCCL kernels, on their own stream) against the union of all other kernels:
    # the part no compute kernel overlaps is time the step waits for communication.
    compute: list[list[float]] = []
    for e in ev:
        if "nccl" not in e["name"]:
            a, b = e["ts"], e["ts"] + e["dur"]
            if compute and a <= compute[-1][1]:
                compute[-1][1] = max(compute[-1][1], b)
            else:
                compute.append([a, b])
    comm = [(e["ts"], e["ts"] + e["dur"]) for e in ev if "nccl" in e["name"]]
    comm_total = sum(b - a for a, b in comm)
    covered = sum(max(0.0, min(b, y) - max(a, x)) for a, b in comm for x, y in compute)
    return dict(kernels=len(ev) / steps, kernel_ms=busy / 1e3 / steps, idle_ms=(span - busy) / 1e3 / steps,
                comm_ms=comm_total / 1e3 / steps, comm_not_overlapped_ms=(comm_total - covered) / 1e3 / steps,
                gaps_over_20us=sum(1 for g, _ in gaps if g > 20) / steps,
                idle_in_gaps_over_20us_ms=sum(g for g, _ in gaps if g > 20) / 1e3 / steps,
                families={k: dict(launches=v[0] / steps, ms=round(v[1] / 1e3 / steps, 2)) for k, v in sorted(fam.items())},
                largest_gaps_us=[(round(g, 1), n) for g, n in gaps[:12]])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def cleanup():
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def table(rows) -> str:
    head = f"{'model':>6} {'system':>16} {'ms/step':>9} {'tok/s':>9} {'MFU':>6} {'peak GiB':>9} {'loss0':>7} {'lossN':>7} {'warm s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:>6} {r['system']:>16}  ERROR {r['error'][:80]}")
            continue
        lines.append(
            f"{r['model']:>6} {r['system']:>16} {r['ms']:9.1f} {r['tokens_per_s']:9.0f} {r['mfu'] * 100:5.1f}% {r['peak_gib']:9.2f} "
            f"{r['loss_first']:7.3f} {r['loss_last']:7.3f} {r['warmup_s']:7.1f}"
        )
    return "\n".join(lines)


def plot(rows, path, title: str = "GPT-2 {}"):
    """A bar chart of tokens/s per system, one panel per model (``title.format(model)``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    models = list(dict.fromkeys(r["model"] for r in ok))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        rs, seen = {}, {}
        for r in (r for r in ok if r["model"] == m):  # a system run twice (A-B-A) gets a bar per run
            seen[r["system"]] = seen.get(r["system"], 0) + 1
            rs[r["system"] + (f" (run {seen[r['system']]})" if seen[r["system"]] > 1 else "")] = r["tokens_per_s"]
        names = list(rs)
        colors = [next((c for pre, c in (("fz", "tab:orange"), ("ds", "tab:gray"), ("liger", "tab:green")) if n.startswith(pre)),
                       "tab:blue") for n in names]
        ax.barh(names, [rs[n] / 1e3 for n in names], color=colors)
        ax.set_title(title.format(m))
        ax.set_xlabel("thousand tokens / s (one GPU)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def burn(seconds: float, what: str = "burn") -> list[float]:
    """Run 8192^3 bf16 matmuls for ``seconds``, logging their rate at the start and the end;
    return the rate (TFLOP/s) of each batch of 20."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    t0, rates = time.perf_counter(), []
    while time.perf_counter() - t0 < seconds:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            a @ b
        end.record()
        end.synchronize()
        rates.append(20 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12)
    log(f"{what}: {seconds:.0f} s of matmuls, {rates[0]:.0f} TFLOP/s at the start, {rates[-1]:.0f} at the end")
    del a, b
    torch.cuda.empty_cache()
    return rates


def init_process_group(device, port: int = 29533) -> None:
    """A one-process torch.distributed group (DeepSpeed needs one): NCCL on a GPU, gloo on the CPU."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="124m,350m,1.5b")
    p.add_argument("--systems", default="torch-eager,torch-compile,ds-zero1,ds-zero2,ds-zero3,fz0-eager,fz1-eager,fz2-eager,fz3-eager,fz0-compile,fz1-compile,fz2-compile,fz3-compile")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--timed", type=int, default=10)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=0, help="override the per-model batch")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs")
    p.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, no DeepSpeed")
    p.add_argument("--profile", default="", help="comma list of systems to profile for 2 steps (top CUDA kernels)")
    p.add_argument("--clip", type=float, default=0.0, help="clip the global gradient norm to this in every system")
    p.add_argument("--burn", type=float, default=0.0,
                   help="seconds of bf16 matmuls before the first system, so every system runs on a GPU at its "
                        "working temperature (the H100 here slows its matmuls ~1%% over the first minutes)")
    args = p.parse_args(argv)
    global CLIP
    CLIP = args.clip
    args.profile = [x for x in args.profile.split(",") if x]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.seq, args.steps, args.timed = 32, 4, 2
    os.makedirs(args.out, exist_ok=True)
    systems = args.systems.split(",")
    if any(s.startswith("ds-") for s in systems) and not torch.distributed.is_initialized():
        init_process_group(device)
    log(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    if args.burn > 0 and device.type == "cuda":
        burn(args.burn)
    rows = []
    for m in args.models.split(","):
        for s in systems:
            log(f"{m} {s} ...")
            try:
                r = run(s, m, args, device)
            except Exception as e:  # noqa: BLE001 - record and go on: one OOM must not lose the table
                traceback.print_exc()
                r = dict(system=s, model=m, error=f"{type(e).__name__}: {e}")
            r["clip"] = CLIP
            cleanup()
            rows.append(r)
            log(json.dumps(r))
            with open(os.path.join(args.out, "train_step.json"), "w") as f:
                json.dump(rows, f, indent=1)
    print(table(rows))
    try:
        plot(rows, os.path.join(args.out, "train_step.png"))
    except Exception as e:  # noqa: BLE001
        log(f"plot failed: {e}")


if __name__ == "__main__":
    main()
