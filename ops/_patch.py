"""``patch(model)``: run funzero's kernels inside an instantiated Hugging Face model.

What is swapped, by exact class (a user's subclass is left alone):

============  =================================================  ================================
kernel        modules                                            becomes
============  =================================================  ================================
"rmsnorm"     Llama/Mistral/Qwen2 ``*RMSNorm``                   :func:`rms_norm`
"swiglu"      Llama/Mistral/Qwen2 ``*MLP`` with a SiLU           ``down(swiglu(gate(x), up(x)))``
"rope"        Llama/Mistral/Qwen2 ``*Attention``                 :func:`rope` for ``apply_rotary_pos_emb``
"layernorm"   ``nn.LayerNorm`` inside a GPT-2 model              :func:`layer_norm`
"gelu"        ``GPT2MLP`` with a tanh GeLU                       :func:`linear_gelu` for ``act(c_fc(x))``
"loss"        ``{Llama,Mistral,Qwen2}ForCausalLM``,              the fused linear-CE on ``labels=``
              ``GPT2LMHeadModel``                                (no logits)
============  =================================================  ================================

How: each module keeps its identity and its Parameters; only its ``__class__`` becomes a subclass
(same name, made once per class) whose ``forward`` calls the kernel. State-dict keys, parameter
identity, weight ties, hooks and ``isinstance`` checks are unchanged, nothing is allocated or
read (a meta-device model patches fine), and ``type(m).__mro__[1]`` is the original class.

* The attention modules' forward is HF's own, re-made with ``apply_rotary_pos_emb`` bound to
  funzero's in its globals (the decorators around it re-made too), so nothing of HF's attention
  code is copied and no other model in the process is affected. A later change to the HF
  module's global (another library patching it) is not seen by a patched module.
* The causal LM's forward runs HF's base model, then ``causal_lm_loss`` on the last hidden
  states and the head's weight: HF's label shift, its ``ignore_index``, ``num_items_in_batch``
  and ``shift_labels`` keywords. It returns ``logits=None`` (with ``return_dict=False``, a tuple
  without them); ``return_logits=True`` (or no ``labels``, or positional arguments past
  ``input_ids``, or a non-zero ``logits_to_keep``) runs HF's original forward. Under autocast the hidden states and weight are cast to the
  autocast dtype first, as ``lm_head`` would be.
* A call the kernel cannot take (mixed dtypes in a norm, a cos/sin the rope kernel does not
  accept) runs HF's original forward; the choice is made per call on shapes and dtypes only.

Order with funzero: patch the model before building the step (``fz.train_step``); before or
after ``fz.init`` both work, because patching touches no parameter (``fz.init`` replaces them by
meta tensors, which patch never reads). A step that was already compiled is not re-traced by
patching; build it again.

Speed: every kernel is a ``torch.library`` custom op, so torch.compile traces each swapped piece
without a graph break, but a custom op is also a boundary inductor cannot fuse across (the
project's norm kernels once made a compiled step 46% slower that way). Which pieces pay under
torch.compile, and which only in eager, is for the GPU benchmark to measure: choose them with
``kernels=``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import types
from typing import Iterable, Optional

import torch
from torch import nn

from ._gelu import linear_gelu
from ._linear_cross_entropy import causal_lm_loss
from ._norms import layer_norm, rms_norm
from ._rope import mismatch, rope
from ._swiglu import swiglu

__all__ = ["patch", "PatchReport", "KERNELS"]

logger = logging.getLogger(__name__)

KERNELS = ("rmsnorm", "swiglu", "rope", "layernorm", "gelu", "loss")

# HF model type -> the prefix of its class names; these share one module layout
_LLAMA_LIKE = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` did.

    Attributes:
        swapped: kernel name -> number of modules now running it.
        classes: kernel name -> sorted names of the classes swapped for it.
        skipped: one line per known module left as it was, with the reason.
        unknown: sorted names of the module classes patch has no kernel for (containers left out).
    """

    swapped: dict = dataclasses.field(default_factory=dict)
    classes: dict = dataclasses.field(default_factory=dict)
    skipped: list = dataclasses.field(default_factory=list)
    unknown: tuple = ()

    def __str__(self) -> str:
        done = ", ".join(f"{k} x{n} ({', '.join(self.classes[k])})" for k, n in self.swapped.items()) or "nothing"
        lines = [f"funzero.ops.patch: swapped {done}"]
        lines += [f"  skipped: {s}" for s in self.skipped]
        if self.unknown:
            lines.append(f"  no kernel for: {', '.join(self.unknown)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- the new forwards


def _original(self) -> type:
    return type(self)._funzero_original


def _rmsnorm_forward(self, hidden_states):
    if hidden_states.dtype != self.weight.dtype:  # HF returns the promoted dtype: not the kernel's contract
        return _original(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _layernorm_forward(self, x):
    if x.dtype != self.weight.dtype:
        return _original(self).forward(self, x)
    return layer_norm(x, self.weight, self.bias, self.eps)


def _gelu_mlp_forward(self, hidden_states):
    # Conv1D keeps its weight as (in, out): x @ W + b is linear(x, W.T, b)
    h = linear_gelu(hidden_states, self.c_fc.weight.t(), self.c_fc.bias)
    return self.dropout(self.c_proj(h))


def _causal_lm_forward(self, input_ids=None, *args, labels=None, return_logits: bool = False, **kwargs):
    """HF's causal LM with the fused loss: ``logits=None`` when ``labels`` are given (see the module
    docstring for when HF's own forward runs instead)."""
    keep = kwargs.get("logits_to_keep", 0)
    if labels is None or return_logits or args or not (isinstance(keep, int) and keep == 0):
        return _original(self).forward(self, input_ids, *args, labels=labels, **kwargs)
    kwargs.pop("logits_to_keep", None)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    outputs = getattr(self, self.base_model_prefix)(input_ids=input_ids, **kwargs)
    hidden = outputs[0]  # (B, T, H)
    weight = self.get_output_embeddings().weight  # (V, H)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # what lm_head(hidden) would have multiplied
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device, enabled=False):
        loss = causal_lm_loss(hidden, weight, labels, ignore_index=kwargs.get("ignore_index", -100),
                              num_items_in_batch=kwargs.get("num_items_in_batch"),
                              shift_labels=kwargs.get("shift_labels"))
    output_cls, fields = type(self)._funzero_output
    out = output_cls(loss=loss, logits=None, **{f: getattr(outputs, f, None) for f in fields})
    return out if return_dict else out.to_tuple()


def _rope_for(original):
    """HF's ``apply_rotary_pos_emb`` on funzero's kernel, and on ``original`` for what the kernel does not take."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        dim = kwargs.get("unsqueeze_dim", 1)
        if args or set(kwargs) - {"unsqueeze_dim"} or mismatch(q, k, cos, sin, dim) is not None:
            return original(q, k, cos, sin, *args, **kwargs)
        return rope(q, k, cos, sin, dim)

    return apply_rotary_pos_emb


def _with_global(fn, name: str, value):
    """``fn`` re-made with the global ``name`` bound to ``value``; the ``functools.wraps`` decorators
    around it (HF's ``deprecate_kwarg`` and the like) are re-made around the new inner function.
    Raises LookupError if ``fn`` does not read that global or a wrapper's closure does not hold
    the function it wraps."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        if name not in fn.__code__.co_names or name not in fn.__globals__:
            raise LookupError(f"{fn.__qualname__} does not call a global {name!r}")
        env = dict(fn.__globals__)
        env[name] = value
        new = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
    else:
        new_inner = _with_global(inner, name, value)
        cells = fn.__closure__ or ()
        hits = [i for i, c in enumerate(cells) if _cell_holds(c, inner)]
        if len(hits) != 1:
            raise LookupError(f"cannot see the function {fn.__qualname__} wraps")
        closure = tuple(types.CellType(new_inner) if i == hits[0] else c for i, c in enumerate(cells))
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    if inner is not None:
        new.__wrapped__ = new_inner
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    new.__annotations__ = dict(getattr(fn, "__annotations__", {}))
    return new


def _cell_holds(cell, obj) -> bool:
    try:
        return cell.cell_contents is obj
    except ValueError:  # an empty cell
        return False


# --------------------------------------------------------------------------- the classes


def _attention_forward(cls: type):
    hf_module = importlib.import_module(cls.__module__)
    return _with_global(cls.forward, "apply_rotary_pos_emb", _rope_for(hf_module.apply_rotary_pos_emb))


_FORWARDS = {
    "rmsnorm": lambda cls: _rmsnorm_forward,
    "swiglu": lambda cls: _swiglu_forward,
    "rope": _attention_forward,
    "layernorm": lambda cls: _layernorm_forward,
    "gelu": lambda cls: _gelu_mlp_forward,
    "loss": lambda cls: _causal_lm_forward,
}
_OUTPUTS = {"GPT2LMHeadModel": "CausalLMOutputWithCrossAttentions"}  # else CausalLMOutputWithPast


@functools.lru_cache(maxsize=None)
def _subclass(cls: type, kernel: str) -> type:
    """``cls`` with the kernel's forward, made once per class; the same name, so that HF's checks by
    class name see the class they know. Raises LookupError where the forward cannot be made."""
    attrs = {"forward": _FORWARDS[kernel](cls), "_funzero_original": cls, "_funzero_kernel": kernel,
             "__module__": __name__, "__qualname__": cls.__qualname__}
    if kernel == "loss":
        from transformers import modeling_outputs

        out = getattr(modeling_outputs, _OUTPUTS.get(cls.__name__, "CausalLMOutputWithPast"))
        attrs["_funzero_output"] = (out, tuple(f.name for f in dataclasses.fields(out)
                                               if f.name not in ("loss", "logits")))
    return type(cls.__name__, (cls,), attrs)


def _is_silu(act) -> bool:
    from transformers import activations

    return isinstance(act, (nn.SiLU, getattr(activations, "SiLUActivation", nn.SiLU)))


def _is_tanh_gelu(act) -> bool:
    from transformers import activations

    names = ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation")
    return isinstance(act, tuple(getattr(activations, n) for n in names if hasattr(activations, n)))


def _lm_check(m) -> Optional[str]:
    from transformers.loss.loss_utils import ForCausalLMLoss

    head = m.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return f"its output embedding is {type(head).__name__}, not a bias-free nn.Linear"
    if m.loss_function is not ForCausalLMLoss:
        return f"its loss_function is {getattr(m.loss_function, '__name__', m.loss_function)}, not ForCausalLMLoss"
    return None


def _layernorm_check(m: nn.LayerNorm) -> Optional[str]:
    if m.weight is None or len(m.normalized_shape) != 1:
        return "not an affine LayerNorm over one dimension"
    return None


def _none(m) -> Optional[str]:
    return None


def _rules():
    """({exact class: (kernel, why_not(module) -> reason or None)}, GPT-2's base class)."""
    rules = {}
    for model_type, prefix in _LLAMA_LIKE.items():
        hf = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        rules[getattr(hf, f"{prefix}RMSNorm")] = ("rmsnorm", _none)
        rules[getattr(hf, f"{prefix}MLP")] = (
            "swiglu", lambda m: None if _is_silu(m.act_fn) else f"act_fn is {type(m.act_fn).__name__}, not SiLU")
        rules[getattr(hf, f"{prefix}Attention")] = ("rope", _none)
        rules[getattr(hf, f"{prefix}ForCausalLM")] = ("loss", _lm_check)
    gpt2 = importlib.import_module("transformers.models.gpt2.modeling_gpt2")
    rules[gpt2.GPT2MLP] = (
        "gelu", lambda m: None if _is_tanh_gelu(m.act) else f"act is {type(m.act).__name__}, not a tanh GeLU")
    rules[gpt2.GPT2LMHeadModel] = ("loss", _lm_check)
    return rules, gpt2.GPT2PreTrainedModel


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def _parse_kernels(kernels: Optional[Iterable[str]]) -> frozenset:
    if kernels is None:
        return frozenset(KERNELS)
    if isinstance(kernels, str):
        kernels = (kernels,)
    chosen = frozenset(kernels)
    bad = sorted(chosen - set(KERNELS))
    if bad:
        raise ValueError(f"unknown kernels {bad}; choose from {KERNELS}")
    return chosen


def patch(model: nn.Module, *, kernels: Optional[Iterable[str]] = None) -> PatchReport:
    """Swaps in funzero's kernels for the Hugging Face modules it knows, in place.

    Args:
        model: an instantiated model (on any device, the meta device included): a Llama, Mistral,
            Qwen2 or GPT-2 model from ``transformers``, or anything containing them. Other modules
            are left alone, with one logged note naming their classes.
        kernels: which pieces to swap, a subset of ``KERNELS`` = ("rmsnorm", "swiglu", "rope",
            "layernorm", "gelu", "loss"); default all. Each piece is switchable on its own because
            under torch.compile a custom op can cost fusion: which pieces win is measured per model
            (see the module docstring).

    Returns:
        A :class:`PatchReport` (also logged at INFO): what was swapped, how many, what was skipped
        and why. Patching twice is harmless: a swapped module is counted, not swapped again.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        ...                                      num_key_value_heads=2, intermediate_size=64, vocab_size=101))
        >>> patch(model, kernels=("rmsnorm", "loss")).swapped
        {'rmsnorm': 3, 'loss': 1}
    """
    chosen = _parse_kernels(kernels)
    report = PatchReport()
    try:
        rules, gpt2_base = _rules()
    except ImportError as e:
        report.unknown = (type(model).__name__,)
        logger.info("funzero.ops.patch: transformers is not importable (%s); %s left as it is", e,
                    type(model).__name__)
        return report
    named = list(model.named_modules())
    gpt2_roots = [name for name, m in named if isinstance(m, gpt2_base)]
    unknown, classes, unused = set(), {}, set()  # unused: the activations a swapped MLP no longer calls
    for name, m in named:
        cls = type(m)
        if id(m) in unused:
            continue
        kernel = getattr(cls, "_funzero_kernel", None)
        if kernel is None:
            if cls in rules:
                kernel, why_not = rules[cls]
            elif cls is nn.LayerNorm and any(r == "" or name.startswith(r + ".") for r in gpt2_roots):
                kernel, why_not = "layernorm", _layernorm_check
            else:
                if not isinstance(m, _CONTAINERS):
                    unknown.add(cls.__name__)
                continue
            if kernel not in chosen:
                continue
            reason = why_not(m)
            if reason is None:
                try:
                    m.__class__ = _subclass(cls, kernel)
                except LookupError as e:  # HF's code is not shaped as this version of patch expects
                    reason = str(e)
            if reason is not None:
                report.skipped.append(f"{name or cls.__name__} ({cls.__name__}): {reason}")
                continue
        report.swapped[kernel] = report.swapped.get(kernel, 0) + 1
        classes.setdefault(kernel, set()).add(cls.__name__)
        unused.add(id(getattr(m, {"swiglu": "act_fn", "gelu": "act"}.get(kernel, ""), None)))
    report.classes = {k: sorted(v) for k, v in classes.items()}
    report.unknown = tuple(sorted(unknown))
    logger.info("%s", report)
    return report
