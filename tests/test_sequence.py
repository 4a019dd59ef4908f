"""Ulysses sequence parallelism composed with ZeRO over dp x sp (funzero/_sequence.py), on real
gloo ranks: trained models against one process on the whole sequences, the all-to-all's backward
against autograd of unsharded attention, collective counts against their formulas, and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import funzero as fz
from shardspec import Mesh
from tests._dist import run_world
from tests._models import GROUPS, tiny_gpt, torch_reference

STEPS, B, T = 3, 4, 16
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, bos_token_id=0, eos_token_id=0, use_cache=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**LLAMA, **overrides})
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).double()


def _gpt():
    return tiny_gpt(dtype=torch.float64, n_head=4)


def _data(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches whose shards hold different numbers of counted labels (ignore_index elsewhere)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(STEPS):
        x = torch.randint(0, vocab, (B, T), generator=g)
        y = torch.randint(0, vocab, (B, T), generator=g)
        y[0, : 5 + i] = -100
        y[3, 9:] = -100
        out.append((x, y))
    return out


MODELS = {  # name: (build, vocab, shift labels, loss of one process, loss of a SequenceBatch)
    "llama": (_llama, 64, True, lambda m, x, y: m(input_ids=x, labels=y).loss,
              lambda apply, b: apply(**b.hf_kwargs()).loss),
    "gpt": (_gpt, 67, False, lambda m, x, y: m(x, y), lambda apply, b: b.cross_entropy(apply(b.input_ids))),
}


def _reference(name: str) -> dict[str, torch.Tensor]:
    build, vocab, _, loss, _ = MODELS[name]
    model = build()

    class Plain(torch.nn.Module):  # torch_reference calls model(x, y) for the loss
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x, y):
            return loss(self.m, x, y)

    return {k.removeprefix("m."): v for k, v in torch_reference(Plain(), _data(vocab)).items()}


def _mesh(shape) -> Mesh:
    return Mesh.from_env(("dp", "sp"), shape).flatten(("dp", "sp"), "dp_sp")


def _train(mesh: Mesh, name: str, stage: int, counter=None):
    build, vocab, shift, _, sp_loss = MODELS[name]
    model = fz.sequence_parallel(build(), mesh, axis="sp")
    groups = fz.block_rules(model) if name == "llama" else GROUPS
    plan = fz.zero(stage, mesh=mesh, axis="dp_sp", batch="local", groups=groups)
    tx = fz.optim.adamw(1e-2, weight_decay=0.1, fused=False)
    state = fz.init(model, tx, plan, precision=fz.Precision(torch.float64))
    step = fz.train_step(model, sp_loss, tx, plan)
    losses = []
    for i, (x, y) in enumerate(_data(vocab)):
        b = fz.split_sequence(x, y, mesh, shift=shift)
        if counter is not None and i == 0:
            with fz.count_comm() as c:
                state, metrics = step(state, b)
            counter[name] = c
        else:
            state, metrics = step(state, b)
        losses.append(float(metrics["loss"]))
    return {k: v.clone() for k, v in fz.gather_params(state, plan).items()}, losses


def _attention_errors(mesh: Mesh) -> dict[str, float]:
    """Ulysses attention (GQA, causal) against autograd of SDPA on the whole sequence: the output
    and q/k/v gradients of this rank's tokens, as relative errors (float64)."""
    sp, rank = mesh.size("sp"), mesh.rank("sp")
    g = torch.Generator().manual_seed(3)
    q, w = (torch.randn(2, 8, T, 3, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, 4, T, 3, generator=g, dtype=torch.float64) for _ in range(2))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*full, is_causal=True, enable_gqa=True, scale=0.7)
    (ref * w).sum().backward()
    mine = slice(rank * T // sp, (rank + 1) * T // sp)
    local = [t[:, :, mine].clone().requires_grad_() for t in (q, k, v)]
    out = fz.ulysses_attention(*local, mesh, "sp", scale=0.7)
    (out * w[:, :, mine]).sum().backward()
    errors = {"out": _rel(out, ref[:, :, mine])}
    errors.update({f"d{n}": _rel(a.grad, b.grad[:, :, mine]) for n, a, b in zip("qkv", local, full)})
    return errors


def _run_world(rank, world, shape, stages):
    mesh = _mesh(shape)
    counts, trained = {}, {}
    for name in MODELS:
        for stage in stages:
            trained[name, stage] = _train(mesh, name, stage, counts if stage == stages[0] else None)
    backend = mesh.group("dp_sp")._get_backend(torch.device("cpu"))  # noqa: SLF001
    return dict(
        trained=trained if rank == 0 else None,
        comm={name: (dict(c.calls), dict(c.elements)) for name, c in counts.items()},
        coords=(mesh.rank("dp_sp"), mesh.rank("dp"), mesh.rank("sp")),
        timeout=backend.options._timeout.total_seconds(),  # noqa: SLF001
        attention=_attention_errors(mesh),
    )


@pytest.fixture(scope="module", params=[(2, 2), (1, 4)], ids=["dp2xsp2", "dp1xsp4"])
def world(request):
    """One spawned 4-rank world per mesh shape, shared by the tests below: (shape, rank results)."""
    return request.param, run_world(_run_world, 4, request.param, (1, 2, 3))


def _first_losses(name: str) -> float:
    build, vocab, _, loss, _ = MODELS[name]
    x, y = _data(vocab)[0]
    return loss(build(), x, y).item()


def _check_trained(results, shape):
    for name in MODELS:
        ref = _reference(name)
        for (model, stage), (params, losses) in results.items():
            if model != name:
                continue
            assert params.keys() == ref.keys()
            for k in ref:
                assert _rel(params[k], ref[k]) < 1e-10, (shape, name, stage, k, _rel(params[k], ref[k]))
            # the step's loss metric (an fp32 scalar) is the global token mean one process computes
            assert losses[0] == pytest.approx(_first_losses(name), rel=1e-6), (shape, name, stage)


def _all_to_all_formula(name: str, shape) -> dict:
    """Calls and elements of one step's all-to-alls: per attention layer, q/k/v fused into one
    exchange and the output in another, in forward ("sp") and, transposed, in backward."""
    dp, sp = shape
    rows, tokens = B // dp, T // sp
    if name == "llama":
        layers, heads, kv, dim = LLAMA["num_hidden_layers"], LLAMA["num_attention_heads"], LLAMA["num_key_value_heads"], LLAMA["hidden_size"] // LLAMA["num_attention_heads"]
    else:
        cfg = _gpt().cfg
        layers, heads, kv, dim = cfg.n_layer, cfg.n_head, cfg.n_head, cfg.n_embd // cfg.n_head
    per_layer = rows * tokens * dim * ((heads + 2 * kv) + heads)
    return {"calls": 2 * layers, "elements": layers * per_layer}


def test_sequence_parallel_zero_trains_like_one_process(world):
    """Llama (GQA) and GPT at ZeRO stages 1-3 over dp x sp equal one process on whole sequences
    (float64, 1e-10), with ignore_index labels spread unevenly over the shards."""
    shape, results = world
    _check_trained(results[0]["trained"], shape)


def test_all_to_alls_per_step_match_the_formula(world):
    shape, results = world
    for name in MODELS:
        calls, elements = results[0]["comm"][name]
        want = _all_to_all_formula(name, shape)
        a2a = {k: v for k, v in calls.items() if k[0] == "all_to_all"}
        assert a2a == {("all_to_all", "sp"): want["calls"], ("all_to_all", "sp_grad"): want["calls"]}, name
        assert elements[("all_to_all", "sp")] == elements[("all_to_all", "sp_grad")] == want["elements"], name


def test_ulysses_attention_and_its_backward_equal_unsharded_attention(world):
    _, results = world
    for r in results:
        assert max(r["attention"].values()) < 1e-12, r["attention"]


def test_flattened_axis_numbers_ranks_row_major_and_keeps_the_timeout(world):
    shape, results = world
    coords = [r["coords"] for r in results]  # (dp_sp, dp, sp) ranks of each process
    assert sorted((d, s) for _, d, s in coords) == [(d, s) for d in range(shape[0]) for s in range(shape[1])]
    assert all(flat == d * shape[1] + s for flat, d, s in coords)
    assert all(r["timeout"] == 180 for r in results)  # tests/_dist.py's world timeout, not torch's 30 min


# --- errors: sizes only, so one process with a mesh of the shape (no ranks needed) ----------------
SP4 = Mesh(("dp", "sp"), (1, 4))


def test_heads_and_kv_heads_that_do_not_divide_over_sp_raise_naming_module_and_counts():
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn: 2 KV heads do not divide over the 4 ranks"):
        fz.sequence_parallel(_llama(num_key_value_heads=2), SP4)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn: 6 attention heads do not divide over the 4"):
        fz.sequence_parallel(_llama(num_attention_heads=6, num_key_value_heads=6, hidden_size=36), SP4)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn: 3 attention heads do not divide over the 4 ranks"):
        fz.sequence_parallel(tiny_gpt(n_head=3), SP4)


def test_bad_axes_and_sequence_lengths_raise_naming_them():
    with pytest.raises(ValueError, match=r"axis 'cp' is not an axis of .*\('dp', 'sp'\)"):
        fz.sequence_parallel(_gpt(), SP4, axis="cp")
    x = torch.zeros(4, 18, dtype=torch.long)
    with pytest.raises(ValueError, match=r"sequence length 18 does not divide over the 4 ranks of axis 'sp'"):
        fz.split_sequence(x, x, SP4)
    with pytest.raises(ValueError, match=r"batch size 3 does not divide over the 2 ranks of axis 'dp'"):
        fz.split_sequence(x[:3, :16], x[:3, :16], Mesh(("dp", "sp"), (2, 2)))
    with pytest.raises(ValueError, match=r"in mesh order, got \('sp', 'dp'\)"):
        SP4.flatten(("sp", "dp"), "dp_sp")
    with pytest.raises(ValueError, match=r"not 'tp'"):
        SP4.flatten(("dp", "tp"), "dp_tp")
    with pytest.raises(ValueError, match=r"axis name 'sp' is taken"):
        SP4.flatten(("dp", "sp"), "sp")
    with pytest.raises(ValueError, match=r"axis 'dp_sp' is not an axis of Mesh\(dp=1, sp=4"):
        fz.zero(2, mesh=SP4, axis="dp_sp")  # not flattened


def test_one_rank_mesh_flattens_to_an_axis_without_communication():
    mesh = Mesh.from_env(("dp", "sp"), (1, 1), device_type="cpu").flatten(("dp", "sp"), "dp_sp")
    assert (mesh.size("dp_sp"), mesh.rank("dp_sp"), mesh.group("dp_sp")) == (1, 0, None)
    assert mesh.axes == ("dp", "sp", "dp_sp") and "dp_sp=dpxsp" in repr(mesh)
    q = torch.randn(1, 2, 5, 3)
    # one rank of sp: the attention is plain causal SDPA
    torch.testing.assert_close(fz.ulysses_attention(q, q, q, mesh, "sp"), F.scaled_dot_product_attention(q, q, q, is_causal=True))


def test_plans_that_would_train_a_sequence_parallel_model_wrongly_are_refused():
    """A plan whose data-parallel axes leave out sp (gradients not averaged over it) or that slices
    a global batch's rows over the sp ranks would train silently wrong: init refuses both."""
    mesh = Mesh(("dp", "sp"), (1, 4)).flatten(("dp", "sp"), "dp_sp")
    model = fz.sequence_parallel(_gpt(), mesh)
    tx = fz.optim.adamw(1e-2)
    with pytest.raises(ValueError, match=r"sequence-parallel over axis 'sp', but the plan's data-parallel axes \('dp',\)"):
        fz.init(model, tx, fz.zero(2, mesh=mesh, axis="dp", batch="local"))
    with pytest.raises(ValueError, match=r"batch='local'.*batch='global'"):
        fz.init(model, tx, fz.zero(2, mesh=mesh, axis="dp_sp"))
    with pytest.raises(ValueError, match="sequence-parallel already"):
        fz.sequence_parallel(model, mesh)
