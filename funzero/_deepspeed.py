"""``fz.initialize``: a DeepSpeed JSON config read as a funzero plan, optimizer, state and step.

    init = fz.initialize(model, "ds_config.json")          # or the config as a dict
    for batch in loader:                                     # this rank's micro-batch, as DeepSpeed
        init_state, metrics = init.step(init_state, batch)   # one call per micro-batch

Everything ``deepspeed.initialize`` would do with the config becomes ordinary funzero objects:
``zero_optimization.stage`` is ``fz.zero(stage)``, offload is placement, ``bf16``/``fp16`` a
precision, ``optimizer`` + ``scheduler`` + ``gradient_clipping`` a chain of transforms,
``gradient_accumulation_steps`` ``optim.multi_steps``. Groups default to one per repeated block of
the model (the items of each ``nn.ModuleList``/``nn.Sequential`` of same-type modules:
``model.layers.N``, ``blocks.N``, ``h.N``), so stage 3 gathers block by block.

Every key falls in exactly one row of the table below. A key not in it is a ``ValueError`` naming
its dotted path; so is a key funzero cannot honour, and a key accepted only at one value when it
has another. Nothing is ignored unless ignoring it cannot change the numbers, and those keys are
listed with the reason.

=============================================================  ========  =====================================================
key                                                            how       funzero
=============================================================  ========  =====================================================
train_batch_size                                               mapped    train = micro x accumulation x world; any two give the third
train_micro_batch_size_per_gpu                                 mapped    rows of this rank's micro-batch (``batch="local"`` plan)
gradient_accumulation_steps                                    mapped    ``optim.multi_steps(tx, k)`` for k > 1
gradient_clipping                                              mapped    ``optim.clip_by_global_norm(c)`` first (absent: 1.0, DeepSpeed's default; 0: none)
communication_data_type                                        mapped    the precision's ``reduce_dtype`` (fp32 / fp16 / bf16)
data_types.grad_accum_dtype                                    mapped    ``multi_steps(..., accum_dtype=)``
optimizer.type                                                 mapped    Adam / AdamW / Lion, any case; "Adam" is AdamW unless adam_w_mode is false
optimizer.params.lr                                            mapped    the learning rate (the scheduler's peak where it has none)
optimizer.params.betas                                         mapped    b1, b2
optimizer.params.eps                                           mapped    eps (Adam, AdamW)
optimizer.params.weight_decay                                  mapped    decoupled (AdamW, Lion) or L2 added to the gradient (Adam with adam_w_mode false)
optimizer.params.adam_w_mode                                   mapped    decoupled weight decay for type Adam (default true)
optimizer.params.torch_adam                                    mapped    only its defaults: torch.optim.AdamW decays 0.01 when weight_decay is absent
optimizer.params.bias_correction                               only      true: funzero's Adam always corrects the moments
optimizer.params.amsgrad                                       only      false: no AMSGrad
optimizer.params.fp32_optimizer_states                         only      true: moments are fp32
scheduler.type                                                 mapped    WarmupLR / WarmupDecayLR / WarmupCosineLR as ``optim.warmup_lr`` / ``warmup_decay_lr`` / ``warmup_cosine_lr``
scheduler.params.warmup_min_lr                                 mapped    WarmupLR, WarmupDecayLR
scheduler.params.warmup_max_lr                                 mapped    WarmupLR (default: optimizer lr), WarmupDecayLR (default 0.001, as DeepSpeed)
scheduler.params.warmup_num_steps                              mapped    all three
scheduler.params.warmup_type                                   mapped    "log" or "linear"
scheduler.params.total_num_steps                               mapped    WarmupDecayLR, WarmupCosineLR (required)
scheduler.params.warmup_min_ratio                              mapped    WarmupCosineLR
scheduler.params.cos_min_ratio                                 mapped    WarmupCosineLR
scheduler.params.last_batch_iteration                          only      -1: a fresh run (resume with ``fz.load_state``)
fp16.enabled                                                   mapped    ``fz.fp16(...)``
fp16.loss_scale                                                only      0: dynamic loss scaling
fp16.initial_scale_power                                       mapped    ``fz.fp16(initial_scale_power=)``
fp16.loss_scale_window                                         mapped    ``fz.fp16(loss_scale_window=)``
fp16.hysteresis                                                mapped    ``fz.fp16(hysteresis=)``
fp16.min_loss_scale                                            mapped    ``fz.fp16(min_loss_scale=)``
fp16.consecutive_hysteresis                                    only      false: funzero's scaler has DeepSpeed's default behaviour
fp16.auto_cast                                                 only      false: the model computes in the parameters' dtype
fp16.fp16_master_weights_and_grads                             only      false: the master copy is fp32
bf16.enabled                                                   mapped    ``fz.bf16()``
bf16.immediate_grad_update                                     only      false
bf16.check_grad_overflow                                       only      false: funzero's bf16 steps do not skip non-finite gradients
bf16.bf16_master_weights_and_grads                             only      false: the master copy is fp32
bf16.bf16_optimizer_states                                     only      false: moments are fp32
zero_optimization.stage                                        mapped    ``fz.zero(stage)``
zero_optimization.offload_optimizer.device                     mapped    cpu: ``placement["opt_state"] = "cpu"``, nvme: ``"nvme:<nvme_path>"`` (stages 1-3)
zero_optimization.offload_optimizer.nvme_path                  mapped    the NVMe directory
zero_optimization.offload_optimizer.ratio                      only      1.0: all of the optimizer state (partial offload: placement rules)
zero_optimization.offload_optimizer.super_offload              only      false
zero_optimization.offload_param.device                         mapped    ``placement["params"]`` (stage 3)
zero_optimization.offload_param.nvme_path                      mapped    the NVMe directory
zero_optimization.offload_optimizer.pin_memory                 ignored   host state is always pinned where a GPU is present
zero_optimization.offload_optimizer.buffer_count               ignored   NVMe I/O buffering; funzero streams group by group
zero_optimization.offload_optimizer.pipeline_read              ignored   I/O overlap only
zero_optimization.offload_optimizer.pipeline_write             ignored   I/O overlap only
zero_optimization.offload_optimizer.fast_init                  ignored   how the state file is first written
zero_optimization.offload_optimizer.cpuadam_cores_perc         ignored   host threads of the update
zero_optimization.offload_param.pin_memory                     ignored   as for the optimizer state
zero_optimization.offload_param.buffer_count                   ignored   NVMe I/O buffering
zero_optimization.offload_param.buffer_size                    ignored   NVMe I/O buffering
zero_optimization.offload_param.max_in_cpu                     ignored   NVMe I/O buffering
zero_optimization.contiguous_gradients                         ignored   every group's gradient is one flat buffer already
zero_optimization.overlap_comm                                 ignored   reduces run during backward as each group finishes
zero_optimization.reduce_scatter                               ignored   stages 1-3 always reduce-scatter (the same sums)
zero_optimization.reduce_bucket_size                           ignored   the unit of communication is the group (one block)
zero_optimization.allgather_bucket_size                        ignored   the unit of communication is the group
zero_optimization.allgather_partitions                         ignored   one all-gather per group
zero_optimization.use_multi_rank_bucket_allreduce              ignored   bucketing of the reduce
zero_optimization.round_robin_gradients                        ignored   order of gradient copies only
zero_optimization.sub_group_size                               ignored   the update runs group by group
zero_optimization.stage3_prefetch_bucket_size                  ignored   gathers are per group, just in time
zero_optimization.stage3_param_persistence_threshold           ignored   small parameters are gathered with their group
zero_optimization.stage3_model_persistence_threshold           ignored   as above
zero_optimization.stage3_max_live_parameters                   ignored   at most two groups are gathered at once
zero_optimization.stage3_max_reuse_distance                    ignored   gathered groups are dropped after their module
zero_optimization.memory_efficient_linear                      ignored   stage 3's saved-tensor hooks re-gather for backward
zero_optimization.ignore_unused_parameters                     ignored   unused parameters get zero gradients
zero_optimization.stage3_gather_16bit_weights_on_model_save    error     save with ``fz.gather_params`` / ``fz.save_state``
zero_optimization.stage3_gather_fp16_weights_on_model_save     error     as above
zero_optimization.cpu_offload                                  error     deprecated in DeepSpeed: use offload_optimizer
zero_optimization.zero_hpz_partition_size                      only      1: one data-parallel axis
zero_optimization.zero_quantized_weights                       only      false
zero_optimization.zero_quantized_gradients                     only      false
zero_optimization.zero_quantized_nontrainable_weights          only      false
zero_optimization.legacy_stage1                                only      false
zero_optimization.elastic_checkpoint                           only      false
prescale_gradients                                             only      false: gradients are averaged after the reduce
gradient_predivide_factor                                      only      1.0
steps_per_print                                                ignored   no logging of its own: print ``metrics`` yourself
wall_clock_breakdown                                           ignored   no timers of its own
activation_checkpointing                                       error     use ``fz.remat(model, rules)``
checkpoint                                                     error     use ``fz.save_state`` / ``fz.load_state``
compile                                                        error     wrap the step: ``fz.compile(init.step)``
=============================================================  ========  =====================================================

``"auto"`` (Hugging Face's placeholder) is resolved as its Trainer integration does, with the
Trainer's default arguments where it would read them: the batch sizes from each other and the
world (an ``"auto"`` one is unknown in train = micro x accumulation x world; a lone known one
sets accumulation to 1, as DeepSpeed does), ``optimizer.params.lr`` 5e-5, ``betas`` [0.9, 0.999],
``eps`` 1e-8, ``weight_decay`` 0, ``gradient_clipping`` 1.0, ``fp16/bf16.enabled`` false,
``scheduler.params.warmup_min_lr`` 0, ``warmup_max_lr`` the optimizer's lr,
``warmup_num_steps`` 1; an ignored key may be ``"auto"`` (HF fills the bucket sizes from the
model's width, which funzero has no use for). ``scheduler.params.total_num_steps`` (the run's
length) has no default: give it, or any other value, by dotted key in ``auto=``.

Numerical differences from DeepSpeed, by design: gradient clipping is optax's (scale by
``c / norm`` when ``norm >= c``; DeepSpeed divides by ``norm + 1e-6``); gradients are reduced in
fp32 under bf16/fp16 unless ``communication_data_type`` says otherwise (DeepSpeed reduces in the
16-bit type by default).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from funzero import optim
from funzero._plan import Plan, zero
from funzero._precision import Precision, bf16, fp16, fp32
from funzero._state import TrainState, init
from funzero._step import train_step

__all__ = ["Initialized", "block_rules", "initialize"]

# --- the table, as data -------------------------------------------------------------------------
# Sections are dicts walked into; every other key is a leaf with one rule:
#   "map": funzero maps it (the builders below read it);  ("only", v): accepted when equal to v;
#   "ignore": accepted, no effect on the numbers (why: the module docstring);  "error": refused.
_SECTIONS = {
    "optimizer", "optimizer.params", "scheduler", "scheduler.params", "fp16", "bf16", "data_types",
    "zero_optimization", "zero_optimization.offload_optimizer", "zero_optimization.offload_param",
}
_MAP, _IGNORE, _ERROR = "map", "ignore", "error"
_RULES: dict[str, Any] = {
    "train_batch_size": _MAP, "train_micro_batch_size_per_gpu": _MAP, "gradient_accumulation_steps": _MAP,
    "gradient_clipping": _MAP, "communication_data_type": _MAP, "data_types.grad_accum_dtype": _MAP,
    "optimizer.type": _MAP, "optimizer.params.lr": _MAP, "optimizer.params.betas": _MAP,
    "optimizer.params.eps": _MAP, "optimizer.params.weight_decay": _MAP, "optimizer.params.adam_w_mode": _MAP,
    "optimizer.params.torch_adam": _MAP, "optimizer.params.bias_correction": ("only", True),
    "optimizer.params.amsgrad": ("only", False), "optimizer.params.fp32_optimizer_states": ("only", True),
    "scheduler.type": _MAP, "scheduler.params.warmup_min_lr": _MAP, "scheduler.params.warmup_max_lr": _MAP,
    "scheduler.params.warmup_num_steps": _MAP, "scheduler.params.warmup_type": _MAP,
    "scheduler.params.total_num_steps": _MAP, "scheduler.params.warmup_min_ratio": _MAP,
    "scheduler.params.cos_min_ratio": _MAP, "scheduler.params.last_batch_iteration": ("only", -1),
    "fp16.enabled": _MAP, "fp16.loss_scale": ("only", 0), "fp16.initial_scale_power": _MAP,
    "fp16.loss_scale_window": _MAP, "fp16.hysteresis": _MAP, "fp16.min_loss_scale": _MAP,
    "fp16.consecutive_hysteresis": ("only", False), "fp16.auto_cast": ("only", False),
    "fp16.fp16_master_weights_and_grads": ("only", False),
    "bf16.enabled": _MAP, "bf16.immediate_grad_update": ("only", False), "bf16.check_grad_overflow": ("only", False),
    "bf16.bf16_master_weights_and_grads": ("only", False), "bf16.bf16_optimizer_states": ("only", False),
    "zero_optimization.stage": _MAP,
    "zero_optimization.offload_optimizer.device": _MAP, "zero_optimization.offload_optimizer.nvme_path": _MAP,
    "zero_optimization.offload_optimizer.ratio": ("only", 1.0),
    "zero_optimization.offload_optimizer.super_offload": ("only", False),
    "zero_optimization.offload_param.device": _MAP, "zero_optimization.offload_param.nvme_path": _MAP,
    **{f"zero_optimization.offload_optimizer.{k}": _IGNORE for k in (
        "pin_memory", "buffer_count", "pipeline_read", "pipeline_write", "fast_init", "cpuadam_cores_perc")},
    **{f"zero_optimization.offload_param.{k}": _IGNORE for k in ("pin_memory", "buffer_count", "buffer_size", "max_in_cpu")},
    **{f"zero_optimization.{k}": _IGNORE for k in (
        "contiguous_gradients", "overlap_comm", "reduce_scatter", "reduce_bucket_size", "allgather_bucket_size",
        "allgather_partitions", "use_multi_rank_bucket_allreduce", "round_robin_gradients", "sub_group_size",
        "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_model_persistence_threshold",
        "stage3_max_live_parameters", "stage3_max_reuse_distance", "memory_efficient_linear",
        "ignore_unused_parameters")},
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": (_ERROR, "save full weights with fz.gather_params(state, plan) or fz.save_state"),
    "zero_optimization.stage3_gather_fp16_weights_on_model_save": (_ERROR, "save full weights with fz.gather_params(state, plan) or fz.save_state"),
    "zero_optimization.cpu_offload": (_ERROR, "deprecated in DeepSpeed; use zero_optimization.offload_optimizer.device"),
    "zero_optimization.zero_hpz_partition_size": ("only", 1),
    **{f"zero_optimization.{k}": ("only", False) for k in (
        "zero_quantized_weights", "zero_quantized_gradients", "zero_quantized_nontrainable_weights",
        "legacy_stage1", "elastic_checkpoint")},
    "prescale_gradients": ("only", False), "gradient_predivide_factor": ("only", 1.0),
    "steps_per_print": _IGNORE, "wall_clock_breakdown": _IGNORE,
    "activation_checkpointing": (_ERROR, "use fz.remat(model, rules) on the model"),
    "checkpoint": (_ERROR, "use fz.save_state / fz.load_state"),
    "compile": (_ERROR, "wrap the step: fz.compile(init.step)"),
}

# Parameters each optimizer and scheduler type takes (the rest of the section is refused for it).
_ADAM_KEYS = {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam", "bias_correction", "amsgrad",
              "fp32_optimizer_states"}
_OPTIMIZERS = {"adam": _ADAM_KEYS, "adamw": _ADAM_KEYS, "lion": {"lr", "betas", "weight_decay"}}
_WARMUP_KEYS = {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"}
_SCHEDULERS = {
    "WarmupLR": _WARMUP_KEYS,
    "WarmupDecayLR": _WARMUP_KEYS | {"total_num_steps"},
    "WarmupCosineLR": {"total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type",
                       "last_batch_iteration"},
}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# "auto" where Hugging Face's Trainer fills the value from its arguments: their defaults.
_HF_DEFAULTS = {
    "optimizer.params.lr": 5e-5, "optimizer.params.betas": [0.9, 0.999], "optimizer.params.eps": 1e-8,
    "optimizer.params.weight_decay": 0.0, "gradient_clipping": 1.0, "fp16.enabled": False, "bf16.enabled": False,
    "scheduler.params.warmup_min_lr": 0.0, "scheduler.params.warmup_num_steps": 1,
}
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_UNSET = object()


class Initialized(NamedTuple):
    """What :func:`initialize` builds: the pieces of a funzero run, and the sizes it resolved."""

    plan: Plan  # fz.zero(stage, groups=..., placement=..., batch="local")
    tx: optim.GradientTransformation  # clipping, the optimizer, accumulation
    state: TrainState  # fz.init(model, tx, plan, precision=precision)
    step: Callable  # fz.train_step(model, loss_fn, tx, plan): one call per micro-batch
    precision: Precision
    lr_schedule: Callable  # updates applied -> learning rate (a constant schedule without a scheduler)
    train_batch_size: int  # rows per optimizer step, all ranks together
    micro_batch_size: int  # rows of one rank's micro-batch (train_micro_batch_size_per_gpu)
    gradient_accumulation_steps: int  # step calls per optimizer step
    config: dict  # the config with every "auto" resolved and the three batch sizes filled in


# --- reading the config -------------------------------------------------------------------------
def _load(config) -> dict:
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise ValueError(f"DeepSpeed config file {path!r} does not exist")
        with open(path) as f:
            try:
                out = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"DeepSpeed config file {path!r} is not JSON: {e}") from None
        if not isinstance(out, dict):
            raise ValueError(f"DeepSpeed config file {path!r} holds a {type(out).__name__}, not a JSON object")
        return out
    raise ValueError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")


def _flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` for every leaf, each checked against the table."""
    out = {}
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if path in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ValueError(f"DeepSpeed config key {path!r} must be an object, got {value!r}")
            out.update(_flatten(value, path + "."))
            continue
        rule = _RULES.get(path)
        if rule is None:
            raise ValueError(f"unknown DeepSpeed config key {path!r}: funzero does not know what it would mean here")
        if isinstance(rule, tuple) and rule[0] == _ERROR:
            raise ValueError(f"DeepSpeed config key {path!r} is not supported: {rule[1]}")
        if isinstance(rule, tuple) and rule[0] == "only":
            # bool is an int in Python: compare types too, so that `true` is not accepted as 1
            if not (value == rule[1] and isinstance(value, bool) == isinstance(rule[1], bool)):
                raise ValueError(
                    f"DeepSpeed config key {path!r} is supported only as {_show(rule[1])}, got {_show(value)}"
                )
        out[path] = value
    return out


