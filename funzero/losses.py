"""Losses over a model's last hidden states, on funzero's fused kernels.

    loss = funzero.losses.causal_lm(hidden, model.lm_head.weight, labels)

computes Hugging Face's causal-LM loss without the (B, T, V) logits: the fused linear +
cross-entropy of ``funzero.ops.linear_cross_entropy``, chunked over tokens.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from funzero._collectives import all_reduce
from funzero.ops._linear_cross_entropy import causal_lm_loss

__all__ = ["causal_lm", "causal_lm_loss_function", "vocab_parallel_cross_entropy"]


def causal_lm(hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, *, ignore_index: int = -100,
              num_items_in_batch=None, shift_labels: Optional[Tensor] = None,
              chunk_size: Optional[int] = None) -> Tensor:
    """Next-token cross-entropy with Hugging Face's label shift, from hidden states.

    Position t of each sequence predicts label t + 1: the labels are padded with ``ignore_index``
    at the end and shifted left by one, as ``transformers``' ``ForCausalLMLoss`` does, so
    ``labels = input_ids`` (with padding set to ``ignore_index``) is the usual call.

    Args:
        hidden: (B, T, H) last hidden states (after the final norm), bf16/fp16/fp32.
        lm_head_weight: (V, H) the output projection's weight, hidden's dtype.
        labels: (B, T) integer targets, unshifted; ``ignore_index`` where no loss is wanted.
        ignore_index: the label that contributes neither loss nor gradient.
        num_items_in_batch: if given (int or tensor), the loss is the sum over targets divided by
            it (HF's convention under gradient accumulation); else the mean over non-ignored
            targets (0 when there are none, where HF gives NaN).
        shift_labels: (B, T) targets already shifted; used as they are instead of ``labels``.
        chunk_size: tokens per chunk of the fused kernel (default: 256 MiB of logits).

    Returns:
        The fp32 scalar loss, differentiable in ``hidden`` and ``lm_head_weight``.

    Example:
        >>> hidden, w = torch.randn(2, 5, 16), torch.randn(100, 16)
        >>> loss = causal_lm(hidden, w, torch.randint(0, 100, (2, 5)))
    """
    return causal_lm_loss(hidden, lm_head_weight, labels, ignore_index=ignore_index,
                          num_items_in_batch=num_items_in_batch, shift_labels=shift_labels, chunk_size=chunk_size)


# tensor parallelism (issue 23)
class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy of logits split by vocabulary over a mesh axis: the max and the
    sum of exponentials are all-reduced, the target's logit comes from the rank holding it, and
    backward is local (softmax minus the one-hot, on each rank's slice). Never gathers the vocab."""

    @staticmethod
    def forward(ctx, logits, target, mesh, axis, ignore_index):
        # logits (N, V_local), target (N,)
        n = logits.shape[-1]
        lo = mesh.rank(axis) * n
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        x = x - all_reduce(x.max(-1).values, mesh, axis, op="max", tag="tp_loss")[:, None]  # (N, V_local)
        ignored = target == ignore_index
        t = target - lo
        mine = (t >= 0) & (t < n) & ~ignored
        t = t.masked_fill(~mine, 0)
        picked = x.gather(-1, t[:, None]).squeeze(-1).masked_fill(~mine, 0.0)
        both = all_reduce(torch.stack([x.exp().sum(-1), picked]), mesh, axis, op="sum", tag="tp_loss")  # (2, N)
        loss = (both[0].log() - both[1]).masked_fill(ignored, 0.0)
        ctx.save_for_backward(x, both[0], t, mine, ignored)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        from funzero._group import backward_phase  # compiled: one backward region (see there)

        with backward_phase(torch.compiler.is_compiling()):
            return _VocabParallelCE.local_backward(ctx, grad)

    @staticmethod
    def local_backward(ctx, grad):
        x, sumexp, t, mine, ignored = ctx.saved_tensors
        g = x.exp().div_(sumexp[:, None])  # softmax (N, V_local)
        g.scatter_add_(-1, t[:, None], -mine.to(g.dtype)[:, None])
        g.mul_(grad.masked_fill(ignored, 0.0)[:, None])
        return g.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(local_logits: Tensor, labels: Tensor, mesh, axis: str = "tp", *,
                                 ignore_index: int = -100, reduction: str = "mean",
                                 num_items_in_batch=None) -> Tensor:
    """``F.cross_entropy`` of logits each rank of ``axis`` holds a vocabulary slice of.

    Rank r holds the logits of tokens ``[r * V_local, (r + 1) * V_local)`` (a column-wise LM head
    under :func:`funzero.tensor_parallel`). Two all-reduces over ``axis`` in forward (the max, then
    the sum of exponentials with the target's logit), none in backward; the full vocabulary is
    never formed on any rank.

    Args:
        local_logits: (..., V_local) this rank's slice of the logits, any float dtype.
        labels: (...) integer targets in the whole vocabulary; ``ignore_index`` where no loss is
            wanted.
        mesh / axis: the tensor-parallel axis the vocabulary is split over.
        reduction: ``"mean"`` (over non-ignored targets), ``"sum"`` or ``"none"``.
        num_items_in_batch: if given, the sum divided by it (Hugging Face's convention).

    Returns:
        The loss in fp32 (fp64 for fp64 logits), the same on every rank of ``axis``.

    Example:
        >>> loss = vocab_parallel_cross_entropy(model.lm_head(hidden), labels, mesh, "tp")
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction=}")
    if tuple(local_logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"logits of shape {tuple(local_logits.shape)} for labels of shape {tuple(labels.shape)}")
    target = labels.reshape(-1).to(local_logits.device)
    loss = _VocabParallelCE.apply(local_logits.reshape(-1, local_logits.shape[-1]), target, mesh, axis, ignore_index)
    if num_items_in_batch is not None:
        return loss.sum() / (num_items_in_batch.to(loss.device) if isinstance(num_items_in_batch, Tensor)
                             else num_items_in_batch)
    if reduction == "none":
        return loss.view(labels.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum()  # NaN when every target is ignored, as F.cross_entropy


def causal_lm_loss_function(mesh, axis: str = "tp"):
    """A Hugging Face ``loss_function`` (``ForCausalLMLoss``'s arguments and label shift) over
    vocabulary-split logits: ``model.loss_function = causal_lm_loss_function(mesh)`` makes
    ``model(input_ids, labels=labels).loss`` the whole-vocabulary loss (``.logits`` stay this
    rank's slice). :func:`funzero.tensor_parallel` installs it."""

    def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index: int = -100,
                      shift_labels=None, **kwargs):
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        return vocab_parallel_cross_entropy(logits, shift_labels, mesh, axis, ignore_index=ignore_index,
                                            num_items_in_batch=num_items_in_batch)

    return loss_function
