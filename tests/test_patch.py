"""funzero.ops.patch on tiny Hugging Face models built from local configs (no downloads).

The patched model runs funzero's Triton kernels (interpreter); the unpatched copy is plain HF.
Tolerances, relative to the largest magnitude of each reference tensor: fp32 losses within 1e-6
and gradients within 1e-5 (summation order; measured up to 1.3e-7 and 1.3e-6). bf16 (both
models in bf16): losses within 1e-3 (measured up to 1.4e-5) and gradients within 2**-4 (measured
up to 2**-5.95): HF rounds to bf16 after every elementwise op, the kernels compute in fp32 and
round once per output. So the bf16 test also holds the patched model to the fp32 model's
gradients: it must be no further from them than HF's own bf16 model (measured: 0.78x to 0.81x
as far).
"""

import copy
import logging
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

import funzero.ops as fo  # noqa: E402
from funzero.ops import _patch  # noqa: E402
from tests._recorder import OpRecorder  # noqa: E402

V = 101
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             vocab_size=V, max_position_embeddings=32)
FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**SIZES)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SIZES)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)),
}
SWAPPED = {  # 2 layers: 2 norms each and a final one; one MLP and one attention each; the loss
    "llama": {"loss": 1, "rope": 2, "swiglu": 2, "rmsnorm": 5},
    "mistral": {"loss": 1, "rope": 2, "swiglu": 2, "rmsnorm": 5},
    "qwen2": {"loss": 1, "rope": 2, "swiglu": 2, "rmsnorm": 5},
    "gpt2": {"loss": 1, "layernorm": 5, "gelu": 2},
}
TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-3, 2.0**-4)}  # (loss, gradients)


def _model(family, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return FAMILIES[family]().to(dtype)


def _batch(batch=2, seq=6):
    ids = torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :2] = -100
    return ids, labels


def _loss_and_grads(model, **kw):
    ids, labels = _batch()
    out = model(input_ids=ids, labels=labels, **kw)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    return out, grads


def _close(got, want, rel):
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = max(want.float().abs().max().item(), 1e-30)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=rel * scale)


def _worst(grads, want) -> float:
    """The largest gradient error, each relative to its reference's largest magnitude."""
    return max(((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30)).item()
               for g, w in zip(grads, want, strict=True))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_patched_model_matches_unpatched(family, dtype):
    ref = _model(family, dtype)
    model = copy.deepcopy(ref)
    params, keys = [id(p) for p in model.parameters()], list(model.state_dict())
    report = fo.patch(model)
    assert report.swapped == SWAPPED[family], report
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    if family == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight  # the tie survives
    with fo.backend("triton"):
        out, grads = _loss_and_grads(model)
    want, want_grads = _loss_and_grads(ref)
    assert out.logits is None and want.logits is not None
    tol_loss, tol_grad = TOL[dtype]
    torch.testing.assert_close(out.loss, want.loss, rtol=tol_loss, atol=0)
    for (name, _), g, w in zip(model.named_parameters(), grads, want_grads):
        assert torch.isfinite(g).all(), name
        _close(g, w, tol_grad)
    if dtype == torch.bfloat16:
        _, exact = _loss_and_grads(_model(family, torch.float32))
        assert _worst(grads, exact) <= _worst(want_grads, exact)


def test_patch_on_the_meta_device_touches_no_tensor():
    with torch.device("meta"):
        model = _model("llama")
    params = {n: p for n, p in model.named_parameters()}
    recorder = OpRecorder()
    with recorder:
        report = fo.patch(model)
    assert recorder.ops == []  # not one tensor op: nothing allocated, read or moved
    assert report.swapped == SWAPPED["llama"]
    assert {n: p for n, p in model.named_parameters()} == params
    assert all(p.device.type == "meta" for p in model.parameters())


def test_patch_keeps_the_classes_hf_knows():
    model = _model("llama")
    fo.patch(model)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, modeling_llama.LlamaAttention) and type(attn).__name__ == "LlamaAttention"
    assert type(attn).__mro__[1] is modeling_llama.LlamaAttention
    assert type(attn) is type(model.model.layers[1].self_attn)  # one subclass per class
    again = fo.patch(model)  # idempotent: counted, not swapped twice
    assert again.swapped == SWAPPED["llama"] and type(attn).__mro__[1] is modeling_llama.LlamaAttention
    # no other model, and no module global of HF's, is touched
    other = _model("llama")
    assert type(other.model.layers[0].self_attn) is modeling_llama.LlamaAttention
    assert modeling_llama.apply_rotary_pos_emb.__module__ == modeling_llama.__name__


def test_each_kernel_switches_on_its_own():
    ids, labels = _batch()
    for kernel in ("rmsnorm", "swiglu", "rope", "loss"):
        model = _model("llama")
        ref = copy.deepcopy(model)
        report = fo.patch(model, kernels=kernel)
        assert report.swapped == {kernel: SWAPPED["llama"][kernel]}
        with fo.backend("triton"):
            got = model(input_ids=ids, labels=labels).loss
        torch.testing.assert_close(got, ref(input_ids=ids, labels=labels).loss, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"unknown kernels \['flash'\]"):
        fo.patch(_model("llama"), kernels=("rmsnorm", "flash"))


