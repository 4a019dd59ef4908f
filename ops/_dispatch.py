"""Backend selection and the small pieces every kernel file shares.

Dispatch rule (one place, so every op agrees):

* backend "torch"  -> the torch reference, whatever the device;
* backend "triton" -> the Triton kernel; on CPU tensors this needs the Triton
  interpreter (``TRITON_INTERPRET=1`` set before ``funzero.ops`` is imported),
  which is how the CPU tests exercise the real kernels;
* backend "auto"   -> Triton on CUDA tensors, the torch reference on CPU.

The initial value comes from ``FUNZERO_OPS_BACKEND`` (default "auto").

Footguns this module guards:

* Triton decides *at decoration time* whether a ``@triton.jit`` function is
  compiled or interpreted. We probe that once (``INTERPRET``) instead of
  re-reading the environment, so a late ``os.environ`` change cannot make us
  send CPU tensors to a compiled kernel.
* Triton is an optional dependency. Without it the kernel modules still import
  (the decorators below become no-ops) and every op runs its torch reference.
"""

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _NoTriton:
        """Stands in for ``triton`` so kernel modules import without it."""

        Config = staticmethod(lambda *args, **kwargs: None)

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*args, **kwargs):
            return lambda f: f

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(int(n) - 1, 0).bit_length()

    class _NoTritonLanguage:
        """Stands in for ``triton.language``: module level code only touches ``constexpr``."""

        constexpr = staticmethod(lambda value=None: value)

    triton = _NoTriton()
    tl = _NoTritonLanguage()

__all__ = ["backend", "get_backend", "use_triton", "direct_call", "sum_partials", "INTERPRET", "HAS_TRITON", "triton",
           "tl"]

_BACKENDS = ("auto", "triton", "torch")


def _check_name(name: str, where: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(f"{where} must be one of {_BACKENDS}, got {name!r}")
    return name


class _State:
    name: str = _check_name(os.environ.get("FUNZERO_OPS_BACKEND", "auto"), "FUNZERO_OPS_BACKEND")


class backend:
    """Selects which implementation the ops run: "auto" | "triton" | "torch".

    Works as a setter and as a context manager (the previous value is restored
    on exit, also after an exception).

    Args:
        name: "auto" (Triton on CUDA, torch reference on CPU), "triton" (always
            the Triton kernels; CPU tensors need ``TRITON_INTERPRET=1``) or
            "torch" (always the torch references).

    Example:
        >>> import funzero.ops as fo
        >>> with fo.backend("torch"):
        ...     y = fo.rms_norm(torch.ones(2, 4), torch.ones(4))
        >>> fo.backend("auto")  # plain setter
    """

    def __init__(self, name: str):
        self._prev = _State.name
        _State.name = _check_name(name, "backend")

    def __enter__(self) -> "backend":
        return self

    def __exit__(self, *exc) -> None:
        _State.name = self._prev

    def __repr__(self) -> str:
        return f"backend({_State.name!r})"


def get_backend() -> str:
    """Returns the current backend name ("auto", "triton" or "torch")."""
    return _State.name


@triton.jit
def _probe():
    pass


# True when @triton.jit produced interpreted functions (TRITON_INTERPRET=1 at import).
INTERPRET = HAS_TRITON and type(_probe).__name__ == "InterpretedFunction"


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op whose main operand is ``t`` runs its Triton kernel."""
    name = _State.name
    if name == "torch":
        return False
    if not HAS_TRITON:
        if name == "triton":
            raise RuntimeError("funzero.ops backend 'triton' was selected but triton is not installed")
        return False
    if t.device.type == "cuda":
        return True
    if name == "triton":
        if t.device.type == "cpu" and INTERPRET:
            return True
        raise RuntimeError(
            f"funzero.ops backend 'triton' cannot run on {t.device} tensors here: CPU tensors need "
            "TRITON_INTERPRET=1 in the environment before funzero.ops is imported"
        )
    return False


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def direct_call(*tensors) -> bool:
    """Whether an op may run its launchers through a plain ``autograd.Function``.

    The ``torch.library`` custom op around a kernel costs host time on every
    call (Python dispatch, aliasing checks, its generic autograd wrapper:
    ~180 us per forward+backward of a norm on the H100 machine, more than the
    kernels take on the GPU). Eager calls on plain tensors skip it; tracing
    (torch.compile, export, FakeTensor or any dispatch mode, functorch
    transforms) and tensor subclasses go through the custom op, whose fake
    implementation and registered autograd those need.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or \
            torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small stand-in on CPU (interpreter)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2  # the interpreter runs programs one after another; a few keep the loops honest


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    """Casts fp32 ``x`` to ``dtype``; bf16 by round-to-nearest-even on the bits.

    The GPU's cvt to bf16 is already RNE, but the interpreter truncates, so the
    integer form keeps CPU tests bit-comparable with torch's ``.to(bfloat16)``.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, 0x7FC00000, rounded)  # any NaN -> the canonical quiet NaN
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _sum_partials_kernel(part_ptr, out0_ptr, out1_ptr, out2_ptr, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    # part: (R, P, N) fp32 contiguous, R <= 3; out0..out2: (N,) each; grid (cdiv(N, BLOCK_N), R)
    r = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    base = part_ptr + r.to(tl.int64) * P * N
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        mask = (rows < P)[:, None] & col_mask[None, :]
        acc += tl.load(base + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    if r == 0:
        tl.store(out0_ptr + cols, cast_to(total, out0_ptr.dtype.element_ty), mask=col_mask)
    elif r == 1:
        tl.store(out1_ptr + cols, cast_to(total, out1_ptr.dtype.element_ty), mask=col_mask)
    else:
        tl.store(out2_ptr + cols, cast_to(total, out2_ptr.dtype.element_ty), mask=col_mask)


def sum_partials(part: torch.Tensor, dtype: torch.dtype) -> tuple:
    """(R, P, N) fp32 per-program partial sums, R <= 3 -> R separate (N,) tensors in ``dtype``, one launch.

    Replaces ``part[r].sum(0).to(dtype)`` per r (two launches each; torch's
    dim-0 reduction of a few hundred rows took ~15 us on an H100, where this
    reads the rows straight from L2). Sums in a fixed order: deterministic.
    Separate outputs, not views of one: custom ops may not return aliases.
    """
    R, P, N = part.shape
    assert R in (1, 2, 3), R
    outs = tuple(part.new_empty((N,), dtype=dtype) for _ in range(R))
    if N:
        # GPU: one 32-byte sector of up to 512 partial rows per load, ~400 programs for D = 1600:
        # latency-bound, so many loads in flight (H100, 2 x 264 x 1600: 12 us at 64 x 32, 8 at 512 x 8)
        block_n = min(next_pow2(N), 1024) if INTERPRET else 8
        block_p = min(next_pow2(P), 1024 if INTERPRET else 512)
        _sum_partials_kernel[(cdiv(N, block_n), R)](part, outs[0], outs[min(1, R - 1)], outs[-1], P, N,
                                                     BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4)
    return outs
