"""Tensor parallelism as rules: which weights split over a ``tp`` mesh axis, and the collectives
that follow, each an explicit autograd Function whose backward is its transpose (Megatron-LM,
Shoeybi et al., 2019, sec. 3).

    fz.tensor_parallel(model, mesh, rules="llama")   # in place; then fz.init / fz.train_step as usual

A rule is a regex over *module* paths (``re.search``, the first rule matching a module wins, a
rule matching no module is an error) and a style:

==============  ==========================================  ===================================
style           leaves of the module (split on ``tp``)       collective installed
==============  ==========================================  ===================================
"colwise"       weight and bias along the output dim         input: identity fwd, all-reduce bwd
"rowwise"       weight along the input dim; bias replicated  output: all-reduce fwd, identity bwd;
                                                             the bias added once, after it
"vocab"         an embedding's rows (the vocabulary)         masked local lookup, all-reduce fwd
"split_out"     as colwise                                   none (a parent module's copy_in)
"split_in"      as rowwise (a bias stays whole: the parent   none (a parent module's reduce_out)
                must add it after the sum)
"copy_in"       none                                         input: identity fwd, all-reduce bwd
"reduce_out"    none                                         output: all-reduce fwd, identity bwd
"region"        none                                         copy_in and reduce_out: a module
                                                             whose children are split_out/_in
"replicate"     none                                         none
==============  ==========================================  ===================================

A column-wise LM head keeps its logits local (each rank its slice of the vocabulary): the loss
is :func:`funzero.losses.vocab_parallel_cross_entropy`, which the transform installs as the
model's ``loss_function`` (Hugging Face's ``labels=`` path; ``funzero.models.GPT``'s targets).

Every leaf no rule splits is replicated over ``tp``; its gradient is the same on every tp rank
(every input to it is), so ZeRO over ``dp`` needs nothing new: each tp rank's groups hold its
slices, and ``dp`` shards those. Rank r of ``tp`` holds the r-th contiguous slice of the split
dim (of each section, for a fused weight: ``sections=3`` splits q, k and v alike).

Design notes (the footguns):

* The modules keep their paths, parameters' names and classes' names: a swapped module's class
  is a subclass made once per class (as ``funzero.ops.patch`` does), so state-dict keys, ties and
  ``isinstance`` checks are unchanged and the group path hands parameters in as before.
* Fused projections called by a parent's code (``funzero.models.GPT``'s fused q/k/v kernel)
  bypass the child's ``forward``: their collectives go on the parent (``copy_in`` /
  ``reduce_out``), the child is ``split_out`` / ``split_in``.
* On the meta device each split module is initialised at its full shape and sliced (see
  :func:`full_shape_init`), so a tp-split model starts from the slices of the values the
  unsplit model starts from, whatever the tp size.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from funzero._collectives import all_gather, all_reduce
from funzero._group import backward_phase
from funzero._sequence import check_heads as check_sequence_heads
from funzero._sequence import sequence_axis
from shardspec import Mesh, MeshAxis, Shard, check_split, first_match, join_shards, local_shape, shard_of

__all__ = ["PRESETS", "TPLayout", "TPRule", "copy_to_tp", "full_shape_init", "gpt2_rules", "gpt_rules", "llama_rules",
           "reduce_from_tp", "tensor_parallel", "tp_info", "tp_layout"]

STYLES = ("colwise", "rowwise", "vocab", "split_out", "split_in", "copy_in", "reduce_out", "region", "replicate")
_ATTR = "_funzero_tp"


@dataclass(frozen=True)
class TPRule:
    """Modules whose path matches ``pattern`` (``re.search``) are split the way ``style`` says.

    ``sections``: the split (output) dim is that many equal fused sections, each split over
    ``tp`` (3 for a fused q/k/v projection).

    Example:
        >>> TPRule(r"attn\\.c_attn$", "split_out", sections=3)
    """

    pattern: str
    style: str
    sections: int = 1

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"tensor-parallel rule {self.pattern!r}: style must be one of {STYLES}, got {self.style!r}")
        if isinstance(self.sections, bool) or not isinstance(self.sections, int) or self.sections < 1:
            raise ValueError(f"tensor-parallel rule {self.pattern!r}: sections must be an int >= 1, got {self.sections!r}")


@dataclass(frozen=True, eq=False)
class Site(MeshAxis):
    """What a module's swapped forward and hooks need: the axis and this rank's place on it, and
    ``split``: ``{parameter name: (spec, full shape)}`` of the module's own split parameters."""

    style: str
    split: dict = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class TPLayout(MeshAxis):
    """A model's tensor-parallel split, as the engine reads it (``Binding.tp``).

    Attributes:
        mesh / axis: where the split lives.
        specs: ``{leaf path: Shard}`` of every split parameter, under each of its names (ties).
        shapes: ``{leaf path: full shape}`` of the same.
        rules: the rules applied.
    """

    specs: dict
    shapes: dict
    rules: tuple

    def psum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the tp ranks (the identity on one)."""
        return all_reduce(x, self.mesh, self.axis, op="sum", tag="norm")

    def full(self, path: str, local: torch.Tensor) -> torch.Tensor:
        """The whole leaf ``path`` from this rank's slice (an all-gather over tp where it is
        split; every tp rank must call it)."""
        spec = self.specs.get(path)
        if spec is None or self.size == 1:
            return local
        flat = all_gather(local.detach().contiguous().reshape(-1), self.mesh, self.axis, tag="gather_weights")
        return join_shards([p.view(local.shape) for p in flat.chunk(self.size)], spec)


def tp_layout(model: nn.Module) -> TPLayout | None:
    """The split :func:`tensor_parallel` applied to ``model``, or None."""
    return model.__dict__.get(_ATTR)


# --- the collectives ------------------------------------------------------------------------------
class CopyToTP(torch.autograd.Function):
    """Identity forward; backward sums the input's gradient over tp (each rank's split matmul
    gives only its part of it)."""

    @staticmethod
    def forward(ctx, x, mesh: Mesh, axis: str):
        ctx.mesh, ctx.axis = mesh, axis
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        with backward_phase(torch.compiler.is_compiling()):
            return all_reduce(grad, ctx.mesh, ctx.axis, op="sum", tag="tp_bwd"), None, None


class ReduceFromTP(torch.autograd.Function):
    """Forward sums the partial outputs over tp; backward is the identity (every rank's output
    gradient is the whole one, the same on every rank)."""

    @staticmethod
    def forward(ctx, x, mesh: Mesh, axis: str):
        return all_reduce(x, mesh, axis, op="sum", tag="tp_fwd")

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def copy_to_tp(x: torch.Tensor, mesh: Mesh, axis: str = "tp") -> torch.Tensor:
    """``x`` unchanged; its gradient summed over ``axis`` in backward (the input of a column-wise
    split). Example: ``h = copy_to_tp(x, mesh); y = F.linear(h, w_local)``."""
    return x if mesh.size(axis) == 1 else CopyToTP.apply(x, mesh, axis)


def reduce_from_tp(x: torch.Tensor, mesh: Mesh, axis: str = "tp") -> torch.Tensor:
    """``x`` summed over ``axis``; its gradient passed through (the output of a row-wise split).
    Example: ``y = reduce_from_tp(F.linear(h_local, w_local), mesh)``."""
    return x if mesh.size(axis) == 1 else ReduceFromTP.apply(x, mesh, axis)


# --- the swapped forwards -------------------------------------------------------------------------
def _rowwise_forward(self, x):
    site = getattr(self, _ATTR)
    y = F.linear(x, self.weight) if isinstance(self, nn.Linear) else x @ self.weight  # Conv1D keeps (in, out)
    y = reduce_from_tp(y, site.mesh, site.axis)
    return y if self.bias is None else y + self.bias  # once, after the sum


def _vocab_forward(self, ids):
    site = getattr(self, _ATTR)
    n = self.weight.shape[0]
    lo = site.rank * n
    outside = (ids < lo) | (ids >= lo + n)
    local = (ids - lo).masked_fill(outside, 0)
    pad = self.padding_idx
    pad = pad - lo if pad is not None and lo <= pad < lo + n else None
    out = F.embedding(local, self.weight, pad, self.max_norm, self.norm_type, False, self.sparse)
    out = out.masked_fill(outside.unsqueeze(-1), 0)  # ids another rank holds: zero here, and no gradient
    return reduce_from_tp(out, site.mesh, site.axis)


_FORWARDS = {"rowwise": _rowwise_forward, "vocab": _vocab_forward}
_CLASSES: dict = {}


def _swap_class(module: nn.Module, style: str) -> None:
    """``module``'s class becomes a subclass (same name, made once) with the style's forward."""
    cls = type(module)
    key = (cls, style)
    if key not in _CLASSES:
        _CLASSES[key] = type(cls.__name__, (cls,), {"forward": _FORWARDS[style], "_funzero_tp_base": cls,
                                                     "__module__": __name__, "__qualname__": cls.__qualname__})
    module.__class__ = _CLASSES[key]


def _first_input_name(module: nn.Module) -> str | None:
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params[0].name if params else None


def _copy_in_hook(module, args, kwargs):
    site = getattr(module, "_funzero_tp_in")
    if args:
        return (copy_to_tp(args[0], site.mesh, site.axis), *args[1:]), kwargs
    name = _first_input_name(module)
    if name in kwargs:
        kwargs = dict(kwargs)
        kwargs[name] = copy_to_tp(kwargs[name], site.mesh, site.axis)
    return args, kwargs


def _reduce_out_hook(module, args, output):
    site = getattr(module, "_funzero_tp_out")
    if isinstance(output, torch.Tensor):
        return reduce_from_tp(output, site.mesh, site.axis)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):  # (output, attn weights)
        return (reduce_from_tp(output[0], site.mesh, site.axis), *output[1:])
    raise ValueError(f"reduce_out on a {type(module).__name__} whose output is a {type(output).__name__}, "
                     "not a tensor or a tuple starting with one")


# --- the split ----------------------------------------------------------------------------------
def _dims(module: nn.Module, path: str, style: str) -> tuple[int, int]:
    """``(output dim, input dim)`` of the module's weight."""
    if isinstance(module, nn.Linear):
        return 0, 1
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 projection keeps (in, out)
        return 1, 0
    raise ValueError(f"module {path!r} is a {type(module).__name__}: style {style!r} splits nn.Linear "
                     "(or transformers' Conv1D) weights")