class _Reader:
    """Values of the flattened config with "auto" resolved; remembers what it resolved."""

    def __init__(self, flat: dict, auto: Mapping) -> None:
        self.flat, self.auto, self.resolved = flat, dict(auto), {}
        for key in self.auto:
            if flat.get(key) != "auto":
                raise ValueError(
                    f"auto= gives a value for {key!r}, which the config does not set to \"auto\" "
                    f"(it is {_show(flat.get(key)) if key in flat else 'absent'})"
                )
            if _RULES.get(key) == _IGNORE:
                raise ValueError(f"auto= gives a value for {key!r}, which funzero ignores (see fz.initialize's table)")

    def get(self, key: str, default: Any = _UNSET, auto_default: Any = _UNSET) -> Any:
        value = self.flat.get(key, default)
        if isinstance(value, str) and value == "auto":
            if key in self.auto:
                value = self.auto[key]
            elif auto_default is not _UNSET:
                value = auto_default
            elif key in _HF_DEFAULTS:
                value = _HF_DEFAULTS[key]
            else:
                raise ValueError(
                    f"DeepSpeed config key {key!r} is \"auto\" and funzero has no Trainer to take it from: "
                    f"give a value in the config or as fz.initialize(..., auto={{{key!r}: value}})"
                )
            self.resolved[key] = value
        return value


