"""Sequence parallelism, Ulysses-style: each rank of the ``sp`` axis holds ``T / sp`` tokens of
every sequence, and only attention, which mixes tokens, needs the others.

Around attention, one all-to-all turns q, k and v from sequence-sharded ``(B, heads, T/sp, D)``
into head-sharded ``(B, heads/sp, T, D)``; causal SDPA runs on whole sequences for the local
heads; a second all-to-all turns the output back. Norms, MLPs, embeddings and the loss run on the
local tokens unchanged. The all-to-all is its own inverse, so the backward of each is the
exchange the other way: the same one idea as ZeRO's gather whose gradient is a reduce.
(Jacobs et al., 2023, "DeepSpeed Ulysses", arXiv:2309.14509.)

Every rank of ``dp x sp`` sees different tokens, so ZeRO reduces over both: flatten them into one
axis and give the plan that axis.

    mesh = Mesh.from_env(("dp", "sp"), (2, 2)).flatten(("dp", "sp"), "dp_sp")
    fz.sequence_parallel(model, mesh, axis="sp")              # the model now runs on its shard
    plan = fz.zero(3, mesh=mesh, axis="dp_sp", batch="local", groups=fz.block_rules(model))
    b = fz.split_sequence(input_ids, input_ids, mesh)          # this rank's (dp, sp) piece
    loss = model(**b.hf_kwargs()).loss                          # the global token mean's share

With tensor parallelism on a third axis (``("dp", "sp", "tp")``, ``tensor_parallel`` before or
after ``sequence_parallel``), each tp rank runs Ulysses on the heads it holds, so those are the
counts that must divide over ``sp``; the gradient's reduce stays over ``dp x sp``, the tp
collectives over ``tp``, and a vocabulary-split LM head's logits take
``b.cross_entropy(logits, mesh=mesh)``. HSDP works too: ``zero(..., axis="sp", replicate="dp")``
shards over the sp ranks and replicates over dp.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from funzero._collectives import all_to_all
from funzero._group import backward_phase
from shardspec import Mesh, MeshAxis

__all__ = ["SequenceBatch", "check_sequence_plan", "sequence_parallel", "split_sequence", "ulysses_attention"]

_ATTR = "_funzero_sp"  # the model's sequence-parallel axis (an _Axis), set by sequence_parallel

_HEADS, _SEQ = 1, 2  # dims of (B, heads, T, D)


@dataclass(frozen=True, eq=False)
class _Axis(MeshAxis):
    """The ``sp`` axis of a mesh. Shared, not copied, by ``copy.deepcopy`` of a model that holds it
    (a process group cannot be copied)."""

    def __deepcopy__(self, memo) -> "_Axis":
        return self


def _exchange(tensors, sp: _Axis, scatter: int, gather: int, tag: str) -> tuple[torch.Tensor, ...]:
    """Split each tensor's ``scatter`` dim over the ranks and concatenate what arrives along
    ``gather`` (rank order), all tensors in one all-to-all."""
    n = sp.size
    rows = [t.unflatten(scatter, (n, t.shape[scatter] // n)).movedim(scatter, 0).reshape(n, -1) for t in tensors]
    received = all_to_all(torch.cat(rows, dim=1) if len(rows) > 1 else rows[0], sp.mesh, sp.axis, tag=tag)
    out = []
    for t, piece in zip(tensors, received.split([r.shape[1] for r in rows], dim=1)):
        chunk = list(t.shape)
        chunk[scatter] //= n
        out.append(piece.reshape(n, *chunk).movedim(0, gather).flatten(gather, gather + 1))  # row i: rank i's
    return tuple(out)


class _AllToAll(torch.autograd.Function):
    """Forward: :func:`_exchange` from ``scatter`` to ``gather``; backward: the exchange back."""

    @staticmethod
    def forward(sp: _Axis, scatter: int, gather: int, *tensors):
        return _exchange(tensors, sp, scatter, gather, "sp")

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.sp, ctx.scatter, ctx.gather = inputs[:3]

    @staticmethod
    def backward(ctx, *grads):
        # Compiled, this backward is traced with the forward: marked as backward, it joins the
        # groups' reduces in one backward region (the stage-3 re-gather pass refuses several).
        with backward_phase(torch.compiler.is_compiling()):
            return (None, None, None, *_exchange(grads, ctx.sp, ctx.gather, ctx.scatter, "sp_grad"))


def _check_heads(what: str, num_heads: int, num_kv_heads: int, sp: _Axis, tp: tuple[str, int] | None = None) -> None:
    """Each count must divide over ``sp``. ``tp``: ``(axis, size)`` where the counts are one
    tensor-parallel rank's (the heads Ulysses exchanges are the local ones)."""
    for count, name in ((num_heads, "attention heads"), (num_kv_heads, "KV heads")):
        if count % sp.size:
            per = f" per rank of tensor-parallel axis {tp[0]!r} ({count * tp[1]} over its {tp[1]} ranks)" if tp else ""
            raise ValueError(
                f"{what}: {count} {name}{per} do not divide over the {sp.size} ranks of sequence-parallel "
                f"axis {sp.axis!r} ({num_heads} heads, {num_kv_heads} KV heads{' per tp rank' if tp else ''})"
            )


