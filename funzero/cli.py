"""``funzero``: memory estimates and stage planning from the command line.

    funzero estimate --params 70B --gpus 8                  # every stage x offload
    funzero estimate --model gpt2-xl --gpus 4 --batch 8     # a real model, counted on meta
    funzero plan --gpu-gb 80 --cpu-gb 128 --params 13B --gpus 4
    funzero plan --gpu-gb 80 --params 70B --gpus 8 --nodes 8 --replicate 8   # shard in a node (HSDP)
    funzero plan --gpu-gb 80 --params 70B --gpus 64 --tp 8                    # dp = 64 / 8; replicas chosen
    funzero estimate --model gpt2-xl --gpus 8 --tp 2 --sp 2 --batch 8        # tp + Ulysses sp

Sizes in and out are decimal (GB = 1e9 bytes, the ZeRO paper's unit). Exit status: 0 done,
1 nothing fits the budgets, 2 bad input; errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from collections.abc import Sequence

import torch

from funzero._activations import ActivationEstimate, gpt_activations
from funzero._counts import parse_count
from funzero._memory import MemoryEstimate, _check_sp_heads, estimate_memory, split_for_estimate
from funzero._planner import OFFLOADS, candidates, choose_stage

__all__ = ["main"]

GPT_GROUPS = [r"blocks\.(\d+)\."]


class _UsageError(Exception):
    """Bad input: printed as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block too
        raise _UsageError(f"{self.prog}: error: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="funzero", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        what = q.add_mutually_exclusive_group(required=True)
        what.add_argument("--params", help="parameter count: 70B, 1.5B, 350M, 7e9")
        what.add_argument("--model", help="GPT preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a JSON file of GPTConfig fields")
        q.add_argument("--gpus", default="1", help="GPUs per node (default 1)")
        q.add_argument("--nodes", default="1", help="nodes (default 1); N = gpus x nodes")
        q.add_argument("--replicate", default=None,
                       help="hierarchical sharding: copies of the state (e.g. = --nodes: shard within a node, "
                            "replicate across nodes); groups are sharded over N / (tp x replicate) ranks "
                            "(default: estimate 1, plan the planner's choice)")
        q.add_argument("--tp", default="1", help="tensor-parallel ranks (must divide --gpus; default 1); --model "
                                                 "is split by funzero's GPT rules, --params evenly")
        q.add_argument("--sp", default="1", help="sequence-parallel (Ulysses) ranks; ZeRO shards over dp x sp "
                                                 "(default 1)")
        q.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
        q.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "lamb", "lion", "sgd", "sgd-momentum"])
        q.add_argument("--layers", default=None, help="with --params: groups (blocks) to assume (default: a GPT-like guess)")
        q.add_argument("--batch", default=None, help="with --model: sequences per data-parallel rank, to include "
                                                     "activations")
        q.add_argument("--seq", default=None, help="with --model: tokens per sequence, all sp ranks' (default: "
                                                   "block_size)")
        q.add_argument("--checkpoint", action="store_true", help="with --batch: activations of a block-checkpointed model")
        q.add_argument("--prefetch", default="1", help="stage 3: groups gathered ahead (default 1)")

    e = sub.add_parser("estimate", help="bytes per GPU and CPU for every stage and offload")
    common(e)
    e.add_argument("--offload", default="none,cpu,nvme", help="comma list of none, cpu, nvme (default: all)")

    pl = sub.add_parser("plan", help="the fastest stage and placement that fits")
    common(pl)
    pl.add_argument("--gpu-gb", required=True, help="memory per GPU, GB")
    pl.add_argument("--cpu-gb", default=None, help="host memory per node, GB (default: not limited)")
    pl.add_argument("--nvme-gb", default=None, help="NVMe per node, GB (default: NVMe not used)")
    pl.add_argument("--reserve-gb", default=None, help="GPU memory to leave free (default: 10%% of --gpu-gb)")
    return p


# --- argument checks (one line each, naming the value) ----------------------------------------
def _int(flag: str, text: str | None, *, minimum: int = 1) -> int | None:
    if text is None:
        return None
    try:
        v = int(text)
    except ValueError:
        raise _UsageError(f"funzero: error: {flag} must be an integer, got {text!r}") from None
    if v < minimum:
        raise _UsageError(f"funzero: error: {flag} must be >= {minimum}, got {text!r}")
    return v


