"""Cross-entropy of a linear head, ``loss(hidden @ weight.T, labels)``, without the (N, V) logits.

An LM head's logits are the largest activation of a training step: N tokens x V vocabulary
entries (8192 x 128256 bf16 = 2 GiB, and the fp32 copy a plain loss makes is 4 GiB more). Here
the tokens are streamed in chunks of ``chunk`` rows, and only one chunk's logits ever exist:

    for each chunk of rows:
        logits = hidden[rows] @ weight.T            # (chunk, V), cuBLAS, in hidden's dtype
        loss[rows], lse = _ce_fwd_kernel(logits)    # the cross-entropy kernels of _cross_entropy,
        logits <- (softmax - onehot) * scale        #   the gradient written over the logits
        d_hidden[rows] = logits @ weight            # (chunk, H)
        d_weight += logits.T @ hidden[rows]         # (V, H), summed in fp32

The gradients are computed in the forward and kept until the backward (Liger-Kernel's
approach), which only multiplies them by the incoming gradient. That needs the reduction to be
known in the forward: ``scale`` is ``1 / (number of non-ignored labels)`` for "mean" and 1 for
"sum". For reduction="none" the per-row incoming gradient is not known until the backward, so
the forward computes only the losses and the backward makes the same chunked pass again with
``scale`` = the incoming gradient rows.

Choices and their costs:

* Chunk size: ``_CHUNK_BYTES`` (256 MiB) of logits per chunk, as a power of two of rows (1024
  rows for a 128256-entry bf16 vocabulary). It bounds the extra memory whatever N is; fewer,
  larger chunks cut the passes over ``d_weight`` (below) and launch overhead. ``chunk_size=``
  overrides it (the GPU benchmark should sweep it).
* ``d_weight`` accumulates in an fp32 (V, H) buffer when the weight is bf16/fp16 (4 bytes per
  weight, held during the pass, cast once at the end): each chunk's product is one cuBLAS GEMM
  (fp32 inside), rounded once to the weight's dtype and added in fp32, so the rounding does not
  compound over chunks. The price is a read-modify-write of V x H fp32 per chunk, the reason
  chunks should not be smaller than needed. (cuBLAS can add a bf16 product into an fp32 buffer
  directly, but torch's ``out_dtype=`` matmuls exist only on CUDA and their dtype rules differ
  between releases, so one code path serves every device.)
* Between forward and backward the op holds ``d_hidden`` (N x H) and ``d_weight`` (V x H) in
  their inputs' dtypes, instead of the logits.
* Ignored rows (``labels == ignore_index``) get zero loss and zero gradient and are left out of
  the mean's denominator. When every label is ignored the mean is 0, not torch's NaN (0 / 0):
  a padded micro-batch must not poison a training step.

The torch reference (``linear_cross_entropy_reference``) is the plain computation in fp32: full
fp32 logits and ``F.cross_entropy``. It is what CPU tensors run under the "auto" backend, and the
tests' oracle.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._cross_entropy import _ce_bwd_triton, _ce_fwd_triton
from ._dispatch import direct_call, use_triton

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "causal_lm_loss", "default_chunk_size"]

_CHUNK_BYTES = 1 << 28  # one chunk's logits: 256 MiB
_REDUCTIONS = ("mean", "sum", "none")


def default_chunk_size(num_rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: the largest power of two whose (rows, vocab) logits fit in 256 MiB, at most
    ``num_rows`` (and at least 1)."""
    fit = max(1, _CHUNK_BYTES // max(1, vocab * dtype.itemsize))
    return max(1, min(1 << (fit.bit_length() - 1), num_rows))


# --------------------------------------------------------------------------- the chunked pass


def _lce_pass(hidden: Tensor, weight: Tensor, labels: Tensor, scale: Tensor, ignore_index: int, chunk: int,
              need_dh: bool, need_dw: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Per-row fp32 losses (N,) and, if asked, d_hidden (N, H) and d_weight (V, H) of ``sum_i scale_i loss_i``.

    ``scale``: (N,) fp32, any stride (a stride-0 broadcast of one value for "mean" and "sum").
    """
    N, H = hidden.shape
    V = weight.shape[0]
    loss = hidden.new_empty((N,), dtype=torch.float32)
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dh else None
    # fp32 sums for bf16/fp16 weights; an fp32 weight's gradient is summed in place by addmm_.
    dw = weight.new_zeros((V, H), dtype=torch.float32) if need_dw else None
    grads = need_dh or need_dw
    buf = hidden.new_empty((min(chunk, N), V))  # the one chunk of logits, reused
    for start in range(0, N, chunk):
        stop = min(start + chunk, N)
        h, t = hidden[start:stop], labels[start:stop]  # (C, H), (C,)
        logits = torch.mm(h, weight.t(), out=buf[: stop - start])  # (C, V)
        loss_c, lse = _ce_fwd_triton(logits, t, ignore_index)
        loss[start:stop] = loss_c
        if not grads:
            continue
        _ce_bwd_triton(logits, logits, t, lse, scale[start:stop], ignore_index)  # logits <- d loss / d logits
        if need_dh:
            torch.mm(logits, weight, out=dh[start:stop])
        if need_dw:
            if dw.dtype == logits.dtype:
                dw.addmm_(logits.t(), h)
            else:
                dw.add_(torch.mm(logits.t(), h))  # one GEMM, one rounding, an fp32 sum over chunks
    if dw is not None and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    return loss, dh, dw


def _mean_scale(labels: Tensor, ignore_index: int) -> Tensor:
    """1 / max(1, number of non-ignored labels), a 0-dim fp32 tensor (computed on the device: no sync)."""
    return 1.0 / (labels != ignore_index).sum().clamp_min(1).to(torch.float32)


def _lce_forward(hidden, weight, labels, ignore_index, reduction, chunk, need_dh, need_dw):
    """(loss, d_hidden, d_weight): the loss reduced as asked; the gradients (of the reduced loss, or
    empty tensors when not asked for or when reduction is "none") in their inputs' dtypes."""
    N = hidden.shape[0]
    with torch.autocast(hidden.device.type, enabled=False):
        if reduction == "none":
            loss, _, _ = _lce_pass(hidden, weight, labels, hidden.new_empty((0,)), ignore_index, chunk, False, False)
            return loss, hidden.new_empty((0,)), weight.new_empty((0,))
        scale = _mean_scale(labels, ignore_index) if reduction == "mean" else hidden.new_ones((), dtype=torch.float32)
        rows, dh, dw = _lce_pass(hidden, weight, labels, scale.expand(N), ignore_index, chunk, need_dh, need_dw)
        loss = rows.sum() * scale if reduction == "mean" else rows.sum()
    return (loss, dh if dh is not None else hidden.new_empty((0,)), dw if dw is not None else weight.new_empty((0,)))


def _lce_backward_rows(hidden, weight, labels, dloss, ignore_index, chunk, need_dh, need_dw):
    """reduction="none": the gradients for per-row incoming gradients ``dloss`` (N,), by a second pass."""
    with torch.autocast(hidden.device.type, enabled=False):
        _, dh, dw = _lce_pass(hidden, weight, labels, dloss.to(torch.float32), ignore_index, chunk, need_dh, need_dw)
    return (dh if dh is not None else hidden.new_empty((0,)), dw if dw is not None else weight.new_empty((0,)))


# --------------------------------------------------------------------------- torch reference


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, labels: Tensor, *, ignore_index: int = -100,
                                   reduction: str = "mean") -> Tensor:
    """Torch reference of :func:`linear_cross_entropy`: fp32 logits (all of them) and ``F.cross_entropy``.

    The mean divides by the number of non-ignored labels, at least 1 (0 when all are ignored)."""
    logits = hidden.float() @ weight.float().t()  # (N, V)
    if reduction != "mean":
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp_min(1)


# --------------------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op("funzero::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd_op(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, reduction: str, chunk: int,
                need_dh: bool, need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _lce_forward(hidden, weight, labels, ignore_index, reduction, chunk, need_dh, need_dw)


@_lce_fwd_op.register_fake
def _(hidden, weight, labels, ignore_index, reduction, chunk, need_dh, need_dw):
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=torch.float32)
    if reduction == "none":  # its gradients come from the backward's pass
        need_dh = need_dw = False
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dh else hidden.new_empty((0,))
    dw = weight.new_empty(weight.shape) if need_dw else weight.new_empty((0,))
    return loss, dh, dw


