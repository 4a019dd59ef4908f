"""Rotary position embedding of queries and keys, Hugging Face's ``apply_rotary_pos_emb``.

``y = x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]`` over the two
halves of the head dimension (the GPT-NeoX / Llama convention, not GPT-J's interleaved pairs):

    y1 = x1 c1 - x2 s1,    y2 = x2 c2 + x1 s2

where ``c1, c2`` (``s1, s2``) are the two halves of ``cos`` (``sin``); HF's rotary modules make
them equal, but any ``cos, sin`` are honoured. The map is linear in x, and its transpose is the
backward:

    dx1 = dy1 c1 + dy2 s2,  dx2 = dy2 c2 - dy1 s1

so one kernel with a ``BACKWARD`` switch does both, and the custom op's gradient is the same op
with the switch flipped. Each program takes a run of positions of one sequence and rotates every
query head and every key head there (GQA's fewer key heads included), in fp32 with one rounding
per output. Inputs may have any strides with a unit last stride (the
``view(...).transpose(1, 2)`` heads HF makes are read in place); outputs take the inputs'
layout (``empty_like``).

Unfused, autograd runs ~6 elementwise kernels per tensor each way, and ``rotate_half``
materialises a copy; in bf16 each of them rounds.
"""

from typing import Optional

import torch
from torch import Tensor

from ._dispatch import INTERPRET, cast_to, cdiv, direct_call, next_pow2, tl, triton, use_triton

__all__ = ["rope", "rope_reference"]

# Query elements (half rows) per program: 2048 on a GPU is one position of 32 heads of 128, or
# several positions of fewer heads; the interpreter pays per program, so it takes whole sequences.
_TILE = 65536 if INTERPRET else 2048
_NUM_WARPS = 4


