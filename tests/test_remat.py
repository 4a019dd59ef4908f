"""fz.remat: activation checkpointing by module-path rules, on a Hugging Face Llama and the GPT,
eager, compiled, and through funzero's stages on real gloo ranks."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy

import funzero as fz
from tests._dist import run_world
from tests._models import batches, tiny_gpt

LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, vocab_size=101)
LAYERS = r"model\.layers\.\d+"
BLOCKS = r"blocks\.\d+"


def save_mm_only(ctx, op, *args, **kwargs):
    """A callable policy: keep plain matmul outputs only (addmm, attention: recomputed)."""
    return CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE


POLICIES = ["full", "selective", "offload", save_mm_only]


def llama(seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA, "use_cache": False, **overrides})).to(dtype)


def llama_batch(rows: int = 4, seq: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 101, (rows, seq), generator=g), torch.randint(0, 101, (rows, seq), generator=g)


def llama_loss(apply, b):
    return apply(input_ids=b[0], labels=b[1]).loss


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _case(name):
    """(model, blocks rule, a forward pre-hook target inside each block, loss of one batch)."""
    if name == "llama":
        x, y = llama_batch()
        return llama(), LAYERS, lambda m: m.model.layers[0].mlp, lambda m: m(input_ids=x, labels=y).loss
    x, y = batches(1)[0]
    return tiny_gpt(), BLOCKS, lambda m: m.blocks[0].mlp, lambda m: m(x, y)


def _grads(model, loss_of, inner):
    calls = []
    inner(model).register_forward_pre_hook(lambda *a: calls.append(1))
    model.zero_grad()
    loss_of(model).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}, len(calls)


@pytest.mark.parametrize("name", ["llama", "gpt"])
def test_every_policy_gives_the_gradients_of_no_remat(name):
    base, rule, inner, loss_of = _case(name)
    ref, ref_calls = _grads(copy.deepcopy(base), loss_of, inner)
    assert ref_calls == 1
    for policy in POLICIES:
        model = fz.remat(copy.deepcopy(base), [(rule, policy)])
        got, calls = _grads(model, loss_of, inner)
        assert got.keys() == ref.keys()
        for k in ref:
            assert _rel(got[k], ref[k]) < 1e-6, (policy, k, _rel(got[k], ref[k]))
        # recomputing policies run the block's forward again in backward; offload does not
        assert calls == (1 if policy == "offload" else 2), (policy, calls)


def test_remat_keeps_parameters_state_dict_and_copies():
    model = llama()
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    out = fz.remat(model, [(LAYERS, "full"), (r"model\.norm", "offload")])
    assert out is model
    assert list(model.state_dict()) == keys
    assert all(p is before[k] for k, p in model.named_parameters())
    layer = model.model.layers[1]
    assert type(layer).__name__ == "LlamaDecoderLayer" and layer.forward.__self__ is layer
    twin = copy.deepcopy(model)  # the copy's wrappers run the copy, not the original
    assert twin.model.layers[1].forward.__self__ is twin.model.layers[1]
    x, y = llama_batch()
    with torch.no_grad():  # no grad: the original forward, nothing saved
        assert torch.equal(model(input_ids=x).logits, twin(input_ids=x).logits)


class _Alive(TorchDispatchMode):
    """Remembers every tensor an op makes, to see which storages forward leaves alive."""

    def __init__(self) -> None:
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.made.append((func, StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes()))
        return out


def _activation_bytes(model, loss_of, blocks):
    """(bytes saved through saved-tensor hooks while inside a block, bytes of storages that ops
    made and forward leaves alive, the part of those allocated by aten.empty: offload's host
    copies). Parameters excluded; each storage counted once."""
    depth = [0]
    for b in blocks:
        b.register_forward_pre_hook(lambda *a: depth.__setitem__(0, depth[0] + 1))
        b.register_forward_hook(lambda *a: depth.__setitem__(0, depth[0] - 1), always_call=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if depth[0] and t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    rec = _Alive()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), rec:
        loss = loss_of(model)
    alive = {}
    for func, ref, n in rec.made:
        if not ref.expired():
            alive.setdefault(ref.cdata, (func, n))  # the op that allocated it (copy_ writes into it later)
    copies = sum(n for f, n in alive.values() if f == torch.ops.aten.empty.memory_format)
    loss.backward()
    return sum(saved.values()), sum(n for _, n in alive.values()), copies


@pytest.mark.parametrize("name", ["llama", "gpt"])
def test_saved_activations_shrink(name):
    base, rule, _, loss_of = _case(name)
    blocks = lambda m: list(m.model.layers) if name == "llama" else list(m.blocks)  # noqa: E731
    x = llama_batch()[0] if name == "llama" else batches(1)[0][0]
    width = base.config.hidden_size if name == "llama" else base.cfg.n_embd
    layer_input = x.numel() * width * 4  # (B, T, C) fp32
    out = {}
    for policy in (None, "full", "selective", "offload"):
        model = copy.deepcopy(base)
        if policy is not None:
            fz.remat(model, [(rule, policy)])
        out[policy] = _activation_bytes(model, loss_of, blocks(model))
    num_blocks = len(blocks(base))
    # full recompute: the default saver sees each block's input and nothing else of the block
    assert out["full"][0] == num_blocks * layer_input, out
    assert out[None][0] > 10 * out["full"][0], out
    # what forward leaves alive: no remat > matmul outputs kept > inputs only
    assert out[None][1] > out["selective"][1] > out["full"][1], out
    # offload: nothing reaches the default saver; on the compute device forward keeps no more
    # than full recompute does, and backward's tensors sit in host copies
    assert out["offload"][0] == 0, out
    assert out["offload"][1] - out["offload"][2] <= out["full"][1], out
    assert out["offload"][2] >= out[None][0] - num_blocks * layer_input, out


def _through_funzero(rank, world):
    """Llama trained one SGD step (the parameters move by lr x the gradient) at stages 0-3 (the GPT at stage 3) without remat and with each
    policy; at stage 3 the gathers counted."""
    out = {}
    for name in ("llama", "gpt"):
        for stage in (0, 1, 2, 3):
            for policy in [None] + POLICIES:
                if name == "gpt" and stage != 3:
                    continue  # Llama takes every stage; the GPT the one that gathers
                if name == "llama":
                    model, rule, groups, loss_fn = llama(), LAYERS, [r"model\.layers\.(\d+)\."], llama_loss
                    data = [llama_batch()]
                    inner = model.model.layers[0].mlp
                else:
                    from tests._models import GROUPS, lm_loss

                    model, rule, groups, loss_fn, data = tiny_gpt(), BLOCKS, GROUPS, lm_loss, batches(1)
                    inner = model.blocks[0].mlp
                if policy is not None:
                    fz.remat(model, [(rule, policy)])
                calls = []
                inner.register_forward_pre_hook(lambda *a: calls.append(1))
                plan = fz.zero(stage, groups=groups)
                tx = fz.optim.sgd(0.5)
                state = fz.init(model, tx, plan)
                step = fz.train_step(model, loss_fn, tx, plan)
                with fz.track_gathered() as live:
                    for b in data:
                        state, _ = step(state, b)
                key = (name, stage, getattr(policy, "__name__", policy))
                out[key] = (fz.gather_params(state, plan), live.gathers, live.peak, len(calls), len(state.binding.layouts))
    out["outer"] = _outer_remat()
    return out if rank == 0 else None


def test_every_policy_through_funzero_stages_on_two_ranks():
    """Stage 3 swaps a group's gathered parameters into its block only while the block runs; the
    recompute gets them from the checkpoint's saved inputs, which pass through stage 3's
    saved-tensor hooks: the group is gathered again in backward, never kept from forward.
    So every policy gathers each group twice per step, as without remat, with at most two groups
    alive at once."""
    out = run_world(_through_funzero, 2)[0]
    (ref, g0, _), (got, g1, calls) = out.pop("outer")
    # the whole decoder recomputed (the layers' owners inside it): the layers' own pre-hooks
    # gather again during the recompute; the same numbers and the same gathers
    for k in ref:
        assert _rel(got[k], ref[k]) < 1e-6, k
    assert g1 == g0 and calls == 2
    for (name, stage, policy), (params, gathers, peak, calls, groups) in out.items():
        ref = out[(name, stage, None)]
        for k in ref[0]:
            assert _rel(params[k], ref[0][k]) < 1e-6, (name, stage, policy, k, _rel(params[k], ref[0][k]))
        assert calls == (1 if policy in (None, "offload") else 2), (name, stage, policy, calls)
        if stage == 3:
            assert gathers == 2 * groups, (name, policy, gathers, groups)  # forward + backward
            assert peak <= 2, (name, policy, peak)
        else:
            assert gathers == 0


def _outer_remat():
    res = []
    for policy in (None, "full"):
        model = llama()
        if policy:
            fz.remat(model, [(r"model", policy)])
        calls = []
        model.model.layers[1].register_forward_pre_hook(lambda *a: calls.append(1))
        plan = fz.zero(3, groups=[r"model\.layers\.(\d+)\."])
        tx = fz.optim.sgd(0.5)
        state = fz.init(model, tx, plan)
        step = fz.train_step(model, llama_loss, tx, plan)
        with fz.track_gathered() as live:
            state, _ = step(state, llama_batch())
        res.append((fz.gather_params(state, plan), live.gathers, len(calls)))
    return res


def test_bad_rules_name_the_offender():
    bad = r"decoder\.\d+"
    with pytest.raises(ValueError, match=re.escape(f"remat rule {bad!r} matches no module path of LlamaForCausalLM")):
        fz.remat(llama(), [(LAYERS, "full"), (bad, "full")])
    with pytest.raises(ValueError, match=r"unknown remat policy 'everything' for rule"):
        fz.remat(llama(), [(LAYERS, "everything")])
    with pytest.raises(ValueError, match=r"a remat rule is a \(regex, policy\) pair, got 'model'"):
        fz.remat(llama(), ["model"])
    with pytest.raises(ValueError, match=r"remat rule '\(' is not a regex"):
        fz.remat(llama(), [("(", "full")])
    with pytest.raises(ValueError, match=r"remat would recompute 'model.layers.0' inside 'model'"):
        fz.remat(llama(), [(r"model", "full"), (LAYERS, "offload")])
    model = fz.remat(llama(), [(LAYERS, "full")])
    with pytest.raises(ValueError, match=r"module 'model.layers.0' already has remat policy 'full'; apply remat once"):
        fz.remat(model, [(LAYERS, "selective")])
    with pytest.raises(ValueError, match=r"remat would recompute 'model.layers.0' inside 'model'"):
        fz.remat(model, [(r"model", "full")])  # around a module chosen by an earlier call
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.config.use_cache is True"):
        fz.remat(llama(use_cache=True), [(LAYERS, "full")])
    with pytest.raises(ValueError, match=r"remat needs an nn.Module, got dict"):
        fz.remat({}, [(LAYERS, "full")])


def test_train_step_takes_remat_rules_and_the_gpt_recompute_is_one_use_of_them():
    """train_step(..., remat=rules) is fz.remat applied once; GPTConfig(recompute=K) is the rule
    for its first K blocks. Both give the plain model's losses (recompute changes no value)."""
    import funzero as fz
    from tests._models import GROUPS, batches, lm_loss, tiny_gpt

    def run(model, **kw):
        plan = fz.zero(3, groups=GROUPS)
        tx = fz.optim.adamw(1e-2)
        state = fz.init(model, tx, plan)
        step = fz.train_step(model, lm_loss, tx, plan, **kw)
        out = []
        for b in batches(3):
            state, m = step(state, b)
            out.append(float(m["loss"]))
        return out, model

    plain, _ = run(tiny_gpt())
    ruled, model = run(tiny_gpt(), remat=[(r"blocks\.\d+", "full")])
    assert ruled == plain
    assert model.blocks[0].__dict__["_funzero_remat"][0] == "full"
    recomputed, model = run(tiny_gpt(recompute=1))
    assert recomputed == plain
    assert "_funzero_remat" in model.blocks[0].__dict__ and "_funzero_remat" not in model.blocks[1].__dict__


@pytest.mark.slow
def test_a_compiled_step_recomputes_a_hugging_face_llama():
    """fz.compile traces the backward into the step's graph, whose remat pass refused any region
    holding attention (the SDPA kernels are tagged random): the README's own snippet failed."""
    def run(remat, compiled):
        model = llama()
        plan = fz.zero(3, groups=[LAYERS + r"\."])
        tx = fz.optim.sgd(0.5)  # updates proportional to the gradients (Adam would magnify rounding)
        state = fz.init(model, tx, plan)
        step = fz.train_step(model, llama_loss, tx, plan, remat=remat)
        step = fz.compile(step) if compiled else step
        losses = []
        for seed in (1, 2):
            state, m = step(state, llama_batch(seed=seed))
            losses.append(float(m["loss"]))
        return losses, fz.gather_params(state, plan)

    ref_losses, ref = run(None, compiled=False)
    losses, got = run([(LAYERS, "full")], compiled=True)
    assert losses == pytest.approx(ref_losses, rel=1e-5) and losses[1] != losses[0]
    for k in ref:
        assert _rel(got[k], ref[k]) < 1e-6, (k, _rel(got[k], ref[k]))