@torch.library.custom_op("funzero::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd_op(hidden: Tensor, weight: Tensor, labels: Tensor, dloss: Tensor, ignore_index: int, chunk: int,
                need_dh: bool, need_dw: bool) -> tuple[Tensor, Tensor]:
    return _lce_backward_rows(hidden, weight, labels, dloss, ignore_index, chunk, need_dh, need_dw)


@_lce_bwd_op.register_fake
def _(hidden, weight, labels, dloss, ignore_index, chunk, need_dh, need_dw):
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dh else hidden.new_empty((0,))
    return dh, (weight.new_empty(weight.shape) if need_dw else weight.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, ignore_index, reduction, chunk, need_dh, need_dw = inputs
    _loss, dh, dw = output
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, labels)
    else:
        ctx.save_for_backward(dh, dw)
    ctx.args = (ignore_index, reduction, chunk, need_dh, need_dw)


def _scaled(ctx, dloss, bwd_rows):
    """(d_hidden, d_weight) for the incoming gradient ``dloss``; None where not needed."""
    ignore_index, reduction, chunk, need_dh, need_dw = ctx.args
    if reduction == "none":
        hidden, weight, labels = ctx.saved_tensors
        dh, dw = bwd_rows(hidden, weight, labels, dloss, ignore_index, chunk, need_dh, need_dw)
    else:
        dh, dw = ctx.saved_tensors
        # A 0-dim fp32 factor keeps each gradient in its own dtype (one rounding).
        dh, dw = dh * dloss, dw * dloss
    return (dh if need_dh else None), (dw if need_dw else None)


