"""The kernels of the Hugging Face pieces (swiglu, rope) for ``funzero.ops._aot_check``'s real compiler
run (sm_90, no GPU), in its ``_variants`` format; the fused linear-CE runs the cross-entropy kernels,
which that module already checks.

    TRITON_INTERPRET=0 python -c "from tests._aot_variants import main; main()"
"""

import sys


def variants():
    from funzero.ops import _rope, _swiglu

    bf16 = "*bf16"
    yield (_swiglu._swiglu_fwd_kernel, dict(g_ptr=bf16, u_ptr=bf16, y_ptr=bf16, n="i32"), dict(BLOCK=2048),
           ("g_ptr", "u_ptr", "y_ptr", "n"), True)
    yield (_swiglu._swiglu_bwd_kernel, dict(dy_ptr=bf16, g_ptr=bf16, u_ptr=bf16, dg_ptr=bf16, du_ptr=bf16, n="i32"),
           dict(BLOCK=2048), ("dy_ptr", "g_ptr", "u_ptr", "dg_ptr", "du_ptr", "n"), True)
    strides = {f"s{t}_{d}": "i32" for t in ("q", "k", "qo", "ko") for d in "bht"}
    strides.update({f"s{t}_{d}": "i32" for t in "cs" for d in "bt"})
    for backward, block_t, hq, hk in ((False, 1, 32, 8), (True, 4, 8, 2)):  # 32 heads of 128 (GQA: 8); 8 of 64
        yield (_rope._rope_kernel,
               dict(q_ptr=bf16, k_ptr=bf16, qo_ptr=bf16, ko_ptr=bf16, cos_ptr=bf16, sin_ptr=bf16, T="i32", NQ="i32",
                    NK="i32", HALF="i32", **strides),
               dict(BACKWARD=backward, BLOCK_T=block_t, BLOCK_HQ=hq, BLOCK_HK=hk, BLOCK_D=64 if hq == 32 else 32),
               ("q_ptr", "k_ptr", "qo_ptr", "ko_ptr", "cos_ptr", "sin_ptr", "HALF", *strides), True)


def main() -> None:
    from funzero.ops import _aot_check

    _aot_check._variants = variants
    sys.exit(_aot_check.main())