def _attention_modules(model: nn.Module) -> list[tuple[str, int, int]]:
    """``(module path, heads, KV heads)`` of each attention module :func:`sequence_parallel`
    swaps, with the model's whole (not tensor-parallel) counts."""
    from funzero.models import GPT
    from funzero.models._gpt import CausalSelfAttention

    if isinstance(model, GPT):  # each module's n_head is divided by tensor_parallel; the config's is whole
        n = model.cfg.n_head
        return [(name, n, n) for name, m in model.named_modules() if isinstance(m, CausalSelfAttention)]
    out = []
    for name, m in model.named_modules():
        if hasattr(m, "num_key_value_groups"):  # Hugging Face attention; its config keeps the whole counts
            heads = m.config.num_attention_heads
            out.append((name, heads, getattr(m.config, "num_key_value_heads", None) or heads))
    return out


def check_heads(model: nn.Module, sp: _Axis, tp: tuple[str, int, frozenset] | None = None) -> None:
    """Every attention module's heads, as one tensor-parallel rank holds them, divide over ``sp``.

    ``tp``: ``(axis, size, split paths)`` of a tensor-parallel split (applied or about to be); an
    attention module with a split path under it computes with ``1 / size`` of its heads.
    """
    for name, heads, kv in _attention_modules(model):
        if tp is not None and tp[1] > 1 and any(p.startswith(name + ".") for p in tp[2]):
            _check_heads(name, heads // tp[1], kv // tp[1], sp, tp[:2])
        else:
            _check_heads(name, heads, kv, sp)


def _tp_split(model: nn.Module) -> tuple[str, int, frozenset] | None:
    from funzero._tp import tp_layout

    tp = tp_layout(model)
    return None if tp is None else (tp.axis, tp.size, frozenset(tp.specs))


def _ulysses(q, k, v, sp: _Axis, *, is_causal=True, scale=None, dropout_p=0.0) -> torch.Tensor:
    _check_heads(f"attention of q {tuple(q.shape)}, k {tuple(k.shape)}", q.shape[_HEADS], k.shape[_HEADS], sp)
    q, k, v = _AllToAll.apply(sp, _HEADS, _SEQ, q, k, v)  # (B, heads/sp, T, D)
    gqa = q.shape[_HEADS] != k.shape[_HEADS]
    y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
                                       enable_gqa=gqa)
    (y,) = _AllToAll.apply(sp, _SEQ, _HEADS, y)  # (B, heads, T/sp, D)
    return y