def _show(value) -> str:
    """A value as the config would spell it (JSON), or its repr when it is no JSON value."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _number(key: str, value, *, integer: bool = False, low: float | None = None, strict: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ValueError(f"DeepSpeed config key {key!r} must be {kind}{bound}, got {_show(value)}")
    return int(value) if integer else float(value)


def _bool(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"DeepSpeed config key {key!r} must be true or false, got {_show(value)}")
    return value


# --- the pieces -----------------------------------------------------------------------------------
def _batch_sizes(r: _Reader, world: int) -> tuple[int, int, int]:
    """DeepSpeed's rule: train = micro x accumulation x world; any two determine the third."""
    given = {}
    for key in _BATCH_KEYS:
        value = r.get(key, None, auto_default=None)
        if value is not None:
            given[key] = _number(key, value, integer=True, low=0, strict=True)
    train, micro, accum = (given.get(k) for k in _BATCH_KEYS)

    def bad(why: str):
        shown = ", ".join(f"{k}={given.get(k, 'unset')}" for k in _BATCH_KEYS)
        return ValueError(f"DeepSpeed batch sizes {shown} on a world of {world} rank(s): {why}")

    if train is None and micro is None:
        raise bad("give train_batch_size or train_micro_batch_size_per_gpu")
    if train is not None and micro is not None and accum is None:
        accum, rem = divmod(train, micro * world)
        if rem or accum < 1:
            raise bad(f"train_batch_size is not a whole multiple of micro x world = {micro * world}")
    elif train is not None and micro is None:
        accum = accum or 1
        micro, rem = divmod(train, accum * world)
        if rem or micro < 1:
            raise bad(f"train_batch_size is not a whole multiple of accumulation x world = {accum * world}")
    accum = accum or 1
    if train is None:
        train = micro * accum * world
    if train != micro * accum * world:
        raise bad(f"train_batch_size must equal micro x accumulation x world = {micro * accum * world}")
    return train, micro, accum


