"""The memory model: per-rank bytes of a ZeRO run, computed from the engine's own layouts.

Design note (what keeps these numbers honest):

* **One source of truth.** Sizes come from the same objects the engine allocates from: a real
  model is bound with :func:`funzero._plan.bind` (its groups, ties, leaf alignment and shard
  padding), and the optimizer state is obtained by calling the transform's own ``init`` on meta
  tensors shaped like the buffers :func:`funzero.init` would hand it. Only when nothing but a
  parameter count Ψ is known are the layouts synthesised, with
  ``shardspec.FlatLayout.from_shapes`` and the plan's alignment defaults. ``tests/test_memory.py``
  holds the estimate to the byte against ``funzero.state_nbytes`` of real states on real gloo
  groups, so the mirror of ``init`` below cannot drift unnoticed.
* **Two accountings.** ``MemoryEstimate.state`` is what ``TrainState`` holds per rank (what
  ``state_nbytes`` reports). ``MemoryEstimate.model_states`` is the ZeRO paper's accounting
  (Rajbhandari et al. 2020, sec. 3.1 and 5): parameters and gradients in the parameter dtype plus
  K bytes per element of optimizer state, each sharded as the stage says; 2Ψ + 2Ψ + 12Ψ for
  mixed-precision Adam. Gradients are not part of ``TrainState``: the step makes them and drops
  them. ``MemoryEstimate.grads`` says what the engine itself holds at the end of backward, in the
  dtype it really uses (see ``_step._Engine.anchors``), which is not always the paper's.
* **Transients are estimates.** Stage-3 gathered groups, the gradient of the group being reduced
  and activations depend on the schedule, not only on shapes; their formulas are documented where
  they are computed and checked on a GPU by ``benchmarks/memory.py``.
* **Offload follows the engine** (``_placement.py``, ``_step.apply_update``): where each state
  leaf lives is tested against real placed states (NVMe files on the CPU); the host-side
  transients of an offloaded update are read from the code and estimated.

Units: bytes everywhere; the printing helpers use GB = 1e9 bytes, the ZeRO paper's unit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optree
import torch
from torch import nn

from funzero._plan import Binding, Plan, bind, zero
from funzero._precision import Precision, bf16, fp16, fp32
from shardspec import FlatLayout, Mesh

__all__ = [
    "ActivationEstimate",
    "Candidate",
    "MemoryEstimate",
    "StageChoice",
    "choose_stage",
    "estimate_memory",
    "format_bytes",
    "gpt_activations",
    "layouts_for_num_params",
    "parse_count",
]

GB = 10**9

# Where a state leaf can live, as the memory model names it (and the spellings accepted for each).
_WHERE = {
    "gpu": "gpu", "cuda": "gpu", "device": "gpu",
    "cpu": "cpu",
    "nvme": "nvme",
}
_OFFLOAD_KEYS = ("params", "opt_state")

# The ZeRO stages as "offload labels" the planner walks, fastest first (see choose_stage).
OFFLOADS: dict[str, dict[str, str]] = {
    "none": {"params": "gpu", "opt_state": "gpu"},
    "cpu": {"params": "gpu", "opt_state": "cpu"},
    "cpu+params": {"params": "cpu", "opt_state": "cpu"},
    "nvme": {"params": "gpu", "opt_state": "nvme"},
    "nvme+params": {"params": "nvme", "opt_state": "nvme"},
}


# --- parsing and printing ---------------------------------------------------------------------
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_COUNT_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*$", re.IGNORECASE)


def parse_count(text: str | int | float) -> int:
    """A parameter count written the way people say it: ``70B``, ``1.5B``, ``350M``, ``7e9``.

    Suffixes are decimal: K = 1e3, M = 1e6, B (or G) = 1e9, T = 1e12, case-insensitive.

    Args:
        text: the count, or an int (returned as it is when positive).

    Returns:
        The count as an int (rounded to the nearest element).

    Raises:
        ValueError: naming ``text`` when it is not a positive count.

    Example:
        >>> parse_count("1.5B")
        1500000000
    """
    if isinstance(text, bool):
        raise ValueError(f"cannot parse {text!r} as a parameter count")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = _COUNT_RE.match(str(text))
        if m is None:
            raise ValueError(
                f"cannot parse {text!r} as a parameter count; write it like 70B, 1.5B, 350M or 7e9"
            )
        value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if not math.isfinite(value) or round(value) < 1:
        raise ValueError(f"a parameter count must be a positive number, got {text!r}")
    return int(round(value))


def format_bytes(n: float, *, unit: str = "GB", digits: int = 2) -> str:
    """``n`` bytes as text in decimal units (``GB`` = 1e9 bytes, the ZeRO paper's unit).

    Args:
        n: bytes.
        unit: ``B``, ``KB``, ``MB``, ``GB`` or ``TB`` (powers of 1000).
        digits: decimals to print.

    Returns:
        e.g. ``"31.41 GB"``.

    Example:
        >>> format_bytes(31.40625e9)
        '31.41 GB'
    """
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    if unit not in scale:
        raise ValueError(f"unit must be one of {sorted(scale)}, got {unit=}")
    return f"{n / scale[unit]:,.{digits}f} {unit}"


# --- layouts ----------------------------------------------------------------------------------
class _PlanningMesh(Mesh):
    """``num_ranks`` ranks with no process group behind them: enough to lay shards out.

    ``bind`` asks the plan for this process's rank; a plan made for estimating has none, and
    every rank's shard has the same size, so rank 0 stands in for all of them.
    """

    def __init__(self, axis: str, num_ranks: int) -> None:
        super().__init__((axis,), (num_ranks,), device_type="meta")

    def rank(self, axis: str) -> int:
        self._axis_index(axis)
        return 0

    def group(self, axis: str):
        raise RuntimeError("a planning mesh has no process group; it only lays out shards")


def _default_num_groups(num_params: int) -> int:
    """Blocks of a GPT-like model of ``num_params`` parameters, when nothing else is known.

    Dense decoders keep the width near 128 x the depth (GPT-3 175B: 12288 / 96; LLaMA 7B:
    4096 / 32), and a block holds about 12 d^2 parameters, so Ψ ≈ 12 L (128 L)^2 gives L.
    Only stage 3's gather buffers and the per-group reduce transients depend on this guess.
    """
    return max(1, round((num_params / (12 * 128**2)) ** (1 / 3)))


def layouts_for_num_params(
    num_params: int,
    *,
    num_shards: int = 1,
    num_groups: int | None = None,
    dtype: torch.dtype = torch.float32,
    shard_align: int = 64,
) -> dict[str, FlatLayout]:
    """Layouts for a model known only by its parameter count.

    Splits ``num_params`` into ``num_groups`` groups as evenly as possible (the first groups take
    the remainder), each one leaf laid out by ``FlatLayout.from_shapes`` with the plan's default
    alignment, so shard padding is exactly what the engine would add for such groups. Leaf
    alignment inside a group cannot be known without shapes; bind a (meta) model for that.

    Args:
        num_params: Ψ, trainable elements.
        num_shards: N, ranks on the data-parallel axis.
        num_groups: groups (gather/reduce units); ``None``: a GPT-like guess from Ψ (about one
            per transformer block, see ``_default_num_groups``).
        dtype: buffer dtype (the parameter dtype).
        shard_align: as in :func:`funzero.zero`.

    Returns:
        ``{"group0": FlatLayout, ...}``.

    Example:
        >>> lays = layouts_for_num_params(7_500_000_000, num_shards=64, num_groups=1)
        >>> lays["group0"].shard_numel
        117187520
    """
    num_params = parse_count(num_params)
    if num_groups is None:
        num_groups = _default_num_groups(num_params)
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups=}")
    if num_groups > num_params:
        raise ValueError(f"num_groups ({num_groups}) exceeds the parameter count ({num_params})")
    base, extra = divmod(num_params, num_groups)
    out = {}
    for i in range(num_groups):
        name = f"group{i}"
        out[name] = FlatLayout.from_shapes(
            name, [(name, (base + (i < extra),))], dtype=dtype, num_shards=num_shards, shard_align=shard_align
        )
    return out


# --- precision and optimizer ------------------------------------------------------------------
def _precision(p: Precision | str | None) -> Precision:
    if p is None:
        return fp32()  # init()'s default
    if isinstance(p, Precision):
        return p
    named = {"fp32": fp32, "float32": fp32, "bf16": bf16, "bfloat16": bf16, "fp16": fp16, "float16": fp16}
    if isinstance(p, str) and p.lower() in named:
        return named[p.lower()]()
    raise ValueError(f"precision must be a Precision or one of {sorted(named)}, got {p!r}")


def _optimizer(tx: Any):
    from funzero import optim

    if isinstance(tx, optim.GradientTransformation):
        return tx
    named = {
        "adamw": lambda: optim.adamw(1e-3),
        "adam": lambda: optim.adam(1e-3),
        "lamb": lambda: optim.lamb(1e-3),
        "lion": lambda: optim.lion(1e-4),
        "sgd": lambda: optim.sgd(1e-2),
        "sgd-momentum": lambda: optim.sgd(1e-2, momentum=0.9),
    }
    if isinstance(tx, str) and tx.lower() in named:
        return named[tx.lower()]()
    raise ValueError(f"optimizer must be a GradientTransformation or one of {sorted(named)}, got {tx!r}")


def _normalise_placement(
    placement: Mapping | None, stage: int, layouts: Mapping[str, FlatLayout] | None = None
) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """``(where, shares)``: each part's place (``gpu``, ``cpu``, ``nvme``, or ``mixed`` under
    leaf-path rules) and the share of its elements in each place (by group shard sizes)."""
    out = {"params": "gpu", "opt_state": "gpu"}
    shares: dict[str, dict[str, float]] = {k: {"gpu": 1.0} for k in _OFFLOAD_KEYS}
    for key, where in dict(placement or {}).items():
        if key not in _OFFLOAD_KEYS:
            raise ValueError(f"placement key {key!r} is not one of {_OFFLOAD_KEYS}")
        if isinstance(where, str):
            per_group = None
            targets = [where]
        else:  # leaf-path rules: resolved against the groups (a model or binding is needed)
            if not layouts or not any(lay.paths for lay in layouts.values()):
                raise ValueError(
                    f"placement[{key!r}] is a list of leaf-path rules: estimate it for a model or a "
                    "state's binding, not a bare parameter count"
                )
            from funzero._placement import _resolve_groups

            per_group = _resolve_groups(key, where, layouts)
            targets = sorted(set(per_group.values()))
        kinds = {}
        for w in targets:
            kind = str(w).split(":", 1)[0].lower()
            if kind not in _WHERE:
                raise ValueError(f"placement[{key!r}] = {w!r}: expected gpu (cuda), cpu or nvme[:<dir>]")
            kinds[w] = _WHERE[kind]
        if per_group is None:
            out[key] = kinds[where]
            shares[key] = {kinds[where]: 1.0}
        else:
            total = sum(lay.shard_numel for lay in layouts.values())
            sh: dict[str, float] = {}
            for g, w in per_group.items():
                sh[kinds[w]] = sh.get(kinds[w], 0.0) + layouts[g].shard_numel / total
            shares[key] = sh
            out[key] = next(iter(sh)) if len(sh) == 1 else "mixed"
    if out["params"] != "gpu" and stage != 3:
        raise ValueError(
            f"placement params={out['params']!r} needs stage 3 (got stage {stage}): stages 0-2 keep "
            "the full parameters on every GPU for forward and backward"
        )
    if out["opt_state"] != "gpu" and stage == 0:
        raise ValueError(
            f"placement opt_state={out['opt_state']!r} needs stage >= 1: offloading the optimizer "
            "streams each rank's optimizer shard, and stage 0 has none"
        )
    return out, shares


# --- the estimate -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes a GPT keeps for backward, per rank (see :func:`gpt_activations`).

    Attributes:
        batch / seq / num_layers: the shape it is for (batch per rank).
        checkpoint: whether blocks are recomputed in backward (activation checkpointing).
        per_layer: bytes one block keeps without checkpointing.
        layers: bytes all blocks keep at the end of forward.
        head: bytes the embeddings, final norm, logits and loss keep.
        backward: the largest transient on top of those early in backward (the logits'
            gradient, or one block's recomputation and its gradients).
        peak: ``layers + head + backward``.
        korthikanti: Korthikanti et al.'s ``sbh(34 + 5as/h)`` per layer times the layers (or
            ``2sbh`` per layer with full recomputation), for comparison only.
    """

    batch: int
    seq: int
    num_layers: int
    checkpoint: bool
    per_layer: int
    layers: int
    head: int
    backward: int
    peak: int
    korthikanti: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-rank bytes of one ZeRO configuration.

    Attributes:
        stage / num_shards / precision: the configuration (N = ``num_shards``).
        placement: ``{"params": ..., "opt_state": ...}`` each ``"gpu"``, ``"cpu"`` or ``"nvme"``.
        num_params: Ψ, trainable elements (tied parameters once).
        padded: elements of all group buffers including alignment and shard padding.
        group_sizes: padded elements of each group, largest first.
        state: what ``TrainState`` holds on each rank, keyed like ``funzero.state_nbytes``
            (``params``, ``master``, ``opt_state``, ``scaler``, ``step``, ``total``).
        model_states: the ZeRO paper's accounting: ``params``, ``grads`` (parameter dtype),
            ``optimizer`` (master + optimizer state), ``total``.
        grads: gradient bytes the step holds at the end of backward, in the dtypes it uses.
        gather: stage 3: gathered groups alive at once (``1 + prefetch`` largest), else 0.
        reduce: transient while the largest group's gradient is formed and reduced.
        staging: offload transients, ``{"gpu": ..., "cpu": ...}``: a host parameter shard on its
            way to the gather; gradients copied to the host for the update, and the pinned copy
            the new parameters are written to before they go back to the device.
        activations: the activation estimate included in ``gpu``, if any.
        gpu / cpu / nvme: bytes per rank on each. ``gpu`` is the estimated peak during a step
            (``gpu_state`` the part that stays between steps); ``cpu`` includes the update's
            staging; ``nvme`` is twice the file-backed state, since an update writes new copies
            of the files before renaming them over the old ones.
    """

    stage: int
    num_shards: int
    precision: Precision
    placement: Mapping[str, str]
    num_params: int
    padded: int
    group_sizes: tuple[int, ...]
    state: Mapping[str, int]
    model_states: Mapping[str, int]
    grads: int
    gather: int
    reduce: int
    staging: Mapping[str, int] = field(default_factory=dict)
    activations: ActivationEstimate | None = None
    gpu_state: int = 0
    gpu: int = 0
    cpu: int = 0
    nvme: int = 0

    @property
    def offload(self) -> str:
        """The placement as a planner label: ``none``, ``cpu``, ``cpu+params``, ``nvme``, ..."""
        for label, p in OFFLOADS.items():
            if dict(self.placement) == p:
                return label
        return ",".join(f"{k}={v}" for k, v in self.placement.items())

    def summary(self) -> str:
        """A few lines for humans (GB = 1e9 bytes)."""
        s, ms = self.state, self.model_states
        lines = [
            f"ZeRO stage {self.stage}, N={self.num_shards}, Ψ={self.num_params:,} "
            f"(padded {self.padded:,}), offload={self.offload}",
            f"  model states (paper): {format_bytes(ms['total'])} = params {format_bytes(ms['params'])}"
            f" + grads {format_bytes(ms['grads'])} + optimizer {format_bytes(ms['optimizer'])}",
            f"  TrainState: {format_bytes(s['total'])} = params {format_bytes(s['params'])}"
            f" + master {format_bytes(s['master'])} + opt_state {format_bytes(s['opt_state'])}",
            f"  step transients: grads {format_bytes(self.grads)}, gather {format_bytes(self.gather)},"
            f" reduce {format_bytes(self.reduce)}"
            + (f", activations {format_bytes(self.activations.peak)}" if self.activations else ""),
            f"  per rank: GPU peak {format_bytes(self.gpu)} (between steps {format_bytes(self.gpu_state)}),"
            f" CPU {format_bytes(self.cpu)}, NVMe {format_bytes(self.nvme)}",
        ]
        return "\n".join(lines)


def _meta(numel: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(numel, dtype=dtype, device="meta")


def _nbytes(tree: Any) -> int:
    """Bytes of the tensor leaves of a state tree (scalars included, as ``state_nbytes``)."""
    return sum(
        t.numel() * t.element_size()
        for t in optree.tree_leaves(tree, namespace="funzero")
        if isinstance(t, torch.Tensor)
    )


def _train_state_bytes(layouts: Mapping[str, FlatLayout], stage: int, precision: Precision, tx) -> dict[str, int]:
    """What ``funzero.init`` allocates on one rank, built on the meta device.

    Mirrors ``_state.init`` step by step; ``tests/test_memory.py`` compares the result with
    ``state_nbytes`` of real states, so a change there that is not made here fails a test.
    """
    params, master = {}, {}
    for g, lay in layouts.items():
        params[g] = _meta(lay.shard_numel if stage == 3 else lay.padded, precision.param_dtype)
        if precision.has_master:
            master[g] = _meta(lay.padded if stage == 0 else lay.shard_numel, precision.master_dtype)
    if precision.has_master:
        target = master
    elif stage in (0, 3):
        target = params
    else:  # stages 1-2 in one dtype: the optimizer sees this rank's slice of the full params
        target = {g: _meta(layouts[g].shard_numel, precision.param_dtype) for g in layouts}
    acc = tx.traits.accumulate
    if acc is not None:
        opt_state = acc.init(target, grad_like=params if stage == 1 else target)
        # Only the inner state is placed; the accumulator and its counter stay on the device.
        device_part = _nbytes(opt_state) - _nbytes(acc.inner_state(opt_state))
        placed = acc.inner_state(opt_state)
    else:
        opt_state = tx.init(target)
        device_part = 0
        placed = opt_state
    # 0-d leaves (step counts) of placed state stay in memory, never in a file.
    scalars = sum(
        t.element_size() for t in optree.tree_leaves(placed, namespace="funzero")
        if isinstance(t, torch.Tensor) and t.dim() == 0
    )
    scaler = 0
    if precision.loss_scaling is not None:
        from funzero._scaler import init_scaler

        scaler = _nbytes(init_scaler(precision.loss_scaling, "meta"))
    out = {
        "params": _nbytes(params),
        "master": _nbytes(master),
        "opt_state": _nbytes(opt_state),
        "scaler": scaler,
        "step": 8,  # () int64
    }
    out["total"] = sum(out.values())
    return out, device_part, scalars


def _held_grads(layouts: Mapping[str, FlatLayout], stage: int, n: int, precision: Precision) -> int:
    """Gradient bytes at the end of backward.

    From ``_step._Engine.anchors``: where forward computes with the buffer it differentiates (one
    rank, or stage 1) the gradient is that buffer's, full and in the parameter dtype. Otherwise
    the anchor is a zero-stride view (no memory of its own) and the gradient arrives from the
    collective in the master dtype when there is a master and more than one rank: full in stage
    0, this rank's shard in stages 2-3. (An eager one-rank step streaming host-placed groups
    differentiates each leaf instead: it holds these bytes less the padding.)
    """
    comm = n > 1 and stage != 1
    dtype = precision.master_dtype if (precision.has_master and comm) else precision.param_dtype
    numel = sum(lay.padded if stage < 2 else lay.shard_numel for lay in layouts.values())
    return numel * torch.empty((), dtype=dtype).element_size()


def _reduce_transient(
    layouts: Mapping[str, FlatLayout], stage: int, n: int, precision: Precision, gathered: bool
) -> int:
    """Bytes alive for a moment while one group's gradient is formed and reduced (the worst group).

    Backward makes each group's flat gradient by concatenating its leaves' gradients (the leaves'
    and the flat one coexist: 2 x the group in the parameter dtype). With communication the flat
    gradient is cast to ``reduce_dtype`` before the collective (one more copy when the dtypes
    differ); the collective's output is the held gradient, counted in ``grads``. Stage 1 reduces
    after backward, over every group, while the full local gradients are still alive: its casts
    and the shards it produces come on top. Stage 3 with parameters on the host reduces through
    the same path at one rank (an identity collective, but the casts happen).
    """
    pb = torch.empty((), dtype=precision.param_dtype).element_size()
    rd = precision.reduce_dtype or precision.param_dtype
    rb = torch.empty((), dtype=rd).element_size()
    cast = rd != precision.param_dtype
    biggest = max(lay.padded for lay in layouts.values())
    concat = 2 * biggest * pb
    if n == 1 and not gathered:
        return concat
    if stage == 1:
        shards = sum(lay.shard_numel for lay in layouts.values()) * rb
        return max(concat, shards + (biggest * rb if cast else 0))
    return max(concat, biggest * pb + (biggest * rb if cast else 0))


def estimate_memory(
    model: nn.Module | Binding | int | str,
    *,
    stage: int | None = None,
    num_shards: int | None = None,
    plan: Plan | None = None,
    precision: Precision | str | None = None,
    tx: Any = "adamw",
    placement: Mapping[str, str] | None = None,
    groups: Sequence | Mapping | None = None,
    rest: str | None = "rest",
    num_groups: int | None = None,
    leaf_align: int = 16,
    shard_align: int = 64,
    prefetch: int = 1,
    compiled: bool = False,
    activations: ActivationEstimate | None = None,
) -> MemoryEstimate:
    """Per-rank bytes of training ``model`` under ZeRO ``stage`` on ``num_shards`` ranks.

    Args:
        model: an ``nn.Module`` (build it under ``torch.device("meta")`` to count a model that
            does not fit: only shapes are read), the ``Binding`` of an existing state
            (``state.binding``), or a parameter count Ψ (``7_000_000_000`` or ``"7B"``).
        stage / num_shards: the ZeRO stage and N; taken from ``plan`` (or the binding) if given.
        plan: a plan from :func:`funzero.zero` whose stage, mesh size, groups, alignment and
            placement to use.
        precision: as passed to :func:`funzero.init` (default ``fp32()``, as there), or
            ``"bf16"``, ``"fp16"``, ``"fp32"``.
        tx: the optimizer (its own ``init`` sizes the state) or a name: ``adamw``, ``adam``,
            ``lamb``, ``lion``, ``sgd``, ``sgd-momentum``.
        placement: ``{"params": "gpu"|"cpu"|"nvme", "opt_state": ...}``; ``opt_state`` includes
            the fp32 master. Params offload needs stage 3, optimizer offload stage >= 1.
        groups / rest / leaf_align / shard_align: as in :func:`funzero.zero` (modules only).
        num_groups: for a bare Ψ: how many equal groups to assume (default: a GPT-like guess).
        prefetch: stage 3: groups gathered ahead of the one computing (the engine today: 1, the
            root's group plus the current block).
        compiled: stage 3 under ``torch.compile``: the compiler keeps gathered groups until
            backward, so every group is gathered at once (see ``_gather.py``).
        activations: an :class:`ActivationEstimate` (e.g. from :func:`gpt_activations`) to add.

    Returns:
        A :class:`MemoryEstimate`.

    Raises:
        ValueError: naming a bad stage, shard count, placement or count.

    Example:
        >>> est = estimate_memory("7.5B", stage=3, num_shards=64, precision="bf16", num_groups=1)
        >>> round(est.model_states["total"] / 1e9, 2)
        1.88
    """
    precision_given = precision is not None
    precision = _precision(precision)
    if isinstance(model, Binding):
        b = model
        if stage is not None and stage != b.stage:
            raise ValueError(f"stage={stage} contradicts the binding's stage {b.stage}")
        if num_shards is not None and num_shards != b.num_shards:
            raise ValueError(f"num_shards={num_shards} contradicts the binding's {b.num_shards} shards")
        if precision_given and precision != b.precision:
            raise ValueError(f"precision {precision} contradicts the binding's {b.precision}")
        stage, num_shards, precision, layouts = b.stage, b.num_shards, b.precision, dict(b.layouts)
        num_params = sum(lay.numel for lay in layouts.values())
        if placement is None and getattr(b, "placement", None) is not None:
            placement = {"params": b.placement.params, "opt_state": b.placement.opt_state}
    else:
        if plan is not None:
            if stage is not None and stage != plan.stage:
                raise ValueError(f"stage={stage} contradicts the plan's stage {plan.stage}")
            if num_shards is not None and num_shards != plan.num_shards:
                raise ValueError(f"num_shards={num_shards} contradicts the plan's {plan.num_shards} shards")
            stage, num_shards = plan.stage, plan.num_shards
            groups, rest, leaf_align, shard_align = plan.groups, plan.rest, plan.leaf_align, plan.shard_align
            if placement is None:
                placement = {k: v for k, v in plan.placement.items()}
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage=}")
        if num_shards is None:
            num_shards = 1
        if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards must be a positive int, got {num_shards=}")
        if isinstance(model, nn.Module):
            planning = zero(
                stage, mesh=_PlanningMesh("dp", num_shards), groups=groups, rest=rest,
                leaf_align=leaf_align, shard_align=shard_align,
            )
            layouts = dict(bind(model, planning, precision).layouts)
            num_params = sum(lay.numel for lay in layouts.values())
        else:
            num_params = parse_count(model)
            layouts = layouts_for_num_params(
                num_params, num_shards=num_shards, num_groups=num_groups,
                dtype=precision.param_dtype, shard_align=shard_align,
            )
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be an int >= 0, got {prefetch=}")
    where, shares = _normalise_placement(placement, stage, layouts)
    tx = _optimizer(tx)
    n = num_shards

    state, acc_bytes, opt_scalars = _train_state_bytes(layouts, stage, precision, tx)
    grads = _held_grads(layouts, stage, n, precision)
    sizes = tuple(sorted((lay.padded for lay in layouts.values()), reverse=True))
    shards = tuple(sorted((lay.shard_numel for lay in layouts.values()), reverse=True))
    padded = sum(sizes)
    pb = torch.empty((), dtype=precision.param_dtype).element_size()

    # The paper's accounting on the engine's layouts: gradients in the parameter dtype.
    param_elems = sum(shards) if stage == 3 else padded
    paper_grad_elems = padded if stage < 2 else sum(shards)
    optimizer = state["master"] + state["opt_state"]
    model_states = {"params": param_elems * pb, "grads": paper_grad_elems * pb, "optimizer": optimizer}
    model_states["total"] = sum(model_states.values())

    # Stage 3 gathers just in time when there is something to gather: shards on other ranks, or
    # shards on the host (_step._Engine.prepare_binding).
    gathered = stage == 3 and (n > 1 or where["params"] != "gpu")
    gather = 0
    if gathered:
        live = sizes if compiled else sizes[: 1 + prefetch]
        gather = sum(live) * pb
    reduce = _reduce_transient(layouts, stage, n, precision, gathered)

    # Where each part lives, as _state.init and _step.apply_update place it (_placement.py).
    # Gradients are made on the device and stay there until the update; with the optimizer state
    # on the host, the update first copies them all to it. An update of host state with the
    # params on the device writes the new params into a pinned staging copy first. NVMe leaves
    # are updated in copies renamed over the originals, so a step needs twice their bytes on disk.
    # Under leaf-path rules each place holds its share of the elements (``shares``); 0-d leaves
    # (counts) are in host memory when any group is.
    gpu = state["scaler"] + state["step"]
    cpu = nvme = 0
    staging = {"gpu": 0, "cpu": 0}
    placed = {"params": state["params"], "opt_state": state["master"] + state["opt_state"] - acc_bytes}
    gpu += acc_bytes
    for key, nbytes in placed.items():
        sh = shares[key]
        scalars = opt_scalars if key == "opt_state" else 0
        if sh.get("gpu", 0.0) < 1.0:
            cpu += scalars
        else:
            gpu += scalars
        body = nbytes - scalars
        gpu += round(body * sh.get("gpu", 0.0))
        cpu += round(body * sh.get("cpu", 0.0))
        nvme += 2 * round(body * sh.get("nvme", 0.0))
    if where["params"] != "gpu":
        staging["gpu"] += shards[0] * pb  # a shard copied host -> device, then gathered
    host_opt = 1.0 - shares["opt_state"].get("gpu", 0.0)
    if host_opt > 0:
        if stage == 1:  # reduced (to shards, in reduce_dtype) after backward, then copied
            rd = precision.reduce_dtype or precision.param_dtype
            staging["cpu"] += round(sum(shards) * torch.empty((), dtype=rd).element_size() * host_opt)
        else:
            staging["cpu"] += round(grads * host_opt)
        if precision.has_master:
            staging["cpu"] += round(sum(shards) * pb * host_opt * shares["params"].get("gpu", 0.0))
    cpu += staging["cpu"]
    gpu_state = gpu
    act = activations.peak if activations is not None else 0
    gpu_peak = gpu + gather + staging["gpu"] + max(act, grads + reduce)
    return MemoryEstimate(
        stage=stage,
        num_shards=n,
        precision=precision,
        placement=where,
        num_params=num_params,
        padded=padded,
        group_sizes=sizes,
        state=state,
        model_states=model_states,
        grads=grads,
        gather=gather,
        reduce=reduce,
        staging=staging,
        activations=activations,
        gpu_state=gpu_state,
        gpu=gpu_peak,
        cpu=cpu,
        nvme=nvme,
    )


# --- activations ------------------------------------------------------------------------------
def gpt_activations(
    cfg: Any,
    *,
    batch: int,
    seq: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    checkpoint: bool = False,
) -> ActivationEstimate:
    """Bytes ``funzero.models.GPT`` keeps for backward on one rank.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    arXiv 2205.05198, sec. 4.1) count ``sbh(34 + 5as/h)`` bytes per layer with 2-byte activations:
    34 sbh of (B, T, ·) tensors and 5 a s^2 b of attention scores, softmax and dropout masks.
    Our GPT keeps less: no dropout (-2 sbh of masks), and attention through SDPA's flash kernel,
    which saves q, k, v, its output and a per-row log-sum-exp instead of the (T, T) scores (no
    a s^2 term). Counted tensor by tensor, with e bytes per activation element:

    ============================  ===================  ==============================
    saved by                      what                 bytes
    ============================  ===================  ==============================
    ln_1, ln_2                    inputs (residual)    2 e sbh, + 2 x 8 sb fp32 stats
    attn.c_attn, mlp.c_fc         inputs (LN outputs)  2 e sbh
    SDPA                          q, k, v (c_attn out) 3 e sbh
    SDPA / attn.c_proj            attention output     e sbh (one tensor: flash writes
                                                       (B, T, nh, hs), so the transpose
                                                       back is already contiguous)
    SDPA                          log-sum-exp          4 a s b (fp32)
    bias_gelu / mlp.c_proj        pre- and post-GeLU   4 e sbh + 4 e sbh
    ============================  ===================  ==============================

    i.e. ``16 e sbh + 4 asb + 16 sb`` per layer: 32 sbh with bf16, against Korthikanti's 34 sbh
    without the attention matrix. Outside the blocks: token ids (8 sb), ln_f's input and
    lm_head's input (2 e sbh), the logits (e s b V, saved by the fused cross-entropy), its
    log-sum-exp and targets (12 sb), position ids (8 s). The largest transient on top comes at the start of
    backward: the logits' gradient (e s b V); with the unfused loss (``fused=False``) the fp32
    log-softmax (4 sbV) is saved instead of the logits and backward briefly holds two more fp32
    (s, b, V) tensors.

    A recomputed block (``GPTConfig(recompute=K)``: the first K blocks; ``checkpoint=True``: all
    of them) keeps only its input (e sbh; Korthikanti's 2 sbh), and backward holds one recomputed
    block on top.

    Args:
        cfg: a ``GPTConfig`` or a ``GPT``.
        batch: sequences per rank (micro-batch).
        seq: tokens per sequence (default: ``cfg.block_size``).
        dtype: activation dtype (the parameter dtype: bf16 under ``funzero.bf16()``).
        checkpoint: recompute every block in backward (else the config's ``recompute`` blocks).

    Returns:
        An :class:`ActivationEstimate`.

    Example:
        >>> from funzero.models import gpt_config
        >>> a = gpt_activations(gpt_config("gpt2"), batch=8, seq=1024)
        >>> a.per_layer == 32 * 8 * 1024 * 768 + 4 * 12 * 1024 * 8 + 16 * 1024 * 8
        True
    """
    cfg = getattr(cfg, "cfg", cfg)
    for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
        if not hasattr(cfg, name):
            raise ValueError(f"cfg must be a GPTConfig or GPT, got {type(cfg).__name__} without {name!r}")
    seq = cfg.block_size if seq is None else seq
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch=}")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError(f"seq must be a positive int, got {seq=}")
    if seq > cfg.block_size:
        raise ValueError(f"seq={seq} exceeds the model's block_size {cfg.block_size}")
    e = torch.empty((), dtype=dtype).element_size()
    s, b, h, a, L, V = seq, batch, cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.vocab_size
    sb, sbh = s * b, s * b * h
    per_layer = 16 * e * sbh + 4 * a * sb + 16 * sb
    fused = getattr(cfg, "fused", True) and getattr(cfg, "bias", True)
    # token and position ids (int64), ln_f's and lm_head's inputs, ln_f's stats, loss lse + targets
    head_common = 8 * sb + 8 * s + 2 * e * sbh + 8 * sb + 12 * sb
    if fused:
        head = head_common + e * sb * V
        head_bwd = e * sb * V
    else:
        head = head_common + 4 * sb * V
        head_bwd = 8 * sb * V + (e * sb * V if e != 4 else 0)
    # One block's backward: gradients of the (B, T, 4h) tensors (two at once) on top of its own.
    block_bwd = 8 * e * sbh
    k = L if checkpoint else int(getattr(cfg, "recompute", 0))
    layers = k * e * sbh + (L - k) * per_layer
    backward = max(head_bwd, (per_layer if k else 0) + block_bwd)
    korthikanti = k * 2 * sbh + (L - k) * (34 * sbh + 5 * a * s * s * b)
    checkpoint = k == L
    return ActivationEstimate(
        batch=b, seq=s, num_layers=L, checkpoint=checkpoint, per_layer=per_layer,
        layers=layers, head=head, backward=backward, peak=layers + head + backward,
        korthikanti=korthikanti,
    )


# --- choosing a stage -------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """One (stage, offload) the planner considered.

    Attributes:
        estimate: its :class:`MemoryEstimate`.
        fits: whether it fits every budget.
        reason: the budget it exceeds (by how much), or its headroom.
        gpu / cpu_node / nvme_node: bytes per GPU, CPU bytes per node, NVMe bytes per node.
    """

    stage: int
    offload: str
    estimate: MemoryEstimate
    fits: bool
    reason: str
    gpu: int
    cpu_node: int
    nvme_node: int


@dataclass(frozen=True)
class StageChoice:
    """What :func:`choose_stage` found: the fastest candidate that fits, and all it looked at."""

    best: Candidate | None
    candidates: tuple[Candidate, ...]
    why: str


SPEED_ORDER = """\
Order, fastest first: no offload, then optimizer state in CPU memory, then parameters too, then
NVMe; within each, the lower stage first. Offload moves every gradient and parameter shard over
PCIe once per step and updates on the CPU, which costs more than any collective between GPUs.
Stages 0-2 move the same 2Ψ elements per step (an all-reduce is a reduce-scatter plus an
all-gather); stage 3 gathers parameters again in backward, 3Ψ in all, 1.5x. Among 0-2 the lower
stage issues fewer, larger collectives (stage 1 reduces once per optimizer step, stage 2 once
per micro-batch and group)."""


def choose_stage(
    model: nn.Module | int | str,
    *,
    num_shards: int,
    gpu_bytes: int,
    cpu_bytes: int | None = None,
    nvme_bytes: int | None = None,
    gpus_per_node: int | None = None,
    reserve_bytes: int = 0,
    **kw: Any,
) -> StageChoice:
    """The fastest ZeRO stage and placement whose estimate fits the memory budgets.

    Args:
        model: as for :func:`estimate_memory` (module or parameter count).
        num_shards: N, data-parallel ranks in all.
        gpu_bytes: memory per GPU.
        cpu_bytes: host memory per node (``None``: not limited).
        nvme_bytes: NVMe per node; ``None``: NVMe placements are not considered.
        gpus_per_node: ranks sharing one node's CPU and NVMe (default: all ``num_shards``).
        reserve_bytes: GPU memory to keep free beyond the estimate (CUDA context, allocator
            fragmentation, activations when none are estimated).
        **kw: passed to :func:`estimate_memory` (``precision``, ``tx``, ``groups``,
            ``activations``, ...).

    Returns:
        A :class:`StageChoice`; ``best`` is ``None`` when nothing fits.

    Raises:
        ValueError: naming a non-positive budget.

    Example:
        >>> c = choose_stage("13B", num_shards=4, gpu_bytes=80e9, cpu_bytes=128e9, precision="bf16",
        ...                  reserve_bytes=8e9)
        >>> (c.best.stage, c.best.offload)
        (3, 'none')
    """
    for name, v in (("gpu_bytes", gpu_bytes), ("cpu_bytes", cpu_bytes), ("nvme_bytes", nvme_bytes)):
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be > 0, got {name}={v}")
    if not 0 <= reserve_bytes < gpu_bytes:
        raise ValueError(f"reserve_bytes must be in [0, gpu_bytes={gpu_bytes}), got {reserve_bytes=}")
    usable = gpu_bytes - reserve_bytes
    per_node = num_shards if gpus_per_node is None else gpus_per_node
    if per_node < 1 or num_shards % per_node:
        raise ValueError(f"gpus_per_node={gpus_per_node} must divide num_shards={num_shards}")
    labels = ["none", "cpu", "cpu+params"] + (["nvme", "nvme+params"] if nvme_bytes is not None else [])
    out = []
    for label in labels:
        for stage in (0, 1, 2, 3):
            try:
                est = estimate_memory(model, stage=stage, num_shards=num_shards, placement=OFFLOADS[label], **kw)
            except ValueError as e:
                if "placement" in str(e):
                    continue  # a combination that does not exist (params offload below stage 3)
                raise
            cpu_node, nvme_node = est.cpu * per_node, est.nvme * per_node
            over = []
            if est.gpu > usable:
                over.append(f"GPU {format_bytes(est.gpu)} > {format_bytes(usable)}")
            if cpu_bytes is not None and cpu_node > cpu_bytes:
                over.append(f"CPU {format_bytes(cpu_node)}/node > {format_bytes(cpu_bytes)}")
            if nvme_bytes is not None and nvme_node > nvme_bytes:
                over.append(f"NVMe {format_bytes(nvme_node)}/node > {format_bytes(nvme_bytes)}")
            if over:
                reason = "needs " + "; ".join(over)
            else:
                reason = f"fits, {format_bytes(usable - est.gpu)} GPU headroom"
            out.append(Candidate(stage, label, est, not over, reason, est.gpu, cpu_node, nvme_node))
    best = next((c for c in out if c.fits), None)
    if best is None:
        why = "nothing fits: " + min(out, key=lambda c: c.gpu).reason
    else:
        skipped = [c for c in out[: out.index(best)]]
        lines = [f"stage {best.stage}, offload {best.offload}: the first candidate that fits ({best.reason})."]
        if skipped:
            lines.append("Faster candidates rejected: " + "; ".join(
                f"stage {c.stage}/{c.offload} {c.reason}" for c in skipped
            ) + ".")
        lines.append(SPEED_ORDER)
        why = "\n".join(lines)
    return StageChoice(best, tuple(out), why)
