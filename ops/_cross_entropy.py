"""Cross-entropy over a large vocabulary without an fp32 softmax.

Forward: one program per row streams the vocabulary in BLOCK_V chunks with an
online log-sum-exp (running max ``m`` and rescaled sum ``s``), then picks the
target logit: ``loss = lse - x[target]``. It saves only ``lse`` (4 bytes per
row). Backward: a second stream writes ``(softmax - onehot) * dloss`` in the
logits' dtype, recomputing ``softmax = exp(x - lse)`` chunk by chunk.

Memory: torch's ``F.cross_entropy(logits.float(), t)`` peaks near 14 bytes per
logit in backward (fp32 copy, saved log-softmax, its gradient, the fp32 input
gradient); here it is the logits plus their gradient (4 bytes per logit in
bf16), or the logits alone with ``inplace_backward=True``.

When writing the gradient into the logits buffer is safe
(``inplace_backward=True``): the logits must be a temporary that nothing reads
after the loss's backward (the usual ``lm_head(h) -> cross_entropy`` chain).
Each program reads a chunk and then overwrites the same chunk, so the kernel
itself never reads a value it already replaced. If another autograd node saved
the same logits tensor, autograd raises the usual "modified by an inplace
operation" error when it unpacks them (the op declares the mutation); plain
reads of ``logits`` after ``backward()`` see the gradient, silently.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import INTERPRET, cast_to, next_pow2, tl, triton, use_triton

__all__ = ["cross_entropy", "cross_entropy_reference"]

# 4096 bf16 logits = 8 KiB per chunk; 13 chunks for V = 50304. The interpreter
# prefers fewer, wider chunks.
_BLOCK_V = 16384 if INTERPRET else 4096
_NUM_WARPS = 8
_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------- kernels


@triton.jit
def _ce_fwd_kernel(
    logits_ptr, targets_ptr, loss_ptr, lse_ptr,  # logits: (N, V) rows; targets: (N,) int; loss, lse: (N,) fp32
    V, row_stride, ignore_index, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)  # running max
    s = tl.full((), 0.0, tl.float32)  # running sum of exp(x - m)
    for start in range(0, V, BLOCK_V):
        x = tl.load(row_ptr + start + cols, mask=start + cols < V, other=float("-inf"),
                    eviction_policy="evict_first").to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While every logit seen is -inf, shift by 0 instead: no (-inf) - (-inf).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    # An out-of-range target must not read out of bounds; its loss is NaN, visible without a sync.
    in_range = (target >= 0) & (target < V)
    x_target = tl.load(row_ptr + target, mask=valid & in_range, other=float("nan")).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - x_target, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _ce_bwd_kernel(
    logits_ptr, grad_ptr,  # (N, V) rows each; grad_ptr may equal logits_ptr (in-place)
    targets_ptr, lse_ptr, dloss_ptr,  # (N,) each; dloss may have stride 0 (a broadcast scalar)
    V, row_stride, grad_row_stride, dloss_stride, ignore_index, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    row_ptr = logits_ptr + row64 * row_stride
    grad_row_ptr = grad_ptr + row64 * grad_row_stride
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    # Ignored rows have a constant zero loss: their gradient is 0 whatever dloss says.
    scale = tl.where(target != ignore_index, tl.load(dloss_ptr + row64 * dloss_stride).to(tl.float32), 0.0)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        mask = idx < V
        x = tl.load(row_ptr + idx, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        p = tl.exp(x - lse)
        g = tl.where(idx == target, p - 1.0, p) * scale
        tl.store(grad_row_ptr + idx, cast_to(g, grad_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


def _rows(logits: Tensor) -> Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _ce_fwd_triton(logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    logits = _rows(logits)
    N, V = logits.shape
    loss = torch.empty((N,), dtype=torch.float32, device=logits.device)
    lse = torch.empty((N,), dtype=torch.float32, device=logits.device)
    if N:
        _ce_fwd_kernel[(N,)](logits, targets, loss, lse, V, logits.stride(0), ignore_index,
                             BLOCK_V=min(_BLOCK_V, next_pow2(V)), num_warps=_NUM_WARPS)
    return loss, lse


def _ce_bwd_triton(logits: Tensor, grad: Tensor, targets: Tensor, lse: Tensor, dloss: Tensor,
                   ignore_index: int) -> None:
    N, V = logits.shape
    if N:
        _ce_bwd_kernel[(N,)](logits, grad, targets, lse, dloss, V, logits.stride(0), grad.stride(0),
                             dloss.stride(0), ignore_index, BLOCK_V=min(_BLOCK_V, next_pow2(V)),
                             num_warps=_NUM_WARPS)


# --------------------------------------------------------------------------- torch reference


def cross_entropy_reference(logits: Tensor, targets: Tensor, ignore_index: int = -100,
                            reduction: str = "mean") -> Tensor:
    """Torch reference of :func:`cross_entropy`: ``F.cross_entropy`` on fp32 logits (fp32 loss)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)


