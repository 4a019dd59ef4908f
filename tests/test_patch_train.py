"""A patched tiny HF Llama trains under funzero at stages 0-3 on 2 gloo ranks like the unpatched one.

Both run the same steps on the same data through the public API; the patched model's RMSNorm,
SwiGLU, RoPE and fused loss run as Triton kernels (interpreter), the unpatched one is plain HF.
The losses of 3 AdamW steps agree to fp32 rounding (the kernels sum in other orders: measured
1.3e-7 relative, bound 2e-6) and, in bf16 (bf16 params and compute, fp32 master), to bf16 noise:
the unpatched model rounds after every elementwise op, the kernels once per output (measured
1.7e-4 to 2.8e-4 relative by step 3, bound 3e-3). Sizes are small because every kernel launch
costs the interpreter tens of milliseconds.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests._dist import run_world  # noqa: E402

STEPS = 3
STAGES = (0, 1, 2, 3)
GROUPS = [r"model\.layers\.(\d+)\."]


def _tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=101, max_position_embeddings=32, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype)


def _batch(batch=2, seq=6):
    """One batch, trained on every step (so the loss must fall)."""
    ids = torch.randint(0, 101, (batch, seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100  # a padded prompt: ignored, so the two ranks count different numbers of tokens
    return ids, labels


def _train(rank, world, stages, dtypes):
    """{(dtype, patched, stage): the losses of STEPS steps}"""
    import funzero as fz
    import funzero.ops as fo

    out = {}
    for dtype in dtypes:
        for patched in (True, False):
            for stage in stages:
                model = _tiny_llama(dtype)
                if patched:
                    report = fo.patch(model)
                    assert report.swapped == {"loss": 1, "rope": 2, "swiglu": 2, "rmsnorm": 5}, report
                plan = fz.zero(stage, groups=GROUPS)
                tx = fz.optim.adamw(1e-2, weight_decay=0.1, fused=False)
                state = fz.init(model, tx, plan, precision=fz.bf16() if dtype == torch.bfloat16 else fz.fp32())
                step = fz.train_step(model, lambda apply, b: apply(input_ids=b[0], labels=b[1]).loss, tx, plan)
                losses = []
                with fo.backend("triton" if patched else "auto"):
                    for _ in range(STEPS):
                        state, metrics = step(state, _batch())
                        losses.append(metrics["loss"].item())
                out[str(dtype), patched, stage] = losses
    return out


@pytest.fixture(scope="module")
def losses():
    return run_world(_train, 2, STAGES, (torch.float32, torch.bfloat16))[0]  # one spawn for both tests


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 3e-3)], ids=["fp32", "bf16"])
def test_patched_llama_trains_like_unpatched_at_every_stage(losses, dtype, tol):
    for stage in STAGES:
        got, want = torch.tensor(losses[str(dtype), True, stage]), torch.tensor(losses[str(dtype), False, stage])
        assert len(got) == STEPS and torch.isfinite(got).all()
        assert ((got - want).abs() / want.abs()).max() < tol, (stage, got.tolist(), want.tolist())
        assert got[-1] < got[0] - 0.1  # it learns
