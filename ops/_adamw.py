"""Fused AdamW over one flat shard: the optimizer's hot path.

One pass reads master, grad, mu, nu once and writes master, mu, nu and the
low-precision parameter copy once: 4+2+4+4 read + 4+4+4+2 written = 28 bytes
per parameter with a bf16 gradient and a bf16 copy. Everything else (loss-scale
unscale, clip coefficient, inf check, bias correction) is folded in, and
nothing is read back to the host.

Footguns this file guards:

* Bias correction ``1 - beta**step`` loses most of its digits in fp32 early in
  training (``1 - fp32(0.999)`` is off by 1.3e-5 relative), so the kernel
  computes it in fp64 by repeated squaring, with the betas as compile-time
  constants carrying their exact double values. Betas never change during
  training, so this costs one compilation.
* ``found_inf`` is read on the device: each program loads it and runs zero
  iterations when it is set. No host sync, so skipped steps stay async.
* A mutating kernel must not be autotuned by timing it on the live buffers
  (the autotuner would need 12 bytes/param of clones, and a first step that
  overflows would time no-op launches and cache a bogus winner), so the launch
  configuration is fixed; ``benchmarks/ops.py`` sweeps the alternatives.
* Full tiles run unmasked (vectorised 16-byte accesses for any length); the
  ragged tail is a second, masked launch of one program.
"""

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _cpu_adamw
from ._dispatch import HAS_TRITON, INTERPRET, cast_to, get_backend, num_sms, tl, triton, use_triton

__all__ = ["adamw_", "adamw_leaves_", "nonfinite_", "adamw_reference_", "nonfinite_reference_"]

# Launch configuration (see the module docstring for why it is not autotuned).
# 4096 fp32 elements per tile = 16 per thread at 8 warps: four 16-byte loads
# per stream in flight per thread, enough to cover DRAM latency at 2 CTAs/SM.
# The interpreter pays per program and per tile, not per element: bigger tiles
# keep CPU tests fast and run the very same kernel code.
_BLOCK = 16384 if INTERPRET else 4096
_NUM_WARPS = 8
# One program per tile: measured on an H100 (benchmarks/NOTES.md, 2026-11-23) at 14.7 ms for
# GPT-2 XL's 1.56B params, 97.8% of copy bandwidth, against 15.4 ms for a persistent grid of
# 4 programs per SM.
_PROGRAMS_PER_SM = 0
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16} \
    if HAS_TRITON else {}


# --------------------------------------------------------------------------- kernels


@triton.jit
def _powi_f64(base, e):
    """``base ** e`` for fp64 scalar ``base`` and int32 ``e >= 0`` (31 squarings, unrolled)."""
    result = tl.full((), 1.0, tl.float64)
    for _ in tl.static_range(31):
        result = tl.where((e & 1) != 0, result * base, result)
        base = base * base
        e = e >> 1
    return result


@triton.jit
def _adamw_scalars(lr_ptr, lr_value, step_ptr, step_value, BETA1: tl.constexpr, BETA2: tl.constexpr,
                   LR_FROM_PTR: tl.constexpr, STEP_FROM_PTR: tl.constexpr):
    """Per-program scalars: ``(lr in fp64, step_size, sqrt(bias_correction2), beta1, 1-beta1,
    beta2, 1-beta2)``, the same values torch.optim.AdamW rounds to fp32."""
    if LR_FROM_PTR:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = tl.cast(lr_value, tl.float64)
    if STEP_FROM_PTR:
        step = tl.load(step_ptr).to(tl.int32)
    else:
        step = tl.cast(step_value, tl.int32)
    beta1 = tl.full((), BETA1, tl.float64)
    beta2 = tl.full((), BETA2, tl.float64)
    bias_correction1 = 1.0 - _powi_f64(beta1, step)
    bias_correction2 = 1.0 - _powi_f64(beta2, step)
    step_size = (lr / bias_correction1).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
    return (lr, step_size, bias_correction2_sqrt, beta1.to(tl.float32), (1.0 - beta1).to(tl.float32),
            beta2.to(tl.float32), (1.0 - beta2).to(tl.float32))


@triton.jit
def _adamw_math(p, g, m, v, decay, step_size, bias_correction2_sqrt, beta1, one_minus_beta1, beta2,
                one_minus_beta2, eps):
    """One tile of the update in torch.optim.AdamW's operation order (decoupled decay first)."""
    p = p * decay
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    return p, m, v


