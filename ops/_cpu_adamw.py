"""AdamW on the host: one fused, multithreaded pass in C, built on first use.

What it is for: the optimizer step of ZeRO-Offload, where the fp32 master and moments live in
host memory and the update is bound by host memory bandwidth. torch's fused CPU AdamW needs an
fp32 gradient (a bf16 gradient costs a conversion pass first) and a second pass to round the
master to the bf16 parameter copy: 40 bytes of traffic per parameter. This kernel reads the bf16
gradient directly and writes the bf16 copy in the same pass: 28 bytes per parameter, like the
Triton kernel on the GPU, with the same operation order and scalar rounding.

Footguns this file guards:

* The call goes through ``ctypes``, which releases the GIL: the update can run in a worker thread
  while the main thread keeps launching GPU work. (A ``torch.compile``d CPU kernel does not
  release the GIL.)
* The library is compiled for the machine it runs on (``-march=native``), so the cache key
  includes the CPU's model and flags; a build is written to a temporary name and renamed, so
  ranks starting together never load a half-written file.
* ``-ffp-contract=off``: no fused multiply-adds, so every product is rounded as in the Triton
  kernel and in torch's reference; ``-fno-math-errno`` lets ``sqrtf`` vectorise.
* bf16 rounding is round-to-nearest-even with NaN mapped to 0x7FC0, bit-equal to
  ``tensor.to(torch.bfloat16)``.

Without a C compiler (or with ``FUNZERO_CPU_ADAMW=torch``) :func:`available` is False and the
caller uses the torch reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import torch

__all__ = ["available", "adamw_cpu_", "host_threads"]

_LOCAL = threading.local()

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)0x7fc0;  /* NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);       /* nearest even */
}

/* One tile of the update. G: 0 fp32 grad, 1 bf16 grad. O: 0 no copy, 1 bf16 copy, 2 fp32 copy. */
#define ADAMW_TILE(G, O)                                                                     \
    for (int64_t i = lo; i < hi; ++i) {                                                      \
        float g = (G) ? bf16_to_f32(((const uint16_t*)grad)[i]) : ((const float*)grad)[i];   \
        g = g * gscale;                                                                      \
        float p = master[i] * decay;                                                         \
        float m = beta1 * mu[i] + omb1 * g;                                                  \
        float v = beta2 * nu[i] + omb2 * g * g;                                              \
        float denom = sqrtf(v) / bc2_sqrt + eps;                                             \
        p = p - step_size * (m / denom);                                                     \
        master[i] = p; mu[i] = m; nu[i] = v;                                                 \
        if ((O) == 1) ((uint16_t*)out)[i] = f32_to_bf16(p);                                  \
        if ((O) == 2) ((float*)out)[i] = p;                                                  \
    }

void funzero_adamw(float* master, const void* grad, float* mu, float* nu, void* out,
                   int64_t n, int grad_bf16, int out_kind,
                   float step_size, float bc2_sqrt, float decay, float beta1, float beta2,
                   float omb1, float omb2, float eps, float gscale, int threads) {
    const int64_t tile = 1 << 14;
    const int64_t tiles = (n + tile - 1) / tile;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t lo = t * tile;
        const int64_t hi = lo + tile < n ? lo + tile : n;
        if (grad_bf16) {
            if (out_kind == 1) { ADAMW_TILE(1, 1) } else if (out_kind == 2) { ADAMW_TILE(1, 2) } else { ADAMW_TILE(1, 0) }
        } else {
            if (out_kind == 1) { ADAMW_TILE(0, 1) } else if (out_kind == 2) { ADAMW_TILE(0, 2) } else { ADAMW_TILE(0, 0) }
        }
    }
}
"""

_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]


def _cpu_key() -> str:
    info = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    info += line
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return info


def _cache_dir() -> str:
    root = os.environ.get("FUNZERO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "funzero"
    )
    return root


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("FUNZERO_CPU_ADAMW", "auto") == "torch":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    key = hashlib.sha256("\0".join([_SOURCE, *_FLAGS, cc, _cpu_key()]).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"adamw-cpu-{key}.so")
    if not os.path.exists(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                src = os.path.join(tmp, "adamw.c")
                with open(src, "w") as f:
                    f.write(_SOURCE)
                built = os.path.join(tmp, "adamw.so")
                subprocess.run([cc, *_FLAGS, src, "-o", built], check=True, capture_output=True, text=True)
                staged = f"{path}.{os.getpid()}.tmp"
                shutil.copyfile(built, staged)
                os.replace(staged, path)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            warnings.warn(f"funzero: building the host AdamW kernel failed, using torch's: {detail[:300]}", RuntimeWarning)
            return None
    lib = ctypes.CDLL(path)
    fn = lib.funzero_adamw
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int, ctypes.c_int] + [ctypes.c_float] * 9 + [ctypes.c_int]
    return lib


def available() -> bool:
    """Whether the host kernel is built (or buildable) here."""
    return _library() is not None


def supports(grad: torch.Tensor, param_out: torch.Tensor | None) -> bool:
    """Dtypes the host kernel takes; others go to the torch reference."""
    return grad.dtype in (torch.float32, torch.bfloat16) and (
        param_out is None or param_out.dtype in (torch.float32, torch.bfloat16)
    )


def adamw_cpu_(master, grad, mu, nu, param_out, *, lr: float, step: int, beta1: float, beta2: float,
               eps: float, weight_decay: float, grad_scale: float = 1.0) -> None:
    """The fused host update of contiguous 1-D CPU tensors (validated by the caller, ``adamw_``).

    Scalars are plain numbers here: on the host reading a 0-d tensor costs nothing.
    """
    lib = _library()
    assert lib is not None, "host AdamW kernel not available"
    n = master.numel()
    if n == 0:
        return
    # The same scalars as the Triton kernel: computed in double, rounded to fp32 once.
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    out_kind = 0 if param_out is None else (1 if param_out.dtype == torch.bfloat16 else 2)
    lib.funzero_adamw(
        master.data_ptr(), grad.data_ptr(), mu.data_ptr(), nu.data_ptr(),
        0 if param_out is None else param_out.data_ptr(),
        n, int(grad.dtype == torch.bfloat16), out_kind,
        lr / bc1, bc2**0.5, 1.0 - lr * weight_decay, beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps,
        grad_scale, current_threads(),
    )


def current_threads() -> int:
    n = getattr(_LOCAL, "threads", None)
    return n or torch.get_num_threads()


class host_threads:
    """Threads the host AdamW of the calling thread uses (default: ``torch.get_num_threads()``).

    A context manager (the previous value comes back on exit). An offloaded update running in a
    worker thread leaves a core or two to the thread that launches GPU work.

    Example:
        >>> with funzero.ops.host_threads(14):
        ...     funzero.ops.adamw_(master, grad, mu, nu, out, lr=1e-3, step=1, beta1=0.9,
        ...                        beta2=0.95, eps=1e-8, weight_decay=0.1)
    """

    def __init__(self, n: int | None) -> None:
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError(f"host_threads needs a positive int or None, got {n!r}")
        self._n, self._prev = n, getattr(_LOCAL, "threads", None)

    def __enter__(self) -> "host_threads":
        _LOCAL.threads = self._n
        return self

    def __exit__(self, *exc) -> None:
        _LOCAL.threads = self._prev

