"""Activation checkpointing ("remat") for any module, chosen by rules over module paths.

    fz.remat(model, [(r"model\\.layers\\.\\d+", "full")])     # every decoder layer recomputed

Design note (the footguns this module guards):

* **The forward is wrapped, the module stays.** ``remat`` sets an instance ``forward`` on each
  chosen module, so parameter identity, ``state_dict`` keys, hooks and ``isinstance`` are those of
  the untouched model. The original forward is kept beside it; the wrapper is a bound method, so
  ``copy.deepcopy`` of the model wraps the copy, not the original.
* **Recompute with the tensors forward saw.** funzero's step runs the model through
  ``functional_call`` and differentiates after it has returned; stage 3 swaps gathered parameters
  into a module only while it runs. So a recompute that read ``module.weight`` in backward would
  read a template (meta) tensor. The wrapper passes every parameter and buffer bound in the
  module's subtree at forward time to ``torch.utils.checkpoint`` as explicit inputs and binds them
  again for the recompute. Checkpoint saves its inputs through whatever saved-tensor hooks are
  active around the module: under stage 3 that is the engine's pack hook, which keeps a gathered
  parameter as (group, view) and gathers the group again when the recompute unpacks it. Nothing
  keeps a gathered group alive from forward to backward, and the recompute re-gathers.
  Stage-3 owners *inside* a recomputed module gather in their own pre-hooks, which run again in
  the recompute.
* **Under torch.compile** the wrapper calls ``checkpoint`` on the original forward directly:
  dynamo turns it into a tagged region that the partitioner recomputes in the backward graph;
  there is no Python-level recompute to feed. ``"offload"`` uses saved-tensor hooks, which dynamo
  cannot trace: the offloaded module's forward runs eagerly between graphs (a graph break).
  A compiled ``fz.train_step`` traces ``autograd.grad`` into the same graph, and that graph's
  remat pass (torch 2.13) refuses to recompute any op tagged as random; the SDPA kernels carry
  the tag even without dropout. So under compile every policy keeps the outputs of random-tagged
  ops (for ``"full"``: each attention's output and log-sum-exp, a few percent of a layer's
  activations) and recomputes the rest as asked.
* **Hugging Face KV caches.** A cache is state the forward appends to; a recompute would append
  again. ``remat`` refuses a model whose ``config.use_cache`` is true (HF's own gradient
  checkpointing turns the cache off in training as well).
* **Offload keeps model state where it is.** A tensor that shares storage with a parameter or
  buffer bound in the module is not activation memory; the offload hook hands it to the
  saved-tensor hooks outside the module (stage 3's re-gather) or keeps the reference, and copies
  only activations to host memory.
* **No nesting, no second application.** A module inside a recomputed module cannot be chosen
  too (the outer recompute already covers it); applying ``remat`` to a module that already has
  a policy is an error naming it. Both are ``ValueError``.
"""

from __future__ import annotations

import contextlib
import functools
import re
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = ["remat", "save_matmuls"]

_ATTR = "_funzero_remat"
_POLICIES = ("full", "selective", "offload")


def _matmul_ops() -> tuple:
    aten = torch.ops.aten
    names = (
        "mm", "addmm", "bmm", "baddbmm",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    )
    return tuple(getattr(aten, n) for n in names if hasattr(aten, n))


_SAVED_OPS = _matmul_ops()


