"""Predicted vs measured GPU memory: GPT-2 124M / 350M / 1.5B, ZeRO stages 0-3, one GPU, bf16.

    python benchmarks/memory.py                         # B=8, T=1024, writes papers/zero/measured.md
    python benchmarks/memory.py --batch 4 --seq 512 --models gpt2,gpt2-medium --out /tmp/m.md
    python benchmarks/memory.py --models gpt2-xl --stages 3 --modes eager,compiled   # issue 20

For each (model, stage) a fresh process builds the model on the meta device, materialises its
parameters on the GPU and hands them to ``funzero.init(params=...)`` (so the module never owns
weights), then takes ``--warmup`` steps (Triton compiles, autotuning, lazy workspaces) and
``--steps`` measured ones. It records

* model states: ``torch.cuda.memory_allocated()`` right after ``init`` (the init-time values
  freed), against ``MemoryEstimate.gpu_state``: the check is 5 %;
* peak: ``torch.cuda.max_memory_allocated()`` over the measured steps, against
  ``MemoryEstimate.gpu`` with ``gpt_activations`` included: the check is 15 %.

``--explain`` records the allocator's history over the measured steps and prints what is alive at
the peak, grouped by the line that allocated it (funzero's, the model's, or inductor's generated
code). ``--modes eager,compiled`` measures each configuration both as the eager step and under
``fz.compile`` (whose stage 3 frees each gathered group after its forward, as eager does); the
compiled rows are also compared with the eager row of the same configuration.

Both are measured from the allocator's level before ``init`` (the CUDA context and the
allocator's reserve are not ``allocated`` memory and are excluded on both sides). An OOM is caught
and recorded; a crashed child is recorded with the tail of its stderr. At one rank the stages
differ little (no shards to split): that is expected, the point is that the model holds there.

Method notes: ``benchmarks/NOTES_memory.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import pathlib
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
GROUPS = [r"blocks\.(\d+)\."]
STATES_TOL, PEAK_TOL = 0.05, 0.15
SIZES = {"gpt2": "124M", "gpt2-medium": "350M", "gpt2-large": "774M", "gpt2-xl": "1.5B"}


def _init_params(model: torch.nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """GPT-2's initialisation, made directly on ``device`` for every (deduplicated) parameter."""
    n_layer = model.cfg.n_layer
    out = {}
    for name, p in model.named_parameters():
        t = torch.empty(p.shape, dtype=torch.float32, device=device)
        if name.endswith("bias"):
            t.zero_()
        elif p.dim() == 1:  # layer-norm gains
            t.fill_(1.0)
        elif name.endswith("c_proj.weight"):
            t.normal_(0.0, 0.02 / math.sqrt(2 * n_layer))
        else:
            t.normal_(0.0, 0.02)
        out[name] = t
    return out


def _loss(apply, batch):
    x, y = batch
    return apply(x, y)


def _where(frames: list[dict]) -> str:
    """The first frame of an allocation's stack that is not torch's own or the allocator's: a
    line of funzero, of the model, or of inductor's generated code (whose source line names the
    buffer), with that line's text."""
    import linecache

    for f in frames:
        name = f.get("filename", "")
        ours = "/funzero/" in name or "/ops/" in name or "torchinductor" in name or "/benchmarks/" in name
        if ours and "/torch/" not in name.split("torchinductor")[0]:
            text = linecache.getline(name, f.get("line", 0)).strip()
            return f"{name.rsplit('/', 2)[-1]}:{f.get('line')} {f.get('name')}: {text[:120]}"
    return "(torch internals)"


def live_at_peak(snapshot: dict, top: int = 12) -> list[dict]:
    """The blocks alive when the recorded trace's allocated bytes peaked, grouped by where they
    were allocated (see :func:`_where`), largest first: what makes up a peak."""
    trace = snapshot["device_traces"][0]
    live, total, best, best_i = {}, 0, -1, 0
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
        if total > best:
            best, best_i = total, i
    alive = {}
    for e in trace[: best_i + 1]:
        if e["action"] == "alloc":
            alive[e["addr"]] = e
        elif e["action"] == "free_completed":
            alive.pop(e["addr"], None)
    groups: dict[str, list[int]] = {}
    for e in alive.values():
        groups.setdefault(_where(e.get("frames", [])), []).append(e["size"])
    rows = sorted(({"where": k, "bytes": sum(v), "blocks": len(v)} for k, v in groups.items()),
                  key=lambda r: -r["bytes"])
    return [{"where": "(all recorded, at the trace's peak)", "bytes": best, "blocks": len(alive)}] + rows[:top]