def ulysses_attention(q, k, v, mesh: Mesh, axis: str = "sp", *, is_causal: bool = True, scale=None,
                      dropout_p: float = 0.0) -> torch.Tensor:
    """Attention over whole sequences whose tokens are sharded over ``axis``.

    Args:
        q: (B, H, T/sp, D) this rank's tokens (the ``mesh.rank(axis)``-th block of T).
        k, v: (B, KVH, T/sp, D), KVH dividing H (grouped-query attention when KVH < H).
        mesh, axis: the sequence-parallel ranks; H and KVH must divide over them.
        is_causal, scale, dropout_p: as for ``F.scaled_dot_product_attention``.

    Returns:
        (B, H, T/sp, D): this rank's tokens of the attention output, the same values as SDPA over
        the gathered sequence. Its backward is the inverse all-to-all.

    Example:
        >>> y = ulysses_attention(q, k, v, mesh, "sp")   # what SDPA on the full sequence gives here
    """
    return _ulysses(q, k, v, _Axis(mesh, axis), is_causal=is_causal, scale=scale, dropout_p=dropout_p)


@dataclass(frozen=True, eq=False)
class _Attention:
    """The Ulysses attention bound to an axis: SDPA's call (``funzero.models.GPT``) or Hugging
    Face's attention-function interface (``module, q, k, v, mask, ...`` -> ``(out, None)``)."""

    sp: _Axis

    def __call__(self, q, k, v, *, is_causal=True, scale=None, dropout_p=0.0):
        return _ulysses(q, k, v, self.sp, is_causal=is_causal, scale=scale, dropout_p=dropout_p)

    def hf(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
           **kwargs):
        if attention_mask is not None or sliding_window is not None:
            raise ValueError(
                f"sequence parallelism runs causal attention without masks; got an attention mask "
                f"({attention_mask is not None}) or sliding window ({sliding_window})"
            )
        y = _ulysses(query, key, value, self.sp, is_causal=getattr(module, "is_causal", True), scale=scaling,
                     dropout_p=dropout)
        return y.transpose(1, 2).contiguous(), None  # (B, T/sp, H, D), as HF's sdpa_attention_forward

    def __deepcopy__(self, memo) -> "_Attention":
        return self


def _global_positions(sp: _Axis, length: int, device) -> torch.Tensor:
    """The positions of this rank's ``length`` tokens in the whole sequence."""
    return torch.arange(length, device=device) + sp.rank * length


_names = itertools.count()


def _apply_hf(model: nn.Module, sp: _Axis) -> None:
    from transformers import AttentionInterface

    if not _attention_modules(model):
        raise ValueError(f"found no attention module (one with num_key_value_groups) in {type(model).__name__}")
    check_heads(model, sp, _tp_split(model))
    if getattr(model.config, "sliding_window", None) is not None and getattr(model.config, "use_sliding_window", True):
        raise ValueError(f"sequence parallelism runs full causal attention; {type(model).__name__} has "
                         f"sliding_window={model.config.sliding_window}")
    # One name per call: the registry is global, and each model keeps the axis it was given.
    impl = f"funzero_ulysses_{next(_names)}"
    AttentionInterface.register(impl, _Attention(sp).hf)
    model.set_attn_implementation(impl)

    def positions(module, args, kwargs):
        if kwargs.get("attention_mask") is not None:
            raise ValueError("sequence parallelism takes no attention_mask (causal, unpadded sequences); got one")
        if kwargs.get("position_ids") is None:
            x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
            x = x if x is not None else args[0]
            kwargs["position_ids"] = _global_positions(sp, x.shape[1], x.device).unsqueeze(0)
        return args, kwargs

    model.base_model.register_forward_pre_hook(positions, with_kwargs=True)


def _apply_gpt(model: nn.Module, sp: _Axis) -> None:
    from funzero.models._gpt import CausalSelfAttention

    check_heads(model, sp, _tp_split(model))
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):
            m.attention = _Attention(sp)

    def positions(wpe, args):  # GPT embeds arange(T) of its local T: shift it to the global range
        (pos,) = args
        if (sp.rank + 1) * pos.numel() > wpe.num_embeddings:
            raise ValueError(f"sequence length {sp.size * pos.numel()} ({sp.size} shards of {pos.numel()}) "
                             f"exceeds block_size {wpe.num_embeddings}")
        return (pos + sp.rank * pos.numel(),)

    model.wpe.register_forward_pre_hook(positions)