# --------------------------------------------------------------------------- kernel


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, s_h, s_t, d_h, d_t, c1, c2, s1, s2, t0, T, NH, HALF,
                  BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # A (BLOCK_T, BLOCK_H, BLOCK_D) tile: positions from t0, heads, the first half's dims.
    # src_ptr / dst_ptr point at this program's batch row; c1..s2 are (BLOCK_T, 1, BLOCK_D) fp32.
    t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None, None]
    h = tl.arange(0, BLOCK_H).to(tl.int64)[None, :, None]
    dims = tl.arange(0, BLOCK_D)[None, None, :]
    mask = (t < T) & (h < NH) & (dims < HALF)
    src = src_ptr + t * s_t + h * s_h + dims
    dst = dst_ptr + t * d_t + h * d_h + dims
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(dst, cast_to(y1, dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, cast_to(y2, dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,  # q, qo: (B, NQ, T, 2 HALF); k, ko: (B, NK, T, 2 HALF)
    T, NQ, NK, HALF,  # cos, sin: (B, T, 2 HALF), batch stride 0 when shared
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t, sc_b, sc_t, ss_b, ss_t,
    BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t0 = tl.program_id(0) * BLOCK_T  # positions on axis 0: a long sequence may need more than 65535 tiles
    b = tl.program_id(1).to(tl.int64)
    t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None, None]
    dims = tl.arange(0, BLOCK_D)[None, None, :]
    mask = (t < T) & (dims < HALF)
    c_row = cos_ptr + b * sc_b + t * sc_t + dims  # (BLOCK_T, 1, BLOCK_D): one row per position, for all heads
    s_row = sin_ptr + b * ss_b + t * ss_t + dims
    c1 = tl.load(c_row, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_row, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + HALF, mask=mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + b * sq_b, qo_ptr + b * sqo_b, sq_h, sq_t, sqo_h, sqo_t, c1, c2, s1, s2,
                  t0, T, NQ, HALF, BACKWARD, BLOCK_T, BLOCK_HQ, BLOCK_D)
    _rotate_heads(k_ptr + b * sk_b, ko_ptr + b * sko_b, sk_h, sk_t, sko_h, sko_t, c1, c2, s1, s2,
                  t0, T, NK, HALF, BACKWARD, BLOCK_T, BLOCK_HK, BLOCK_D)


# --------------------------------------------------------------------------- launcher


def _heads_view(x: Tensor, unsqueeze_dim: int) -> Tensor:
    """(B, heads, T, hd) view of q or k (unsqueeze_dim 2: stored as (B, T, heads, hd))."""
    return x if unsqueeze_dim == 1 else x.transpose(1, 2)


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rope_triton(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int,
                 backward: bool) -> tuple[Tensor, Tensor]:
    q, k, cos, sin = _unit_last(q), _unit_last(k), _unit_last(cos), _unit_last(sin)
    qo, ko = torch.empty_like(q), torch.empty_like(k)  # the inputs' layout
    qv, kv, qov, kov = (_heads_view(x, unsqueeze_dim) for x in (q, k, qo, ko))
    B, NQ, T, D = qv.shape
    NK = kv.shape[1]
    cos, sin = cos.expand(B, T, D), sin.expand(B, T, D)  # a shared batch row gets stride 0
    if B * T:
        block_hq, block_hk, block_d = next_pow2(NQ), next_pow2(NK), next_pow2(D // 2)
        block_t = max(1, min(next_pow2(T), _TILE // (block_hq * block_d)))
        _rope_kernel[(cdiv(T, block_t), B)](
            qv, kv, qov, kov, cos, sin, T, NQ, NK, D // 2,
            *qv.stride()[:3], *kv.stride()[:3], *qov.stride()[:3], *kov.stride()[:3], *cos.stride()[:2],
            *sin.stride()[:2], BACKWARD=backward, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
            BLOCK_D=block_d, num_warps=_NUM_WARPS)
    return qo, ko


# --------------------------------------------------------------------------- torch reference


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """Torch reference of :func:`rope`: HF's formula in fp32, outputs in q's and k's dtypes."""
    c, s = cos.unsqueeze(unsqueeze_dim).float(), sin.unsqueeze(unsqueeze_dim).float()
    qf, kf = q.float(), k.float()
    return (qf * c + _rotate_half(qf) * s).to(q.dtype), (kf * c + _rotate_half(kf) * s).to(k.dtype)


# --------------------------------------------------------------------------- custom op + autograd


@torch.library.custom_op("funzero::rope", mutates_args=())
def _rope_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int,
             backward: bool) -> tuple[Tensor, Tensor]:
    return _rope_triton(q, k, cos, sin, unsqueeze_dim, backward)


@_rope_op.register_fake
def _(q, k, cos, sin, unsqueeze_dim, backward):
    return torch.empty_like(_unit_last(q)), torch.empty_like(_unit_last(k))


def _setup_context(ctx, inputs, output):
    _q, _k, cos, sin, unsqueeze_dim, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.unsqueeze_dim, ctx.backward = unsqueeze_dim, backward


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = torch.ops.funzero.rope(dq, dk, cos, sin, ctx.unsqueeze_dim, not ctx.backward)
    return dq, dk, None, None, None, None


torch.library.register_autograd("funzero::rope", _backward, setup_context=_setup_context)


class _Rope(torch.autograd.Function):
    """The custom op's forward and backward without its dispatcher: eager calls (``direct_call``)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        return _rope_triton(q, k, cos, sin, unsqueeze_dim, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_triton(dq, dk, cos, sin, ctx.unsqueeze_dim, True)
        return dq, dk, None, None, None


# --------------------------------------------------------------------------- public API


def mismatch(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> Optional[str]:
    """Why :func:`rope` cannot take these arguments, or None when it can (``funzero.ops.patch`` asks
    before it hands a call to the kernel, and leaves the others to HF's own function)."""
    if unsqueeze_dim not in (1, 2):
        return f"unsqueeze_dim must be 1 (q, k as (B, heads, T, hd)) or 2 ((B, T, heads, hd)), got {unsqueeze_dim=}"
    if q.dim() != 4 or k.dim() != 4:
        return f"q and k must be 4-D, got {tuple(q.shape)=}, {tuple(k.shape)=}"
    qv, kv = _heads_view(q, unsqueeze_dim), _heads_view(k, unsqueeze_dim)
    B, _, T, D = qv.shape
    if kv.shape[0] != B or kv.shape[2] != T or kv.shape[3] != D:
        return (f"k must match q's batch, positions and head size, got {tuple(q.shape)=}, {tuple(k.shape)=} "
                f"with {unsqueeze_dim=}")
    if D % 2:
        return f"the head size must be even, got {D} (q {tuple(q.shape)})"
    if q.dtype != k.dtype or not q.dtype.is_floating_point:
        return f"q and k must share one floating dtype, got {q.dtype=}, {k.dtype=}"
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, B) or tuple(t.shape[1:]) != (T, D):
            return f"{name} must be ({B} or 1, {T}, {D}) for q {tuple(q.shape)}, got {tuple(t.shape)}"
    return None


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """Rotary embedding of queries and keys, as Hugging Face's ``apply_rotary_pos_emb``.

    Args:
        q: (B, nh, T, hd) queries (``unsqueeze_dim=1``) or (B, T, nh, hd) (``unsqueeze_dim=2``).
        k: keys, laid out like q, with nkv heads (nkv may be fewer than nh: GQA).
        cos, sin: (B, T, hd) or (1, T, hd), as HF's rotary modules return them (any float dtype).
        unsqueeze_dim: where the heads dimension is, as HF's argument of that name.

    Returns:
        ``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)`` in q's dtype, computed
        in fp32 and laid out like the inputs. Differentiable in q and k; a ``cos`` or ``sin`` that
        requires grad sends the call to the torch reference (the kernel has no gradient for them).

    Example:
        >>> q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
        >>> cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
        >>> q_rot, k_rot = rope(q, k, cos, sin)

    References:
        Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021.
    """
    problem = mismatch(q, k, cos, sin, unsqueeze_dim)
    if problem:
        raise ValueError(problem)
    if not use_triton(q) or (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)):
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    if direct_call(q, k, cos, sin):
        return _Rope.apply(q, k, cos, sin, int(unsqueeze_dim))
    return torch.ops.funzero.rope(q, k, cos, sin, int(unsqueeze_dim), False)