def _leaf_specs(module: nn.Module, path: str, rule: TPRule, axis: str) -> dict[str, Shard]:
    """``{parameter name: spec}`` of ``module``'s own parameters under ``rule``."""
    style, params = rule.style, module._parameters
    if style in ("copy_in", "reduce_out", "region", "replicate"):
        return {}
    if style == "vocab":
        if not isinstance(module, nn.Embedding):
            raise ValueError(f"module {path!r} is a {type(module).__name__}: style 'vocab' splits an nn.Embedding")
        if module.scale_grad_by_freq:
            raise ValueError(f"embedding {path!r} has scale_grad_by_freq=True, which a vocab split cannot keep")
        return {"weight": Shard(axis, 0)}
    out_dim, in_dim = _dims(module, path, style)
    if style in ("colwise", "split_out"):
        n = module.weight.shape[out_dim]
        if n % rule.sections:
            raise ValueError(f"leaf {path + '.weight'!r} of shape {tuple(module.weight.shape)}: dim {out_dim} ({n}) "
                             f"is not {rule.sections} equal sections")
        secs = (n // rule.sections,) * rule.sections if rule.sections > 1 else ()
        specs = {"weight": Shard(axis, out_dim, secs)}
        if params.get("bias") is not None:
            specs["bias"] = Shard(axis, 0, secs)
        return specs
    return {"weight": Shard(axis, in_dim)}


# Per-module head counts (and GPT-2's split_size, the width of q, k and v) that a forward reads.
_HEAD_COUNTS = ("n_head", "num_heads", "num_key_value_heads", "split_size")


def _check_heads(model: nn.Module, split_modules: set[str], size: int) -> None:
    """Attention modules above split projections: their head counts (the module's own, and
    Hugging Face's in its config) must divide over tp; the module's own are divided."""
    for path, module in model.named_modules():
        if not any(s.startswith(path + ".") for s in split_modules) or isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        counts = {a: getattr(module, a) for a in _HEAD_COUNTS if isinstance(getattr(module, a, None), int)}
        cfg = getattr(module, "config", None)
        if hasattr(module, "head_dim") and cfg is not None:  # Hugging Face attention reshapes with -1 heads
            heads = getattr(cfg, "num_attention_heads", None)
            counts.setdefault("config.num_attention_heads", heads)
            counts.setdefault("config.num_key_value_heads", getattr(cfg, "num_key_value_heads", None) or heads)
        for name, n in counts.items():
            if n is not None and n % size:
                raise ValueError(f"module {path!r}: {name} = {n} does not divide over {size} tensor-parallel ranks")
        for name in counts:
            if "." not in name:
                setattr(module, name, counts[name] // size)


def _parameter_slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """``{id(parameter): [(module, name), ...]}``: every place a parameter is held (ties: several),
    found in one walk of the modules, so that swapping each split parameter does not walk them
    again (a walk per parameter took seconds for an 80-layer model)."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append((module, name))
    return slots


def _swap_parameter(slots: dict, old: nn.Parameter, new: nn.Parameter) -> None:
    for module, name in slots.get(id(old), ()):
        module._parameters[name] = new


def _rules_of(model: nn.Module, rules) -> tuple[TPRule, ...]:
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise ValueError(f"unknown tensor-parallel preset {rules!r}; choose from {sorted(PRESETS)} or pass rules")
        rules = PRESETS[rules](model)
    out = []
    for r in rules:
        if isinstance(r, TPRule):
            out.append(r)
        elif isinstance(r, tuple) and len(r) in (2, 3):
            out.append(TPRule(*r))
        else:
            raise ValueError(f"tensor-parallel rule {r!r} is neither a TPRule nor a (regex, style[, sections]) tuple")
    return tuple(out)


def tensor_parallel(model: nn.Module, mesh: Mesh, rules: str | Sequence = "llama", *, axis: str = "tp") -> nn.Module:
    """Split ``model`` over mesh axis ``axis`` in place, Megatron-style; returns ``model``.

    Each split parameter becomes this rank's slice (on the meta device: a meta tensor of the
    slice's shape), each matched module gets the collectives its style implies (see the module
    docstring), head counts kept by attention modules are divided, and a vocabulary-split LM
    head's loss becomes the vocab-parallel cross-entropy. Call it before :func:`funzero.init`.

    Args:
        model: an instantiated module (real or meta device).
        mesh: a mesh with an axis named ``axis`` (``Mesh.from_env(("dp", "tp"), (2, 2))``).
        rules: ``"llama"`` (Llama, Mistral, Qwen2-style HF models), ``"gpt2"`` (HF GPT-2),
            ``"gpt"`` (``funzero.models.GPT``), or rules: :class:`TPRule` or ``(regex, style[, sections])``.
        axis: the tensor-parallel axis.

    Raises:
        ValueError: an axis the mesh lacks, a rule matching no module, a split dim that does not
            divide (naming the leaf, its shape, the dim and the tp size), a head count that does
            not divide (naming the module and the counts), on a model :func:`funzero.sequence_parallel`
            made sequence-parallel first, heads per tp rank that do not divide over its ``sp`` axis
            (naming both axes and the counts), or a model split already.

    Example:
        >>> mesh = Mesh.from_env(("dp", "tp"), (2, 2))
        >>> fz.tensor_parallel(model, mesh, rules="llama")
        >>> plan = fz.zero(3, mesh=mesh, axis="dp", groups=fz.block_rules(model))
    """
    if axis not in mesh.axis_names:
        raise ValueError(f"tensor-parallel axis {axis!r} is not an axis of {mesh} (axes {mesh.axis_names})")
    if tp_layout(model) is not None:
        raise ValueError("model is tensor-parallel already (tensor_parallel was applied to it)")
    if getattr(type(model), "_funzero_kernel", None) == "loss":
        raise ValueError("model has funzero.ops.patch's fused loss, which needs the whole LM head; "
                         "patch it with kernels that leave out 'loss'")
    table = _rules_of(model, rules)
    size = mesh.size(axis)
    modules = dict(model.named_modules(remove_duplicate=False))
    chosen = first_match(modules, [r.pattern for r in table], what="tensor-parallel rule")
    plans = {}
    for path, i in chosen.items():  # check everything before changing anything
        module, rule = modules[path], table[i]
        specs = _leaf_specs(module, path, rule, axis)
        for name, spec in specs.items():
            check_split(f"{path}.{name}", tuple(module._parameters[name].shape), spec, size)
        plans[path] = (module, rule, specs, {n: module._parameters[n] for n in specs})  # before any swap
    split_modules = {p for p, (_, _, s, _) in plans.items() if s}
    _check_heads(model, split_modules, size)
    sp = sequence_axis(model)
    if sp is not None:  # sequence_parallel came first: Ulysses will exchange the heads left on each tp rank
        check_sequence_heads(model, sp, (axis, size, frozenset(split_modules)))
    rank = mesh.rank(axis) if size > 1 else 0
    slots = _parameter_slots(model)
    by_param: dict[int, tuple[Shard, str]] = {}
    for path, (module, rule, specs, originals) in plans.items():
        site = Site(mesh, axis, rule.style)
        for name, spec in specs.items():
            p = originals[name]
            seen = by_param.get(id(p))
            if seen is not None and seen[0] != spec:
                raise ValueError(f"leaf {path + '.' + name!r} is tied to {seen[1]!r}, which the rules split as {seen[0]}, "
                                 f"this one as {spec}")
            site.split[name] = (spec, tuple(p.shape))
            if seen is None:
                by_param[id(p)] = (spec, f"{path}.{name}")
                if size > 1:
                    local = (torch.empty(local_shape(p.shape, spec, size), dtype=p.dtype, device="meta")
                             if p.device.type == "meta" else shard_of(p.detach(), spec, rank, size).clone())
                    _swap_parameter(slots, p, nn.Parameter(local, requires_grad=p.requires_grad))
        _install(module, rule.style, site)
    specs, shapes = {}, {}
    for path, (module, _, own, _) in plans.items():
        for name, spec in own.items():
            specs[f"{path}.{name}"], shapes[f"{path}.{name}"] = spec, getattr(module, _ATTR).split[name][1]
    model.__dict__[_ATTR] = TPLayout(mesh, axis, specs, shapes, table)
    _install_loss(model, mesh, axis, plans)
    return model


# The sizes a module keeps beside its weight, by the weight dim they describe (Conv1D's ``nf`` is
# read by its forward; the others by reprs and by code that sizes buffers from them).
_SIZES = {(nn.Linear, 0): "out_features", (nn.Linear, 1): "in_features", (nn.Embedding, 0): "num_embeddings"}


def _local_sizes(module: nn.Module, site: Site) -> None:
    """The size attributes of ``module`` that its split weight changed, set to this rank's."""
    spec = site.split.get("weight", (None,))[0]
    if spec is None or site.size == 1:
        return
    local = module._parameters["weight"].shape[spec.dim]
    name = next((a for (cls, dim), a in _SIZES.items() if isinstance(module, cls) and dim == spec.dim), None)
    if name is None and type(module).__name__ == "Conv1D" and spec.dim == 1:
        name = "nf"
    if name is not None:
        setattr(module, name, local)


def _install(module: nn.Module, style: str, site: Site) -> None:
    object.__setattr__(module, _ATTR, site)
    _local_sizes(module, site)
    if style in ("rowwise", "vocab"):
        _swap_class(module, style)
    if style in ("colwise", "copy_in", "region"):
        object.__setattr__(module, "_funzero_tp_in", site)
        module.register_forward_pre_hook(_copy_in_hook, with_kwargs=True)
    if style in ("reduce_out", "region"):
        object.__setattr__(module, "_funzero_tp_out", site)
        module.register_forward_hook(_reduce_out_hook)


def _install_loss(model: nn.Module, mesh: Mesh, axis: str, plans: dict) -> None:
    """Where the LM head is split by vocabulary, the model's loss becomes the vocab-parallel one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(model, "lm_head", None)
    if head is None or not any(m is head and "weight" in s for m, _, s, _ in plans.values()):
        return
    from funzero.losses import causal_lm_loss_function, vocab_parallel_cross_entropy

    if isinstance(getattr(type(model), "loss_function", None), property):  # Hugging Face: labels=
        model.loss_function = causal_lm_loss_function(mesh, axis)
    else:  # funzero.models.GPT: forward(idx, targets)
        model.loss_function = lambda logits, targets: vocab_parallel_cross_entropy(logits, targets, mesh, axis)


# --- initialising at the full shape ---------------------------------------------------------------
def full_shape_init(model: nn.Module, init):
    """``init(module)`` run, for a module with tp-split parameters, on full-shape stand-ins whose
    slices then fill the module's own parameters: the split model starts from the slices of what
    the unsplit one starts from (the same seed, the same module). ``init`` itself where ``model``
    is not split."""
    if tp_layout(model) is None:
        return init

    def run(module: nn.Module) -> None:
        site = getattr(module, _ATTR, None)
        if site is None or not site.split or site.size == 1:
            return init(module)
        own = {n: module._parameters[n] for n in site.split}
        for n, (_, shape) in site.split.items():
            module._parameters[n] = nn.Parameter(torch.empty(shape, dtype=own[n].dtype, device=own[n].device),
                                                 requires_grad=own[n].requires_grad)
        try:
            init(module)
            with torch.no_grad():
                for n, (spec, _) in site.split.items():
                    own[n].copy_(shard_of(module._parameters[n], spec, site.rank, site.size))
        finally:
            module._parameters.update(own)

    return run


# --- presets ------------------------------------------------------------------------------------
def llama_rules(model: nn.Module | None = None) -> list[TPRule]:
    """Hugging Face Llama / Mistral / Qwen2: q/k/v and gate/up split by output, o and down by
    input, the embedding and the LM head by vocabulary. The input collective sits on the
    attention and MLP modules (one all-reduce in backward for q, k and v together, not three)."""
    rules = [
        TPRule(r"self_attn\.(q|k|v)_proj$", "split_out"),
        TPRule(r"self_attn$", "copy_in"),
        TPRule(r"self_attn\.o_proj$", "rowwise"),
        TPRule(r"mlp\.(gate|up)_proj$", "split_out"),
        TPRule(r"mlp$", "copy_in"),
        TPRule(r"mlp\.down_proj$", "rowwise"),
        TPRule(r"embed_tokens$", "vocab"),
    ]
    if model is None or isinstance(getattr(model, "lm_head", None), nn.Linear):
        rules.append(TPRule(r"^lm_head$", "colwise"))
    return rules


def gpt2_rules(model: nn.Module | None = None) -> list[TPRule]:
    """Hugging Face GPT-2 (``Conv1D`` projections, whose weights are (in, out)): the fused c_attn
    split per q/k/v section, c_fc by output, both c_proj by input, wte (tied to lm_head) by
    vocabulary; the input collective on the attention and MLP modules."""
    return [
        TPRule(r"attn\.c_attn$", "split_out", sections=3),
        TPRule(r"mlp\.c_fc$", "split_out"),
        TPRule(r"(attn|mlp)\.c_proj$", "rowwise"),
        TPRule(r"\.(attn|mlp)$", "copy_in"),
        TPRule(r"wte$", "vocab"),
        TPRule(r"^lm_head$", "colwise"),
    ]


def gpt_rules(model: nn.Module | None = None) -> list[TPRule]:
    """``funzero.models.GPT``: the fused c_attn split per q/k/v section (each rank its heads' q, k
    and v), c_fc by output, both c_proj by input, wte (tied to lm_head) by vocabulary. The input
    and output collectives sit on the attention and MLP modules, whose fused kernels call the
    projections' weights directly; where the output projection's bias joins the residual
    (``resnorm``) the module's output is reduced, else the c_proj adds its bias after the sum."""
    outside = model is not None and any(getattr(m, "bias_outside", False) for m in model.modules())
    proj, parent = ("split_in", "region") if outside else ("rowwise", "copy_in")
    return [
        TPRule(r"attn\.c_attn$", "split_out", sections=3),
        TPRule(r"mlp\.c_fc$", "split_out"),
        TPRule(r"(attn|mlp)\.c_proj$", proj),
        TPRule(r"\.(attn|mlp)$", parent),
        TPRule(r"^wte$", "vocab"),
        TPRule(r"^lm_head$", "colwise"),
    ]


PRESETS = {"llama": llama_rules, "mistral": llama_rules, "qwen2": llama_rules, "gpt": gpt_rules, "gpt2": gpt2_rules}


def tp_info(tp: TPLayout | None, compute) -> dict:
    """The :class:`~funzero.optim.ShardInfo` fields of a tp split (none without one)."""
    if tp is None or tp.size == 1:
        return {}
    return {"tp_split": frozenset(tp.specs), "tp_psum": lambda x: tp.psum(x.to(compute)).to(x.device),
            "tp_size": tp.size}


def read_local(tp: TPLayout | None, source, key: str, path: str, lo: int, hi: int) -> torch.Tensor:
    """Elements ``[lo, hi)`` of this rank's slice of leaf ``path``, read from a weights source that
    holds the whole tensor under ``key``: only the range itself where the slice is one piece of the
    whole (a split of dim 0 into one section), else the whole tensor, sliced."""
    spec = None if tp is None else tp.specs.get(path)
    if spec is None or tp.size == 1:
        return source.read(key, lo, hi)
    shape = tp.shapes[path]
    if spec.dim == 0 and not spec.sections:
        base = tp.rank * math.prod(local_shape(shape, spec, tp.size))
        return source.read(key, base + lo, base + hi)
    return shard_of(source.read(key).view(shape), spec, tp.rank, tp.size).reshape(-1)[lo:hi]