def test_unknown_modules_are_left_alone_with_one_note(caplog):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4))  # a LayerNorm outside GPT-2 too
    classes = [type(m) for m in model.modules()]
    with caplog.at_level(logging.INFO, logger="funzero.ops._patch"):
        report = fo.patch(model)
    assert report.swapped == {} and [type(m) for m in model.modules()] == classes
    assert report.unknown == ("LayerNorm", "Linear", "ReLU")
    assert len(caplog.records) == 1 and "no kernel for: LayerNorm, Linear, ReLU" in caplog.records[0].message


def test_a_module_the_kernel_cannot_run_is_skipped_with_the_reason():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, hidden_act="gelu"))
    report = fo.patch(model)
    assert "swiglu" not in report.swapped and report.swapped["rmsnorm"] == 5
    assert len(report.skipped) == 2 and "act_fn is GELUActivation, not SiLU" in report.skipped[0]
    assert type(model.model.layers[0].mlp) is modeling_llama.LlamaMLP


def test_patch_without_transformers_is_a_logged_no_op(monkeypatch, caplog):
    for name in [n for n in sys.modules if n == "transformers" or n.startswith("transformers.")]:
        monkeypatch.setitem(sys.modules, name, None)  # what an environment without it sees
    model = nn.Linear(2, 2)
    with caplog.at_level(logging.INFO, logger="funzero.ops._patch"):
        report = fo.patch(model)
    assert report.swapped == {} and report.unknown == ("Linear",) and type(model) is nn.Linear
    assert "transformers is not importable" in caplog.text


def test_the_loss_path_takes_hf_keywords():
    """num_items_in_batch, shift_labels, return_dict=False and return_logits=True as HF's forward takes them
    (torch references on CPU: this is about the wiring, the kernels are checked above)."""
    ref = _model("llama")
    model = copy.deepcopy(ref)
    fo.patch(model, kernels="loss")
    ids, labels = _batch()
    other_ignored = labels.clamp_min(0)
    other_ignored[1, :3] = 3
    for y, kw in ((labels, {"num_items_in_batch": torch.tensor(7)}), (labels, {"num_items_in_batch": 5}),
                  (labels, {"shift_labels": labels.roll(-1, 1)}), (other_ignored, {"ignore_index": 3})):
        torch.testing.assert_close(model(input_ids=ids, labels=y, **kw).loss, ref(input_ids=ids, labels=y, **kw).loss,
                                   rtol=1e-6, atol=0)
    as_tuple = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], model(input_ids=ids, labels=labels).loss)
    full = model(input_ids=ids, labels=labels, return_logits=True)  # HF's own forward
    want = ref(input_ids=ids, labels=labels)
    assert torch.equal(full.logits, want.logits) and torch.equal(full.loss, want.loss)
    assert torch.equal(model(input_ids=ids).logits, want.logits)  # no labels: HF's forward
    with torch.autocast("cpu", dtype=torch.bfloat16):  # lm_head would run in bf16: so does the loss
        got, hf = model(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(got, hf, rtol=2e-2, atol=0)


def test_patched_model_compiles_to_one_graph_with_the_kernels():
    """torch.compile(fullgraph=True) traces the patched Llama's loss and backward with the kernels as
    custom ops in the graph (no graph break), equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = _model("llama")
    fo.patch(model)
    ids, labels = _batch()
    targets = set()

    def backend(gm, example_inputs):
        targets.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return counter(gm, example_inputs)

    def loss_of(m, x, y):
        return m(input_ids=x, labels=y).loss

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    with fo.backend("triton"):
        loss = torch.compile(loss_of, fullgraph=True, backend=backend)(model, ids, labels)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        loss_eager = loss_of(model, ids, labels)
        grads_eager = torch.autograd.grad(loss_eager, list(model.parameters()))
    assert counter.frame_count == 1
    for op in ("norm_fwd", "swiglu_fwd", "rope", "linear_cross_entropy_fwd"):
        assert f"funzero.{op}" in targets, (op, sorted(t for t in targets if "funzero" in t))
    torch.testing.assert_close(loss, loss_eager, rtol=1e-6, atol=0)
    for g, w in zip(grads, grads_eager):
        _close(g, w, 1e-5)


def test_patch_after_fz_init_trains_like_patch_before():
    """fz.init leaves the module's parameters on the meta device; patch never reads them, so patching
    then (before the step is built) gives the same steps, bit for bit."""
    import funzero as fz

    def losses(order):
        model = _model("llama")
        if order == "before":
            fo.patch(model)
        plan = fz.zero(3, groups=[r"model\.layers\.(\d+)\."])
        tx = fz.optim.adamw(1e-2, fused=False)
        state = fz.init(model, tx, plan)
        if order == "after":
            assert next(model.parameters()).device.type == "meta"
            assert fo.patch(model).swapped == SWAPPED["llama"]
        step = fz.train_step(model, lambda apply, b: apply(input_ids=b[0], labels=b[1]).loss, tx, plan)
        out = []
        with fo.backend("triton"):
            for _ in range(2):
                state, metrics = step(state, _batch())
                out.append(metrics["loss"].item())
        return out

    before = losses("before")
    assert losses("after") == before and before[1] < before[0]
