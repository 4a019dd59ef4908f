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

Variants (``VARIANTS``, chosen per thread with :class:`host_variant` or for the process with
``FUNZERO_CPU_ADAMW_VARIANT``) differ in how threads split the arrays, streaming stores and
prefetch, never in the arithmetic: every variant gives the same bits.

Without a C compiler (or with ``FUNZERO_CPU_ADAMW=torch``) :func:`available` is False and the
caller uses the torch reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import warnings

import torch

__all__ = ["available", "adamw_cpu_", "host_threads", "host_variant", "VARIANTS", "DEFAULT_VARIANT"]

_LOCAL = threading.local()

# Kernel variants: same arithmetic, different memory access. A name is a layout, then options:
#   contig        each thread one contiguous range      tile16k   16384-element tiles, round robin
#   -dyn          tiles handed out dynamically           -ntout    streaming stores for the copy out
#   -ntall        streaming stores for master/mu/nu too  -pf[N]    prefetch N KiB of fp32 ahead (4)
# Streaming stores exist on x86-64 only (elsewhere they are plain stores) and only above _NT_MIN
# elements, where the arrays do not fit in cache anyway.
VARIANTS = ("tile16k", "tile16k-ntout", "tile256k-dyn-ntout", "contig", "contig-pf", "contig-ntout",
            "contig-ntout-pf", "contig-ntall")
# The default is the fastest on the H100 host (16 cores, 2026-11-23, 256M params): 5.33 Gparam/s
# against DeepSpeedCPUAdam's 4.72 and the first kernel's (tile16k) 4.42 (benchmarks/NOTES.md).
DEFAULT_VARIANT = "contig-ntout-pf"
_NT_MIN = 1 << 18
_MIN_CHUNK = 1 << 14  # elements per thread at least: small updates wake fewer threads

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)0x7fc0;  /* NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);       /* nearest even */
}

/* Streaming stores, as wide as the target allows; FZ_NT is their width and alignment in bytes
   (0: none, the variants that ask for them use plain stores). Moves only: bits are unchanged. */
#if defined(__x86_64__) && defined(__AVX512F__)
#define FZ_NT 64
static inline void nt_copy(void* dst, const void* src, int64_t bytes) {
    for (int64_t k = 0; k < bytes; k += 64)
        _mm512_stream_si512((__m512i*)((char*)dst + k), _mm512_load_si512((const char*)src + k));
}
#elif defined(__x86_64__) && defined(__AVX__)
#define FZ_NT 32
static inline void nt_copy(void* dst, const void* src, int64_t bytes) {
    for (int64_t k = 0; k < bytes; k += 32)
        _mm256_stream_si256((__m256i*)((char*)dst + k), _mm256_load_si256((const __m256i*)((const char*)src + k)));
}
#elif defined(__x86_64__)
#define FZ_NT 16
static inline void nt_copy(void* dst, const void* src, int64_t bytes) {
    for (int64_t k = 0; k < bytes; k += 16)
        _mm_stream_si128((__m128i*)((char*)dst + k), _mm_load_si128((const __m128i*)((const char*)src + k)));
}
#else
#define FZ_NT 0
#endif

int funzero_adamw_nt_bytes(void) { return FZ_NT; }

static inline void put(void* dst, const void* src, int64_t bytes, int nt) {
#if FZ_NT
    if (nt) { nt_copy(dst, src, bytes); return; }
#endif
    (void)nt;
    memcpy(dst, src, (size_t)bytes);
}

typedef struct {
    float* master; const void* grad; float* mu; float* nu; void* out;
    float step_size, bc2_sqrt, decay, beta1, beta2, omb1, omb2, eps, gscale;
} fz_args;

#define FZ_UNPACK(a)                                                                         \
    float* master = (a)->master; const void* grad = (a)->grad;                               \
    float* mu = (a)->mu; float* nu = (a)->nu; void* out = (a)->out; (void)out;               \
    const float step_size = (a)->step_size, bc2_sqrt = (a)->bc2_sqrt, decay = (a)->decay;    \
    const float beta1 = (a)->beta1, beta2 = (a)->beta2, omb1 = (a)->omb1, omb2 = (a)->omb2;  \
    const float eps = (a)->eps, gscale = (a)->gscale;

