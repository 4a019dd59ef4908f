"""The largest Llama on one GPU: Llama-3-8B shapes built on the meta device, ZeRO-3 with the
optimizer state on the host, funzero against DeepSpeed ZeRO-3 + ``offload_param`` +
``offload_optimizer`` (issue 20). Each system runs in a process of its own.

    python benchmarks/big_llama.py                                   # fz3-offload-gpu8-async, ds-zero3-offload
    python benchmarks/big_llama.py --layers 16 --systems fz3-offload,ds-zero3-offload   # a 4.6B that both fit
    python benchmarks/big_llama.py --smoke                           # a tiny Llama on the CPU (the script's plumbing)

Model: ``LlamaConfig`` hidden 4096, ``--layers`` (32) layers, 32 heads / 8 KV heads, MLP 14336,
vocab 128256, untied (Llama-3-8B's shapes, 8.03B parameters), SDPA, ``use_cache=False``; built under
``torch.device("meta")`` by every system, never materialised whole anywhere. No weights are read:
each system initialises the parameters itself (HF's ``_init_weights``), funzero group by group on
the GPU (``fz.init`` without ``weights=``), DeepSpeed under ``deepspeed.zero.Init``. B=``--batch``
(2) sequences of T=``--seq`` (2048) random tokens (seed 1234, labels = inputs, which the HF loss
shifts), AdamW lr 3e-4, betas 0.9/0.95, wd 0.1, bf16, ``--steps`` (10) steps of which the last
``--timed`` (7) are timed with CUDA events.

Systems (``--systems``, comma list):
  fz3-offload[-gpuK][-async]  funzero stage 3, groups ``model.layers.N``, ``fz.bf16()``;
                   placement rules: the optimizer state (fp32 master, mu, nu) of every decoder layer
                   on the host (pinned), except layers 0..K-1 and the embedding / norm / LM-head group,
                   which stay on the GPU; ``-async``: ``zero(async_update=True)`` (the host update
                   overlaps the next forward, exact)
  ds-zero3-offload  DeepSpeed ZeRO-3, ``offload_param`` and ``offload_optimizer`` to pinned CPU
                   memory, its DeepSpeedCPUAdam (JIT-built), bf16, the model built under
                   ``deepspeed.zero.Init(remote_device="cpu")``

Columns: status (ok / OOM / killed / the error's first line), parameters, init seconds (model
built and state allocated and initialised), first-step seconds, ms/step and tokens/s over the
timed steps, peak GPU memory (``max_memory_allocated``), peak host memory (the process's VmHWM:
its resident peak, pinned buffers included), the first and last losses. JSON and a PNG go to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback

import torch

HIDDEN, HEADS, KV_HEADS, MLP, VOCAB = 4096, 32, 8, 14336, 128256
GROUPS = [r"model\.layers\.(\d+)\."]
LR, BETAS, EPS, WD = 3e-4, (0.9, 0.95), 1e-8, 0.1
SYSTEM = re.compile(r"fz3-offload((?:-gpu\d+|-async)*)|ds-zero3-offload")


def llama_config(args):
    from transformers import LlamaConfig

    if args.smoke:
        shape = dict(hidden_size=64, num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=512)
    else:
        shape = dict(hidden_size=HIDDEN, num_hidden_layers=args.layers, num_attention_heads=HEADS,
                     num_key_value_heads=KV_HEADS, intermediate_size=MLP, vocab_size=VOCAB)
    return LlamaConfig(**shape, tie_word_embeddings=False, max_position_embeddings=max(args.seq, 2048),
                       use_cache=False, attn_implementation="sdpa")


def host_peak_gib() -> float:
    """This process's resident-set peak (VmHWM), GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def data(args, vocab: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randint(0, vocab, (args.steps, args.batch, args.seq), generator=g)
    return [(t.to(device), t.to(device)) for t in x]


def placement_rules(k: int) -> list[tuple[str, str]]:
    """Optimizer state of layers 0..k-1 and of the root group on the GPU, every other layer's on
    the host."""
    keep = [(r"^model\.layers\.(" + "|".join(map(str, range(k))) + r")\.", "device")] if k else []
    return keep + [(r"^model\.layers\.", "cpu"), ("", "device")]


def funzero_system(opts: str, config, device, args):
    """``(step(x, y) -> loss, notes)`` for ``fz3-offload<opts>``."""
    import funzero as fz
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    k = int(m[1]) if (m := re.search(r"-gpu(\d+)", opts)) else 0
    plan = fz.zero(3, groups=GROUPS, placement={"opt_state": placement_rules(k)}, async_update="-async" in opts)
    tx = fz.optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)
    precision = fz.bf16()  # an fp32 master: what host updates and split placements need
    est = fz.estimate_memory(model, plan=plan, precision=precision, tx=tx)
    state = fz.init(model, tx, plan, precision=precision)
    step_fn = fz.train_step(model, lambda apply, b: apply(input_ids=b[0], labels=b[1]).loss, tx, plan)
    box = {"state": state}

    def step(x, y):
        box["state"], metrics = step_fn(box["state"], (x, y))
        return metrics["loss"]

    notes = dict(gpu_layers=k, estimate_gpu_state_gib=est.gpu_state / 2**30, estimate_host_gib=est.cpu / 2**30)
    return step, notes


