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


def _train_world(rank, world, shape, stages):
    mesh = _mesh(shape)
    counts, out = {}, {}
    for name in MODELS:
        for stage in stages:
            out[name, stage] = _train(mesh, name, stage, counts if stage == stages[0] else None)
    comm = {name: (dict(c.calls), dict(c.elements)) for name, c in counts.items()}
    return out if rank == 0 else None, comm, (mesh.rank("dp_sp"), mesh.rank("dp"), mesh.rank("sp"))


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


@pytest.mark.parametrize("shape", [(2, 2), (1, 4)])
def test_sequence_parallel_zero_trains_like_one_process(shape):
    """Llama (GQA) and GPT at ZeRO stages 1-3 over dp x sp equal one process on whole sequences
    (float64, 1e-10), with ignore_index labels spread unevenly over the shards."""
    results = run_world(_train_world, 4, shape, (1, 2, 3))
    _check_trained(results[0][0], shape)
    coords = [r[2] for r in results]  # (dp_sp, dp, sp) ranks: dp_sp is row-major over (dp, sp)
    assert sorted((d, s) for _, d, s in coords) == [(d, s) for d in range(shape[0]) for s in range(shape[1])]
    assert all(flat == d * shape[1] + s for flat, d, s in coords)
    for name in MODELS:
        calls, elements = results[0][1][name]
        want = _all_to_all_formula(name, shape)
        a2a = {k: v for k, v in calls.items() if k[0] == "all_to_all"}
        assert a2a == {("all_to_all", "sp"): want["calls"], ("all_to_all", "sp_grad"): want["calls"]}, name
        assert elements[("all_to_all", "sp")] == elements[("all_to_all", "sp_grad")] == want["elements"], name