def _gb(flag: str, text: str | None, *, allow_zero: bool = False) -> float | None:
    if text is None:
        return None
    try:
        v = float(text)
    except ValueError:
        raise _UsageError(f"funzero: error: {flag} must be a number of GB, got {text!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise _UsageError(f"funzero: error: {flag} must be {'>= 0' if allow_zero else '> 0'} GB, got {text!r}")
    return v * 1e9


def _model(args) -> tuple[object, str, object | None]:
    """(what estimate_memory takes, a description, the GPTConfig if any)."""
    if args.params is not None:
        if args.batch is not None:
            raise _UsageError("funzero: error: --batch needs --model (activations need the shapes)")
        try:
            n = parse_count(args.params)
        except ValueError as e:
            raise _UsageError(f"funzero: error: --params: {e}") from None
        return n, f"{n:,} parameters", None
    from funzero.models import GPT, GPTConfig, gpt_config

    spec = args.model
    path = pathlib.Path(spec)
    try:
        if spec.endswith(".json") or path.is_file():
            if not path.is_file():
                raise ValueError(f"config file {spec!r} does not exist")
            try:
                fields = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"config file {spec!r} is not valid JSON: {e.msg} (line {e.lineno})") from None
            if not isinstance(fields, dict):
                raise ValueError(f"config file {spec!r} must hold a JSON object of GPTConfig fields")
            known = set(GPTConfig.__dataclass_fields__)
            unknown = sorted(set(fields) - known)
            if unknown:
                raise ValueError(f"config file {spec!r} has unknown field {unknown[0]!r}; GPTConfig has {sorted(known)}")
            cfg = GPTConfig(**fields)
        else:
            cfg = gpt_config(spec)
    except (ValueError, TypeError) as e:
        raise _UsageError(f"funzero: error: --model: {e}") from None
    with torch.device("meta"):  # shapes only: a 70B model costs nothing here
        model = GPT(cfg)
    return model, f"{spec} ({sum(p.numel() for p in model.parameters()):,} parameters)", cfg


def _activations(args, cfg, tp: int, sp: int) -> ActivationEstimate | None:
    if args.batch is None:
        if args.seq is not None or args.checkpoint:
            raise _UsageError("funzero: error: --seq and --checkpoint need --batch")
        return None
    batch = _int("--batch", args.batch)
    seq = _int("--seq", args.seq)
    if sp > 1 and (seq or cfg.block_size) % sp:
        what = f"--seq {args.seq}" if seq is not None else f"the model's block_size {cfg.block_size} (no --seq)"
        raise _UsageError(f"funzero: error: --sp {sp} does not divide {what}: each sp rank holds seq / sp tokens")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    try:
        return gpt_activations(cfg, batch=batch, seq=seq, dtype=dtype, checkpoint=args.checkpoint, tp=tp, sp=sp)
    except ValueError as e:
        raise _UsageError(f"funzero: error: {e}") from None


class _Layout:
    """The GPUs and how they split: ``n = gpus x nodes = dp x tp x sp``, the dp ranks into
    ``replicas`` copies (``None``: the planner chooses) of ``n / (tp x replicas)`` shards."""

    def __init__(self, args) -> None:
        self.gpus, self.nodes = _int("--gpus", args.gpus), _int("--nodes", args.nodes)
        self.tp, self.sp = _int("--tp", args.tp), _int("--sp", args.sp)
        self.n = self.gpus * self.nodes
        if self.gpus % self.tp:
            raise _UsageError(f"funzero: error: --tp {args.tp} does not divide --gpus {args.gpus} "
                              "(tensor parallelism stays within a node)")
        if self.n % (self.tp * self.sp):
            raise _UsageError(f"funzero: error: --sp {args.sp} does not divide the {self.n // self.tp} ranks "
                              f"left by --tp {args.tp} of {self.n} GPUs")
        self.dp = self.n // (self.tp * self.sp)
        self.replicas = _int("--replicate", args.replicate)
        if self.replicas is not None and self.dp % self.replicas:
            how = f"--gpus {args.gpus} x --nodes {args.nodes}"
            if self.tp * self.sp > 1:
                how += f" / (--tp {args.tp} x --sp {args.sp})"
            raise _UsageError(f"funzero: error: --replicate {args.replicate!r} does not divide the {self.dp} ranks "
                              f"({how})")

    def shards(self, replicas: int) -> int:
        return self.n // (self.tp * replicas)

    def describe(self, hsdp: str = "") -> str:
        """The GPUs and their split, for the header; ``hsdp``: how the shards are replicated."""
        nodes = f"{self.gpus} GPU{'s' if self.gpus > 1 else ''} x {self.nodes} node{'s' if self.nodes > 1 else ''}"
        if self.tp == self.sp == 1:
            return f"N = {self.n} ranks ({nodes}{hsdp})"
        sp = f" x sp {self.sp}, ZeRO over dp x sp" if self.sp > 1 else ""
        return f"{self.n} GPUs ({nodes}) = dp {self.dp} x tp {self.tp}{sp}{hsdp}"