def _precision(r: _Reader) -> Precision:
    use_fp16 = _bool("fp16.enabled", r.get("fp16.enabled", False))
    use_bf16 = _bool("bf16.enabled", r.get("bf16.enabled", False))
    if use_fp16 and use_bf16:
        raise ValueError("DeepSpeed config enables both fp16.enabled and bf16.enabled; choose one")
    comm = r.get("communication_data_type", None)
    if comm is not None and comm not in _DTYPES:
        raise ValueError(f"DeepSpeed config key 'communication_data_type' must be one of {sorted(_DTYPES)}, got {_show(comm)}")
    reduce = {} if comm is None else {"reduce_dtype": _DTYPES[comm]}
    if use_fp16:
        knobs = {
            "initial_scale_power": _number("fp16.initial_scale_power", r.get("fp16.initial_scale_power", 16), integer=True, low=0),
            "loss_scale_window": _number("fp16.loss_scale_window", r.get("fp16.loss_scale_window", 1000), integer=True, low=1),
            "hysteresis": _number("fp16.hysteresis", r.get("fp16.hysteresis", 2), integer=True, low=1),
            "min_loss_scale": _number("fp16.min_loss_scale", r.get("fp16.min_loss_scale", 1), low=0, strict=True),
        }
        return fp16(**reduce, **knobs)
    if use_bf16:
        return bf16(**reduce)
    return fp32() if comm is None else Precision(torch.float32, None, _DTYPES[comm])