def sequence_parallel(model: nn.Module, mesh: Mesh, *, axis: str = "sp") -> nn.Module:
    """Make ``model`` a function of its ``axis``-shard of each sequence, in place.

    Attention becomes :func:`ulysses_attention` over ``axis`` and positions become global (rank
    ``r``'s ``T/sp`` tokens are positions ``r*T/sp ...``); everything else runs on the local tokens
    as before. Hugging Face causal LMs (Llama, Mistral, Qwen2: any whose attention takes
    transformers' attention-function interface) get a registered attention function and
    ``position_ids`` where the call gives none; ``funzero.models.GPT`` gets its attention function
    and its position embedding's input replaced. Feed it :func:`split_sequence`'s pieces.

    Args:
        model: an HF ``PreTrainedModel`` or a ``funzero.models.GPT`` (meta or materialised).
        mesh: the ranks; ``axis`` must be one of ``mesh.axes``.
        axis: the sequence-parallel axis. Every attention module's heads and KV heads must divide
            over it; on a model split by :func:`funzero.tensor_parallel` (before or after this call),
            the heads one tp rank holds.

    Returns:
        ``model`` itself.

    Example:
        >>> mesh = Mesh.from_env(("dp", "sp"), (2, 2)).flatten(("dp", "sp"), "dp_sp")
        >>> model = fz.sequence_parallel(model, mesh, axis="sp")
        >>> plan = fz.zero(2, mesh=mesh, axis="dp_sp", batch="local")
    """
    if axis not in mesh.axes:
        raise ValueError(f"sequence-parallel axis {axis!r} is not an axis of {mesh} (axes {mesh.axes})")
    if _ATTR in model.__dict__:
        raise ValueError("model is sequence-parallel already (sequence_parallel was applied to it)")
    sp = _Axis(mesh, axis)
    from funzero.models import GPT

    if isinstance(model, GPT):
        _apply_gpt(model, sp)
    elif hasattr(model, "set_attn_implementation"):
        _apply_hf(model, sp)
    else:
        raise ValueError(f"sequence_parallel knows HF PreTrainedModels and funzero.models.GPT, not {type(model).__name__}")
    model.__dict__[_ATTR] = sp
    return model


def sequence_axis(model: nn.Module) -> _Axis | None:
    """The axis :func:`sequence_parallel` made ``model`` sequence-parallel over (``.mesh``,
    ``.axis``, ``.size``, ``.rank``), or None."""
    return model.__dict__.get(_ATTR)


def check_sequence_plan(model: nn.Module, plan) -> None:
    """Refuse a plan that would train a sequence-parallel ``model`` wrongly without saying so.

    Its ``sp`` ranks hold different tokens of the same rows, so the gradient must be averaged
    over them (the plan's data-parallel axes must span ``sp``: shard over a flattened
    ``dp x sp`` axis), and the step must not slice the batch's rows over them (``batch="local"``
    with :func:`split_sequence`'s pieces)."""
    sp = sequence_axis(model)
    if sp is None or sp.size == 1:
        return
    if not set(sp.mesh.spanned((sp.axis,))) <= set(plan.mesh.spanned(plan.data_axes)):
        raise ValueError(
            f"the model is sequence-parallel over axis {sp.axis!r}, but the plan's data-parallel axes "
            f"{plan.data_axes} do not span it, so its ranks' gradients would not be averaged: flatten "
            f"the axes (mesh.flatten(('dp', {sp.axis!r}), 'dp_{sp.axis}')) and give zero() that axis"
        )
    if plan.batch != "local":
        raise ValueError(
            f"the model is sequence-parallel over axis {sp.axis!r}: build the plan with batch='local' and "
            f"feed each rank split_sequence's piece (batch={plan.batch!r} would slice rows over every "
            f"data-parallel rank, sp ranks included)"
        )