/* The update of element i, the same expression in every variant. G: 1 for a bf16 grad. */
#define FZ_ELEM(G, i)                                                                        \
    float g = (G) ? bf16_to_f32(((const uint16_t*)grad)[i]) : ((const float*)grad)[i];       \
    g = g * gscale;                                                                          \
    float p = master[i] * decay;                                                             \
    float m = beta1 * mu[i] + omb1 * g;                                                      \
    float v = beta2 * nu[i] + omb2 * g * g;                                                  \
    float denom = sqrtf(v) / bc2_sqrt + eps;                                                 \
    p = p - step_size * (m / denom);

/* O: 0 no copy, 1 bf16 copy, 2 fp32 copy. G and O are literals at every call site. */
static inline __attribute__((always_inline)) void
fz_direct(const fz_args* a, int64_t lo, int64_t hi, const int G, const int O) {
    FZ_UNPACK(a)
    for (int64_t i = lo; i < hi; ++i) {
        FZ_ELEM(G, i)
        master[i] = p; mu[i] = m; nu[i] = v;
        if (O == 1) ((uint16_t*)out)[i] = f32_to_bf16(p);
        if (O == 2) ((float*)out)[i] = p;
    }
}

#define FZ_BLK 64  /* elements: 256 B of fp32, 128 B of bf16, whole lines of either */

/* Blocks of FZ_BLK computed into aligned buffers, then stored (streamed where asked and aligned);
   optional software prefetch pf elements ahead. The head up to the anchor's alignment and the
   tail take the direct loop. */
static inline __attribute__((always_inline)) void
fz_blocked(const fz_args* a, int64_t lo, int64_t hi, const int G, const int O,
           int nt_state, int nt_out, int64_t pf) {
    FZ_UNPACK(a)
    const int osz = O == 1 ? 2 : 4;
    const int al = FZ_NT ? FZ_NT : 64;
    const int anchor_out = nt_out && O;
    const uintptr_t base = anchor_out ? (uintptr_t)out : (uintptr_t)master;
    const int asz = anchor_out ? osz : 4;
    const uintptr_t mis = (base + (uintptr_t)lo * asz) % al;
    int64_t h = lo;
    if (mis % asz) nt_state = nt_out = 0;  /* not even element-aligned: plain stores */
    else if (mis) h = lo + (int64_t)((al - mis) / asz);
    if (h > hi) h = hi;
    fz_direct(a, lo, h, G, O);
    const int sp = nt_state && (uintptr_t)(master + h) % al == 0;
    const int sm = nt_state && (uintptr_t)(mu + h) % al == 0;
    const int sv = nt_state && (uintptr_t)(nu + h) % al == 0;
    const int so = nt_out && O && ((uintptr_t)out + (uintptr_t)h * osz) % al == 0;
    float pb[FZ_BLK] __attribute__((aligned(64)));
    float mb[FZ_BLK] __attribute__((aligned(64)));
    float vb[FZ_BLK] __attribute__((aligned(64)));
    float ob32[FZ_BLK] __attribute__((aligned(64)));
    uint16_t ob16[FZ_BLK] __attribute__((aligned(64)));
    int64_t b = h;
    for (; b + FZ_BLK <= hi; b += FZ_BLK) {
        if (pf && b + pf + FZ_BLK <= hi) {
            const int64_t q = b + pf;
            for (int k = 0; k < FZ_BLK; k += 16) {
                __builtin_prefetch(master + q + k, 1, 3);
                __builtin_prefetch(mu + q + k, 1, 3);
                __builtin_prefetch(nu + q + k, 1, 3);
                if (!G) __builtin_prefetch((const float*)grad + q + k, 0, 3);
                if (O == 2 && !so) __builtin_prefetch((float*)out + q + k, 1, 3);
            }
            for (int k = 0; k < FZ_BLK; k += 32) {
                if (G) __builtin_prefetch((const uint16_t*)grad + q + k, 0, 3);
                if (O == 1 && !so) __builtin_prefetch((uint16_t*)out + q + k, 1, 3);
            }
        }
        for (int j = 0; j < FZ_BLK; ++j) {
            const int64_t i = b + j;
            FZ_ELEM(G, i)
            pb[j] = p; mb[j] = m; vb[j] = v;
            if (O == 1) ob16[j] = f32_to_bf16(p);
            if (O == 2) ob32[j] = p;
        }
        put(master + b, pb, sizeof pb, sp);
        put(mu + b, mb, sizeof mb, sm);
        put(nu + b, vb, sizeof vb, sv);
        if (O == 1) put((uint16_t*)out + b, ob16, sizeof ob16, so);
        if (O == 2) put((float*)out + b, ob32, sizeof ob32, so);
    }
    fz_direct(a, b, hi, G, O);
}