def measure(model_name: str, stage: int, batch: int, seq: int, steps: int, warmup: int, mode: str = "eager",
            explain: bool = False) -> dict:
    """One configuration, in this process. Returns a JSON-able record."""
    import funzero as fz
    from funzero import estimate_memory, gpt_activations
    from funzero.models import GPT, gpt_config

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    cfg = gpt_config(model_name)
    with torch.device("meta"):
        model = GPT(cfg)
    plan = fz.zero(stage, groups=GROUPS)
    precision = fz.bf16()
    tx = fz.optim.adamw(3e-4, weight_decay=0.1)
    acts = gpt_activations(cfg, batch=batch, seq=seq, dtype=precision.param_dtype)
    est = estimate_memory(model, plan=plan, precision=precision, tx=tx, activations=acts, compiled=mode == "compiled")
    rec = dict(
        model=model_name, size=SIZES.get(model_name, ""), params=est.num_params, stage=stage, mode=mode,
        batch=batch, seq=seq, world=plan.num_shards,
        predicted_states=est.gpu_state, predicted_peak=est.gpu,
        predicted_parts=dict(state=dict(est.state), grads=est.grads, reduce=est.reduce, gather=est.gather,
                             activations=acts.peak, act_layers=acts.layers, act_head=acts.head,
                             act_backward=acts.backward),
        status="ok",
    )
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    try:
        params = _init_params(model, device)
        state = fz.init(model, tx, plan, precision=precision, params=params)
        del params
        gc.collect()
        torch.cuda.synchronize()
        rec["measured_states"] = torch.cuda.memory_allocated() - base
        rec["state_nbytes"] = fz.state_nbytes(state)["total"]
        step = fz.train_step(model, _loss, tx, plan)
        if mode == "compiled":
            step = fz.compile(step)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (batch, seq), device=device, generator=g)
        y = torch.randint(0, cfg.vocab_size, (batch, seq), device=device, generator=g)
        for _ in range(warmup):
            state, metrics = step(state, (x, y))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        if explain:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        for _ in range(steps):
            state, metrics = step(state, (x, y))
        torch.cuda.synchronize()
        rec["measured_peak"] = torch.cuda.max_memory_allocated() - base
        if explain:
            rec["at_peak"] = live_at_peak(torch.cuda.memory._snapshot())
            torch.cuda.memory._record_memory_history(enabled=None)
        rec["loss"] = float(metrics["loss"])
    except torch.cuda.OutOfMemoryError as e:
        rec["status"] = "oom"
        rec["error"] = str(e).splitlines()[0][:300]
    for kind, tol in (("states", STATES_TOL), ("peak", PEAK_TOL)):
        got = rec.get(f"measured_{kind}")
        if got:
            err = rec[f"predicted_{kind}"] / got - 1
            rec[f"{kind}_err"] = err
            rec[f"{kind}_ok"] = abs(err) <= tol
    return rec


def predict(model_name: str, stage: int, batch: int, seq: int):
    """The estimate ``measure`` checks, without a GPU."""
    import funzero as fz
    from funzero import estimate_memory, gpt_activations
    from funzero.models import GPT, gpt_config
    from shardspec import Mesh

    cfg = gpt_config(model_name)
    with torch.device("meta"):
        model = GPT(cfg)
    plan = fz.zero(stage, mesh=Mesh(("dp",), (1,)), groups=GROUPS)
    acts = gpt_activations(cfg, batch=batch, seq=seq, dtype=torch.bfloat16)
    return estimate_memory(model, plan=plan, precision=fz.bf16(), tx=fz.optim.adamw(3e-4), activations=acts)


def _predict(args) -> int:
    for m in [m.strip() for m in args.models.split(",") if m.strip()]:
        for s in [int(s) for s in args.stages.split(",")]:
            est = predict(m, s, args.batch, args.seq)
            a = est.activations
            print(f"{m:>12} stage {s}: states {_gb(est.gpu_state)} GB, peak {_gb(est.gpu)} GB "
                  f"(activations {_gb(a.peak)} = layers {_gb(a.layers)} + head {_gb(a.head)} + "
                  f"backward {_gb(a.backward)}; grads {_gb(est.grads)}, reduce {_gb(est.reduce)})")
    return 0


def _child(args) -> int:
    rec = measure(args.one, args.stage, args.batch, args.seq, args.steps, args.warmup, args.mode, args.explain)
    for r in rec.get("at_peak", []):
        print(f"at peak: {r['bytes'] / 1e9:8.3f} GB in {r['blocks']:5d} blocks  {r['where']}", flush=True)
    print("RESULT " + json.dumps(rec), flush=True)
    return 0


