"""The memory model: per-rank bytes of a ZeRO run, computed by the engine's own code.

Design note (what keeps these numbers honest):

* **It runs the engine, it does not mirror it.** The state is built by ``_state.build_state``,
  the function ``init`` uses, on meta tensors: the same layouts (``_binding.bind``, or layouts
  synthesised from a parameter count), the same specs, the optimizer's own ``init``. Each leaf
  is counted in the memory tier of the placement kind that would hold it. The gradient a group
  holds after backward comes from the group path's own rule (``_group.gradient_like``).
  ``tests/test_memory.py`` holds the estimate to the byte against ``funzero.state_nbytes`` of
  real states on real gloo groups.
* **Two accountings.** ``MemoryEstimate.state`` is what ``TrainState`` holds per rank (what
  ``state_nbytes`` reports). ``MemoryEstimate.model_states`` is the ZeRO paper's accounting
  (Rajbhandari et al. 2020, sec. 3.1 and 5): parameters and gradients in the parameter dtype plus
  K bytes per element of optimizer state, each held as the specs say; 2Ψ + 2Ψ + 12Ψ for
  mixed-precision Adam. Gradients are not part of ``TrainState``: the step makes them and drops
  them. ``MemoryEstimate.grads`` says what the engine itself holds at the end of backward.
* **Tensor and sequence parallelism are layouts, not formulas.** A tp size splits a meta copy of
  the module by ``tensor_parallel``'s own rules on a mesh with no process group (tp rank 0's
  slices stand for every rank's; a split that does not divide is refused), an sp size becomes the
  flattened ``dp x sp`` shard axis ``_sequence.py`` trains over, and the binding of that is
  counted like any other. ``tests/test_memory_parallel.py`` holds it to the byte on tp and sp
  ranks.
* **Transients are estimates.** Gathered groups, the gradient of the group being reduced,
  host staging and activations depend on the schedule, not only on shapes; their formulas are
  documented where they are computed and checked on a GPU by ``benchmarks/memory.py``.

Units: bytes everywhere; the printing helpers (``_counts.py``) use GB = 1e9 bytes.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optree
import torch
from torch import nn

from funzero._activations import ActivationEstimate
from funzero._binding import Binding, bind, from_layouts
from funzero._counts import format_bytes, parse_count
from funzero._group import GroupComm, gradient_like, group_modes
from funzero._placement import Placement, group_of_path, parse_placement
from funzero._plan import STAGES, Plan, zero
from funzero._state import build_state
from funzero._precision import Precision, bf16, fp16, fp32
from funzero._tp import PRESETS, tensor_parallel, tp_layout
from shardspec import FlatLayout, Mesh, held_numel

__all__ = ["MemoryEstimate", "estimate_memory", "layouts_for_num_params", "split_for_estimate"]


# --- layouts ----------------------------------------------------------------------------------
class _PlanningMesh(Mesh):
    """Ranks on named axes with no process group behind them: enough to lay shards out.

    ``bind`` asks the plan for this process's rank; a plan made for estimating has none, and
    every rank's shard has the same size, so rank 0 stands in for all of them (and, on a ``tp``
    axis, tp rank 0's slices for every tp rank's: a split that does not divide is refused).
    """

    def __init__(self, axes: tuple[str, ...], shape: tuple[int, ...]) -> None:
        super().__init__(axes, shape, device_type="meta")

    def rank(self, axis: str) -> int:
        if axis not in self.axes:
            self._axis_index(axis)  # raises, naming the axes
        return 0

    def group(self, axis: str):
        raise RuntimeError("a planning mesh has no process group; it only lays out shards")

    group_over = group


def _planning_mesh(axis: str, num_shards: int, replicate: tuple[str, ...] = (), num_replicas: int = 1) -> _PlanningMesh:
    """``num_shards`` ranks on ``axis`` and ``num_replicas`` copies of them over ``replicate``
    (all on its first axis: per-rank bytes depend only on how many copies there are)."""
    sizes = tuple(num_replicas if i == 0 else 1 for i in range(len(replicate)))
    return _PlanningMesh((*replicate, axis), (*sizes, num_shards))


@dataclass(frozen=True)
class _Layout:
    """The parallel layout an estimate is for, and the mesh that stands for it.

    The shard axis ZeRO splits each group over holds ``num_shards`` ranks; with sequence
    parallelism it is the flattened ``dp x <sp axis>`` axis (as ``_sequence.py`` sets it up), so
    its ``num_shards`` ranks include the ``sp`` ranks. ``tp`` ranks hold different slices.
    """

    num_shards: int
    num_replicas: int
    tp: int
    sp: int
    sp_axis: str = "sp"

    @property
    def replicate(self) -> tuple[str, ...]:
        return ("replicate",) if self.num_replicas > 1 else ()

    @property
    def shard_axis(self) -> str:
        return f"dp_{self.sp_axis}" if self.sp > 1 else "dp"

    def mesh(self) -> _PlanningMesh:
        axes, sizes = [*self.replicate, "dp"], [*((self.num_replicas,) if self.replicate else ()),
                                               self.num_shards // self.sp]
        if self.sp > 1:
            axes.append(self.sp_axis)
            sizes.append(self.sp)
        if self.tp > 1:
            axes.append("tp")
            sizes.append(self.tp)
        mesh = _PlanningMesh(tuple(axes), tuple(sizes))
        if self.sp > 1:
            mesh._flat = {self.shard_axis: ("dp", self.sp_axis)}  # what Mesh.flatten records
        return mesh


def _positive(name: str, value, default: int = 1) -> int:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    return value


def _check_sp(sp: int, num_shards: int) -> None:
    if num_shards % sp:
        raise ValueError(
            f"sp={sp} does not divide num_shards={num_shards}: ZeRO shards over the flattened dp x sp "
            f"axis, whose num_shards ranks include the sp ranks"
        )


def _sp_of(model: nn.Module):
    """The sequence-parallel axis :func:`funzero.sequence_parallel` gave ``model``, or None."""
    return model.__dict__.get("_funzero_sp")


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are meta tensors of the same shapes and
    dtypes (ties kept): splitting it costs no memory and leaves ``model`` as it was."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) not in memo:
            meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _default_rules(model: nn.Module) -> str:
    """The tensor-parallel preset for ``model``'s kind: ``gpt`` for ``funzero.models.GPT``, else
    its Hugging Face ``model_type`` where :data:`funzero._tp.PRESETS` has one."""
    from funzero.models import GPT

    if isinstance(model, GPT):
        return "gpt"
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in PRESETS:
        return kind
    raise ValueError(f"no tensor-parallel preset for a {type(model).__name__} (model_type {kind!r}); "
                     f"pass tp_rules= (a preset of {sorted(PRESETS)} or rules)")


def split_for_estimate(model: nn.Module, tp: int, rules=None) -> nn.Module:
    """A meta copy of ``model`` split over ``tp`` ranks by ``rules`` the way
    :func:`funzero.tensor_parallel` splits it (tp rank 0's slices; every rank's are the same
    size), with no process group: the shapes each tp rank would hold. ``model`` itself if it is
    split already (its own split must then be over ``tp`` ranks) or ``tp`` is 1."""
    have = tp_layout(model)
    if have is not None:
        if have.size != tp:
            raise ValueError(f"tp={tp} contradicts the model's tensor-parallel split over {have.size} ranks")
        return model
    if tp == 1:
        return model
    rules = _default_rules(model) if rules is None else rules
    mesh = _PlanningMesh(("tp",), (tp,))
    return tensor_parallel(_meta_copy(model), mesh, rules=rules, axis="tp")


def _check_sp_heads(model: nn.Module, sp: int) -> None:
    """Every attention module's heads (per tp rank) must divide over the ``sp`` ranks, as the
    Ulysses exchange needs (``funzero._sequence``)."""
    from funzero.models._gpt import CausalSelfAttention

    split = tp_layout(model)
    tp = split.size if split is not None else 1
    for path, m in model.named_modules():
        if isinstance(m, CausalSelfAttention):
            counts = {"attention heads": m.n_head}  # per tp rank once split (tensor_parallel divides it)
        elif hasattr(m, "num_key_value_groups") and getattr(m, "config", None) is not None:
            heads = m.config.num_attention_heads
            counts = {"attention heads": heads // tp,
                      "KV heads": (getattr(m.config, "num_key_value_heads", None) or heads) // tp}
        else:
            continue
        for what, n in counts.items():
            if n % sp:
                per = f" per tensor-parallel rank (of {tp})" if tp > 1 else ""
                raise ValueError(f"sp={sp} does not divide the {n} {what}{per} of module {path!r}: the Ulysses "
                                 "exchange splits them over the sequence-parallel ranks")


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



# --- the estimate -----------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Per-rank bytes of one ZeRO configuration.

    Attributes:
        stage / num_shards / precision: the configuration (N = ``num_shards``, the ranks of
            the shard axis; with sequence parallelism they include the ``sp`` ranks).
        num_replicas: copies of the N shards (hierarchical sharding; 1 without it).
        tp / sp: tensor- and sequence-parallel ranks (1 without them).
        placement: ``{"params": ..., "opt_state": ...}`` each ``"gpu"``, ``"cpu"`` or ``"nvme"``.
        num_params: Ψ, trainable elements a rank's groups hold (tied parameters once; with
            ``tp`` > 1 one tp rank's slices plus the replicated leaves).
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
    num_replicas: int = 1
    tp: int = 1
    sp: int = 1

    @property
    def num_gpus(self) -> int:
        """GPUs of the layout: ``num_shards x num_replicas x tp`` (the shards include ``sp``)."""
        return self.num_shards * self.num_replicas * self.tp

    @property
    def offload(self) -> str:
        """The placement as a planner label: ``none``, ``cpu``, ``cpu+params``, ``nvme``, ..."""
        from funzero._placement import parse_where
        from funzero._planner import OFFLOADS

        for label, p in OFFLOADS.items():
            tiers = {k: parse_where(w, key=k, training=False)[0].tier for k, w in p.items()}
            if dict(self.placement) == tiers:
                return label
        return ",".join(f"{k}={v}" for k, v in self.placement.items())

    def summary(self) -> str:
        """A few lines for humans (GB = 1e9 bytes)."""
        s, ms = self.state, self.model_states
        lines = [
            f"ZeRO stage {self.stage}, N={self.num_shards}"
            + (f" x {self.num_replicas} replicas" if self.num_replicas > 1 else "")
            + (f", tp={self.tp}" if self.tp > 1 else "") + (f", sp={self.sp}" if self.sp > 1 else "")
            + f", Ψ={self.num_params:,} "
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




def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors_with_paths(tree) -> list[tuple[tuple, torch.Tensor]]:
    paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace="funzero")
    return [(p, t) for p, t in zip(paths, leaves) if isinstance(t, torch.Tensor)]


def _state_bytes(state) -> dict[str, int]:
    """``state_nbytes`` of a state built on meta tensors (no two of its leaves share memory)."""
    out = {part: sum(_nbytes(t) for _, t in _tensors_with_paths(getattr(state, part)))
           for part in ("params", "master", "opt_state", "scaler", "step")}
    out["total"] = sum(out.values())
    return out


def _tiers(state, b: Binding, tx) -> dict[str, int]:
    """``{tier: bytes}`` of the state, each leaf where its placement kind holds it: a group's
    leaves by their kind, 0-d leaves of a part in host memory when any group of it is
    offloaded, the gradient accumulator (``optim.multi_steps``) and the rest on the device."""
    pl = b.placement
    out = {"gpu": 0, "cpu": 0, "nvme": 0}

    def add(key, path, t, g=None):
        g = g if g is not None else group_of_path(path, b.layouts)
        if t.dim() == 0 or g is None:
            out["cpu" if pl.offloaded(key) else "gpu"] += _nbytes(t)
        else:
            out[pl.kind_of(key, g).tier] += _nbytes(t)

    for g, t in state.params.items():
        add("params", (), t, g)
    for g, t in (state.master or {}).items():
        add("opt_state", (), t, g)
    acc = tx.traits.accumulate
    placed = acc.inner_state(state.opt_state) if acc is not None else state.opt_state
    for path, t in _tensors_with_paths(placed):
        add("opt_state", path, t)
    rest = _state_bytes(state)
    out["gpu"] += rest["opt_state"] - sum(_nbytes(t) for _, t in _tensors_with_paths(placed))
    out["gpu"] += rest["scaler"] + rest["step"]
    return out


def _reduce_transient(b: Binding, comm: GroupComm, gathered: bool) -> int:
    """Bytes alive for a moment while one group's gradient is formed and reduced (the worst group).

    Backward makes each group's flat gradient by concatenating its leaves' gradients (the leaves'
    and the flat one coexist: 2 x the group in the parameter dtype). With communication the flat
    gradient is cast to ``reduce_dtype`` before the collective (one more copy when the dtypes
    differ); the collective's output is the held gradient, counted in ``grads``. Where the specs
    leave the reduce to the step, it runs over every group while the full local gradients are
    still alive: its casts and the shards it produces come on top. Gathering from the host at
    one rank reduces through the same path (an identity collective, but the casts happen).
    """
    precision, n = b.precision, comm.num_ranks
    pb = torch.empty((), dtype=precision.param_dtype).element_size()
    rd = precision.reduce_dtype or precision.param_dtype
    rb = torch.empty((), dtype=rd).element_size()
    cast = rd != precision.param_dtype
    biggest = max(lay.padded for lay in b.layouts.values())
    concat = 2 * biggest * pb
    if n == 1 and not gathered:
        return concat
    if b.specs.reduce == "step":
        shards = sum(b.specs.held("grads", lay) for lay in b.layouts.values()) * rb
        return max(concat, shards + (biggest * rb if cast else 0))
    return max(concat, biggest * pb + (biggest * rb if cast else 0))


def _binding_for(model, plan: Plan, precision: Precision, placement, num_groups, tp: int) -> Binding:
    """The binding the engine would make of ``model`` (module or parameter count) under ``plan``:
    a module's tp rank-0 slices where ``tp`` > 1; a count's share ``ceil(Ψ / tp)`` (a count
    knows no shapes, so every parameter is taken to be split)."""
    if isinstance(model, nn.Module):
        b = bind(model, plan, precision, training=False)
    else:
        total = parse_count(model)
        if num_groups is None:
            num_groups = _default_num_groups(total)  # the blocks of the whole model, each split over tp
        layouts = layouts_for_num_params(math.ceil(total / tp), num_shards=plan.num_shards, num_groups=num_groups,
                                         dtype=precision.param_dtype, shard_align=plan.shard_align)
        b = from_layouts(plan, layouts, precision, training=False)
    return _with_placement(b, placement)


def _with_placement(b: Binding, placement) -> Binding:
    """``b`` with another placement (estimated, not made: no NVMe directory is touched)."""
    for key, where in dict(placement or {}).items():
        if not isinstance(where, str) and not any(lay.paths for lay in b.layouts.values()):
            raise ValueError(
                f"placement[{key!r}] is a list of leaf-path rules: estimate it for a model or a "
                "state's binding, not a bare parameter count"
            )
    rules = parse_placement(placement, b.specs, stage=b.stage, training=False)
    pl = Placement(rules, b.placement.compute, rank=b.rank, layouts=b.layouts, training=False)
    return dataclasses.replace(b, placement=pl)


def _model_layout(model, num_shards: int, num_replicas: int, tp, sp, tp_rules):
    """``(model to bind, layout)``: ``tp`` and ``sp`` default to what the module was split or
    made sequence-parallel over (1 otherwise), a module still to be split becomes its tp-split
    meta copy, and the sizes are checked against each other and the heads."""
    split = tp_layout(model) if isinstance(model, nn.Module) else None
    seq = _sp_of(model) if isinstance(model, nn.Module) else None
    tp = _positive("tp", tp, split.size if split is not None else 1)
    sp = _positive("sp", sp, seq.size if seq is not None else 1)
    if seq is not None and seq.size != sp:
        raise ValueError(f"sp={sp} contradicts the model's sequence-parallel axis of {seq.size} ranks")
    _check_sp(sp, num_shards)
    if isinstance(model, nn.Module):
        model = split_for_estimate(model, tp, tp_rules)
        if sp > 1:
            _check_sp_heads(model, sp)
    elif tp_rules is not None:
        raise ValueError("tp_rules applies to a model; a bare parameter count is split evenly over tp")
    return model, _Layout(num_shards, num_replicas, tp, sp, seq.axis if seq is not None else "sp")


def _planned(model, stage, num_shards, num_replicas, tp, sp, tp_rules, plan, precision, placement, groups, rest,
             num_groups, leaf_align, shard_align) -> tuple[Binding, _Layout]:
    """The binding :func:`estimate_memory` counts, from its arguments (a plan's values win)."""
    if plan is not None:
        _check_agrees("plan", plan, stage=stage, num_shards=num_shards, num_replicas=num_replicas)
        stage, num_shards, num_replicas = plan.stage, plan.num_shards, plan.num_replicas
        groups, rest, leaf_align, shard_align = plan.groups, plan.rest, plan.leaf_align, plan.shard_align
        if placement is None:
            placement = dict(plan.placement)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in STAGES:
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage=}")
    num_shards = _positive("num_shards", num_shards)
    num_replicas = _positive("num_replicas", num_replicas)
    model, layout = _model_layout(model, num_shards, num_replicas, tp, sp, tp_rules)
    planning = zero(stage, mesh=layout.mesh(), axis=layout.shard_axis, replicate=layout.replicate,
                    batch="local" if layout.sp > 1 else "global", groups=groups, rest=rest, leaf_align=leaf_align,
                    shard_align=shard_align)
    return _binding_for(model, planning, precision, placement, num_groups, layout.tp), layout


