"""The activation model of ``funzero.models.GPT``: bytes kept for backward, per rank.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ActivationEstimate", "gpt_activations"]


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




def _check(cfg: Any, batch: int, seq: int | None) -> int:
    """``seq`` (default: the block size) once the shape is known to be one the model takes."""
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
    return seq


def gpt_activations(
    cfg: Any,
    *,
    batch: int,
    seq: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    checkpoint: bool = False,
) -> ActivationEstimate:
    """Bytes ``funzero.models.GPT`` keeps for backward on one rank.

    The count, tensor by tensor, is in this module's docstring.

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
    seq = _check(cfg, batch, seq)
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
