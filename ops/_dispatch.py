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

__all__ = ["backend", "get_backend", "use_triton", "INTERPRET", "HAS_TRITON", "triton", "tl"]

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


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small stand-in on CPU (interpreter)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2  # the interpreter runs programs one after another; a few keep the loops honest


def configs(candidates: list) -> list:
    """Autotune candidates, collapsed to the first one under the interpreter."""
    return candidates[:1] if INTERPRET else candidates


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
