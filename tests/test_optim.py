"""funzero.optim: parity with torch.optim, optax's definitions on hand-computed cases, the scaler."""

from __future__ import annotations

import math

import pytest
import torch

import funzero as fz
from funzero import optim
from funzero import LossScaleConfig
from funzero._scaler import init_scaler, update_scaler


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(7, 5, generator=g), "b": torch.randn(5, generator=g), "v": torch.randn(123, generator=g)}


def _grads(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=g) for k, v in _params().items()} for _ in range(n)]


def _run_ours(tx, steps=20):
    params = _params()
    state = tx.init(params)
    for grads in _grads(steps):
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
    return params


def _run_torch(make_opt, steps=20):
    params = {k: v.clone().requires_grad_() for k, v in _params().items()}
    opt = make_opt(list(params.values()))
    for grads in _grads(steps):
        for k, p in params.items():
            p.grad = grads[k].clone()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


PARITY = [
    ("sgd", lambda: optim.sgd(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    ("sgd_momentum", lambda: optim.sgd(0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    ("sgd_nesterov_wd", lambda: optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.01), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adam", lambda: optim.adam(1e-2, b1=0.8, b2=0.99), lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99))),
    ("adamw", lambda: optim.adamw(1e-2, weight_decay=0.1, fused=False), lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
]


@pytest.mark.parametrize("name,ours,theirs", PARITY, ids=[p[0] for p in PARITY])
def test_parity_with_torch_optim_over_20_steps(name, ours, theirs):
    got, want = _run_ours(ours()), _run_torch(theirs)
    for k in want:
        assert _rel(got[k], want[k]) <= 1e-6, (name, k, _rel(got[k], want[k]))


def test_fused_adamw_path_matches_torch_adamw():
    """The engine's fused path (funzero.ops.adamw_: torch's fused CPU kernel here) on flat buffers."""
    tx = optim.adamw(1e-2, weight_decay=0.1)
    assert tx.traits.fused is not None
    params = _params()
    state = tx.init(params)
    for grads in _grads(20):
        state = tx.traits.fused.apply(grads, state, params)
    want = _run_torch(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))
    for k in want:
        assert _rel(params[k], want[k]) <= 1e-6, k
    assert int(state[0].count) == 20 and int(state[2].count) == 20


def test_chain_scale_and_named_chain_compose_in_order():
    u = {"a": torch.tensor([1.0, -2.0])}
    tx = optim.chain(optim.scale(2.0), optim.scale(-3.0))
    out, _ = tx.update(u, tx.init(u))
    assert torch.equal(out["a"], torch.tensor([-6.0, 12.0]))
    nc = optim.named_chain(("clip", optim.clip_by_global_norm(1.0)), ("sgd", optim.sgd(0.5)))
    st = nc.init(u)
    assert set(st) == {"clip", "sgd"}
    out, _ = nc.update(u, st)
    # norm sqrt(5) > 1: clipped to unit norm, then scaled by -0.5
    torch.testing.assert_close(out["a"], torch.tensor([1.0, -2.0]) / math.sqrt(5) * -0.5)
    with pytest.raises(ValueError, match="duplicate names"):
        optim.named_chain(("a", optim.scale(1.0)), ("a", optim.scale(1.0)))


def test_clip_by_global_norm_values():
    u = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}  # global norm 5
    tx = optim.clip_by_global_norm(1.0)
    out, _ = tx.update(u, tx.init(u))
    torch.testing.assert_close(out["a"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(out["b"], torch.tensor([0.8]))
    out, _ = optim.clip_by_global_norm(10.0).update(u, None)
    assert torch.equal(out["a"], u["a"]) and torch.equal(out["b"], u["b"])
    with pytest.raises(ValueError, match="max_norm=0"):
        optim.clip_by_global_norm(0)


def test_schedules_values():
    lin = optim.linear_schedule(1.0, 0.0, 4, transition_begin=2)
    assert [round(float(lin(c)), 6) for c in (0, 2, 4, 6, 9)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    cos = optim.cosine_decay_schedule(2.0, 10, alpha=0.5)
    assert float(cos(0)) == pytest.approx(2.0) and float(cos(5)) == pytest.approx(2.0 * (0.5 * 0.5 + 0.5))
    assert float(cos(10)) == pytest.approx(1.0) and float(cos(100)) == pytest.approx(1.0)
    wc = optim.warmup_cosine(1.0, 2, 10)
    assert [float(wc(c)) for c in (0, 1, 2, 6, 10)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0], abs=1e-6)
    js = optim.join_schedules([optim.constant_schedule(1.0), optim.constant_schedule(2.0)], [3])
    assert [float(js(c)) for c in (0, 2, 3, 7)] == [1.0, 1.0, 2.0, 2.0]
    # traceable: a tensor count gives a tensor
    assert isinstance(wc(torch.tensor(3)), torch.Tensor)
    with pytest.raises(ValueError, match="warmup_steps=10, decay_steps=5"):
        optim.warmup_cosine(1.0, 10, 5)
    with pytest.raises(ValueError, match="transition_steps=0"):
        optim.linear_schedule(1.0, 0.0, 0)


def test_scale_by_schedule_uses_the_count_before_the_update():
    tx = optim.scale_by_learning_rate(optim.linear_schedule(1.0, 0.0, 2))
    u = {"a": torch.ones(1)}
    st = tx.init(u)
    outs = []
    for _ in range(3):
        o, st = tx.update(u, st)
        outs.append(float(o["a"]))
    assert outs == [-1.0, -0.5, -0.0]


def test_multi_steps_applies_mean_on_every_kth_call():
    tx = optim.multi_steps(optim.sgd(1.0), 3)
    p = {"a": torch.zeros(2)}
    st = tx.init(p)
    outs = []
    for g in ([1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [1.0, 1.0]):
        u, st = tx.update({"a": torch.tensor(g)}, st, p)
        outs.append(u["a"].tolist())
    assert outs == [[0.0, 0.0], [0.0, 0.0], [-3.0, -4.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="every_k=0"):
        optim.multi_steps(optim.sgd(1.0), 0)


def test_masked_weight_decay_only_on_selected_leaves():
    p = {"w": torch.full((2,), 2.0), "b": torch.full((2,), 2.0)}
    u = {"w": torch.zeros(2), "b": torch.zeros(2)}
    tx = optim.add_decayed_weights(0.5, mask=r"^w$")
    out, _ = tx.update(u, tx.init(p), p)
    assert out["w"].tolist() == [1.0, 1.0] and out["b"].tolist() == [0.0, 0.0]
    tx = optim.masked(optim.scale(10.0), optim.by_path(lambda path: path == "b"))
    out, _ = tx.update({"w": torch.ones(2), "b": torch.ones(2)}, tx.init(p), p)
    assert out["w"].tolist() == [1.0, 1.0] and out["b"].tolist() == [10.0, 10.0]


def test_masked_and_partition_on_flat_shards_act_per_leaf():
    """With ShardInfo, a mask selects slices of a flat buffer, leaf by leaf; padding stays 0."""
    from shardspec import FlatLayout

    lay = FlatLayout.from_shapes("g", {"blk.w": (3, 4), "blk.b": (4,)}, num_shards=2, shard_align=8)
    info = optim.ShardInfo({"g": lay}, rank=0, sharded=False)
    p = {"g": lay.pack({"blk.w": torch.ones(3, 4), "blk.b": torch.ones(4)})}
    u = {"g": lay.pack({"blk.w": torch.zeros(3, 4), "blk.b": torch.zeros(4)})}
    out, _ = optim.add_decayed_weights(0.5, mask=r"\.w$").update(u, None, p, info=info)
    leaves = lay.unpack(out["g"])
    assert leaves["blk.w"].eq(0.5).all() and leaves["blk.b"].eq(0).all()
    tx = optim.partition({"slow": optim.scale(0.1), "fast": optim.scale(10.0)}, [(r"\.w$", "slow"), (r"\.b$", "fast")])
    ones = {"g": lay.pack({"blk.w": torch.ones(3, 4), "blk.b": torch.ones(4)})}
    out, _ = tx.update(ones, tx.init(ones), p, info=info)
    leaves = lay.unpack(out["g"])
    assert torch.allclose(leaves["blk.w"], torch.full((3, 4), 0.1)) and leaves["blk.b"].eq(10.0).all()
    assert out["g"][lay.numel :].eq(0).all()
    with pytest.raises(ValueError, match="leaf 'blk.b' is matched by no label rule"):
        optim.partition({"slow": optim.scale(0.1)}, [(r"\.w$", "slow")]).update(ones, {"slow": optim.EmptyState()}, p, info=info)


def test_lion_and_lamb_hand_computed_first_step():
    p = {"a": torch.tensor([3.0, 4.0])}
    g = {"a": torch.tensor([2.0, -3.0])}
    tx = optim.lion(0.1, b1=0.9, b2=0.99, weight_decay=0.0)
    out, st = tx.update(g, tx.init(p), p)
    assert out["a"].tolist() == pytest.approx([-0.1, 0.1])  # -lr * sign(0.1 g)
    assert st[0].trace["a"].tolist() == pytest.approx([0.02, -0.03])
    tx = optim.lamb(0.1, weight_decay=0.0, eps=0.0)
    out, _ = tx.update(g, tx.init(p), p)
    # first Adam step is sign(g) (eps=0); trust ratio ||p|| / ||sign(g)|| = 5 / sqrt(2)
    assert out["a"].tolist() == pytest.approx([-0.1 * 5 / math.sqrt(2), 0.1 * 5 / math.sqrt(2)], rel=1e-5)


def test_arguments_validated_when_built():
    with pytest.raises(ValueError, match="b1=1.5"):
        optim.adamw(1e-3, b1=1.5)
    with pytest.raises(ValueError, match="learning_rate=-1"):
        optim.sgd(-1)
    with pytest.raises(ValueError, match="nesterov needs momentum > 0"):
        optim.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match="weight_decay=-0.1"):
        optim.adamw(1e-3, weight_decay=-0.1)
    with pytest.raises(ValueError, match="argument 1 is a int"):
        optim.chain(optim.scale(1.0), 3)


def test_inject_hyperparams_reads_the_learning_rate_from_state():
    tx = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-2, weight_decay=0.1)
    params = _params()
    st = tx.init(params)
    assert float(st.hyperparams["learning_rate"]) == pytest.approx(1e-2)
    want_params = {k: v.clone() for k, v in params.items()}
    ref = optim.adamw(1e-2, weight_decay=0.1, fused=False)
    ref_st = ref.init(want_params)
    for i, grads in enumerate(_grads(4)):
        if i == 2:
            st.hyperparams["learning_rate"].fill_(1e-3)
            ref = optim.adamw(1e-3, weight_decay=0.1, fused=False)  # same state layout
        u, st = tx.update(grads, st, params)
        params = optim.apply_updates(params, u)
        ru, ref_st = ref.update(grads, ref_st, want_params)
        want_params = optim.apply_updates(want_params, ru)
    for k in params:
        assert _rel(params[k], want_params[k]) < 1e-6


# --- loss scaling: DeepSpeed's state machine --------------------------------------------------
def _drive(cfg, overflows):
    s = init_scaler(cfg)
    scales = []
    for o in overflows:
        s = update_scaler(s, torch.tensor(float(o)), cfg)
        scales.append(float(s.scale))
    return scales


def test_loss_scale_halves_after_hysteresis_overflows_and_never_below_min():
    cfg = LossScaleConfig(initial_scale_power=4, loss_scale_window=1000, hysteresis=2, min_loss_scale=4.0)
    # first overflow spends hysteresis, the second halves; hysteresis is not restored by clean steps
    assert _drive(cfg, [1, 1, 1, 0, 1, 1, 1]) == [16.0, 8.0, 4.0, 4.0, 4.0, 4.0, 4.0]


def test_loss_scale_doubles_after_window_clean_steps():
    cfg = LossScaleConfig(initial_scale_power=3, loss_scale_window=3, hysteresis=1, min_loss_scale=1.0)
    # 3 clean steps -> x2; overflow -> /2 and the window restarts after it
    assert _drive(cfg, [0, 0, 0, 0, 0, 0, 1, 0, 0, 0]) == [8, 8, 16, 16, 16, 32, 16, 16, 16, 32]


def test_loss_scale_config_validation():
    with pytest.raises(ValueError, match="hysteresis=0"):
        LossScaleConfig(hysteresis=0)
    p = fz.fp16()
    assert p.loss_scaling.initial_scale_power == 16 and p.loss_scaling.loss_scale_window == 1000
    assert p.loss_scaling.hysteresis == 2 and p.loss_scaling.min_loss_scale == 1.0


def test_combinators_keep_the_fused_update_and_its_capabilities():
    """named_chain, chain and inject_hyperparams derive the fused-update record from their parts:
    named_chain once rebuilt the fused pass without its per-group and per-leaf capabilities, so
    the engine silently lost the pipelined host update for it."""
    params = _params()
    adamw = optim.adamw(1e-2, weight_decay=0.1)
    for tx in (adamw, optim.chain(optim.clip_by_global_norm(1.0), adamw), optim.named_chain(("opt", adamw)),
               optim.named_chain(("clip", optim.clip_by_global_norm(1.0)), ("opt", adamw))):
        fused = tx.traits.fused
        assert fused is not None and fused.takes_leaves
        assert fused.groupwise(tx.init(params)) is not None
    named = optim.named_chain(("clip", optim.clip_by_global_norm(1.0)), ("opt", adamw))
    state = named.init(params)
    gw = named.traits.fused.groupwise(state)
    assert gw.prefix is not None  # the clipping norm runs over every group first
    new = gw.join(*gw.prefix(_grads(1)[0], params, None, None)[1:2], gw.apply({}, gw.state, {}))
    assert set(new) == {"clip", "opt"} and int(new["opt"][0].count) == 1
    assert optim.lion(1e-3).traits.fused is None  # no fused pass: the engine runs update()
    injected = optim.inject_hyperparams(optim.adamw, static_args=("weight_decay",))(learning_rate=1e-2, weight_decay=0.1)
    assert injected.traits.fused is not None