def _schedule(r: _Reader, lr: float):
    """The learning rate as a schedule of updates applied (DeepSpeed's scheduler, or constant)."""
    kind = r.get("scheduler.type", None)
    params = {k.rpartition(".")[2] for k in r.flat if k.startswith("scheduler.params.")}
    if kind is None:
        if params:
            raise ValueError(f"DeepSpeed config has scheduler.params ({sorted(params)[0]!r}, ...) but no scheduler.type")
        return lr
    if kind not in _SCHEDULERS:
        raise ValueError(f"DeepSpeed scheduler.type {kind!r} is not supported; funzero has {sorted(_SCHEDULERS)}")
    extra = sorted(params - _SCHEDULERS[kind])
    if extra:
        raise ValueError(f"DeepSpeed config key 'scheduler.params.{extra[0]}' is not a parameter of {kind}")

    def p(name, default=_UNSET, **auto):
        key = f"scheduler.params.{name}"
        value = r.get(key, default, **auto)
        if value is _UNSET:
            raise ValueError(f"DeepSpeed config key {key!r} is required by {kind}")
        return value

    steps = _number("scheduler.params.warmup_num_steps", p("warmup_num_steps", 1000), integer=True, low=0, strict=True)
    warmup_type = p("warmup_type", "log")
    if warmup_type not in ("log", "linear"):
        raise ValueError(f"DeepSpeed config key 'scheduler.params.warmup_type' must be \"log\" or \"linear\", got {_show(warmup_type)}")
    if kind == "WarmupCosineLR":
        return optim.warmup_cosine_lr(
            _number("scheduler.params.total_num_steps", p("total_num_steps"), integer=True, low=0),
            learning_rate=lr,
            warmup_min_ratio=_number("scheduler.params.warmup_min_ratio", p("warmup_min_ratio", 0.0), low=0),
            warmup_num_steps=steps,
            cos_min_ratio=_number("scheduler.params.cos_min_ratio", p("cos_min_ratio", 0.0001), low=0),
            warmup_type=warmup_type,
        )
    lo = _number("scheduler.params.warmup_min_lr", p("warmup_min_lr", 0.0), low=0)
    # DeepSpeed's defaults: WarmupLR peaks at the optimizer's lr, WarmupDecayLR at 0.001.
    hi = _number("scheduler.params.warmup_max_lr", p("warmup_max_lr", lr if kind == "WarmupLR" else 0.001, auto_default=lr), low=0)
    if kind == "WarmupLR":
        return optim.warmup_lr(warmup_min_lr=lo, warmup_max_lr=hi, warmup_num_steps=steps, warmup_type=warmup_type)
    total = _number("scheduler.params.total_num_steps", p("total_num_steps"), integer=True, low=0)
    return optim.warmup_decay_lr(total, warmup_min_lr=lo, warmup_max_lr=hi, warmup_num_steps=steps, warmup_type=warmup_type)