# --------------------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op("funzero::cross_entropy_fwd", mutates_args=())
def _ce_fwd_op(logits: Tensor, targets: Tensor, ignore_index: int, inplace_backward: bool) -> tuple[Tensor, Tensor]:
    return _ce_fwd_triton(logits, targets, ignore_index)


@_ce_fwd_op.register_fake
def _(logits, targets, ignore_index, inplace_backward):
    N = logits.shape[0]
    return logits.new_empty((N,), dtype=torch.float32), logits.new_empty((N,), dtype=torch.float32)


@torch.library.custom_op("funzero::cross_entropy_bwd", mutates_args=())
def _ce_bwd_op(logits: Tensor, targets: Tensor, lse: Tensor, dloss: Tensor, ignore_index: int) -> Tensor:
    logits = _rows(logits)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _ce_bwd_triton(logits, grad, targets, lse, dloss, ignore_index)
    return grad


@_ce_bwd_op.register_fake
def _(logits, targets, lse, dloss, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("funzero::cross_entropy_bwd_", mutates_args=("logits",))
def _ce_bwd_inplace_op(logits: Tensor, targets: Tensor, lse: Tensor, dloss: Tensor, ignore_index: int) -> None:
    if logits.stride(-1) != 1:
        raise ValueError("inplace_backward needs logits with a contiguous last dimension")
    _ce_bwd_triton(logits, logits, targets, lse, dloss, ignore_index)


@_ce_bwd_inplace_op.register_fake
def _(logits, targets, lse, dloss, ignore_index) -> None:
    return None


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index, inplace_backward = inputs
    _loss, lse = output
    ctx.save_for_backward(logits, targets, lse)
    ctx.ignore_index = ignore_index
    ctx.inplace_backward = inplace_backward


def _backward(ctx, dloss, _dlse):
    logits, targets, lse = ctx.saved_tensors
    # dloss: (N,), often a stride-0 broadcast of the reduced loss's gradient.
    if ctx.inplace_backward:
        torch.ops.funzero.cross_entropy_bwd_(logits, targets, lse, dloss, ctx.ignore_index)
        grad = logits
    else:
        grad = torch.ops.funzero.cross_entropy_bwd(logits, targets, lse, dloss, ctx.ignore_index)
    return grad, None, None, None


torch.library.register_autograd("funzero::cross_entropy_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100, reduction: str = "mean", *,
                  inplace_backward: bool = False) -> Tensor:
    """Cross-entropy of (N, V) logits against (N,) class indices, streamed over V.

    Args:
        logits: (N, V) bf16/fp16/fp32 scores (last dimension contiguous).
        targets: (N,) integer class indices in [0, V), or ``ignore_index``.
            An out-of-range target gives a NaN loss for its row (torch raises;
            checking on the host would cost a sync).
        ignore_index: target value whose rows contribute neither loss nor gradient.
        reduction: "mean" (over non-ignored rows, NaN if there are none, like
            torch), "sum" or "none" (per-row losses, 0 for ignored rows).
        inplace_backward: write the logits' gradient into the logits buffer
            itself (see the module docstring for when that is safe).

    Returns:
        fp32 loss: a scalar, or (N,) for reduction="none". The gradient with
        respect to logits comes back in the logits' dtype.

    Example:
        >>> loss = cross_entropy(torch.randn(16, 50304), torch.randint(0, 50304, (16,)))
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction=}")
    if logits.dim() != 2 or targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"expected logits (N, V) and targets (N,), got {tuple(logits.shape)=}, "
                         f"{tuple(targets.shape)=}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices, got {targets.dtype=}")
    if inplace_backward and logits.stride(-1) != 1:
        raise ValueError(f"inplace_backward needs logits with a contiguous last dimension, got {logits.stride()=}")
    if not use_triton(logits):
        return cross_entropy_reference(logits, targets, ignore_index, reduction)
    loss, _lse = torch.ops.funzero.cross_entropy_fwd(logits, targets, int(ignore_index), bool(inplace_backward))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum()