def _backward(ctx, dloss, _ddh, _ddw):
    dh, dw = _scaled(ctx, dloss, torch.ops.funzero.linear_cross_entropy_bwd)
    return dh, dw, None, None, None, None, None, None


torch.library.register_autograd("funzero::linear_cross_entropy_fwd", _backward, setup_context=_setup_context)


class _LinearCrossEntropy(torch.autograd.Function):
    """The custom op's forward and backward without its dispatcher: eager calls (``direct_call``)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk, need_dh, need_dw):
        inputs = (hidden, weight, labels, ignore_index, reduction, chunk, need_dh, need_dw)
        out = _lce_forward(*inputs)
        _setup_context(ctx, inputs, out)
        return out[0]

    @staticmethod
    def backward(ctx, dloss):
        dh, dw = _scaled(ctx, dloss, _lce_backward_rows)
        return dh, dw, None, None, None, None, None, None


# --------------------------------------------------------------------------- public API


def _check(hidden: Tensor, weight: Tensor, labels: Tensor, reduction: str, chunk_size: Optional[int]) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction=}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, H) and weight (V, H), got {tuple(hidden.shape)=}, "
                         f"{tuple(weight.shape)=}")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"expected labels (N,) = ({hidden.shape[0]},), got {tuple(labels.shape)=}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype=}")
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if hidden.dtype not in floats or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must share one of {floats}, got {hidden.dtype=}, {weight.dtype=}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size=}")


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, ignore_index: int = -100,
                         reduction: str = "mean", chunk_size: Optional[int] = None) -> Tensor:
    """``cross_entropy(hidden @ weight.T, labels)`` without ever holding the (N, V) logits.

    The tokens go through in chunks of ``chunk_size`` rows: each chunk's logits (cuBLAS) are turned
    in place into their loss and gradient by the cross-entropy kernels, and the gradients of
    ``hidden`` and ``weight`` are accumulated in the same pass (see the module docstring for the
    memory and precision trade-offs). Under torch.compile the op is one graph node (a custom op
    with a fake implementation); whether that beats inductor's own unfused loss on a given model is
    for the GPU benchmark to measure.

    Args:
        hidden: (N, H) bf16/fp16/fp32 inputs of the head (e.g. the last hidden states, flattened).
        weight: (V, H) the head's weight (``nn.Linear(H, V, bias=False).weight``), hidden's dtype.
        labels: (N,) integer targets in [0, V), or ``ignore_index``. An out-of-range target gives a
            NaN loss (checking on the host would cost a sync).
        ignore_index: label whose rows contribute neither loss nor gradient.
        reduction: "mean" (over the non-ignored rows; 0 if there are none, where torch gives NaN),
            "sum", or "none" (per-row losses, 0 for ignored rows; its backward makes a second pass).
        chunk_size: rows per chunk; default :func:`default_chunk_size` (256 MiB of logits).

    Returns:
        The fp32 loss: a scalar, or (N,) for reduction="none". Gradients come back in the inputs'
        dtypes, for any incoming gradient (the stored ones are scaled by it).

    Example:
        >>> h, w = torch.randn(8, 16), torch.randn(100, 16)
        >>> loss = linear_cross_entropy(h, w, torch.randint(0, 100, (8,)))
    """
    _check(hidden, weight, labels, reduction, chunk_size)
    if not use_triton(hidden):
        return linear_cross_entropy_reference(hidden, weight, labels, ignore_index=ignore_index, reduction=reduction)
    N, V = hidden.shape[0], weight.shape[0]
    chunk = chunk_size if chunk_size is not None else default_chunk_size(N, V, hidden.dtype)
    grad = torch.is_grad_enabled()
    args = (hidden.contiguous(), weight.contiguous(), labels.contiguous(), int(ignore_index), reduction,
            max(1, min(chunk, N)), grad and hidden.requires_grad, grad and weight.requires_grad)
    if direct_call(hidden, weight):
        return _LinearCrossEntropy.apply(*args)
    return torch.ops.funzero.linear_cross_entropy_fwd(*args)[0]


def causal_lm_loss(hidden: Tensor, weight: Tensor, labels: Optional[Tensor], *, ignore_index: int = -100,
                   num_items_in_batch=None, shift_labels: Optional[Tensor] = None,
                   chunk_size: Optional[int] = None) -> Tensor:
    """Hugging Face's causal-LM loss on (B, T, H) hidden states, through :func:`linear_cross_entropy`.

    Position t predicts label t + 1: ``labels`` (B, T) are padded with ``ignore_index`` at the end
    and shifted left by one (or ``shift_labels`` (B, T), already shifted, are used as they are).
    The loss is the mean over non-ignored targets, or their sum divided by ``num_items_in_batch``
    when that is given (HF's gradient-accumulation convention). ``funzero.losses.causal_lm`` is the
    public name; this lives beside the kernel so that ``funzero.ops.patch`` can use it.
    """
    if hidden.dim() != 3:
        raise ValueError(f"expected hidden states (B, T, H), got {tuple(hidden.shape)=}")
    B, T, H = hidden.shape
    if shift_labels is None:
        if labels is None or tuple(labels.shape) != (B, T):
            raise ValueError(f"expected labels (B, T) = ({B}, {T}), got "
                             f"{None if labels is None else tuple(labels.shape)}")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]  # (B, T)
    elif tuple(shift_labels.shape) != (B, T):
        raise ValueError(f"expected shift_labels (B, T) = ({B}, {T}), got {tuple(shift_labels.shape)=}")
    targets = shift_labels.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        return linear_cross_entropy(hidden.reshape(B * T, H), weight, targets, ignore_index=ignore_index,
                                    chunk_size=chunk_size)
    total = linear_cross_entropy(hidden.reshape(B * T, H), weight, targets, ignore_index=ignore_index,
                                 reduction="sum", chunk_size=chunk_size)
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