def _optimizer(r: _Reader) -> tuple[optim.GradientTransformation, Callable]:
    kind = r.get("optimizer.type", None)
    if kind is None:
        raise ValueError(
            "DeepSpeed config has no optimizer.type (DeepSpeed would take a client optimizer); "
            "fz.initialize builds one of Adam, AdamW, Lion"
        )
    if not isinstance(kind, str) or kind.lower() not in _OPTIMIZERS:
        raise ValueError(f"DeepSpeed optimizer.type {kind!r} is not supported; funzero has Adam, AdamW, Lion")
    name = kind.lower()
    params = {k.rpartition(".")[2] for k in r.flat if k.startswith("optimizer.params.")}
    extra = sorted(params - _OPTIMIZERS[name])
    if extra:
        raise ValueError(f"DeepSpeed config key 'optimizer.params.{extra[0]}' is not a parameter of {kind}")
    lr = _number("optimizer.params.lr", r.get("optimizer.params.lr", 1e-3), low=0)
    betas = r.get("optimizer.params.betas", [0.9, 0.99] if name == "lion" else [0.9, 0.999])
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
        raise ValueError(f"DeepSpeed config key 'optimizer.params.betas' must be a pair, got {_show(betas)}")
    b1, b2 = (_number("optimizer.params.betas", b, low=0) for b in betas)
    schedule = _schedule(r, lr)
    if name == "lion":
        wd = _number("optimizer.params.weight_decay", r.get("optimizer.params.weight_decay", 0.0), low=0)
        opt = optim.lion(schedule, b1, b2, weight_decay=wd)
    else:
        eps = _number("optimizer.params.eps", r.get("optimizer.params.eps", 1e-8), low=0)
        decoupled = name == "adamw" or _bool("optimizer.params.adam_w_mode", r.get("optimizer.params.adam_w_mode", True))
        torch_adam = _bool("optimizer.params.torch_adam", r.get("optimizer.params.torch_adam", False))
        # DeepSpeed's own Adam kernels default to no decay; torch.optim.AdamW (torch_adam) to 0.01.
        wd_default = 0.01 if torch_adam and decoupled else 0.0
        wd = _number("optimizer.params.weight_decay", r.get("optimizer.params.weight_decay", wd_default), low=0)
        if decoupled:
            opt = optim.adamw(schedule, b1, b2, eps, weight_decay=wd)
        elif wd == 0:
            opt = optim.adam(schedule, b1, b2, eps)
        else:  # classic Adam: L2 decay joins the gradient before the moments
            opt = optim.chain(optim.add_decayed_weights(wd), optim.scale_by_adam(b1, b2, eps), optim.scale_by_learning_rate(schedule))
    return opt, schedule if callable(schedule) else optim.constant_schedule(schedule)