def _spawn(model_name: str, stage: int, args, mode: str = "eager") -> dict:
    cmd = [sys.executable, __file__, "--one", model_name, "--stage", str(stage), "--mode", mode, *(["--explain"] if args.explain else []),
           "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(model=model_name, size=SIZES.get(model_name, ""), stage=stage, batch=args.batch, seq=args.seq,
                    status="error", error=f"timed out after {args.timeout}s")
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    status = "oom" if any("out of memory" in t.lower() for t in tail) else "error"
    return dict(model=model_name, size=SIZES.get(model_name, ""), stage=stage, batch=args.batch, seq=args.seq,
                status=status, error=" | ".join(tail)[:500])


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _verdict(r, kind) -> str:
    ok = r.get(f"{kind}_ok")
    return "-" if ok is None else ("pass" if ok else "FAIL")


COLUMNS = ["model", "stage", "mode", "states pred GB", "states meas GB", "err", "ok",
           "peak pred GB", "peak meas GB", "err", "ok", "peak vs eager", "status"]


def _row(r) -> list[str]:
    return [f"{r['model']} ({r.get('size', '')})", str(r["stage"]), r.get("mode", "eager"),
            _gb(r.get("predicted_states")), _gb(r.get("measured_states")), _pct(r.get("states_err")), _verdict(r, "states"),
            _gb(r.get("predicted_peak")), _gb(r.get("measured_peak")), _pct(r.get("peak_err")), _verdict(r, "peak"),
            _pct(r.get("peak_vs_eager")),
            r["status"] + (f": {r['error']}" if r.get("error") else "")]


def _markdown(results: list[dict], args, device: str) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Predicted vs measured GPU memory (funzero memory model)",
        "",
        f"{device}, torch {torch.__version__}, {when}. One rank, `funzero.bf16()`, fused AdamW, "
        f"B={args.batch}, T={args.seq}, {args.warmup} warm-up + {args.steps} measured steps. "
        "Produced by `benchmarks/memory.py`; GB = 1e9 bytes.",
        "",
        f"Model states: `memory_allocated` after `init` vs `MemoryEstimate.gpu_state` (within {STATES_TOL:.0%}). "
        f"Peak: `max_memory_allocated` over the measured steps vs `MemoryEstimate.gpu` with "
        f"`gpt_activations` (within {PEAK_TOL:.0%}). Both from the allocator's level before `init`.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in results]
    lines += ["", "Raw records (predicted parts included): the JSON file written beside this one.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt2,gpt2-medium,gpt2-xl")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "papers" / "zero" / "measured.md"))
    p.add_argument("--json", default=None, help="default: --out with .json")
    p.add_argument("--inprocess", action="store_true", help="run every configuration in this process")
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration (child process)")
    p.add_argument("--predict", action="store_true", help="print the predictions only (no GPU needed)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="eager", help=argparse.SUPPRESS)
    p.add_argument("--modes", default="eager", help="comma list of eager, compiled (fz.compile)")
    p.add_argument("--explain", action="store_true",
                   help="record the allocator's history over the measured steps and list what is alive at the peak")
    args = p.parse_args(argv)
    if args.predict:
        return _predict(args)
    if not torch.cuda.is_available():
        print("benchmarks/memory.py: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if args.one:
        return _child(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    stages = [int(s) for s in args.stages.split(",")]
    results = []
    from rich.console import Console
    from rich.table import Table

    con = Console()
    modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    if set(modes) - {"eager", "compiled"}:
        raise SystemExit(f"--modes takes eager and compiled, got {args.modes!r}")
    for m in models:
        for s in stages:
            eager = None
            for mode in modes:
                if args.inprocess:
                    try:
                        r = measure(m, s, args.batch, args.seq, args.steps, args.warmup, mode, args.explain)
                    finally:
                        gc.collect()
                        torch.cuda.empty_cache()
                else:
                    r = _spawn(m, s, args, mode)
                r.setdefault("mode", mode)
                if mode == "eager":
                    eager = r
                elif eager is not None and eager.get("measured_peak") and r.get("measured_peak"):
                    r["peak_vs_eager"] = r["measured_peak"] / eager["measured_peak"] - 1
                results.append(r)
                con.print(" ".join(_row(r)))
    table = Table(title=f"funzero memory model vs {torch.cuda.get_device_name(0)}, B={args.batch} T={args.seq}")
    for c in COLUMNS:
        table.add_column(c)
    for r in results:
        table.add_row(*_row(r))
    con.print(table)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_markdown(results, args, torch.cuda.get_device_name(0)))
    js = pathlib.Path(args.json) if args.json else out.with_suffix(".json")
    js.write_text(json.dumps(results, indent=1))
    con.print(f"wrote {out} and {js}")
    failed = [r for r in results if r["status"] == "ok" and not (r.get("states_ok") and r.get("peak_ok"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