def _split(model, lay: _Layout, args):
    """``model`` split over ``--tp`` once (a meta copy), its heads checked against ``--sp``; a bare
    count as it is."""
    if isinstance(model, int):
        return model
    try:
        model = split_for_estimate(model, lay.tp)
    except ValueError as e:
        raise _UsageError(f"funzero: error: --tp {args.tp}: {e}") from None
    if lay.sp > 1:
        try:
            _check_sp_heads(model, lay.sp)
        except ValueError as e:
            raise _UsageError(f"funzero: error: --sp {args.sp}: {e}") from None
    return model


def _common(args):
    lay = _Layout(args)
    layers = _int("--layers", args.layers)
    prefetch = _int("--prefetch", args.prefetch, minimum=0)
    if layers is not None and args.params is None:
        raise _UsageError("funzero: error: --layers applies to --params; --model knows its layers")
    model, desc, cfg = _model(args)
    model = _split(model, lay, args)
    acts = _activations(args, cfg, lay.tp, lay.sp)
    kw = dict(precision=args.precision, tx=args.optimizer, prefetch=prefetch, activations=acts, tp=lay.tp, sp=lay.sp)
    if cfg is not None:
        kw["groups"] = GPT_GROUPS
    else:
        kw["num_groups"] = layers
    return model, desc, lay, kw


# --- output -----------------------------------------------------------------------------------
def _console():
    from rich.console import Console

    out = sys.stdout
    return Console(file=out, width=None if out.isatty() else 160, highlight=False)


def _g(n: float) -> str:
    v = n / 1e9
    if v == 0:
        return "0"
    return f"{v:,.1f}" if v >= 100 else f"{v:,.2f}"