def _placement(r: _Reader, stage: int) -> dict:
    out = {}
    for part, leaf, stages in (("offload_optimizer", "opt_state", (1, 2, 3)), ("offload_param", "params", (3,))):
        key = f"zero_optimization.{part}.device"
        device = r.get(key, "none")
        if device not in ("none", "cpu", "nvme"):
            raise ValueError(f"DeepSpeed config key {key!r} must be \"none\", \"cpu\" or \"nvme\", got {_show(device)}")
        if device == "none":
            continue
        if stage not in stages:
            raise ValueError(
                f"DeepSpeed config key {key!r} = {_show(device)} needs zero_optimization.stage in {stages}, got {stage}"
            )
        if device == "cpu":
            out[leaf] = "cpu"
        else:
            path = r.get(f"zero_optimization.{part}.nvme_path", None)
            if not isinstance(path, str) or not path:
                raise ValueError(f"DeepSpeed config key {key!r} = \"nvme\" needs zero_optimization.{part}.nvme_path")
            out[leaf] = f"nvme:{path}"
    return out


def block_rules(model: nn.Module) -> list[str]:
    """One group rule per repeated block of ``model``: for each ``nn.ModuleList`` or
    ``nn.Sequential`` of two or more modules of one type that hold parameters (the outermost such
    list on each branch), the rule ``<its path>\\.(\\d+)\\.`` (e.g. ``model\\.layers\\.(\\d+)\\.``)."""
    rules = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = prefix + name
            items = list(child.children()) if isinstance(child, (nn.ModuleList, nn.Sequential)) else []
            if (
                len(items) >= 2
                and len({type(m) for m in items}) == 1
                and all(any(True for _ in m.parameters()) for m in items)
            ):
                rules.append(re.escape(path) + r"\.(\d+)\.")
            else:
                visit(path + ".", child)

    visit("", model)
    return rules


