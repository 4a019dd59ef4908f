"""All ops together: torch.compile(fullgraph=True) with inductor on the reference backend, and a
short training run whose losses agree between the Triton kernels and the torch references."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import funzero.ops as fo  # noqa: E402
from funzero.ops import _dispatch  # noqa: E402

if not _dispatch.INTERPRET:  # pragma: no cover
    raise RuntimeError("tests/test_ops_*.py need TRITON_INTERPRET=1 before funzero.ops is imported")

V, D, H, N = 64, 32, 96, 24
SHAPES = {"ln_w": (D,), "ln_b": (D,), "w1": (D, H), "b1": (H,), "w2": (H, D), "rms_w": (D,),
          "head": (D, V)}
HP = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01)


def _unflatten(flat: torch.Tensor) -> dict:
    out, i = {}, 0
    for name, shape in SHAPES.items():
        n = torch.Size(shape).numel()
        out[name] = flat[i:i + n].view(shape)
        i += n
    return out


def _init_flat() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    parts = []
    for name, shape in SHAPES.items():
        if name in ("ln_w", "rms_w"):
            parts.append(torch.ones(shape).flatten())
        elif name in ("ln_b", "b1"):
            parts.append(torch.zeros(shape).flatten())
        else:
            parts.append((torch.randn(shape, generator=g) * shape[0] ** -0.5).flatten())
    return torch.cat(parts)


def _loss(p: dict, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    h = fo.layer_norm(x, p["ln_w"], p["ln_b"])  # (N, D)
    h = h + fo.bias_gelu(h @ p["w1"], p["b1"]) @ p["w2"]  # (N, D)
    logits = fo.rms_norm(h, p["rms_w"]) @ p["head"]  # (N, V)
    return fo.cross_entropy(logits, targets)


def _train_step(master, mu, nu, step, lr, x, targets):
    flat = master.detach().requires_grad_()
    loss = _loss(_unflatten(flat), x, targets)
    (grad,) = torch.autograd.grad(loss, flat)
    step += 1
    fo.adamw_(master, grad, mu, nu, lr=lr, step=step, check_finite=True, **HP)
    return loss.detach()


def _batch(i: int):
    g = torch.Generator().manual_seed(100 + i)
    tokens = torch.randint(0, V, (N,), generator=g)
    x = _CODEBOOK[tokens]  # (N, D) fixed features per token
    return x, (tokens * 7 + 3) % V  # a learnable map


_CODEBOOK = torch.randn(V, D, generator=torch.Generator().manual_seed(1))


def _train(backend: str, compile_with=None, steps: int = 6):
    master = _init_flat()
    mu, nu = torch.zeros_like(master), torch.zeros_like(master)
    step, lr = torch.tensor(0.0), torch.tensor(3e-2)
    fn = _train_step if compile_with is None else torch.compile(_train_step, fullgraph=True, backend=compile_with)
    losses = []
    with fo.backend(backend):
        for i in range(steps):
            losses.append(fn(master, mu, nu, step, lr, *_batch(i)).item())
    return losses, master


def test_tiny_model_trains_the_same_on_kernels_and_references():
    losses_ref, master_ref = _train("torch")
    losses_tri, master_tri = _train("triton")
    assert losses_ref[-1] < 0.8 * losses_ref[0]  # it learns
    torch.testing.assert_close(torch.tensor(losses_tri), torch.tensor(losses_ref), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(master_tri, master_ref, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("backend,compiler", [("triton", "inductor"), ("torch", "aot_eager")])
def test_train_step_compiles_to_one_graph(backend, compiler):
    """Forward, backward, inf check and AdamW in one graph (fullgraph), compiled once, same numbers.

    On the kernel backend every op is an opaque custom op: inductor sees their fake
    implementations, registered autograd and declared mutations (adamw_, nonfinite_
    are functionalised and re-inplaced) - the configuration a GPU run compiles.
    """
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(compiler)
    losses_c, master_c = _train(backend, compile_with=counter, steps=3)
    losses_e, master_e = _train(backend, steps=3)
    assert counter.frame_count == 1  # one graph, no recompilation as step and state change
    torch.testing.assert_close(torch.tensor(losses_c), torch.tensor(losses_e), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(master_c, master_e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend,compiler", [("triton", "inductor"), ("torch", "aot_eager")])
def test_quantize_roundtrip_compiles(backend, compiler):
    def f(x):
        q, s = fo.quantize_int8(x, 64)
        return fo.dequantize_int8(q, s, 64, dtype=torch.bfloat16), s

    x = torch.randn(1000)
    torch._dynamo.reset()
    with fo.backend(backend):
        y, s = torch.compile(f, fullgraph=True, backend=compiler)(x)
        y_e, s_e = f(x)
    assert torch.equal(y, y_e) and torch.equal(s, s_e)