def deepspeed_config(args) -> dict:
    pinned = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "offload_param": dict(pinned), "offload_optimizer": dict(pinned),
                              "overlap_comm": True, "contiguous_gradients": True},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def deepspeed_system(config, device, args):
    import deepspeed
    from transformers import LlamaForCausalLM

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    ds = deepspeed_config(args)
    with deepspeed.zero.Init(config_dict_or_path=ds, remote_device="cpu", pin_memory=True):
        model = LlamaForCausalLM(config)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)

    def step(x, y):
        loss = engine(input_ids=x, labels=y).loss
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step, dict(zero_init="built under deepspeed.zero.Init(remote_device='cpu')")


def run(system: str, args) -> dict:
    """One system in this process: the row."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config = llama_config(args)
    row = dict(system=system, layers=args.layers, batch=args.batch, seq=args.seq, status="ok")
    t0 = time.perf_counter()
    if system.startswith("ds-"):
        step, notes = deepspeed_system(config, device, args)
    else:
        step, notes = funzero_system(SYSTEM.fullmatch(system)[1], config, device, args)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    row.update(notes, init_s=time.perf_counter() - t0, init_host_peak_gib=host_peak_gib())
    batches = data(args, config.vocab_size, device)
    warm = args.steps - args.timed
    losses = []
    for i in range(warm):
        t1 = time.perf_counter()
        losses.append(step(*batches[i]))
        sync()
        if i == 0:
            row["first_step_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    for i in range(warm, args.steps):
        losses.append(step(*batches[i]))
    if device.type == "cuda":
        end.record()
        sync()
        ms = start.elapsed_time(end) / args.timed
        row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        ms = (time.perf_counter() - t2) * 1e3 / args.timed
    losses = [float(x) for x in losses]
    row.update(ms=ms, tokens_per_s=args.batch * args.seq / (ms / 1e3), peak_host_gib=host_peak_gib(),
               loss_first=losses[0], loss_last=losses[-1], finite=all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
               params=sum(p.numel() for p in _meta_model(config).parameters()))
    return row


def _meta_model(config):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


def child(args) -> int:
    try:
        row = run(args.system, args)
    except torch.cuda.OutOfMemoryError as e:
        row = dict(system=args.system, status="OOM: " + str(e).splitlines()[0][:200])
    except Exception as e:  # noqa: BLE001 - the row says what went wrong
        traceback.print_exc()
        row = dict(system=args.system, status=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    print("ROW " + json.dumps(row), flush=True)
    return 0


def launch(system: str, args, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", "--system", system, "--layers", str(args.layers), "--batch",
           str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--timed", str(args.timed)]
    if args.smoke:
        cmd.append("--smoke")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(system=system, status=f"timed out after {timeout:.0f} s")
    rows = [json.loads(line[4:]) for line in p.stdout.splitlines() if line.startswith("ROW ")]
    if rows:
        return {**rows[-1], "wall_s": time.perf_counter() - t0}
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    how = "killed (signal %d; host out of memory?)" % -p.returncode if p.returncode < 0 else f"exit {p.returncode}"
    return dict(system=system, status=f"{how}: {' | '.join(tail)[:300]}", wall_s=time.perf_counter() - t0)


def table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = [("system", "system", "{}"), ("status", "status", "{}"), ("params B", "params", "{:.2f}"),
            ("init s", "init_s", "{:.1f}"), ("first step s", "first_step_s", "{:.1f}"), ("ms/step", "ms", "{:.0f}"),
            ("tok/s", "tokens_per_s", "{:,.0f}"), ("GPU peak GiB", "peak_gpu_gib", "{:.1f}"),
            ("host peak GiB", "peak_host_gib", "{:.1f}"), ("loss first/last", None, None)]
    t = Table(title="Llama, ZeRO-3 + CPU offload, one GPU")
    for name, _, _ in cols:
        t.add_column(name)
    for r in rows:
        cells = []
        for _, key, fmt in cols:
            if key is None:
                cells.append(f"{r['loss_first']:.4f} / {r['loss_last']:.4f}" if "loss_first" in r else "-")
            elif key in r:
                v = r[key] / 1e9 if key == "params" else r[key]
                cells.append(fmt.format(v))
            else:
                cells.append("-")
        t.add_row(*cells)
    Console(width=200).print(t)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key, title in zip(axes, ("tokens_per_s", "peak_gpu_gib", "peak_host_gib"),
                              ("tokens/s", "peak GPU GiB", "peak host GiB")):
        ax.bar([r["system"] for r in ok], [r.get(key, 0) for r in ok], color="tab:blue")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20, labelsize=7)
    fig.suptitle(f"Llama {ok[0].get('params', 0) / 1e9:.2f}B, ZeRO-3 + CPU offload, one GPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default="fz3-offload-gpu8-async,ds-zero3-offload")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; smoke 2)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=None, help="tokens a sequence (default 2048; smoke 32)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--timed", type=int, default=7)
    p.add_argument("--timeout", type=float, default=420.0, help="seconds per system")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs")
    p.add_argument("--smoke", action="store_true", help="a 2-layer tiny Llama on whatever device there is")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.layers = args.layers or (2 if args.smoke else 32)
    args.seq = args.seq or (32 if args.smoke else 2048)
    if args.timed >= args.steps:
        raise SystemExit(f"--timed {args.timed} must be below --steps {args.steps} (the first step is not timed)")
    if args.child:
        return child(args)
    systems = [s for s in args.systems.split(",") if s]
    for s in systems:
        if not SYSTEM.fullmatch(s):
            raise SystemExit(f"unknown system {s!r}: fz3-offload[-gpuK][-async] or ds-zero3-offload")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for s in systems:
        rows.append(launch(s, args, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
        with open(os.path.join(args.out, "big_llama.json"), "w") as f:
            json.dump(rows, f, indent=1)
    table(rows)
    plot(rows, os.path.join(args.out, "big_llama.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