def estimate_memory(
    model: nn.Module | Binding | int | str,
    *,
    stage: int | None = None,
    num_shards: int | None = None,
    num_replicas: int | None = None,
    tp: int | None = None,
    sp: int | None = None,
    tp_rules: str | Sequence | None = None,
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

    A rank of a run on ``num_shards x num_replicas x tp`` GPUs: ZeRO splits each group over the
    ``num_shards`` ranks of its shard axis, ``num_replicas`` copies of those shards take other
    rows of the batch (hierarchical sharding), and each of the ``tp`` tensor-parallel ranks holds
    its own slices of the split leaves (and the replicated ones whole). With ``sp``-way sequence
    parallelism the shard axis is the flattened ``dp x sp`` axis: its ``num_shards`` ranks
    include the ``sp`` ranks (``(dp=2, sp=2)``: ``num_shards=4, sp=2``).

    Args:
        model: an ``nn.Module`` (build it under ``torch.device("meta")`` to count a model that
            does not fit: only shapes are read), the ``Binding`` of an existing state
            (``state.binding``), or a parameter count Ψ (``7_000_000_000`` or ``"7B"``).
        stage / num_shards: the ZeRO stage and N; taken from ``plan`` (or the binding) if given.
        num_replicas: hierarchical sharding: copies of the N shards (``zero(..., replicate=)``;
            default 1). Per-rank bytes follow N; the replicas change only what needs more than
            one rank (a reduced gradient's dtype, the reduce's transients).
        tp: tensor-parallel ranks (default: the split :func:`funzero.tensor_parallel` gave the
            module, else 1). A module not split yet is split on a meta copy by ``tp_rules`` (no
            process group, the module untouched); a bare count is taken as split evenly
            (``ceil(Ψ / tp)`` per rank: its norms and biases, replicated in a real model, are
            counted as split).
        sp: sequence-parallel ranks (default: the module's :func:`funzero.sequence_parallel`
            axis, else 1). It must divide ``num_shards`` and, for a module, every attention
            module's heads per tp rank. Model states do not depend on it beyond ``num_shards``;
            activations do (:func:`funzero.gpt_activations`'s ``sp``).
        tp_rules: for a module to split: a preset name or rules, as for
            :func:`funzero.tensor_parallel` (default: the preset of its kind, ``gpt`` for
            ``funzero.models.GPT``, its ``model_type`` for Hugging Face models).
        plan: a plan from :func:`funzero.zero` whose stage, mesh size, groups, alignment and
            placement to use.
        precision: as passed to :func:`funzero.init` (default ``fp32()``, as there), or
            ``"bf16"``, ``"fp16"``, ``"fp32"``.
        tx: the optimizer (its own ``init`` sizes the state) or a name: ``adamw``, ``adam``,
            ``lamb``, ``lion``, ``sgd``, ``sgd-momentum``.
        placement: as for :func:`funzero.zero` (``"device"``, ``"cpu"``, ``"nvme[:<dir>]"``, or
            leaf-path rules for a model); ``opt_state`` includes the fp32 master. Params offload
            needs stage 3, optimizer offload stage >= 1. The estimate reports each part's memory
            tier (``gpu``, ``cpu``, ``nvme``).
        groups / rest / leaf_align / shard_align: as in :func:`funzero.zero` (modules only).
        num_groups: for a bare Ψ: how many equal groups to assume (default: a GPT-like guess).
        prefetch: stage 3: groups gathered ahead of the one computing (the engine today: 1, the
            root's group plus the current block).
        compiled: stage 3 under ``torch.compile``. Compiled steps free each gathered group after
            its owner's forward and gather it again in backward, as eager ones do (see
            ``_group.py``), so the count is the same; kept so callers need not change.
        activations: an :class:`ActivationEstimate` (e.g. from :func:`gpt_activations`) to add;
            its ``tp`` and ``sp`` must be the estimate's.

    Returns:
        A :class:`MemoryEstimate`.

    Raises:
        ValueError: naming a bad stage, shard count, tp or sp size (one that does not divide the
            shards, the heads or a split dimension), placement or count.

    Example:
        >>> est = estimate_memory("7.5B", stage=3, num_shards=64, precision="bf16", num_groups=1)
        >>> round(est.model_states["total"] / 1e9, 2)
        1.88
        >>> round(estimate_memory("70B", stage=3, num_shards=8, tp=8, precision="bf16").model_states["total"] / 1e9, 1)
        17.5
    """
    precision_given = precision is not None
    precision = _precision(precision)
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be an int >= 0, got {prefetch=}")
    if isinstance(model, Binding):
        b, layout = _from_binding(model, stage, num_shards, num_replicas, tp, sp,
                                  precision if precision_given else None, placement)
    else:
        b, layout = _planned(model, stage, num_shards, num_replicas, tp, sp, tp_rules, plan, precision, placement,
                             groups, rest, num_groups, leaf_align, shard_align)
    if activations is not None:
        _check_agrees("activation estimate", activations, tp=layout.tp, sp=layout.sp)
    tx = _optimizer(tx)
    del compiled  # the same count either way (see above)
    return dataclasses.replace(_estimate(b, tx, prefetch=prefetch, activations=activations), tp=layout.tp,
                               sp=layout.sp)


def _check_agrees(what: str, source, **given) -> None:
    """Raise if a value the caller passed (not ``None``) contradicts ``source``'s attribute of that name."""
    for key, value in given.items():
        if value is not None and value != getattr(source, key):
            raise ValueError(f"{key}={value} contradicts the {what}'s {key} {getattr(source, key)}")


def _from_binding(b: Binding, stage, num_shards, num_replicas, tp, sp, precision, placement) -> tuple[Binding, _Layout]:
    """An existing state's binding, checked against what the caller also passed (``None``: not
    passed), with ``placement`` swapped in if given. Its tp size is its split's; a binding does
    not record sequence parallelism, so ``sp`` is only checked to divide its shards."""
    _check_agrees("binding", b, stage=stage, num_shards=num_shards, num_replicas=num_replicas, precision=precision)
    have = b.tp.size if b.tp is not None else 1
    if tp is not None and tp != have:
        raise ValueError(f"tp={tp} contradicts the binding's tensor-parallel split over {have} ranks")
    sp = _positive("sp", sp)
    _check_sp(sp, b.num_shards)
    return (b if placement is None else _with_placement(b, placement)), _Layout(b.num_shards, b.num_replicas, have, sp)


def _estimate(b: Binding, tx, *, prefetch: int, activations: ActivationEstimate | None) -> MemoryEstimate:
    precision, specs, pl, n = b.precision, b.specs, b.placement, b.num_shards
    state = _state_bytes(built := build_state(b, tx, None, "meta", place=False))
    tiers = _tiers(built, b, tx)
    del built
    mesh = _planning_mesh(specs.axis, n, specs.replicate, b.num_replicas)
    comm = GroupComm(mesh, specs, precision.reduce_dtype, torch.device("meta"))
    modes = group_modes(comm, pl, b.layouts)
    grads = 0
    for g, lay in b.layouts.items():
        numel, dt = gradient_like(comm, lay, modes[g], precision.param_dtype)
        grads += numel * dt.itemsize
    lays = list(b.layouts.values())
    sizes = tuple(sorted((lay.padded for lay in lays), reverse=True))
    shards = tuple(sorted((lay.shard_numel for lay in lays), reverse=True))
    padded = sum(sizes)
    pb = precision.param_dtype.itemsize

    # The paper's accounting on the engine's layouts: gradients in the parameter dtype, held
    # whole where the reduce waits for the optimizer step.
    param_elems = sum(specs.held("params", lay) for lay in lays)
    paper_grad_elems = sum(specs.held("grads", lay) for lay in lays) if specs.reduce == "backward" else padded
    model_states = {"params": param_elems * pb, "grads": paper_grad_elems * pb,
                    "optimizer": state["master"] + state["opt_state"]}
    model_states["total"] = sum(model_states.values())

    gathered = comm.gathers(pl.offloaded("params"))
    gather = sum(sizes[: 1 + prefetch]) * pb if gathered else 0  # compiled or not: the same gathers
    reduce = _reduce_transient(b, comm, gathered)

    # Offload transients. A host parameter shard travels to the device before its gather. With
    # optimizer state on the host the update copies the reduced gradients there, and writes the
    # new parameters (where they live on the device) into a pinned staging copy first; each in
    # the share of the groups the host updates.
    staging = {"gpu": 0, "cpu": 0}
    if pl.offloaded("params"):
        staging["gpu"] += shards[0] * pb
    opt_elems = {g: specs.held("opt_state", lay) for g, lay in b.layouts.items()}
    host_opt = sum(v for g, v in opt_elems.items() if pl.offloaded("opt_state", g)) / sum(opt_elems.values())
    if host_opt > 0:
        if specs.reduce == "step" and comm.num_ranks > 1:  # reduced to shards, in reduce_dtype, after backward
            rd = precision.reduce_dtype or precision.param_dtype
            reduced = sum(specs.held("grads", lay) for lay in lays) * rd.itemsize
        else:
            reduced = grads
        staging["cpu"] += round(reduced * host_opt)
        if precision.has_master:
            params_gpu = pl.shares("params", b.layouts).get("gpu", 0.0)
            staging["cpu"] += round(sum(shards) * pb * host_opt * params_gpu)
    act = activations.peak if activations is not None else 0
    gpu_state = tiers["gpu"]
    where = {}
    for key in ("params", "opt_state"):
        found = {pl.kind_of(key, g).tier for g in b.layouts}
        where[key] = found.pop() if len(found) == 1 else "mixed"
    return MemoryEstimate(
        stage=b.stage,
        num_shards=n,
        num_replicas=b.num_replicas,
        precision=precision,
        placement=where,
        num_params=sum(lay.numel for lay in lays),
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
        gpu=gpu_state + gather + staging["gpu"] + max(act, grads + reduce),
        cpu=tiers["cpu"] + staging["cpu"],
        nvme=2 * tiers["nvme"],
    )