def save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The ``"selective"`` policy: keep matrix-multiply and attention outputs, recompute the rest.

    The outputs of ``mm``/``addmm``/``bmm`` and the fused scaled-dot-product-attention kernels
    are the expensive part of a transformer layer's forward; norms, activations, residual adds
    and rotary embeddings are cheap to run again (Korthikanti et al., 2022, "Reducing Activation
    Recomputation in Large Transformer Models", section 5).
    """
    if op in _SAVED_OPS or getattr(op, "overloadpacket", None) in _SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _state_slots(module: nn.Module) -> list[tuple[dict, str]]:
    """Every (dict, key) in the subtree that binds a parameter or buffer, aliases included."""
    slots = []
    for mod in module.modules():
        for d in (mod._parameters, mod._buffers):
            slots.extend((d, k) for k in d)
    return slots


@contextlib.contextmanager
def _bound(slots: list[tuple[dict, str]], tensors: Sequence):
    old = [d[k] for d, k in slots]
    try:
        for (d, k), t in zip(slots, tensors):
            d[k] = t
        yield
    finally:
        for (d, k), t in zip(slots, old):
            d[k] = t


class _Offload(torch.autograd.graph.saved_tensors_hooks):
    """Saved activations go to host memory (pinned where a GPU can use it), one copy per distinct
    view however many ops save it; tensors sharing storage with the module's parameters or
    buffers go to the saved-tensor hooks outside (stage 3's re-gather) or are kept as they are."""

    def __init__(self, state: Sequence[torch.Tensor], pin_memory: bool) -> None:
        keep = {t.untyped_storage().data_ptr() for t in state if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        copies: dict[tuple, tuple] = {}  # view -> (weak ref to its storage, host copy)

        def pack(t: torch.Tensor):
            if t.device.type == "meta" or t.untyped_storage().data_ptr() in keep:
                return ("outer", outer[0](t)) if outer is not None else ("kept", t)
            storage = t.untyped_storage()
            key = (storage.data_ptr(), t.storage_offset(), tuple(t.size()), tuple(t.stride()), t.dtype)
            hit = copies.get(key)
            if hit is not None and not hit[0].expired():  # an address reused after a free is a miss
                return ("host", t.device, hit[1])
            pinned = pin_memory and t.device.type == "cuda" and not t.is_sparse
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pinned)
            host.copy_(t, non_blocking=pinned)
            copies[key] = (StorageWeakRef(storage), host)
            return ("host", t.device, host)

        def unpack(packed):
            if packed[0] == "outer":
                return outer[1](packed[1])
            if packed[0] == "kept":
                return packed[1]
            _, device, host = packed
            return host.to(device, non_blocking=host.is_pinned())

        super().__init__(pack, unpack)


@torch.compiler.disable  # saved-tensor hooks are not traceable: an explicit graph break
def _offloaded(fn, state, pin_memory, args, kwargs):
    with _Offload(state, pin_memory):
        return fn(*args, **kwargs)


def _recompute_all(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.PREFER_RECOMPUTE


def _seeded_saved(policy: Callable) -> Callable:
    """``policy``, except that ops tagged as random (dropout, and the SDPA kernels, which carry
    the tag even at ``dropout_p=0``) keep their outputs: the whole-step graph's remat pass
    refuses to recompute them, and keeping them gives the values the forward saw."""

    def chosen(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if torch.Tag.nondeterministic_seeded in getattr(op, "tags", ()):
            return CheckpointPolicy.MUST_SAVE
        return policy(ctx, op, *args, **kwargs)

    return chosen


def _context_fn(policy, compiling: bool) -> Callable | None:
    if policy == "full" and not compiling:
        return None  # plain checkpoint: its recompute replays the generators' state
    fn = {"full": _recompute_all, "selective": save_matmuls}.get(policy, policy)
    # A partial, not a lambda: dynamo accepts context_fn only in this form.
    return functools.partial(create_selective_checkpoint_contexts, _seeded_saved(fn) if compiling else fn)


def _remat_forward(self: nn.Module, *args, **kwargs):
    policy, orig, pin_memory = self.__dict__[_ATTR]
    if not torch.is_grad_enabled():
        return orig(*args, **kwargs)
    if policy == "offload":
        return _offloaded(orig, [d[k] for d, k in _state_slots(self)], pin_memory, args, kwargs)
    compiling = torch.compiler.is_compiling()
    ctx = _context_fn(policy, compiling)
    extra = {} if ctx is None else {"context_fn": ctx}
    if compiling:
        return checkpoint(orig, *args, use_reentrant=False, **extra, **kwargs)
    live = [(d, k) for d, k in _state_slots(self) if d[k] is not None]
    state = [d[k] for d, k in live]
    n = len(args)

    def run(*flat, **kw):
        with _bound(live, flat[n:]):
            return orig(*flat[:n], **kw)

    return checkpoint(run, *args, *state, use_reentrant=False, **extra, **kwargs)


def remat(model: nn.Module, rules: Sequence[tuple[str, Any]], *, pin_memory: bool = True) -> nn.Module:
    """Recompute (or offload) the activations of the submodules that ``rules`` choose, in place.

    Args:
        model: any ``nn.Module`` (a Hugging Face model, ``funzero.models.GPT``, ...).
        rules: ordered ``(regex, policy)`` pairs; each module path (``model.layers.3``; ``""``
            is the root) takes the policy of the first regex that ``re.fullmatch``es it. Policies:
            ``"full"``: keep only the module's inputs, run its forward again in backward;
            ``"selective"``: keep matmul and attention outputs, recompute the rest
            (:func:`save_matmuls`); ``"offload"``: keep every activation the module saves, in
            host memory (``torch.autograd.graph.save_on_cpu``'s scheme); or a callable
            ``policy(ctx, op, *args, **kwargs) -> torch.utils.checkpoint.CheckpointPolicy``
            for torch's selective checkpointing.
        pin_memory: ``"offload"`` copies into pinned host memory when the module runs on a GPU.

    Returns:
        ``model`` itself, its chosen submodules' forwards wrapped (parameters, buffers and
        ``state_dict`` keys unchanged).

    Raises:
        ValueError: a rule that is not a (regex, policy) pair, a policy that is none of the above,
            a rule that matches no module, a module inside another chosen module, or a module that
            already has a policy (``remat`` is not idempotent: apply it once).

    Example:
        >>> fz.remat(model, [(r"model\\.layers\\.([0-9]|1[0-5])", "full"), (r"model\\.layers\\.\\d+", "selective")])
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"remat needs an nn.Module, got {type(model).__name__}")
    compiled = []
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise ValueError(f"a remat rule is a (regex, policy) pair, got {rule!r}")
        pattern, policy = rule
        if not (policy in _POLICIES or callable(policy)):
            raise ValueError(f"unknown remat policy {policy!r} for rule {pattern!r}; choose from {_POLICIES} or a callable")
        try:
            regex = re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"remat rule {pattern!r} is not a regex: {e}") from None
        compiled.append((pattern, regex, policy))
    chosen: dict[str, tuple[nn.Module, Any]] = {}
    used = set()
    for path, mod in model.named_modules():
        for pattern, regex, policy in compiled:
            if regex.fullmatch(path):
                chosen[path] = (mod, policy)
                used.add(pattern)
                break
    unused = [p for p, _, _ in compiled if p not in used]
    if unused:
        raise ValueError(f"remat rule {unused[0]!r} matches no module path of {type(model).__name__}")
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False) is True:
        # A KV cache is state the forward appends to: the recompute would append again and
        # attend over twice the keys. Hugging Face's own gradient checkpointing turns it off too.
        raise ValueError(
            f"{type(model).__name__}.config.use_cache is True: a recomputed attention layer would "
            "extend the KV cache a second time in backward; set model.config.use_cache = False for training"
        )
    done = [p for p, m in model.named_modules() if _ATTR in m.__dict__]
    paths = sorted(chosen)
    for path in paths:
        if path in done:
            raise ValueError(
                f"module {path!r} already has remat policy {chosen[path][0].__dict__[_ATTR][0]!r}; apply remat once"
            )
    for path in paths:
        for other in paths + done:
            for inner, outer in ((other, path), (path, other)):
                if inner != outer and (outer == "" or inner.startswith(outer + ".")):
                    raise ValueError(f"remat would recompute {inner!r} inside {outer!r}, which is recomputed already")
    for path in paths:
        mod, policy = chosen[path]
        mod.__dict__[_ATTR] = (policy, mod.forward, bool(pin_memory))
        mod.forward = types.MethodType(_remat_forward, mod)
    return model