@triton.jit
def _adamw_tile(master_ptr, mu_ptr, nu_ptr, out_ptr, base, g_ptr, offs, mask, decay, step_size, bc2_sqrt, b1, omb1,
                b2, omb2, eps, grad_scale, HAS_SCALE: tl.constexpr, HAS_OUT: tl.constexpr):
    """Load, update and store one tile: ``master/mu/nu/out[base + offs]`` and ``g_ptr[offs]``."""
    p = tl.load(master_ptr + base + offs, mask=mask, eviction_policy="evict_first")
    g = tl.load(g_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
    m = tl.load(mu_ptr + base + offs, mask=mask, eviction_policy="evict_first")
    v = tl.load(nu_ptr + base + offs, mask=mask, eviction_policy="evict_first")
    if HAS_SCALE:
        g = g * grad_scale
    p, m, v = _adamw_math(p, g, m, v, decay, step_size, bc2_sqrt, b1, omb1, b2, omb2, eps)
    tl.store(master_ptr + base + offs, p, mask=mask)
    tl.store(mu_ptr + base + offs, m, mask=mask)
    tl.store(nu_ptr + base + offs, v, mask=mask)
    if HAS_OUT:
        tl.store(out_ptr + base + offs, cast_to(p, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adamw_kernel(
    master_ptr, grad_ptr, mu_ptr, nu_ptr, out_ptr,  # flat (n,) each; out_ptr unused without HAS_OUT
    lr_ptr, lr_value,  # 0-d fp32 tensor, or a float when LR_FROM_PTR is False
    step_ptr, step_value,  # 0-d tensor (fp32 or int), or an int when STEP_FROM_PTR is False
    scale_ptr, flag_ptr,  # optional 0-d fp32 tensors
    weight_decay, eps,
    num_tiles, n_valid,  # tiles of BLOCK; n_valid bounds the single masked tile
    BETA1: tl.constexpr, BETA2: tl.constexpr,
    LR_FROM_PTR: tl.constexpr, STEP_FROM_PTR: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_FLAG: tl.constexpr, HAS_OUT: tl.constexpr,
    MASKED: tl.constexpr, BLOCK: tl.constexpr,
):
    # ---- per-program scalars: computed once, then a grid-stride loop over tiles
    if HAS_FLAG:
        # Skipped step: run no iterations, so nothing is read or written.
        num_tiles = tl.where(tl.load(flag_ptr) != 0, 0, num_tiles)
    lr, step_size, bc2_sqrt, b1, omb1, b2, omb2 = _adamw_scalars(
        lr_ptr, lr_value, step_ptr, step_value, BETA1, BETA2, LR_FROM_PTR, STEP_FROM_PTR)
    decay = (1.0 - lr * tl.cast(weight_decay, tl.float64)).to(tl.float32)
    grad_scale = tl.load(scale_ptr).to(tl.float32) if HAS_SCALE else 1.0

    offs = tl.arange(0, BLOCK)
    if MASKED:
        mask = offs < n_valid
    else:
        mask = None
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    for tile in range(pid, num_tiles, num_programs):
        base = tl.cast(tile, tl.int64) * BLOCK  # int64: shards may pass 2**31 elements
        _adamw_tile(master_ptr, mu_ptr, nu_ptr, out_ptr, base, grad_ptr + base, offs, mask, decay, step_size,
                    bc2_sqrt, b1, omb1, b2, omb2, eps, grad_scale, HAS_SCALE, HAS_OUT)


@triton.jit
def _adamw_leaves_kernel(
    master_ptr, mu_ptr, nu_ptr, out_ptr,  # flat (n,) each; out_ptr unused without HAS_OUT
    addr_ptr,  # (L,) int64: the address of each leaf's gradient, this call
    tiles_ptr,  # (T, 2) int32: (leaf, tile of BLOCK within the leaf) per tile
    start_ptr, numel_ptr, decay_ptr,  # (L,) int64 offset in the flat buffer, int64 numel, fp32 weight decay
    lr_ptr, lr_value, step_ptr, step_value, scale_ptr, flag_ptr, eps,
    num_tiles,
    BETA1: tl.constexpr, BETA2: tl.constexpr,
    LR_FROM_PTR: tl.constexpr, STEP_FROM_PTR: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_FLAG: tl.constexpr, HAS_OUT: tl.constexpr,
    GRAD_DTYPE: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """:func:`_adamw_kernel` reading each leaf's gradient where autograd left it (no flat copy).

    Unmasked launches cover the tiles that lie wholly inside a leaf; the masked launch covers
    each leaf's ragged last tile. ``ALIGNED``: the host checked that every leaf starts at a
    multiple of 16 elements and every gradient address at a multiple of 16 bytes, so the
    loaded offsets and addresses may carry that hint (16-byte vector accesses).
    """
    if HAS_FLAG:
        num_tiles = tl.where(tl.load(flag_ptr) != 0, 0, num_tiles)
    lr, step_size, bc2_sqrt, b1, omb1, b2, omb2 = _adamw_scalars(
        lr_ptr, lr_value, step_ptr, step_value, BETA1, BETA2, LR_FROM_PTR, STEP_FROM_PTR)
    grad_scale = tl.load(scale_ptr).to(tl.float32) if HAS_SCALE else 1.0
    offs = tl.arange(0, BLOCK)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    for t in range(pid, num_tiles, num_programs):
        leaf = tl.load(tiles_ptr + 2 * t)
        within = tl.cast(tl.load(tiles_ptr + 2 * t + 1), tl.int64) * BLOCK
        start = tl.load(start_ptr + leaf)
        gptr = tl.load(addr_ptr + leaf).to(tl.pointer_type(GRAD_DTYPE))
        if ALIGNED:
            start = tl.multiple_of(start, 16)
            gptr = tl.multiple_of(gptr, 16)
        if MASKED:
            mask = offs < tl.load(numel_ptr + leaf) - within
        else:
            mask = None
        decay = (1.0 - lr * tl.load(decay_ptr + leaf).to(tl.float64)).to(tl.float32)
        _adamw_tile(master_ptr, mu_ptr, nu_ptr, out_ptr, start + within, gptr + within, offs, mask, decay,
                    step_size, bc2_sqrt, b1, omb1, b2, omb2, eps, grad_scale, HAS_SCALE, HAS_OUT)


@triton.jit
def _nonfinite_kernel(x_ptr, flag_ptr, num_tiles, n_valid, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if MASKED:
        mask = offs < n_valid
        other = 0.0
    else:
        mask = None
        other = None  # Triton rejects `other` without `mask`
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    pid = tl.program_id(0)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        base = tl.cast(tile, tl.int64) * BLOCK
        x = tl.load(x_ptr + base + offs, mask=mask, other=other, eviction_policy="evict_first").to(tl.float32)
        # Exponent all ones <=> inf or NaN; integer test, so no float exception noise.
        bits = x.to(tl.int32, bitcast=True)
        bad = bad | ((bits & 0x7F800000) == 0x7F800000).to(tl.int32)
    found = tl.max(bad, axis=0)
    # Several programs may store 1.0 at once; the value is the same, so no atomics.
    tl.store(flag_ptr, tl.full((), 1.0, tl.float32), mask=found != 0)


# --------------------------------------------------------------------------- launchers


def _split(n: int, block: int) -> tuple[int, int]:
    """(elements covered by full tiles, elements left for the masked tail)."""
    n_main = n - n % block
    return n_main, n - n_main


def _grid(num_tiles: int, device: torch.device, programs_per_sm: int) -> int:
    if programs_per_sm <= 0:  # one tile per program
        return num_tiles
    return max(1, min(num_tiles, num_sms(device) * programs_per_sm))


def _adamw_triton(master, grad, mu, nu, param_out, lr, lr_value, step, step_value, beta1, beta2, eps,
                  weight_decay, grad_scale, found_inf, *, block=_BLOCK, num_warps=_NUM_WARPS,
                  programs_per_sm=_PROGRAMS_PER_SM) -> None:
    n = master.numel()
    n_main, n_tail = _split(n, block)
    flags = dict(
        BETA1=float(beta1), BETA2=float(beta2),
        LR_FROM_PTR=lr is not None, STEP_FROM_PTR=step is not None,
        HAS_SCALE=grad_scale is not None, HAS_FLAG=found_inf is not None, HAS_OUT=param_out is not None,
        BLOCK=block, num_warps=num_warps,
    )
    scalars = (lr, float(lr_value), step, int(step_value), grad_scale, found_inf, float(weight_decay), float(eps))
    if n_main:
        num_tiles = n_main // block
        _adamw_kernel[(_grid(num_tiles, master.device, programs_per_sm),)](
            master, grad, mu, nu, param_out, *scalars, num_tiles, n_main, MASKED=False, **flags)
    if n_tail:
        out_tail = param_out[n_main:] if param_out is not None else None
        _adamw_kernel[(1,)](
            master[n_main:], grad[n_main:], mu[n_main:], nu[n_main:], out_tail, *scalars, 1, n_tail,
            MASKED=True, **flags)


class _LeafTables:
    """Static tables of one leaf layout on one device: tile lists, offsets, sizes, decays."""

    def __init__(self, offsets: tuple, numels: tuple, decays: tuple, block: int, device: torch.device) -> None:
        full, tail = [], []
        for i, n in enumerate(numels):
            whole, rest = divmod(n, block)
            full.extend((i, j) for j in range(whole))
            if rest:
                tail.append((i, whole))

        def table(rows: list, dtype) -> Tensor:
            return torch.tensor(rows, dtype=dtype).to(device)

        self.full = table(full, torch.int32).reshape(-1) if full else None
        self.tail = table(tail, torch.int32).reshape(-1) if tail else None
        self.num_full, self.num_tail = len(full), len(tail)
        self.starts = table(list(offsets), torch.int64)
        self.numels = table(list(numels), torch.int64)
        self.decays = table(list(decays), torch.float32)
        self.starts_aligned = all(o % 16 == 0 for o in offsets)
        # Address tables of the buffers this layout updates (groups of one shape share a layout):
        # (master address, gradient addresses) -> (device table, kept for a captured graph).
        self.addresses: dict = {}
        self.capture_rows: Tensor | None = None  # page-locked host rows for tables made in capture
        self.captured = 0  # rows handed out (never reused: a captured graph reads its row at replay)


_LEAF_TABLES: dict = {}
_CAPTURE_TABLES = 256  # address tables per layout that CUDA graph captures may make, in all
_LOOSE_TABLES = 256  # other address tables kept per layout (the oldest goes first)


def _leaf_tables(offsets, numels, decays, block: int, device: torch.device) -> _LeafTables:
    key = (tuple(offsets), tuple(numels), tuple(decays), block, device)
    tabs = _LEAF_TABLES.get(key)
    if tabs is None:
        tabs = _LEAF_TABLES[key] = _LeafTables(*key)
    return tabs


def _capture_rows(n: int) -> Tensor:
    """``(_CAPTURE_TABLES, n)`` int64 host rows page-locked by one ``cudaHostRegister``, outside
    torch's caching host allocator: a copy from them inside a CUDA graph capture records no
    allocator event (an event recorded during capture breaks the allocator's later queries)."""
    rows = torch.empty(_CAPTURE_TABLES, n, dtype=torch.int64)
    err = torch.cuda.cudart().cudaHostRegister(rows.data_ptr(), rows.numel() * rows.element_size(), 0)
    if int(err) != 0:
        raise RuntimeError(f"adamw_leaves_: cudaHostRegister failed ({err})")
    return rows


def _address_table(tabs: _LeafTables, master: Tensor, grads: list) -> Tensor:
    """The device table of the gradients' addresses, made once per set of addresses.

    Steady-state steps find their table (a CUDA graph replays fixed addresses; without one the
    caching allocator may hand autograd other blocks, and a new table is one small asynchronous
    copy). A table made while a CUDA graph is being captured is copied in the graph from a
    page-locked host row set aside before capture; the graph reads that row at each replay, so
    row and table are kept as long as the process lives.
    """
    device = master.device
    key = (master.data_ptr(), *(g.data_ptr() for g in grads))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    hit = tabs.addresses.get(key)
    if hit is not None:
        if capturing:
            tabs.addresses[key] = (hit[0], True)
        return hit[0]
    if capturing:
        if tabs.capture_rows is None or tabs.captured == _CAPTURE_TABLES:
            raise RuntimeError("adamw_leaves_: no host row left for an address table made during CUDA graph "
                               f"capture (run the step once before capturing it; at most {_CAPTURE_TABLES} "
                               "tables per layout are made in captures)")
        host = tabs.capture_rows[tabs.captured]
        tabs.captured += 1
        host.copy_(torch.tensor(key[1:], dtype=torch.int64))
        table = torch.empty(len(grads), dtype=torch.int64, device=device)
        table.copy_(host, non_blocking=True)
    else:
        host_table = torch.tensor(key[1:], dtype=torch.int64)
        if device.type == "cuda":
            # Pinned and asynchronous: a copy from pageable memory would wait for the GPU to
            # drain, and the host would stop running ahead (measured: 84 -> 96 ms a step at 350M
            # without CUDA graphs, where the allocator hands autograd new addresses each step).
            host_table = host_table.pin_memory()
            if tabs.capture_rows is None:
                tabs.capture_rows = _capture_rows(len(grads))
        table = host_table.to(device, non_blocking=True)
        loose = [k for k, (_, kept) in tabs.addresses.items() if not kept]
        if len(loose) >= _LOOSE_TABLES:
            del tabs.addresses[loose[0]]  # the oldest; stream order keeps launches queued on it safe
    tabs.addresses[key] = (table, capturing)
    return table


def _adamw_leaves_triton(master, grads, offsets, mu, nu, param_out, lr, lr_value, step, step_value, beta1,
                         beta2, eps, decays, grad_scale, found_inf, *, block=_BLOCK, num_warps=_NUM_WARPS) -> None:
    # One gradient dtype, ranges inside master: checked by adamw_leaves_.
    tabs = _leaf_tables(offsets, [g.numel() for g in grads], decays, block, master.device)
    addresses = _address_table(tabs, master, grads)
    aligned = tabs.starts_aligned and all(g.data_ptr() % 16 == 0 for g in grads)
    flags = dict(
        BETA1=float(beta1), BETA2=float(beta2),
        LR_FROM_PTR=lr is not None, STEP_FROM_PTR=step is not None,
        HAS_SCALE=grad_scale is not None, HAS_FLAG=found_inf is not None, HAS_OUT=param_out is not None,
        GRAD_DTYPE=_TL_DTYPES[grads[0].dtype], ALIGNED=aligned, BLOCK=block, num_warps=num_warps,
    )
    args = (master, mu, nu, param_out, addresses)
    scalars = (tabs.starts, tabs.numels, tabs.decays, lr, float(lr_value), step, int(step_value), grad_scale,
               found_inf, float(eps))
    if tabs.num_full:
        _adamw_leaves_kernel[(tabs.num_full,)](*args, tabs.full, *scalars, tabs.num_full, MASKED=False, **flags)
    if tabs.num_tail:
        _adamw_leaves_kernel[(tabs.num_tail,)](*args, tabs.tail, *scalars, tabs.num_tail, MASKED=True, **flags)


def _nonfinite_triton(x: Tensor, found_inf: Tensor, *, block: int = 4 * _BLOCK, programs_per_sm: int = 4) -> None:
    x = x.reshape(-1)  # a view for contiguous tensors
    n_main, n_tail = _split(x.numel(), block)
    if n_main:
        num_tiles = n_main // block
        _nonfinite_kernel[(_grid(num_tiles, x.device, programs_per_sm),)](
            x, found_inf, num_tiles, n_main, MASKED=False, BLOCK=block, num_warps=8)
    if n_tail:
        _nonfinite_kernel[(1,)](x[n_main:], found_inf, 1, n_tail, MASKED=True, BLOCK=block, num_warps=8)


# --------------------------------------------------------------------------- torch references


def adamw_reference_(master: Tensor, grad: Tensor, mu: Tensor, nu: Tensor, param_out: Optional[Tensor] = None, *,
                     lr: Union[Tensor, float], step: Union[Tensor, int], beta1: float, beta2: float, eps: float,
                     weight_decay: float, grad_scale: Optional[Tensor] = None,
                     found_inf: Optional[Tensor] = None) -> None:
    """Torch reference of :func:`adamw_` (and its CPU path): ``torch._fused_adamw_``.

    Same arguments and semantics as :func:`adamw_`. Reads ``found_inf`` on the
    host (free on CPU; a sync on CUDA, acceptable for a reference). At most one
    temporary: an fp32 copy of the gradient, only when it is not fp32 or needs
    scaling (torch's fused kernel wants fp32 gradients and would overwrite them
    when given a scale).
    """
    if found_inf is not None and found_inf.item() != 0:
        return
    g = grad
    if grad_scale is not None:
        g = grad * grad_scale if grad.dtype == torch.float32 else grad.to(torch.float32).mul_(grad_scale)
    elif grad.dtype != torch.float32:
        g = grad.to(torch.float32)
    if isinstance(step, Tensor):
        steps = [step if step.dtype == torch.float32 else step.to(torch.float32)]
    else:
        steps = [torch.tensor(float(step), device=master.device)]
    torch._fused_adamw_([master], [g], [mu], [nu], [], steps, lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
    if param_out is not None:
        param_out.copy_(master)


def nonfinite_reference_(tensors: list[Tensor], found_inf: Tensor) -> None:
    """Torch reference of :func:`nonfinite_` (device-side, no host sync)."""
    for t in tensors:
        found_inf.masked_fill_(~torch.isfinite(t).all(), 1.0)


# --------------------------------------------------------------------------- custom ops


def _adamw_impl(master, grad, mu, nu, param_out, lr, lr_value, step, step_value, beta1, beta2, eps, weight_decay,
                grad_scale, found_inf) -> None:
    if use_triton(master):
        _adamw_triton(master, grad, mu, nu, param_out, lr, lr_value, step, step_value, beta1, beta2, eps,
                      weight_decay, grad_scale, found_inf)
    elif master.device.type == "cpu" and get_backend() == "auto" and _cpu_adamw.supports(grad, param_out) \
            and _cpu_adamw.available():
        # Host memory: the fused C pass; 0-d tensors are read for free here.
        if found_inf is not None and found_inf.item() != 0:
            return
        _cpu_adamw.adamw_cpu_(
            master, grad, mu, nu, param_out, lr=float(lr) if lr is not None else lr_value,
            step=int(step) if step is not None else step_value, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, grad_scale=1.0 if grad_scale is None else float(grad_scale))
    else:
        adamw_reference_(master, grad, mu, nu, param_out, lr=lr if lr is not None else lr_value,
                         step=step if step is not None else step_value, beta1=beta1, beta2=beta2, eps=eps,
                         weight_decay=weight_decay, grad_scale=grad_scale, found_inf=found_inf)


@torch.library.custom_op("funzero::adamw_", mutates_args=("master", "mu", "nu", "param_out"))
def _adamw_op(master: Tensor, grad: Tensor, mu: Tensor, nu: Tensor, param_out: Optional[Tensor],
              lr: Optional[Tensor], lr_value: float, step: Optional[Tensor], step_value: int,
              beta1: float, beta2: float, eps: float, weight_decay: float,
              grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    # Dispatch happens here, at run time, so a compiled step holds one opaque node.
    _adamw_impl(master, grad, mu, nu, param_out, lr, lr_value, step, step_value, beta1, beta2, eps, weight_decay,
                grad_scale, found_inf)


@_adamw_op.register_fake
def _(master, grad, mu, nu, param_out, lr, lr_value, step, step_value, beta1, beta2, eps, weight_decay,
      grad_scale, found_inf) -> None:
    return None


@torch.library.custom_op("funzero::adamw_leaves_", mutates_args=("master", "mu", "nu", "param_out"))
def _adamw_leaves_op(master: Tensor, grads: list[Tensor], offsets: list[int], mu: Tensor, nu: Tensor,
                     param_out: Optional[Tensor], lr: Optional[Tensor], lr_value: float, step: Optional[Tensor],
                     step_value: int, beta1: float, beta2: float, eps: float, decays: list[float],
                     grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    if use_triton(master) and all(g.is_contiguous() for g in grads):
        _adamw_leaves_triton(master, grads, offsets, mu, nu, param_out, lr, lr_value, step, step_value, beta1,
                             beta2, eps, decays, grad_scale, found_inf)
        return
    for g, a, wd in zip(grads, offsets, decays):
        n = g.numel()
        po = None if param_out is None else param_out[a : a + n]
        _adamw_impl(master[a : a + n], g.reshape(-1), mu[a : a + n], nu[a : a + n], po, lr, lr_value, step,
                    step_value, beta1, beta2, eps, wd, grad_scale, found_inf)


@_adamw_leaves_op.register_fake
def _(master, grads, offsets, mu, nu, param_out, lr, lr_value, step, step_value, beta1, beta2, eps, decays,
      grad_scale, found_inf) -> None:
    return None


@torch.library.custom_op("funzero::nonfinite_", mutates_args=("found_inf",))
def _nonfinite_op(tensors: list[Tensor], found_inf: Tensor) -> None:
    if use_triton(found_inf):
        for t in tensors:
            if t.numel():
                _nonfinite_triton(t if t.is_contiguous() else t.contiguous(), found_inf)
    else:
        nonfinite_reference_(tensors, found_inf)


@_nonfinite_op.register_fake
def _(tensors, found_inf) -> None:
    return None


# --------------------------------------------------------------------------- public API


def _check_scalar_tensor(name: str, t: Optional[Tensor], device: torch.device) -> None:
    if t is None:
        return
    if t.numel() != 1 or t.dim() != 0:
        raise ValueError(f"{name} must be a 0-d tensor, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must live on {device} like master, got {t.device}")


def adamw_(master: Tensor, grad: Tensor, mu: Tensor, nu: Tensor, param_out: Optional[Tensor] = None, *,
           lr: Union[Tensor, float], step: Union[Tensor, int], beta1: float, beta2: float, eps: float,
           weight_decay: float, grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
           check_finite: bool = False) -> None:
    """One AdamW update of a flat shard, in place, in a single fused pass.

    Math and operation order of ``torch.optim.AdamW``: ``p *= 1 - lr*wd``;
    ``m = b1*m + (1-b1)*g``; ``v = b2*v + (1-b2)*g*g``;
    ``p -= lr/(1-b1**step) * m / (sqrt(v)/sqrt(1-b2**step) + eps)``.

    Args:
        master: (n,) fp32 contiguous master weights, updated in place.
        grad: (n,) bf16/fp16/fp32 contiguous gradient (read only).
        mu: (n,) fp32 first moment, updated in place.
        nu: (n,) fp32 second moment, updated in place.
        param_out: optional (n,) bf16/fp16 tensor that receives the updated
            master rounded to nearest even (bit-equal to ``master.to(dtype)``).
        lr: learning rate, a 0-d fp32 tensor on master's device (a changing
            value never recompiles) or a Python float.
        step: the step number already incremented (1 on the first update), a
            0-d tensor (fp32 or integer) on master's device or a Python int.
        beta1, beta2, eps, weight_decay: AdamW hyperparameters (the betas are
            compile-time constants of the kernel).
        grad_scale: optional 0-d fp32 tensor the gradient is multiplied by
            first (1/loss-scale times the clip coefficient).
        found_inf: optional 0-d fp32 tensor; when nonzero on entry, nothing is
            written at all. Read on the device: no host sync.
        check_finite: run :func:`nonfinite_` over ``grad`` first so that a
            non-finite gradient sets ``found_inf`` and skips this update. A
            scalar flag is created when ``found_inf`` is None.

    Returns:
        None; ``master``, ``mu``, ``nu`` and ``param_out`` are updated in place.

    Example:
        >>> n = 1000
        >>> master, mu, nu = torch.randn(n), torch.zeros(n), torch.zeros(n)
        >>> grad, out = torch.randn(n).bfloat16(), torch.empty(n, dtype=torch.bfloat16)
        >>> adamw_(master, grad, mu, nu, out, lr=torch.tensor(1e-3), step=torch.tensor(1.0),
        ...        beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)

    References:
        Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """
    n = master.numel()
    if master.dtype != torch.float32 or mu.dtype != torch.float32 or nu.dtype != torch.float32:
        raise ValueError(f"master, mu, nu must be fp32, got {master.dtype=}, {mu.dtype=}, {nu.dtype=}")
    if grad.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"grad must be fp32, bf16 or fp16, got {grad.dtype=}")
    for name, t in (("master", master), ("grad", grad), ("mu", mu), ("nu", nu), ("param_out", param_out)):
        if t is None:
            continue
        if t.dim() != 1 or t.numel() != n or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D tensor of {n} elements, got shape "
                             f"{tuple(t.shape)}, contiguous={t.is_contiguous()}")
        if t.device != master.device:
            raise ValueError(f"{name} must live on {master.device}, got {t.device}")
    if param_out is not None and param_out.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"param_out must be bf16, fp16 or fp32, got {param_out.dtype=}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got {beta1=}, {beta2=}")
    lr_t = lr if isinstance(lr, Tensor) else None
    step_t = step if isinstance(step, Tensor) else None
    for name, t in (("lr", lr_t), ("step", step_t), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        _check_scalar_tensor(name, t, master.device)
    if check_finite:
        if found_inf is None:
            found_inf = torch.zeros((), dtype=torch.float32, device=master.device)
        nonfinite_([grad], found_inf)
    if n == 0:
        return
    torch.ops.funzero.adamw_(master, grad, mu, nu, param_out, lr_t, 0.0 if lr_t is not None else float(lr),
                             step_t, 0 if step_t is not None else int(step), float(beta1), float(beta2),
                             float(eps), float(weight_decay), grad_scale, found_inf)


def adamw_leaves_(master: Tensor, grads: Sequence[Tensor], offsets: Sequence[int], mu: Tensor, nu: Tensor,
                  param_out: Optional[Tensor] = None, *, lr: Union[Tensor, float], step: Union[Tensor, int],
                  beta1: float, beta2: float, eps: float, weight_decay: Union[float, Sequence[float]],
                  grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """:func:`adamw_` over a flat buffer whose gradient comes as separate leaves.

    Leaf ``i`` covers ``master[offsets[i] : offsets[i] + grads[i].numel()]``; the kernel reads
    each gradient where it lies (a table of addresses), so the flat gradient is never formed:
    the same result as ``adamw_`` on the gradient scattered into a flat buffer, bit for bit,
    without that buffer's 2 x (bytes of the gradient) of traffic. Elements no leaf covers
    (alignment padding) are left as they are.

    Args:
        master, mu, nu, param_out: as in :func:`adamw_`, all ``(n,)``.
        grads: the leaves' gradients, one dtype (bf16/fp16/fp32), any shape; contiguous ones
            run in the Triton kernel, others through the per-leaf path.
        offsets: where each leaf starts in the flat buffers; the ranges must not overlap.
        weight_decay: one rate, or one per leaf (0.0 for undecayed leaves).
        lr, step, beta1, beta2, eps, grad_scale, found_inf: as in :func:`adamw_`.

    Returns:
        None; ``master``, ``mu``, ``nu`` and ``param_out`` are updated in place.

    Example:
        >>> master, mu, nu = torch.randn(48), torch.zeros(48), torch.zeros(48)
        >>> w, b = torch.randn(4, 8).bfloat16(), torch.randn(8).bfloat16()
        >>> adamw_leaves_(master, [w, b], [0, 32], mu, nu, lr=1e-3, step=1, beta1=0.9, beta2=0.95,
        ...               eps=1e-8, weight_decay=[0.1, 0.0])
    """
    grads, offsets = list(grads), [int(o) for o in offsets]
    n = master.numel()
    if len(offsets) != len(grads):
        raise ValueError(f"adamw_leaves_: {len(grads)} gradients but {len(offsets)} offsets")
    decays = [float(weight_decay)] * len(grads) if isinstance(weight_decay, (int, float)) else \
        [float(w) for w in weight_decay]
    if len(decays) != len(grads):
        raise ValueError(f"adamw_leaves_: {len(grads)} gradients but {len(decays)} weight decays")
    for name, t in (("master", master), ("mu", mu), ("nu", nu), ("param_out", param_out)):
        if t is not None and (t.dim() != 1 or t.numel() != n or not t.is_contiguous()):
            raise ValueError(f"adamw_leaves_: {name} must be a contiguous 1-D tensor of {n} elements, got shape "
                             f"{tuple(t.shape)}, contiguous={t.is_contiguous()}")
    if master.dtype != torch.float32 or mu.dtype != torch.float32 or nu.dtype != torch.float32:
        raise ValueError(f"master, mu, nu must be fp32, got {master.dtype=}, {mu.dtype=}, {nu.dtype=}")
    end = 0
    for i in sorted(range(len(grads)), key=offsets.__getitem__):
        g, a = grads[i], offsets[i]
        if g.dtype != grads[0].dtype or g.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"adamw_leaves_: gradient {i} is {g.dtype}, expected bf16/fp16/fp32 like gradient 0 "
                             f"({grads[0].dtype})")
        if g.device != master.device:
            raise ValueError(f"adamw_leaves_: gradient {i} lives on {g.device}, master on {master.device}")
        if a < end or a + g.numel() > n:
            raise ValueError(f"adamw_leaves_: gradient {i} (offset {a}, {g.numel()} elements) overlaps another "
                             f"leaf or runs past the {n} elements of master")
        end = a + g.numel()
    lr_t = lr if isinstance(lr, Tensor) else None
    step_t = step if isinstance(step, Tensor) else None
    for name, t in (("lr", lr_t), ("step", step_t), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        _check_scalar_tensor(name, t, master.device)
    if not grads:
        return
    torch.ops.funzero.adamw_leaves_(master, grads, offsets, mu, nu, param_out, lr_t,
                                    0.0 if lr_t is not None else float(lr), step_t,
                                    0 if step_t is not None else int(step), float(beta1), float(beta2), float(eps),
                                    decays, grad_scale, found_inf)


def nonfinite_(tensors: list[Tensor], found_inf: Tensor) -> None:
    """Sets ``found_inf`` to 1.0 if any element of ``tensors`` is inf or NaN.

    Leaves ``found_inf`` as it was otherwise (flags accumulate across calls,
    like ``torch._amp_foreach_non_finite_check_and_unscale_``). One read of
    each tensor, no host sync.

    Args:
        tensors: tensors of any float dtype and shape, on found_inf's device.
        found_inf: 0-d fp32 flag, updated in place.

    Returns:
        None.
    """
    if found_inf.dim() != 0 or found_inf.dtype != torch.float32:
        raise ValueError(f"found_inf must be a 0-d fp32 tensor, got {found_inf.shape=} {found_inf.dtype=}")
    for t in tensors:
        if t.device != found_inf.device:
            raise ValueError(f"tensors must live on {found_inf.device} like found_inf, got {t.device}")
    torch.ops.funzero.nonfinite_(list(tensors), found_inf)

