"""Compile every kernel for a real GPU target, without a GPU.

The interpreter checks what a kernel computes, not whether Triton's compiler
accepts it (``other`` without ``mask``, scalar types, constexpr misuse are
only errors there), nor whether full tiles become 128-bit accesses. This
module runs the real compiler (Triton -> PTX -> cubin through the bundled
ptxas) for sm_90 on each kernel variant the launchers use, with the
divisibility-by-16 specialisation real launches get, and counts vector loads.

Run it with the interpreter off: ``TRITON_INTERPRET=0 python -m funzero.ops._aot_check``.
Prints one line per variant; exits non-zero on a compile error or when an
unmasked variant compiles to scalar loads.
"""

import math
import re
import sys


def _variants():
    from . import _adamw, _cross_entropy, _gelu, _heads, _norms, _quant

    f32, bf16, i64 = "*fp32", "*bf16", "*i64"
    k0 = math.sqrt(2.0 / math.pi)
    # (kernel, signature of runtime args, constexprs, names specialised as 16-divisible, expect vector loads)
    for masked in (False, True):
        for opt in (True, False):
            yield (_adamw._adamw_kernel,
                   dict(master_ptr=f32, grad_ptr=bf16, mu_ptr=f32, nu_ptr=f32, out_ptr=bf16, lr_ptr=f32,
                        lr_value="fp32", step_ptr=f32, step_value="i32", scale_ptr=f32, flag_ptr=f32,
                        weight_decay="fp32", eps="fp32", num_tiles="i32", n_valid="i32"),
                   dict(BETA1=0.9, BETA2=0.95, LR_FROM_PTR=opt, STEP_FROM_PTR=opt, HAS_SCALE=opt, HAS_FLAG=opt,
                        HAS_OUT=True, MASKED=masked, BLOCK=4096),
                   ("master_ptr", "grad_ptr", "mu_ptr", "nu_ptr", "out_ptr"), not masked)
        for aligned in (True, False):  # per-leaf gradients: hinted only where the host checked alignment
            yield (_adamw._adamw_leaves_kernel,
                   dict(master_ptr=f32, mu_ptr=f32, nu_ptr=f32, out_ptr=bf16, addr_ptr=i64, tiles_ptr="*i32",
                        start_ptr=i64, numel_ptr=i64, decay_ptr=f32, lr_ptr=f32, lr_value="fp32", step_ptr=f32,
                        step_value="i32", scale_ptr=f32, flag_ptr=f32, eps="fp32", num_tiles="i32"),
                   dict(BETA1=0.9, BETA2=0.95, LR_FROM_PTR=True, STEP_FROM_PTR=True, HAS_SCALE=True, HAS_FLAG=True,
                        HAS_OUT=True, GRAD_DTYPE=_adamw.tl.bfloat16, MASKED=masked, ALIGNED=aligned, BLOCK=4096),
                   ("master_ptr", "mu_ptr", "nu_ptr", "out_ptr"), aligned and not masked)
        yield (_adamw._nonfinite_kernel, dict(x_ptr=bf16, flag_ptr=f32, num_tiles="i32", n_valid="i32"),
               dict(MASKED=masked, BLOCK=16384), ("x_ptr",), not masked)
        for kernel in (_quant._quantize_kernel, _quant._dequantize_kernel):
            src, dst = ("x_ptr", "q_ptr") if kernel is _quant._quantize_kernel else ("q_ptr", "y_ptr")
            types = {"x_ptr": bf16, "q_ptr": "*i8", "y_ptr": bf16}
            yield (kernel, {src: types[src], dst: types[dst], "scale_ptr": f32, "n_valid": "i32", "block_size": "i32"},
                   dict(ROWS=32, BLOCK=256, MASKED=masked), (src, dst, "scale_ptr", "block_size"), not masked)
    for rms in (False, True):
        yield (_norms._norm_fwd_kernel,
               dict(x_ptr=bf16, w_ptr=bf16, b_ptr=bf16, y_ptr=bf16, mean_ptr=f32, rstd_ptr=f32, M="i32", D="i32",
                    x_row_stride="i32", y_row_stride="i32", eps="fp32"),
               dict(RMS=rms, HAS_BIAS=not rms, BLOCK_M=2, BLOCK_D=2048),
               ("x_ptr", "y_ptr", "w_ptr", "b_ptr", "D", "x_row_stride", "y_row_stride"), True)
    # the norms' backward, and residual_norm's: the residual gradient, statistics recomputed
    for rms, res in ((False, False), (True, False), (False, True)):
        yield (_norms._norm_bwd_kernel,
               dict(dy_ptr=bf16, x_ptr=bf16, w_ptr=bf16, mean_ptr=f32, rstd_ptr=f32, dr_ptr=bf16, dx_ptr=bf16,
                    dw_part_ptr=f32, db_part_ptr=f32, dr_part_ptr=f32, M="i32", D="i32", x_row_stride="i32",
                    dy_row_stride="i32", dr_row_stride="i32", dx_row_stride="i32", num_tiles="i32",
                    tiles_per_program="i32", eps="fp32"),
               dict(RMS=rms, HAS_BIAS=not rms, HAS_RES=res, SAVED=not res, BLOCK_M=2, BLOCK_D=2048),
               ("x_ptr", "dy_ptr", "dr_ptr", "dx_ptr", "D", "x_row_stride", "dy_row_stride", "dr_row_stride",
                "dx_row_stride"), True)
    yield (_gelu._bias_gelu_fwd_kernel, dict(x_ptr=bf16, b_ptr=bf16, y_ptr=bf16, M="i32", H="i32"),
           dict(K0=k0, BLOCK_M=16, BLOCK_N=256), ("x_ptr", "b_ptr", "y_ptr", "H"), True)
    yield (_gelu._bias_gelu_bwd_kernel,
           dict(dy_ptr=bf16, x_ptr=bf16, b_ptr=bf16, dx_ptr=bf16, db_part_ptr=f32, M="i32", H="i32",
                num_row_tiles="i32", tiles_per_program="i32"),
           dict(K0=k0, BLOCK_M=16, BLOCK_N=256), ("x_ptr", "b_ptr", "dx_ptr", "dy_ptr", "H"), True)
    yield (_gelu._gelu_bwd_tile_kernel, dict(dy_ptr=bf16, x_ptr=bf16, dx_ptr=bf16, db_part_ptr=f32, M="i32", H="i32"),
           dict(WANT_DB=True, K0=k0, BLOCK_M=32, BLOCK_N=128), ("x_ptr", "dx_ptr", "dy_ptr", "H"), True)
    yield (_heads._heads_grad_kernel,
           dict(q_ptr=bf16, k_ptr=bf16, v_ptr=bf16, out_ptr=bf16, part_ptr=f32, T="i32", NH="i32", HS="i32", C="i32",
                n_t_tiles="i32", **{f"s{t}{i}": "i32" for t in "qkv" for i in range(3)}),
           dict(WANT_DB=True, BLOCK_T=128, BLOCK_D=64, sq3=1, sk3=1, sv3=1),  # Triton specialises stride 1
           ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "HS", "C", "sq0", "sq1", "sq2", "sk0", "sk1", "sk2", "sv0", "sv1",
            "sv2"), True)
    yield (_cross_entropy._ce_fwd_kernel,
           dict(logits_ptr=bf16, targets_ptr=i64, loss_ptr=f32, lse_ptr=f32, V="i32", row_stride="i32",
                ignore_index="i32"),
           dict(BLOCK_V=4096), ("logits_ptr", "V", "row_stride"), True)
    yield (_cross_entropy._ce_bwd_kernel,
           dict(logits_ptr=bf16, grad_ptr=bf16, targets_ptr=i64, lse_ptr=f32, dloss_ptr=f32, V="i32",
                row_stride="i32", grad_row_stride="i32", dloss_stride="i32", ignore_index="i32"),
           dict(BLOCK_V=4096), ("logits_ptr", "grad_ptr", "V", "row_stride", "grad_row_stride"), True)


def main(arch: int = 90) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._dispatch import INTERPRET

    if INTERPRET:
        print("TRITON_INTERPRET=1: kernels are interpreted; run with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", arch, 32)
    failures = 0
    for kernel, signature, constexprs, aligned, want_vector in _variants():
        fn = kernel
        while not isinstance(fn, triton.runtime.JITFunction):  # unwrap @triton.autotune
            fn = fn.fn
        signature = dict(signature, **{k: "constexpr" for k in constexprs})
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        label = f"{fn.__name__} {constexprs.get('MASKED', '')} {'aligned' if constexprs.get('ALIGNED') else ''}".strip()
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=target, options={"num_warps": 8})
        except Exception as e:  # report every variant, then fail
            failures += 1
            print(f"FAIL {label}: {type(e).__name__}: {str(e)[:500]}")
            continue
        ptx = compiled.asm["ptx"]
        vector_loads = len(re.findall(r"ld\.global\S*\.v[24]\.", ptx))
        ok = vector_loads > 0 or not want_vector
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {label}: sm_{arch}, {len(compiled.asm['cubin'])} B cubin, "
              f"{vector_loads} vector loads{'' if ok else ' (expected 128-bit loads on full tiles)'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