class SequenceBatch(NamedTuple):
    """This rank's piece of a global causal-LM batch, named as Hugging Face's forward takes them."""

    input_ids: torch.Tensor  # (B/dp, T/sp) int64
    position_ids: torch.Tensor  # (1, T/sp): the local tokens' global positions
    shift_labels: torch.Tensor  # (B/dp, T/sp) the next token of each local token (or ignore_index)
    num_items_in_batch: torch.Tensor  # () fp32: the global batch's counted labels / (dp*sp ranks)

    def hf_kwargs(self) -> dict:
        """Keyword arguments for an HF causal LM's forward whose ``.loss`` is this rank's share of
        the global token mean (``labels`` only switches HF's loss on; ``shift_labels`` are used)."""
        return dict(self._asdict(), labels=self.shift_labels)

    def cross_entropy(self, logits: torch.Tensor, *, ignore_index: int = -100, mesh: Mesh | None = None,
                      axis: str = "tp") -> torch.Tensor:
        """This rank's share of the global token-mean cross-entropy of ``logits`` (B/dp, T/sp, V):
        its summed losses over ``num_items_in_batch``, so that averaging over the ranks (ZeRO's
        gradient reduce) gives the mean over every counted token of the global batch.

        ``mesh``: given, ``logits`` are this rank's vocabulary slice over ``axis`` (an LM head
        split by :func:`funzero.tensor_parallel`), and the loss is
        :func:`funzero.losses.vocab_parallel_cross_entropy`'s, with the same share."""
        if mesh is not None:
            from funzero.losses import vocab_parallel_cross_entropy

            return vocab_parallel_cross_entropy(logits, self.shift_labels, mesh, axis, ignore_index=ignore_index,
                                                num_items_in_batch=self.num_items_in_batch)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), self.shift_labels.flatten(), ignore_index=ignore_index,
                               reduction="sum")
        return loss / self.num_items_in_batch


def split_sequence(input_ids: torch.Tensor, labels: torch.Tensor, mesh: Mesh, *, dp: str | None = "dp",
                   sp: str = "sp", shift: bool = True, ignore_index: int = -100) -> SequenceBatch:
    """This rank's piece of a global batch: rows split over ``dp``, tokens over ``sp``.

    Args:
        input_ids: (B, T) the global batch, the same on every rank; B must divide over ``dp`` and
            T over ``sp``.
        labels: (B, T): with ``shift`` (HF's convention) token t's target is ``labels[:, t + 1]``,
            shifted here on the whole sequence, so the last token of a shard predicts the first of
            the next; without, ``labels`` are the targets as they are (``funzero.models.GPT``).
        mesh: the ranks; ``dp=None`` for a mesh with no data-parallel axis.
        ignore_index: labels that count neither in the loss nor in ``num_items_in_batch``.

    Returns:
        A :class:`SequenceBatch`.

    Example:
        >>> b = split_sequence(ids, ids, mesh)                  # (8, 1024) on (dp=2, sp=4)
        >>> b.input_ids.shape, b.position_ids[0, 0].item()      # on sp rank 1
        (torch.Size([4, 256]), 256)
    """
    num_dp = mesh.size(dp) if dp is not None else 1
    num_sp = mesh.size(sp)
    (B, T) = input_ids.shape
    if tuple(labels.shape) != (B, T):
        raise ValueError(f"labels of shape {tuple(labels.shape)} for input_ids of shape {(B, T)}")
    if T % num_sp:
        raise ValueError(f"sequence length {T} does not divide over the {num_sp} ranks of axis {sp!r}")
    if B % num_dp:
        raise ValueError(f"batch size {B} does not divide over the {num_dp} ranks of axis {dp!r}")
    if shift:
        labels = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    count = (labels != ignore_index).sum().clamp(min=1).to(torch.float32)
    b, t = B // num_dp, T // num_sp
    i, j = (mesh.rank(dp) if dp is not None else 0), mesh.rank(sp)
    local = (slice(i * b, (i + 1) * b), slice(j * t, (j + 1) * t))
    positions = torch.arange(j * t, (j + 1) * t, device=input_ids.device).unsqueeze(0)
    return SequenceBatch(input_ids[local], positions, labels[local].contiguous(), count / (num_dp * num_sp))