def _default_loss(apply, batch):
    """The model's own loss: ``apply(**batch)`` for a dict batch, ``apply(*batch)`` for a tuple or
    list, else ``apply(batch)``; a tensor result is the loss, otherwise its ``loss`` (a Hugging
    Face output)."""
    if isinstance(batch, Mapping):
        out = apply(**batch)
    elif isinstance(batch, (tuple, list)):
        out = apply(*batch)
    else:
        out = apply(batch)
    if isinstance(out, torch.Tensor):
        return out
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise ValueError(
            f"the model returned {type(out).__name__} without a loss; pass fz.initialize(..., loss_fn=...)"
        )
    return loss


def initialize(
    model: nn.Module,
    config: Mapping | str | os.PathLike,
    *,
    mesh=None,
    groups=None,
    loss_fn: Callable | None = None,
    auto: Mapping[str, Any] | None = None,
    batch: str = "local",
) -> Initialized:
    """Read a DeepSpeed config and build the funzero run it describes (``deepspeed.initialize``'s
    counterpart; the key-by-key mapping is the table in this module's docstring).

    Args:
        model: any ``nn.Module``; it becomes funzero's template (see :func:`funzero.init`).
        config: the DeepSpeed config as a dict, or the path of its JSON file.
        mesh: the ranks (default: ``Mesh.from_env(("dp",))``: torchrun's world, or one process).
        groups: group rules for :func:`funzero.zero`; default :func:`block_rules` of the model.
        loss_fn: ``loss_fn(apply, batch) -> loss``; default: the model's own loss (a dict batch is
            passed as keywords, a tuple as positions; a Hugging Face output gives its ``loss``).
        auto: values for keys the config sets to ``"auto"``, by dotted key
            (``{"scheduler.params.total_num_steps": 1000}``).
        batch: ``"local"`` (DeepSpeed's way: each rank's step gets its own micro-batch of
            ``micro_batch_size`` rows) or ``"global"`` (every rank gets the same
            ``micro_batch_size x world`` rows and takes its slice).

    Returns:
        :class:`Initialized`: ``plan, tx, state, step`` and the resolved precision, learning-rate
        schedule, batch sizes and config. Call ``step`` once per micro-batch; it applies an
        update every ``gradient_accumulation_steps`` calls.

    Raises:
        ValueError: a key that is unknown, unsupported, or accepted only at another value (named
            by its dotted path); inconsistent batch sizes (all three named); an ``"auto"`` funzero
            cannot resolve; a value of the wrong kind.

    Example:
        >>> init = fz.initialize(model, {"train_batch_size": 32, "zero_optimization": {"stage": 3},
        ...                              "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}})
        >>> state = init.state
        >>> for batch in loader:
        ...     state, metrics = init.step(state, batch)
    """
    cfg = _load(config)
    r = _Reader(_flatten(cfg), auto or {})
    if mesh is None:
        from shardspec import Mesh

        mesh = Mesh.from_env(("dp",))
    world = mesh.size("dp")
    train, micro, accum = _batch_sizes(r, world)
    stage = r.get("zero_optimization.stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed config key 'zero_optimization.stage' must be 0, 1, 2 or 3, got {_show(stage)}")
    precision = _precision(r)
    opt, schedule = _optimizer(r)
    # DeepSpeed clips at 1.0 when the key is absent (constants.GRADIENT_CLIPPING_DEFAULT, 0.19).
    clip = _number("gradient_clipping", r.get("gradient_clipping", 1.0), low=0)
    tx = optim.chain(optim.clip_by_global_norm(clip), opt) if clip > 0 else opt
    accum_dtype = r.get("data_types.grad_accum_dtype", None)
    if accum_dtype is not None and accum_dtype not in _DTYPES:
        raise ValueError(f"DeepSpeed config key 'data_types.grad_accum_dtype' must be one of {sorted(_DTYPES)}, got {_show(accum_dtype)}")
    if accum > 1:
        tx = optim.multi_steps(tx, accum, accum_dtype=_DTYPES.get(accum_dtype))
    plan = zero(
        stage, mesh=mesh, groups=block_rules(model) if groups is None else groups,
        placement=_placement(r, stage), batch=batch,
    )
    state = init(model, tx, plan, precision=precision)
    step = train_step(model, loss_fn or _default_loss, tx, plan)
    resolved = copy.deepcopy(cfg)
    for key, value in {**r.resolved, **dict(zip(_BATCH_KEYS, (train, micro, accum)))}.items():
        node = resolved
        *head, last = key.split(".")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return Initialized(plan, tx, state, step, precision, schedule, train, micro, accum, resolved)
