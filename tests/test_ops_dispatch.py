"""Backend selection, the no-GPU fallback, and the real compiler on every kernel (sm_90, no GPU)."""

import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import funzero.ops as fo  # noqa: E402
from funzero.ops import _dispatch, _gelu, _norms  # noqa: E402

if not _dispatch.INTERPRET:  # pragma: no cover
    raise RuntimeError("tests/test_ops_*.py need TRITON_INTERPRET=1 before funzero.ops is imported")


def test_backend_setter_and_context_manager():
    start = fo.get_backend()
    with fo.backend("torch"):
        assert fo.get_backend() == "torch"
        with fo.backend("triton"):
            assert fo.get_backend() == "triton"
        assert fo.get_backend() == "torch"
    assert fo.get_backend() == start
    try:
        fo.backend("torch")  # plain setter
        assert fo.get_backend() == "torch"
    finally:
        fo.backend(start)
    with pytest.raises(KeyError):
        with fo.backend("triton"):
            raise KeyError("restored on the way out")
    assert fo.get_backend() == start
    with pytest.raises(ValueError, match="one of"):
        fo.backend("cuda")


def test_dispatch_rule_on_cpu(monkeypatch):
    """auto and torch run the reference on CPU tensors; triton runs the kernel (interpreter)."""
    calls = []
    real = _norms._norm_fwd_triton
    monkeypatch.setattr(_norms, "_norm_fwd_triton", lambda *a: calls.append("kernel") or real(*a))
    x, w = torch.randn(3, 8), torch.ones(8)
    for name, expected in (("auto", 0), ("torch", 0), ("triton", 1)):
        calls.clear()
        with fo.backend(name):
            y = fo.rms_norm(x, w)
        assert len(calls) == expected, name
        torch.testing.assert_close(y, fo.reference.rms_norm(x, w), rtol=1e-5, atol=1e-5)


def test_torch_backend_never_touches_triton(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("kernel launched under the torch backend")

    monkeypatch.setattr(_gelu, "_bias_gelu_fwd_triton", boom)
    with fo.backend("torch"):
        fo.bias_gelu(torch.randn(2, 4), torch.zeros(4))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_backend_from_environment_and_no_interpreter_refusal():
    """FUNZERO_OPS_BACKEND sets the start value; without the interpreter, CPU tensors never reach
    a compiled kernel (a clear error instead)."""
    code = ("import torch, funzero.ops as fo\n"
            "print('start', fo.get_backend())\n"
            "fo.backend('triton')\n"
            "try:\n    fo.rms_norm(torch.randn(2, 4), torch.ones(4))\n"
            "except RuntimeError as e:\n    print('refused:', e)\n")
    res = _python(code, FUNZERO_OPS_BACKEND="torch", TRITON_INTERPRET="0")
    assert res.returncode == 0, res.stderr
    assert "start torch" in res.stdout
    assert "refused:" in res.stdout and "TRITON_INTERPRET=1" in res.stdout
    res = _python("import funzero.ops", FUNZERO_OPS_BACKEND="fast")
    assert res.returncode != 0 and "FUNZERO_OPS_BACKEND must be one of" in res.stderr


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    """The real Triton compiler (PTX + ptxas) accepts every kernel variant; full tiles get 128-bit loads."""
    res = subprocess.run([sys.executable, "-m", "funzero.ops._aot_check"], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("ok")]
    assert len(lines) == 25, res.stdout