def _dt(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _header(desc: str, lay: _Layout, est: MemoryEstimate) -> str:
    sizes = est.group_sizes
    hsdp = f", sharded over {est.num_shards} x {est.num_replicas} replicas" if est.num_replicas > 1 else ""
    per_tp = " per tp rank" if lay.tp > 1 else ""
    return (
        f"{desc}; {lay.describe(hsdp)}; "
        f"{_dt(est.precision.param_dtype)} params, "
        f"{'fp32 master' if est.precision.has_master else 'no master copy'}; "
        f"{len(sizes)} groups, largest {sizes[0]:,} elements{per_tp}"
    )


_NOTES = (
    "Model states: the ZeRO paper's accounting (params + gradients in the param dtype + optimizer state "
    "with the fp32 master), per rank. TrainState: what funzero.init allocates per rank. GPU peak: "
    "TrainState on the GPU + the gradients the step holds + stage-3 gathered groups + the reduce "
    "transient (+ activations when --batch is given). CPU and NVMe per rank; multiply CPU by GPUs per "
    "node for a node. With --tp, a rank holds its slices of the split leaves and the replicated ones "
    "whole (--params: every parameter counted as split). GB = 1e9 bytes."
)


def _usage(fn, *a, **kw):
    """``fn(*a, **kw)``, its ValueError (a size the model or layout refuses) a usage error."""
    try:
        return fn(*a, **kw)
    except ValueError as e:
        raise _UsageError(f"funzero: error: {e}") from None


def _estimate(args) -> int:
    model, desc, lay, kw = _common(args)
    wanted = [w.strip() for w in args.offload.split(",") if w.strip()]
    bad = [w for w in wanted if w not in ("none", "cpu", "nvme")]
    if bad or not wanted:
        raise _UsageError(f"funzero: error: --offload takes a comma list of none, cpu, nvme; got {args.offload!r}")
    labels = ["none"] + [lab for lab in OFFLOADS if lab != "none" and lab.split("+")[0] in wanted]
    from rich.table import Table

    pairs = sorted(candidates(labels), key=lambda p: (p[1], labels.index(p[0])))  # by stage, then offload
    replicas = lay.replicas or 1
    rows = [_usage(estimate_memory, model, stage=stage, num_shards=lay.shards(replicas), num_replicas=replicas,
                   placement=OFFLOADS[label], **kw) for label, stage in pairs]
    con = _console()
    con.print(_header(desc, lay, rows[0]))
    t = Table(title="Per-rank memory (GB)", title_justify="left")
    cols = ["stage", "offload", "model states", "TrainState", "grads", "gather+reduce"]
    if kw["activations"] is not None:
        cols.append("activations")
    cols += ["GPU peak", "CPU", "NVMe"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("stage", "offload") else "right")
    for est in rows:
        cells = [str(est.stage), est.offload, _g(est.model_states["total"]), _g(est.state["total"]),
                 _g(est.grads), _g(est.gather + est.reduce)]
        if kw["activations"] is not None:
            cells.append(_g(est.activations.peak))
        cells += [_g(est.gpu), _g(est.cpu), _g(est.nvme)]
        t.add_row(*cells)
    con.print(t)
    con.print(_NOTES)
    return 0


def _plan(args) -> int:
    model, desc, lay, kw = _common(args)
    gpu = _gb("--gpu-gb", args.gpu_gb)
    cpu = _gb("--cpu-gb", args.cpu_gb)
    nvme = _gb("--nvme-gb", args.nvme_gb)
    reserve = _gb("--reserve-gb", args.reserve_gb, allow_zero=True)
    if reserve is None:
        reserve = 0.1 * gpu
    if reserve >= gpu:
        raise _UsageError(f"funzero: error: --reserve-gb {args.reserve_gb!r} leaves nothing of --gpu-gb {args.gpu_gb!r}")
    choice = _usage(choose_stage, model, gpus=lay.n, num_replicas=lay.replicas, gpu_bytes=gpu, cpu_bytes=cpu,
                    nvme_bytes=nvme, gpus_per_node=lay.gpus, reserve_bytes=reserve, **kw)
    from rich.table import Table

    con = _console()
    con.print(_header(desc, lay, choice.candidates[0].estimate))
    budget = f"budget: {gpu / 1e9:g} GB per GPU (keeping {reserve / 1e9:g} GB free)"
    budget += f", {cpu / 1e9:g} GB CPU per node" if cpu is not None else ", CPU not limited"
    budget += f", {nvme / 1e9:g} GB NVMe per node" if nvme is not None else ", no NVMe"
    con.print(budget)
    t = Table(title="Candidates, fastest first (GB; model states and GPU peak per GPU)", title_justify="left")
    for c in ("stage", "offload", "shards x replicas", "model states", "GPU peak", "CPU/node", "NVMe/node",
              "verdict"):
        t.add_column(c, justify="left" if c in ("stage", "offload", "verdict") else "right")
    for c in choice.candidates:
        mark = "[bold]chosen[/bold]: " if c is choice.best else ""
        t.add_row(str(c.stage), c.offload, f"{c.estimate.num_shards} x {c.num_replicas}",
                  _g(c.estimate.model_states["total"]), _g(c.gpu), _g(c.cpu_node), _g(c.nvme_node), mark + c.reason)
    con.print(t)
    if kw["activations"] is None:
        con.print("Activations are not included (give --model and --batch to include them); the reserve must hold them.")
    if choice.best is None:
        print(
            f"funzero: error: no stage or offload fits {args.gpu_gb} GB per GPU"
            + (f" and {args.cpu_gb} GB CPU per node" if cpu is not None else "")
            + f" for {desc} on {lay.n} GPUs; closest: {choice.why.removeprefix('nothing fits: ')}",
            file=sys.stderr,
        )
        return 1
    best = choice.best.estimate
    con.print(f"Per GPU at the choice: model states {_g(best.model_states['total'])} GB (params "
              f"{_g(best.model_states['params'])} + grads {_g(best.model_states['grads'])} + optimizer "
              f"{_g(best.model_states['optimizer'])}), GPU peak {_g(best.gpu)} GB, CPU {_g(best.cpu)} GB.")
    con.print(f"Choice: {choice.why}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``funzero`` command; returns the exit status.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 1 when nothing fits the budgets, 2 on bad input.

    Example:
        >>> main(["estimate", "--params", "7B", "--gpus", "8"])  # doctest: +SKIP
        0
    """
    try:
        args = _parser().parse_args(argv)
        return {"estimate": _estimate, "plan": _plan}[args.command](args)
    except _UsageError as e:
        print(str(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