#define FZ_CASES(CALL)                                                                       \
    if (G) { if (O == 1) { CALL(1, 1) } else if (O == 2) { CALL(1, 2) } else { CALL(1, 0) } } \
    else   { if (O == 1) { CALL(0, 1) } else if (O == 2) { CALL(0, 2) } else { CALL(0, 0) } }
#define FZ_CALL_DIRECT(g, o) fz_direct(a, lo, hi, g, o);
#define FZ_CALL_BLOCKED(g, o) fz_blocked(a, lo, hi, g, o, flags & 2, flags & 1, pf);

static void fz_range(const fz_args* a, int64_t lo, int64_t hi, int G, int O, int flags, int64_t pf) {
    if (lo >= hi) return;
    if (!(flags & 3) && !pf) { FZ_CASES(FZ_CALL_DIRECT) }
    else { FZ_CASES(FZ_CALL_BLOCKED) }
}

/* tile > 0: tiles of that many elements dealt to threads (static, or dynamic with flags & 4);
   tile == 0: each thread one contiguous range (in 1024-element units). flags & 1: stream the
   copy out, flags & 2: stream master/mu/nu. pf: prefetch distance in elements (0: none).
   No more threads than n has min_chunk elements. */
void funzero_adamw(float* master, const void* grad, float* mu, float* nu, void* out,
                   int64_t n, int grad_bf16, int out_kind,
                   float step_size, float bc2_sqrt, float decay, float beta1, float beta2,
                   float omb1, float omb2, float eps, float gscale, int threads,
                   int64_t tile, int flags, int64_t pf, int64_t min_chunk) {
    const fz_args args = {master, grad, mu, nu, out, step_size, bc2_sqrt, decay, beta1, beta2,
                          omb1, omb2, eps, gscale};
    const fz_args* a = &args;
    const int G = grad_bf16 != 0, O = out_kind;
    if (!FZ_NT || !O) flags &= ~1;
    if (!FZ_NT) flags &= ~2;
    if (min_chunk < 1) min_chunk = 1;
    int64_t cap = (n + min_chunk - 1) / min_chunk;
    if (tile > 0 && (n + tile - 1) / tile < cap) cap = (n + tile - 1) / tile;
    const int nth = threads < 1 ? 1 : (cap < threads ? (cap < 1 ? 1 : (int)cap) : threads);
    #pragma omp parallel num_threads(nth)
    {
        if (tile > 0) {
            const int64_t tiles = (n + tile - 1) / tile;
            if (flags & 4) {
                #pragma omp for schedule(dynamic, 1) nowait
                for (int64_t t = 0; t < tiles; ++t)
                    fz_range(a, t * tile, t * tile + tile < n ? t * tile + tile : n, G, O, flags, pf);
            } else {
                #pragma omp for schedule(static) nowait
                for (int64_t t = 0; t < tiles; ++t)
                    fz_range(a, t * tile, t * tile + tile < n ? t * tile + tile : n, G, O, flags, pf);
            }
        } else {
            const int64_t T = omp_get_num_threads(), id = omp_get_thread_num();
            const int64_t unit = 1024, units = (n + unit - 1) / unit;
            const int64_t lo = units * id / T * unit, hi = units * (id + 1) / T * unit;
            fz_range(a, lo < n ? lo : n, hi < n ? hi : n, G, O, flags, pf);
        }
#if defined(__x86_64__)
        if (flags & 3) _mm_sfence();  /* streamed stores visible before the barrier */
#endif
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
    fn.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int, ctypes.c_int] + [ctypes.c_float] * 9
                   + [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])
    lib.funzero_adamw_nt_bytes.restype = ctypes.c_int
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
    tile, flags, pf = parse_variant(current_variant())
    if n < _NT_MIN:
        flags &= ~3
    lib.funzero_adamw(
        master.data_ptr(), grad.data_ptr(), mu.data_ptr(), nu.data_ptr(),
        0 if param_out is None else param_out.data_ptr(),
        n, int(grad.dtype == torch.bfloat16), out_kind,
        lr / bc1, bc2**0.5, 1.0 - lr * weight_decay, beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps,
        grad_scale, current_threads(), tile, flags, pf, _MIN_CHUNK,
    )


