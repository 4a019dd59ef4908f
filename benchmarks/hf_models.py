"""Hugging Face causal LMs on one GPU: funzero against torch eager, torch.compile, Liger-Kernel and
DeepSpeed, each system in a process of its own (issue 21).

    python benchmarks/hf_models.py --burn 60 --models llama-1b --systems torch-compile,liger,fz2,fz2-patched
    python benchmarks/hf_models.py --smoke           # the tiny Llama on the CPU: processes, JSON, table, plot
    benchmarks/hf_models.sh $OUT                     # the GPU run in one device call (installs the wheels)

Models (built from configs here, no downloads; fp32 weights from ``torch.manual_seed(0)`` on the
device, the same for every system; SDPA attention, ``use_cache=False``):
  llama-1b     LlamaConfig d=2048, 16 layers, 16/8 heads, MLP 5632, vocab 32000, untied (886M), B=8
  llama-3b     d=3072, 28 layers, 24/8 heads, MLP 8192, vocab 128256, tied (Llama-3.2-3B, 3.21B), B=4
  qwen2-1.5b   Qwen2Config d=1536, 28 layers, 12/2 heads, MLP 8960, vocab 151936, tied (1.54B), B=8
  tiny         a 2-layer Llama (d=64, vocab 512) for ``--smoke``; tiny-qwen2 the same as a tied Qwen2
T=2048 unless ``--seq``. Every system trains on the same random tokens (seed 1234; labels = the
inputs, which the HF loss shifts), AdamW lr 3e-4, betas 0.9/0.95, wd 0.1, no clipping.

Systems (``--systems``, comma list; the first is the reference, run again after the others: A-B-A):
  torch-eager      fp32 parameters, autocast bf16, torch.optim.AdamW(fused=True) (train_step.py's)
  torch-compile    the same with torch.compile(model)
  liger            Liger-Kernel's apply_liger_kernel_to_llama / _qwen2 on the built model (RMSNorm,
                   SwiGLU, rope, fused linear cross-entropy), eager, otherwise as torch-eager
  liger-compile    the same under torch.compile (known to fail on torch 2.11: the row says how)
  ds-zero{1,2,3}   deepspeed.initialize, bf16, ZeRO stage k, torch's fused AdamW (train_step.py's
                   config); ds-zero3 builds the model under deepspeed.zero.Init when it builds
                   there (the common weights are then copied in), else DeepSpeed partitions it
  fz{0-3}[-eager][-patched][-cg]
                   funzero stage k: fz.train_step with groups [r"model\\.layers\\.(\\d+)\\."], loss
                   ``apply(input_ids=b[0], labels=b[1]).loss``, fz.bf16() (bf16 params, fp32 master),
                   its AdamW, under fz.compile unless -eager; -patched: after
                   funzero.ops.patch(model, kernels=--patch-kernels) (funzero's RMSNorm, SwiGLU, rope
                   and loss kernels; "not available" where this funzero has no patch); -cg: fz.cuda_graph

Method: the parent process runs one child process per (model, system), each with an empty inductor
and Triton cache directory of its own, so no compile cache, allocator state or monkey-patch leaks
between systems, and first steps are cold; the closing reference run reuses the first reference
run's cache (the same kernels; its first step is then not cold), ``--warm-cache`` gives every
child the environment's cache. ``--burn S`` runs S seconds of
8192^3 bf16 matmuls in a process of its own before the first system; ``--reheat S`` runs S
seconds of them inside each child just before its last warm-up step (every system compiles for
up to minutes with the GPU idle, so one burn at the start has cooled by the next system).
Each child: measures the matmul ceiling (8192^3 bf16, ``--ceiling-s`` seconds, the median rate
of the second half), builds the model, then ``--warmup`` steps (the first one timed on the host
clock from building the step to its end, synchronised: **first-step seconds**, compile included),
then ``--steps`` steps timed with CUDA events around the loop (train_step.timed_steps, no host sync
inside).

Columns: tokens/s, ms/step, MFU = tokens/s x (6N + 12 L d T) / 989e12 (H100/H200 SXM dense bf16
datasheet) and the same against the matmul ceiling measured in the child; N counts every
parameter once, the embedding included (PaLM appendix B's convention, as train_step.py): a tied
embedding once (it stands for the lm_head matmul), an untied input embedding as well although its
lookup is no matmul (llama-1b: 6 x 65.5M of 6.12 GFLOP a token, so MFU reads 6.4% above a count
of non-embedding + lm_head parameters; 0 for the tied models). 12 L d T is attention's QK^T and
AV (d = heads x head size, no causal halving). Peak GiB = max_memory_allocated from the model
built to the last timed step; losses of the first and last timed steps; status ok / OOM / "not
available: ..." / the error's first line. Rows go to ``--out``/hf_models.json after every child,
the table is printed with rich, the chart (tok/s per system per model, a bar per A-B-A repeat)
goes to hf_models.png.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import train_step as ts  # noqa: E402

import funzero  # noqa: E402
import funzero.ops  # noqa: E402,F401

# name -> (family, config kwargs, batch)
MODELS = {
    "llama-1b": ("llama", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                               intermediate_size=5632, vocab_size=32000, tie_word_embeddings=False), 8),
    "llama-3b": ("llama", dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True), 4),
    "qwen2-1.5b": ("qwen2", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True), 8),
    "tiny": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=512, tie_word_embeddings=False), 2),
    "tiny-qwen2": ("qwen2", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True), 2),
}
GROUPS = [r"model\.layers\.(\d+)\."]
SYSTEMS = "torch-compile,torch-eager,liger,liger-compile,ds-zero2,ds-zero3,fz2,fz3,fz2-patched,fz3-patched,fz2-eager-patched"
# On the CPU: the eager systems (compiling takes ~50 s a system there, DeepSpeed's first CPU run
# builds its shared-memory op for ~100 s; both run with --systems where time allows).
SMOKE_SYSTEMS = "torch-eager,fz2-eager,fz3-eager,fz2-eager-patched,liger"
FZ_SYSTEM = re.compile(r"fz([0-3])((?:-eager|-patched|-cg)*)")
CHILD_OPTIONS = ("steps", "warmup", "seq", "batch", "reheat", "ceiling_s", "patch_kernels", "profile")


class Unavailable(Exception):
    """A system this machine or this funzero cannot run; its row says ``not available: ...``."""


# --- the child: one system on one model ---------------------------------------------------------
def build_model(name: str, device, seq: int):
    """The HF causal LM ``name`` in fp32 on ``device``, from ``torch.manual_seed(0)``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    family, kwargs, _ = MODELS[name]
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    config = config_cls(**kwargs, max_position_embeddings=max(seq, 2048), use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        return model_cls(config)


def hf_loss(module, input_ids, labels):
    return module(input_ids=input_ids, labels=labels).loss


def fz_loss(apply, batch):
    return apply(input_ids=batch[0], labels=batch[1]).loss


def require(module: str, device, *, cuda: bool = False) -> None:
    if importlib.util.find_spec(module) is None:
        raise Unavailable(f"{module} is not installed")
    if cuda and device.type != "cuda":
        raise Unavailable(f"{module} needs a CUDA device (Triton kernels)")


def deepspeed_zero3_model(model, name: str, device, seq: int, batch: int, notes: dict):
    """``name`` built again under ``deepspeed.zero.Init`` with ``model``'s weights (the common
    seeded ones) copied in: HF's own init does not reach partitioned parameters. Where it does
    not build there, ``model`` itself, which ``deepspeed.initialize`` partitions."""
    import deepspeed

    try:
        with deepspeed.zero.Init(config_dict_or_path=ts.deepspeed_config(3, batch)):
            under = build_model(name, device, seq)
        ref = dict(model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(under.parameters()), modifier_rank=0), torch.no_grad():
            for n, p in under.named_parameters():
                p.copy_(ref[n])
    except Exception as e:  # noqa: BLE001 - the issue asks for zero.Init only where the model builds under it
        notes["zero_init"] = f"failed, partitioned by deepspeed.initialize: {first_line(e)}"
        return model
    notes["zero_init"] = "built under deepspeed.zero.Init, the common weights copied in"
    return under


def make_step(system: str, model_name: str, model, data, device, args, notes: dict):
    """``step(i) -> loss`` for ``system`` over ``model`` (for ds-zero3 the one built under zero.Init)."""
    family = MODELS[model_name][0]
    batch = data[0][0].shape[0]
    if system in ("torch-eager", "torch-compile"):
        return ts.torch_step(model, hf_loss, data, device, compiled=system == "torch-compile")
    if system in ("liger", "liger-compile"):
        require("liger_kernel", device, cuda=True)
        import liger_kernel.transformers as liger

        getattr(liger, f"apply_liger_kernel_to_{family}")(model=model)
        return ts.torch_step(model, hf_loss, data, device, compiled=system == "liger-compile")
    if m := re.fullmatch(r"ds-zero([1-3])", system):
        require("deepspeed", device)
        return ts.deepspeed_step(model, lambda engine, x, y: engine(input_ids=x, labels=y).loss, data, int(m[1]), batch)
    if m := FZ_SYSTEM.fullmatch(system):
        stage, opts = int(m[1]), m[2]
        if "-patched" in opts:
            patch = getattr(funzero.ops, "patch", None)
            if patch is None:
                raise Unavailable("funzero.ops.patch is not in this funzero")
            kernels = {} if args.patch_kernels is None else {"kernels": tuple(k for k in args.patch_kernels.split(",") if k)}
            notes["patch"] = json.loads(json.dumps(patch(model, **kernels), default=str))
        return ts.funzero_step(model, fz_loss, data, device, stage, compiled="-eager" not in opts, groups=GROUPS,
                               graphed="-cg" in opts)
    raise ValueError(f"unknown system {system!r}")


def matmul_ceiling(seconds: float) -> float:
    """TFLOP/s of 8192^3 bf16 matmuls: the median batch of the second half of ``seconds``."""
    rates = ts.burn(seconds, what="matmul ceiling")
    rates = sorted(rates[len(rates) // 2:])
    return rates[len(rates) // 2]


def model_flops(model, seq: int) -> dict:
    """N (every parameter once, the embedding included) and 6N + 12 L d T FLOPs a token."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())  # tied weights appear once
    d_attn = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    return dict(params=n, embedding_params=c.vocab_size * c.hidden_size, tied=bool(c.tie_word_embeddings),
                flops_per_token=6 * n + 12 * c.num_hidden_layers * d_attn * seq)


def run(system: str, model_name: str, args, device) -> dict:
    cuda = device.type == "cuda"
    batch = args.batch or MODELS[model_name][2]
    row: dict = dict(batch=batch, seq=args.seq, tokens_per_step=batch * args.seq, steps=args.steps, warmup=args.warmup)
    notes: dict = {}
    row["notes"] = notes
    if cuda:
        row["device_name"] = torch.cuda.get_device_name()
        row["matmul_tflops"] = matmul_ceiling(args.ceiling_s)
    g = torch.Generator().manual_seed(1234)
    vocab = MODELS[model_name][1]["vocab_size"]
    tokens = torch.randint(0, vocab, (args.warmup + args.steps, batch, args.seq), generator=g).to(device)
    data = [(t, t) for t in tokens]  # HF's loss shifts the labels itself
    t0 = time.perf_counter()
    model = build_model(model_name, device, args.seq)
    row.update(model_flops(model, args.seq))
    if system == "ds-zero3" and importlib.util.find_spec("deepspeed") is not None:
        model = deepspeed_zero3_model(model, model_name, device, args.seq, batch, notes)
    row["build_s"] = time.perf_counter() - t0
    ts.cleanup()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step = make_step(system, model_name, model, data, device, args, notes)
    del model
    losses = [step(0)]
    ts.sync(device)
    row["first_step_s"] = time.perf_counter() - t0
    for i in range(1, args.warmup):
        if i == args.warmup - 1 and args.reheat > 0 and cuda:
            rates = ts.burn(args.reheat, what="reheat")
            row["reheat_tflops"] = [rates[0], rates[-1]]
        losses.append(step(i))
    ts.sync(device)
    row["warmup_s"] = time.perf_counter() - t0
    timed, ms = ts.timed_steps(step, args.warmup, args.warmup + args.steps, device)
    losses += timed
    tok_s = batch * args.seq / (ms / 1e3)
    row.update(ms=ms, tokens_per_s=tok_s, mfu=tok_s * row["flops_per_token"] / ts.PEAK_FLOPS,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)
    if cuda:
        row["mfu_ceiling"] = tok_s * row["flops_per_token"] / (row["matmul_tflops"] * 1e12)
    losses = [float(x) for x in losses]
    row.update(losses=losses, loss_step1=losses[0], loss_first=losses[args.warmup], loss_last=losses[-1])
    if system in args.profile.split(",") and cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(args.warmup, min(args.warmup + 2, args.warmup + args.steps)):
                step(i)
            ts.sync(device)
        row["trace"] = ts.save_trace(prof, os.path.join(args.out, f"trace_{model_name}_{system}.json"), steps=2)
    return row


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def status_of(e: BaseException) -> str:
    if isinstance(e, Unavailable):
        return f"not available: {e}"
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        return "OOM"
    return first_line(e)


def versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for dist in ("transformers", "triton", "deepspeed", "liger-kernel"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def child(args) -> int:
    """One (model, system) in this process; its row goes to ``args.row_out``."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.burn_only:
        if device.type == "cuda":
            ts.burn(args.burn)
        return 0
    row = dict(model=args.model, system=args.system, versions=versions())
    try:
        if args.system.startswith("ds-") and importlib.util.find_spec("deepspeed") is not None:
            with socket.socket() as s:  # a free port: the children run one after another
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            ts.init_process_group(device, port=port)
        row.update(run(args.system, args.model, args, device))
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - the row says what went wrong; the parent goes on
        if not isinstance(e, Unavailable):
            traceback.print_exc()
        row.update(status=status_of(e), error=traceback.format_exc()[-4000:])
    with open(args.row_out, "w") as f:
        json.dump(row, f, indent=1)
    ts.log(f"{args.model} {args.system}: {row['status']}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


# --- the parent: one process per system, A-B-A, the table and the chart ------------------------
def launch(args, model: str, system: str, index: int, timeout: float, cache: str | None) -> dict:
    """Run ``system`` on ``model`` in a child process whose inductor and Triton caches live under
    ``cache`` (None: the environment's own); stream its output and keep it in ``out/logs``;
    return its row."""
    tag = f"{index:02d}_{model}_{system}"
    row_out = os.path.join(args.out, "rows", tag + ".json")
    with contextlib.suppress(FileNotFoundError):
        os.remove(row_out)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--system", system,
           "--row-out", row_out, "--out", args.out]
    for k in CHILD_OPTIONS:
        v = getattr(args, k)
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    if args.smoke:
        cmd.append("--smoke")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cache:
        env.update(TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"), TRITON_CACHE_DIR=os.path.join(cache, "triton"))
    t0 = time.perf_counter()
    tail: collections.deque = collections.deque(maxlen=20)
    with open(os.path.join(args.out, "logs", tag + ".log"), "w") as logf, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=True) as proc:
        def pump():
            for line in proc.stdout:
                sys.stdout.write(line)
                logf.write(line)
                if line.strip():
                    tail.append(line.rstrip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=None if timeout == float("inf") else max(timeout, 1.0))
            why = None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group (start_new_session)
            rc = proc.wait()
            why = f"timeout after {time.perf_counter() - t0:.0f} s"
        reader.join(10)
    if why is None and os.path.exists(row_out):
        with open(row_out) as f:
            row = json.load(f)
    else:
        why = why or f"process exited with rc {rc}: {tail[-1] if tail else 'no output'}"
        row = dict(model=model, system=system, status=why, error="\n".join(tail))
    if row["status"] != "ok":
        row.setdefault("error", row["status"])  # train_step.plot leaves rows with an error out
    row.update(index=index, wall_s=time.perf_counter() - t0, rc=rc)
    return row


def write(rows, args) -> None:
    with open(os.path.join(args.out, "hf_models.json"), "w") as f:
        json.dump(dict(args={k: v for k, v in vars(args).items() if k != "child"}, rows=rows), f, indent=1)


def ratios(rows) -> dict:
    """tok/s of each ok row over the mean of its model's reference runs (the first system)."""
    ref = {}
    for r in rows:
        if r.get("reference") and r["status"] == "ok":
            ref.setdefault(r["model"], []).append(r["tokens_per_s"])
    return {id(r): r["tokens_per_s"] / (sum(ref[r["model"]]) / len(ref[r["model"]]))
            for r in rows if r["status"] == "ok" and r["model"] in ref}


def table(rows):
    from rich.table import Table

    devices = sorted({r["device_name"] for r in rows if "device_name" in r}) or ["CPU"]
    t = Table(title=f"hf_models on {', '.join(devices)} (* first step with the first reference's compile cache)")
    for name in ("model", "system", "status", "tok/s", "vs ref", "ms/step", "MFU 989", "MFU ceil", "ceil TF/s",
                 "peak GiB", "first step s", "loss first", "loss last"):
        t.add_column(name, justify="left" if name in ("model", "system", "status") else "right",
                     overflow="fold", max_width=48 if name == "status" else None)
    vs = ratios(rows)
    for r in rows:
        if r["status"] != "ok":
            t.add_row(r["model"], r["system"], r["status"], *[""] * 10)
            continue
        ceil = r.get("matmul_tflops")
        t.add_row(r["model"], r["system"], "ok", f"{r['tokens_per_s']:,.0f}",
                  f"{vs[id(r)]:.3f}x" if id(r) in vs else "", f"{r['ms']:.1f}", f"{r['mfu'] * 100:.1f}%",
                  f"{r['mfu_ceiling'] * 100:.1f}%" if ceil else "", f"{ceil:.0f}" if ceil else "",
                  f"{r['peak_gib']:.2f}", f"{r['first_step_s']:.1f}" + ("" if r.get("compile_cache") == "cold" else "*"),
                  f"{r['loss_first']:.4f}", f"{r['loss_last']:.4f}")
    return t


def run_model(args, model: str, systems: list[str], left, done: list[dict]) -> list[dict]:
    """Every system on ``model`` in processes of their own, the first again at the end (A-B-A);
    ``left()`` is the time left of the deadline, ``done`` the rows of the models before. Each
    system compiles cold in a cache of its own; the closing reference reuses the first reference
    run's, so its kernels are the same (its first step is then not cold: its row says so)."""
    order = systems + ([systems[0]] if len(systems) > 1 and not args.no_aba else [])
    reserve = 0.0  # what the closing reference run needs: as long as its first run took
    rows: list[dict] = []
    index = len(done)
    with contextlib.ExitStack() as stack:
        def cache():
            return contextlib.nullcontext() if args.warm_cache else tempfile.TemporaryDirectory(prefix="hf_models_")

        ref_cache = stack.enter_context(cache())
        for k, s in enumerate(order):
            closing = k == len(order) - 1 and k > 0 and s == systems[0] and not args.no_aba
            budget = left() if closing else left() - reserve
            if budget < (5 if closing else 30):  # the closing run has its time reserved
                ts.log(f"{model} {s}: skipped, {left():.0f} s left of the deadline (the closing reference needs {reserve:.0f})")
                rows.append(dict(model=model, system=s, status="skipped: deadline", error="deadline", index=index + k))
                continue
            ts.log(f"{model} {s} (process {index + k}) ...")
            with contextlib.nullcontext(ref_cache) if k == 0 or closing else cache() as where:
                row = launch(args, model, s, index + k, budget, where)
            row.update(reference=s == systems[0],
                       compile_cache="the environment's (--warm-cache)" if args.warm_cache
                       else "the first reference run's" if closing else "cold")
            if k == 0:
                reserve = row["wall_s"] * 1.1 + 10
            rows.append(row)
            ts.log(f"{model} {s}: {row['status']}" + (f", {row['tokens_per_s']:,.0f} tok/s" if row["status"] == "ok" else "")
                   + f", {row['wall_s']:.0f} s in all")
            write(done + rows, args)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama-1b,llama-3b,qwen2-1.5b", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--systems", default=None, help=f"comma list, the first is the reference (default {SYSTEMS})")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 8; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="steps before the timed ones, the cold first included (default 8; smoke 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens a sequence (default 2048; smoke 32)")
    p.add_argument("--batch", type=int, default=None, help="override every model's batch")
    p.add_argument("--burn", type=float, default=0.0, help="seconds of bf16 matmuls in a process of their own before the first system")
    p.add_argument("--reheat", type=float, default=0.0, help="seconds of bf16 matmuls in each child before its last warm-up step")
    p.add_argument("--ceiling-s", type=float, default=3.0, help="seconds of 8192^3 matmuls measuring the ceiling in each child")
    p.add_argument("--patch-kernels", default=None, help="comma list passed as funzero.ops.patch(model, kernels=...)")
    p.add_argument("--profile", default="", help="comma list of systems to profile for 2 steps after timing (trace + kernel summary)")
    p.add_argument("--no-aba", action="store_true", help="do not run the reference system again after the others")
    p.add_argument("--deadline", type=float, default=0.0,
                   help="seconds for the whole run (0: none): a system is not started unless the closing reference "
                        "still fits; a child is killed when it would overrun")
    p.add_argument("--warm-cache", action="store_true", help="the children use the environment's compile cache (first steps not cold)")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs")
    p.add_argument("--smoke", action="store_true", help="the tiny model on the CPU, 2 + 2 steps of T=32")
    # the child's own arguments
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--burn-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--row-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    smoke = args.smoke
    for k, full, small in (("steps", 8, 2), ("warmup", 8, 2), ("seq", 2048, 32)):
        if getattr(args, k) is None:
            setattr(args, k, small if smoke else full)
    if args.warmup < 1 or args.steps < 1:
        raise ValueError(f"--warmup and --steps must be at least 1, got {args.warmup=} {args.steps=}")
    if args.child:
        return child(args)
    if smoke and args.models == p.get_default("models"):
        args.models = "tiny"
    args.systems = args.systems or (SMOKE_SYSTEMS if smoke else SYSTEMS)
    models, systems = args.models.split(","), args.systems.split(",")
    for m in models:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    os.makedirs(os.path.join(args.out, "rows"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    ts.log(f"hf_models: {versions()}; models {models}, systems {systems} (A-B-A: {not args.no_aba}), out {args.out}")
    start = time.perf_counter()

    def left() -> float:
        return args.deadline - (time.perf_counter() - start) if args.deadline else float("inf")

    if args.burn > 0 and not smoke:
        try:
            subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--burn-only", "--burn", str(args.burn)],
                           check=False, timeout=min(left(), args.burn + 120))
        except subprocess.TimeoutExpired:
            ts.log("burn: timed out")
    rows: list[dict] = []
    for m in models:
        rows += run_model(args, m, systems, left, rows)
    write(rows, args)
    from rich.console import Console

    Console(width=200).print(table(rows))
    try:
        ts.plot(rows, os.path.join(args.out, "hf_models.png"), title="HF {}")
    except Exception as e:  # noqa: BLE001 - the JSON and the table stand without the chart
        ts.log(f"plot failed: {first_line(e)}")
    ts.log(f"done in {time.perf_counter() - start:.0f} s: {args.out}/hf_models.json, hf_models.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
