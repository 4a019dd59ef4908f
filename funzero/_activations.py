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

Tensor parallelism (``tp`` = t ranks, ``funzero.tensor_parallel(model, mesh, rules="gpt")``)
splits what lives between the split projections: q, k, v, the attention output, its
log-sum-exp and the two (B, T, 4h) MLP tensors are a rank's heads' and columns' share, while the
norms' inputs and outputs (the projections' inputs) stay whole, as in Megatron-LM without
sequence parallelism (Korthikanti's ``sbh(10 + 24/t + 5as/(ht))``): per layer
``(4 + 12/t) e sbh + 4asb/t + 16 sb``. The LM head keeps a vocabulary slice and the loss is
``vocab_parallel_cross_entropy``, which saves fp32 shifted logits (4 sbV/t, whatever the
activation dtype), its sum of exponentials (8 sb: two fp32 rows), local targets and two masks
(10 sb) and the count of counted targets (one int64), but not the logits; the vocab-split
embedding saves its masked local ids and the mask (9 sb) in place of the ids. Backward's head
transient is the fp32 softmax (4 sbV/t) and its cast to the activation dtype.

Sequence parallelism (``sp`` ranks, Ulysses, ``funzero.sequence_parallel``) gives each rank
s/sp tokens of every sequence: every (s, b, ·) term above divides by sp. Attention keeps one more
tensor: SDPA saves its head-sharded output (B, heads/sp, s, D) and the exchange back gives the
output projection a second, token-sharded copy, so the attention output costs 2 e sbh/sp. The
exchange itself saves nothing for backward; for a moment it holds the q, k, v rows it sends, the
packed send buffer and what it receives: 3 x 3 e sbh/sp (``exchange``, a transient counted with
backward's).

What this does not count: activations of models other than ``funzero.models.GPT`` (a Hugging
Face Llama's SwiGLU, GQA and RMSNorm save other tensors), a loss computed outside the model
(``SequenceBatch.cross_entropy`` saves the fp32 log-softmax of the local logits, as
``fused=False`` does), tp and sp together (composed by the formula, never measured), the
collectives' own buffers (NCCL's, and an all-reduce's output while the input is still alive),
and allocator fragmentation. ``tests/test_memory.py`` and ``tests/test_memory_parallel.py`` hold
the kept bytes to what autograd saves on one process, on 2 and 4 tp ranks (to the byte) and on 2
sp ranks (within the per-row log-sum-exp the CPU's loss does not save); transients are
estimates.
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
        batch / seq / num_layers: the shape it is for (batch: sequences per data-parallel rank;
            seq: tokens per whole sequence, of which each sp rank holds ``seq / sp``).
        tp / sp: tensor- and sequence-parallel ranks it is for.
        checkpoint: whether blocks are recomputed in backward (activation checkpointing).
        per_layer: bytes one block keeps without checkpointing.
        layers: bytes all blocks keep at the end of forward.
        head: bytes the embeddings, final norm, logits and loss keep.
        backward: the largest transient on top of those early in backward (the logits'
            gradient, or one block's recomputation and its gradients, or with sp one exchange).
        exchange: with sp: the buffers one all-to-all of q, k and v holds for a moment (0 without).
        peak: ``layers + head + backward``.
        korthikanti: Korthikanti et al.'s ``sbh(10 + 24/t + 5as/(ht))`` per layer (``34`` at t=1)
            times the layers, on a rank's s/sp tokens (the attention scores ``5as^2b/(t sp)``),
            or ``2sbh`` per layer with full recomputation; for comparison only.
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
    tp: int = 1
    sp: int = 1
    exchange: int = 0




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
    tp: int = 1,
    sp: int = 1,
) -> ActivationEstimate:
    """Bytes ``funzero.models.GPT`` keeps for backward on one rank.

    The count, tensor by tensor, is in this module's docstring.

    Args:
        cfg: a ``GPTConfig`` or a ``GPT``.
        batch: sequences per data-parallel rank (micro-batch).
        seq: tokens per sequence (default: ``cfg.block_size``), the whole sequence: each of the
            ``sp`` ranks holds ``seq / sp`` of them.
        dtype: activation dtype (the parameter dtype: bf16 under ``funzero.bf16()``).
        checkpoint: recompute every block in backward (else the config's ``recompute`` blocks).
        tp: tensor-parallel ranks (``rules="gpt"``): heads, the MLP width and the vocabulary
            must divide over them.
        sp: sequence-parallel ranks (Ulysses): heads and ``seq`` must divide over them.

    Returns:
        An :class:`ActivationEstimate`.

    Raises:
        ValueError: naming a batch, seq, tp or sp that does not fit the model.

    Example:
        >>> from funzero.models import gpt_config
        >>> a = gpt_activations(gpt_config("gpt2"), batch=8, seq=1024)
        >>> a.per_layer == 32 * 8 * 1024 * 768 + 4 * 12 * 1024 * 8 + 16 * 1024 * 8
        True
        >>> gpt_activations(gpt_config("gpt2"), batch=8, seq=1024, sp=4).per_layer * 4 < a.per_layer * 1.1
        True
    """
    cfg = getattr(cfg, "cfg", cfg)
    seq = _check(cfg, batch, seq)
    for name, n in (("tp", tp), ("sp", sp)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {name}={n!r}")
    e = torch.empty((), dtype=dtype).element_size()
    h, a, L, V, t = cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.vocab_size, tp
    for flag, by, what, n in (("tp", t, "n_head", a), ("tp", t, "vocab_size", V),
                              ("sp", sp, "the heads per tensor-parallel rank", a // t), ("sp", sp, "seq", seq)):
        if n % by:
            raise ValueError(f"{flag}={by} does not divide {what} = {n}")
    s, b = seq // sp, batch  # this rank's tokens of each sequence
    sb, sbh = s * b, s * b * h
    # whole: norms' inputs and outputs; split over tp: q, k, v, attention output, lse, MLP (4h)
    per_layer = 4 * e * sbh + 12 * e * sbh // t + 4 * a * sb // t + 16 * sb
    if sp > 1:
        per_layer += e * sbh // t  # SDPA's head-sharded output and the exchange's token-sharded copy
    fused = getattr(cfg, "fused", True) and getattr(cfg, "bias", True)
    # position ids (int64), ln_f's and lm_head's inputs, ln_f's stats
    head_common = 8 * s + 2 * e * sbh + 8 * sb
    if t > 1:  # vocab-split embedding (masked ids + mask) and vocab_parallel_cross_entropy
        head = head_common + 9 * sb + 4 * sb * V // t + 8 * sb + 10 * sb + 8  # + the int64 count of targets
        head_bwd = 4 * sb * V // t + (e * sb * V // t if e != 4 else 0)
    elif fused:  # token ids, logits, the loss's lse + targets
        head = head_common + 8 * sb + e * sb * V + 12 * sb
        head_bwd = e * sb * V
    else:
        head = head_common + 8 * sb + 12 * sb + 4 * sb * V
        head_bwd = 8 * sb * V + (e * sb * V if e != 4 else 0)
    # One block's backward: gradients of the (B, T, 4h) tensors (two at once) on top of its own.
    block_bwd = 8 * e * sbh // t
    exchange = 9 * e * sbh // t if sp > 1 else 0
    k = L if checkpoint else int(getattr(cfg, "recompute", 0))
    layers = k * e * sbh + (L - k) * per_layer
    backward = max(head_bwd, (per_layer if k else 0) + max(block_bwd, exchange))
    korthikanti = k * 2 * sbh + (L - k) * ((10 * t + 24) * sbh // t + 5 * a * seq * seq * b // (t * sp))
    checkpoint = k == L
    return ActivationEstimate(
        batch=b, seq=seq, num_layers=L, checkpoint=checkpoint, per_layer=per_layer,
        layers=layers, head=head, backward=backward, peak=layers + head + backward,
        korthikanti=korthikanti, tp=tp, sp=sp, exchange=exchange,
    )