def current_threads() -> int:
    n = getattr(_LOCAL, "threads", None)
    return n or torch.get_num_threads()


class _ThreadSetting:
    """A context manager that sets ``_LOCAL.<attr>`` for the calling thread, restoring it on exit."""

    _attr = ""

    def __init__(self, value) -> None:
        self._value = value

    def __enter__(self):
        self._prev = getattr(_LOCAL, self._attr, None)
        setattr(_LOCAL, self._attr, self._value)
        return self

    def __exit__(self, *exc) -> None:
        setattr(_LOCAL, self._attr, self._prev)


class host_threads(_ThreadSetting):
    """Threads the host AdamW of the calling thread uses (default: ``torch.get_num_threads()``).

    A context manager (the previous value comes back on exit). An offloaded update running in a
    worker thread leaves a core or two to the thread that launches GPU work.

    Example:
        >>> with funzero.ops.host_threads(14):
        ...     funzero.ops.adamw_(master, grad, mu, nu, out, lr=1e-3, step=1, beta1=0.9,
        ...                        beta2=0.95, eps=1e-8, weight_decay=0.1)
    """

    _attr = "threads"

    def __init__(self, n: int | None) -> None:
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError(f"host_threads needs a positive int or None, got {n!r}")
        super().__init__(n)



@functools.lru_cache(maxsize=None)
def parse_variant(name: str) -> tuple[int, int, int]:
    """``(tile, flags, prefetch)`` for the kernel from a variant name (see ``VARIANTS``)."""
    layout, *opts = name.split("-")
    m = re.fullmatch(r"tile(\d+)(k?)", layout)
    if layout == "contig":
        tile = 0
    elif m and int(m[1]) > 0:
        tile = int(m[1]) * (1024 if m[2] else 1)
    else:
        raise ValueError(f"host AdamW variant {name!r}: layout must be 'contig' or 'tile<N>[k]'")
    flags = pf = 0
    for opt in opts:
        m = re.fullmatch(r"pf(\d*)", opt)
        if opt == "ntout":
            flags |= 1
        elif opt == "ntall":
            flags |= 3
        elif opt == "dyn" and tile:
            flags |= 4
        elif m:
            pf = int(m[1] or 4) * 256
        else:
            raise ValueError(f"host AdamW variant {name!r}: unknown option {opt!r}")
    return tile, flags, pf


def current_variant() -> str:
    """The variant the calling thread runs: ``host_variant``, else ``FUNZERO_CPU_ADAMW_VARIANT``."""
    return getattr(_LOCAL, "variant", None) or os.environ.get("FUNZERO_CPU_ADAMW_VARIANT") or DEFAULT_VARIANT


def nt_bytes() -> int:
    """Width of the streaming stores the built kernel has (0: none on this target)."""
    lib = _library()
    return 0 if lib is None else lib.funzero_adamw_nt_bytes()


class host_variant(_ThreadSetting):
    """Kernel variant for the host AdamW of the calling thread (a context manager, like
    :class:`host_threads`). Variants differ in memory access only; results are bit-identical.

    Example:
        >>> with host_variant("tile16k"):
        ...     funzero.ops.adamw_(master, grad, mu, nu, out, lr=1e-3, step=1, beta1=0.9,
        ...                        beta2=0.95, eps=1e-8, weight_decay=0.1)
    """

    _attr = "variant"

    def __init__(self, name: str | None) -> None:
        if name is not None:
            parse_variant(name)
        super().__init__(name)
