"""Losses over a model's last hidden states, on funzero's fused kernels.

    loss = funzero.losses.causal_lm(hidden, model.lm_head.weight, labels)

computes Hugging Face's causal-LM loss without the (B, T, V) logits: the fused linear +
cross-entropy of ``funzero.ops.linear_cross_entropy``, chunked over tokens.
"""

from typing import Optional

from torch import Tensor

from funzero.ops._linear_cross_entropy import causal_lm_loss

__all__ = ["causal_lm"]


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
