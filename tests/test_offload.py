"""Offload as placement: state leaves live where the plan says, and training is unchanged."""

from __future__ import annotations

import os
import time

import optree
import pytest
import torch

import funzero as fz
from funzero import optim, testing
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt, train_tiny

CASES = [  # (stage, placement) for every stage where the offload makes sense
    (1, {"opt_state": "cpu"}),
    (2, {"opt_state": "cpu"}),
    (3, {"opt_state": "cpu"}),
    (3, {"opt_state": "cpu", "params": "cpu"}),
    (1, {"opt_state": "nvme"}),
    (2, {"opt_state": "nvme"}),
    (3, {"opt_state": "nvme", "params": "cpu"}),
    (3, {"opt_state": "nvme", "params": "nvme"}),
]


def _leaves(tree):
    return [t for t in optree.tree_leaves(tree, namespace="funzero") if isinstance(t, torch.Tensor)]


B0, B1 = r"^blocks\.0\.", r"^blocks\.1\."
# Leaf-path rules: groups of one part in different places (the tiny GPT's groups: rest, blocks.0,
# blocks.1).
RULE_CASES = [
    (2, {"opt_state": [(B0, "device"), ("", "cpu")]}),
    (1, {"opt_state": [(B0, "device"), (B1, "nvme"), ("", "cpu")]}),
    (3, {"params": [(B1, "cpu"), ("", "device")], "opt_state": [(B0, "device"), ("", "cpu")]}),
    (3, {"params": "cpu", "opt_state": [(B0, "device"), (B1, "cpu"), ("", "nvme")]}),
]


def _with_dir(placement: dict, d: str) -> dict:
    """``"nvme"`` in a placement (a value or a rule's target) as ``nvme:<d>``."""
    def one(w):
        return f"nvme:{d}" if w == "nvme" else w

    return {k: one(v) if isinstance(v, str) else [(rx, one(w)) for rx, w in v] for k, v in placement.items()}


def _train(rank, world, tmpdir, cases, steps):
    out = {}
    for i, (stage, placement) in enumerate(cases):
        placement = _with_dir(placement, f"{tmpdir}/r{rank}c{i}")
        runs = {}
        for name, pl in (("default", {}), ("placed", placement)):
            model = tiny_gpt()
            plan = fz.zero(stage, groups=GROUPS, placement=pl)
            tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1, mask=r"weight$"))
            state = fz.init(model, tx, plan, precision=fz.bf16())
            step = fz.train_step(model, lm_loss, tx, plan)
            # Host state takes the pipelined update (_placement/_host.py), NVMe files included,
            # except when the parameters themselves are files (stage 3, params on NVMe).
            pipelined = bool(pl) and "nvme" not in str(pl.get("params", ""))
            assert testing.route(step, state).pipelined == pipelined, (stage, pl)
            misplaced = [testing.misplaced(state)]
            for b in batches(steps):
                state, _ = step(state, b)
                misplaced.append(testing.misplaced(state))
            files = testing.nvme_files(state) if pl else []
            runs[name] = (fz.gather_params(state, plan), misplaced, files, [t.clone() for t in _leaves(state.params)])
        out[(stage, str(placement))] = runs
    return out


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("cases", ["whole", "rules"])
def test_offloaded_state_trains_bit_identically_and_stays_placed(world, cases, tmp_path):
    cases = CASES if cases == "whole" else RULE_CASES
    res = run_world(_train, world, str(tmp_path), cases, 3)[0]
    assert len(res) == len(cases)
    for key, runs in res.items():
        want, _, _, want_params = runs["default"]
        got, misplaced, files, got_params = runs["placed"]
        assert all(not m for m in misplaced), (key, misplaced)
        for k in want:
            assert torch.equal(got[k], want[k]), (key, k)
        assert all(torch.equal(a, b) for a, b in zip(got_params, want_params)), key
        if "nvme" in key[1]:
            assert files and not any(f.endswith(".tmp") for f in files), (key, files)  # renamed, none left over


def test_bad_placements_fail_at_plan_or_init_with_the_value(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="opt_state='cpu' needs ZeRO stage >= 1"):
        fz.zero(0, placement={"opt_state": "cpu"})
    with pytest.raises(ValueError, match="params='cpu' needs ZeRO stage 3"):
        fz.zero(2, placement={"params": "cpu"})
    with pytest.raises(ValueError, match="'gpu' is not one of"):
        fz.zero(2, placement={"opt_state": "gpu"})
    with pytest.raises(ValueError, match="placement key 'grads'"):
        fz.zero(2, placement={"grads": "cpu"})
    with pytest.raises(ValueError, match="nvme needs a directory"):
        fz.zero(2, placement={"opt_state": "nvme:"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' but the mesh computes on cpu"):
            fz.init(tiny_gpt(), optim.sgd(0.1), fz.zero(2, placement={"opt_state": "cuda"}))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # running as root: a file where a directory should be instead
        ro = tmp_path / "file"
        ro.write_text("x")
    with pytest.raises(ValueError, match=f"nvme directory '{ro}' is not writable"):
        fz.init(tiny_gpt(), optim.adamw(1e-3), fz.zero(2, placement={"opt_state": f"nvme:{ro}"}))
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    with pytest.raises(ValueError, match=r"has 0.00 GiB free; the state needs"):
        fz.init(tiny_gpt(), optim.adamw(1e-3), fz.zero(2, placement={"opt_state": f"nvme:{tmp_path}/ok"}))


# --- the pipelined host update (funzero/_placement/_host.py) -----------------------------------
# A fused optimizer (plain adamw) takes the pipelined path: gradients copied out per group, a
# worker thread updating group by group, parameters copied back. On CPU the copies are plain
# copies, the worker thread and its ordering are the real ones.
PIPE_CASES = [
    (1, {"opt_state": "cpu"}, "bf16"),
    (2, {"opt_state": "cpu"}, "bf16"),
    (2, {"opt_state": "cpu"}, "fp16"),
    (2, {"opt_state": "cpu"}, "bf16+clip"),  # the clip coefficient is global, the update per group
    (3, {"opt_state": "cpu"}, "bf16"),
    (3, {"opt_state": "cpu", "params": "cpu"}, "bf16+clip"),
    (2, {"opt_state": [(B0, "device"), ("", "cpu")]}, "bf16+clip"),
    (1, {"opt_state": [(B1, "device"), ("", "cpu")]}, "fp16"),
    (3, {"params": "cpu", "opt_state": [(B0, "device"), ("", "cpu")]}, "bf16"),
]


def _precision(name):
    return fz.bf16() if name.startswith("bf16") else fz.fp16(initial_scale_power=8)


def _tx(name):
    tx = optim.adamw(1e-2, weight_decay=0.1, mask=r"weight$")
    # max_norm small enough that every step clips (a per-group norm would give other bits)
    return optim.chain(optim.clip_by_global_norm(0.05), tx) if name.endswith("+clip") else tx


def _pipelined(rank, world, cases, steps, mode):
    delayed = mode == "delayed"
    out = {}
    for stage, placement, prec in cases:
        runs = {}
        lagged = set()  # the groups a delayed update lags: those the host updates
        for name, pl, dpu in (("placed", placement, delayed), ("default", {}, False)):
            model = tiny_gpt()
            plan = fz.zero(stage, groups=GROUPS, placement=pl, delayed_update=dpu,
                           async_update=mode == "async" and name == "placed")
            tx = _tx(prec)
            state = fz.init(model, tx, plan, precision=_precision(prec))
            step = fz.train_step(model, lm_loss, tx, plan)
            # The device-placed reference packs each group's gradient like the host path does:
            # a clip norm summed per leaf (one-rank eager steps) would give other bits.
            testing.set_leaf_grads(step, False)
            assert testing.route(step, state).pipelined == (name == "placed")
            if name == "placed":
                lagged = {g for g in state.binding.layouts if state.binding.placement.offloaded("opt_state", g)}
            hist = [{g: t.clone() for g, t in state.params.items()}]
            misplaced = [testing.misplaced(state)]
            for i, b in enumerate(batches(steps)):
                if delayed and name == "default":
                    # Emulate the delayed update with the ordinary step: compute step t's gradient
                    # at the parameters from before step t-1's update (groups updated on the
                    # host; those on the device update at once).
                    for g in lagged:
                        state.params[g].copy_(hist[max(0, i - 1)][g])
                state, _ = step(state, b)
                if delayed and name == "default":
                    hist.append({g: t.clone() for g, t in state.params.items()})
                misplaced.append(testing.misplaced(state))
            fz.sync(state)
            if delayed and name == "default":
                for g, t in state.params.items():
                    t.copy_(hist[-1][g])
            runs[name] = (fz.gather_params(state, plan), misplaced, [t.clone() for t in _leaves(state.params)], int(state.step))
        out[(stage, str(placement), prec)] = runs
    return out


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("mode", ["exact", "delayed", "async"])
def test_pipelined_host_update_is_bit_identical(world, mode):
    """Pipelined and async: same bits as the device-placed step. Delayed: same bits as the
    device-placed step fed the parameters from before the previous update (ZeRO-Offload's DPU,
    emulated)."""
    res = run_world(_pipelined, world, PIPE_CASES, 4, mode)[0]
    for key, runs in res.items():
        want, _, want_params, want_step = runs["default"]
        got, misplaced, got_params, got_step = runs["placed"]
        assert all(not m for m in misplaced), (key, misplaced)
        assert got_step == want_step, key
        for k in want:
            assert torch.equal(got[k], want[k]), (key, k, (got[k] - want[k]).abs().max())
        assert all(torch.equal(a, b) for a, b in zip(got_params, want_params)), key


def test_delayed_update_changes_the_trajectory_and_sync_is_needed():
    """The emulation above could pass vacuously if 'delayed' did nothing: it must differ."""
    finals = {}
    for dpu in (False, True):
        state, plan = train_tiny(tiny_gpt(), 3, placement={"opt_state": "cpu"}, delayed_update=dpu)
        before = [t.clone() for t in state.params.values()]
        fz.sync(state)
        changed = any(not torch.equal(a, b) for a, b in zip(before, state.params.values()))
        assert changed == dpu  # only a delayed update still has parameters to copy in
        finals[dpu] = fz.gather_params(state, plan)
    assert any(not torch.equal(finals[False][k], finals[True][k]) for k in finals[False])


def test_delayed_update_errors_name_the_problem():
    with pytest.raises(ValueError, match="delayed_update=True needs placement opt_state='cpu'"):
        fz.zero(2, delayed_update=True)
    model = tiny_gpt()
    plan = fz.zero(2, groups=GROUPS, placement={"opt_state": "cpu"}, delayed_update=True)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.lion(1e-3))
    state = fz.init(model, tx, plan, precision=fz.bf16())
    with pytest.raises(ValueError, match="needs an optimizer whose update runs group by group"):
        fz.train_step(model, lm_loss, tx, plan)(state, batches(1)[0])


def test_a_failing_host_update_raises_in_the_caller(monkeypatch):
    from funzero import ops

    model = tiny_gpt()
    plan = fz.zero(2, groups=GROUPS, placement={"opt_state": "cpu"})
    tx = optim.adamw(1e-2)
    state = fz.init(model, tx, plan, precision=fz.bf16())

    def boom(*a, **k):
        raise OSError("injected")

    monkeypatch.setattr(ops, "adamw_", boom)
    with pytest.raises(RuntimeError, match="host optimizer update failed") as e:
        fz.train_step(model, lm_loss, tx, plan)(state, batches(1)[0])
    assert isinstance(e.value.__cause__, OSError)


@pytest.mark.parametrize("clip,nonfinite", [(False, "ignore"), (True, "ignore"), (False, "skip")])
def test_gradients_leave_during_backward_when_nothing_global_is_needed(clip, nonfinite):
    model = tiny_gpt()
    plan = fz.zero(2, groups=GROUPS, placement={"opt_state": "cpu"})
    tx = _tx("bf16+clip" if clip else "bf16")
    state = fz.init(model, tx, plan, precision=fz.bf16())
    step = fz.train_step(model, lm_loss, tx, plan, nonfinite=nonfinite)
    with testing.host_events(state) as events:
        state, _ = step(state, batches(1)[0])
    inside = [e.in_backward for e in events if e.kind == "issue"]
    n = len(state.binding.layouts)
    # Every group streams from inside backward, unless something global must come first: a clip
    # norm, or the non-finite check (which needs every gradient before any update).
    assert inside == [not clip and nonfinite == "ignore"] * n


def test_a_step_that_fails_in_forward_leaves_the_next_step_working():
    model = tiny_gpt()
    plan = fz.zero(2, groups=GROUPS, placement={"opt_state": "cpu"})
    tx = optim.adamw(1e-2)
    state = fz.init(model, tx, plan, precision=fz.bf16())
    calls = [0]

    def flaky(apply, batch):
        calls[0] += 1
        if calls[0] == 1:
            raise ValueError("bad batch")
        return lm_loss(apply, batch)

    step = fz.train_step(model, flaky, tx, plan)
    with pytest.raises(ValueError, match="bad batch"):
        step(state, batches(1)[0])
    state, m = step(state, batches(1)[0])
    assert torch.isfinite(m["loss"]) and int(state.step) == 1


# --- leaf-path placement rules -------------------------------------------------------------------
def test_rules_send_exactly_the_offloaded_groups_to_the_host():
    """Groups whose state a rule keeps on the device never reach the host update."""
    for tx_name in ("bf16", "bf16+clip"):  # streamed from backward, and after a global prefix
        model = tiny_gpt()
        plan = fz.zero(2, groups=GROUPS, placement={"opt_state": [(B0, "device"), ("", "cpu")]})
        tx = _tx(tx_name)
        state = fz.init(model, tx, plan, precision=fz.bf16())
        pl = state.binding.placement
        assert pl.kind("opt_state") == "mixed" and pl.kinds("opt_state") == {"device", "cpu"}
        assert [pl.kind("opt_state", g) for g in state.binding.layouts] == ["cpu", "device", "cpu"]
        step = fz.train_step(model, lm_loss, tx, plan)
        with testing.host_events(state) as events:
            for b in batches(2):
                state, m = step(state, b)
        issued = [e.group for e in events if e.kind == "issue"]
        assert torch.isfinite(m["loss"])
        assert sorted(issued) == sorted(["rest", "blocks.1"] * 2), (tx_name, issued)


def test_bad_placement_rules_name_the_leaf_group_or_rule():
    model = tiny_gpt()

    def init(placement, stage=2, tx=None):
        plan = fz.zero(stage, groups=GROUPS, placement=placement)
        return fz.init(tiny_gpt(), tx or optim.adamw(1e-3), plan, precision=fz.bf16()), plan

    with pytest.raises(ValueError, match=r"leaf 'wte.weight' is matched by no rule"):
        init({"opt_state": [(B0, "device"), (B1, "cpu")]})
    with pytest.raises(ValueError, match=r"puts group 'blocks.0' in two places: leaf 'blocks.0.ln_1.weight' on 'device', leaf 'blocks.0.attn"):
        init({"opt_state": [(r"^blocks\.0\.ln", "device"), ("", "cpu")]})
    with pytest.raises(ValueError, match=r"rule 'nope' matches no leaf path"):
        init({"opt_state": [("nope", "device"), ("", "cpu")]})
    with pytest.raises(ValueError, match=r"rule \('x',\) is not a \(regex, where\) pair"):
        fz.zero(2, placement={"opt_state": [("x",)]})
    with pytest.raises(ValueError, match=r"rule '\(' is not a valid regex"):
        fz.zero(2, placement={"opt_state": [("(", "cpu")]})
    with pytest.raises(ValueError, match=r"must be a string or a non-empty list"):
        fz.zero(2, placement={"opt_state": []})
    with pytest.raises(ValueError, match=r"params='cpu' needs ZeRO stage 3"):
        fz.zero(2, placement={"params": [(B0, "cpu"), ("", "device")]})
    with pytest.raises(ValueError, match=r"'gpu' is not one of"):
        fz.zero(2, placement={"opt_state": [(B0, "gpu"), ("", "cpu")]})
    # A mixed placement needs the per-group update: lion has none.
    state, plan = init({"opt_state": [(B0, "device"), ("", "cpu")]}, tx=optim.lion(1e-3))
    with pytest.raises(ValueError, match="placement rules that split opt_state between the device and the host"):
        fz.train_step(model, lm_loss, optim.lion(1e-3), plan)(state, batches(1)[0])
    # delayed_update needs a cpu group and no NVMe one
    with pytest.raises(ValueError, match="delayed_update=True needs placement opt_state='cpu'"):
        fz.zero(2, placement={"opt_state": [(B0, "device"), ("", "nvme:/tmp")]}, delayed_update=True)
    fz.zero(2, placement={"opt_state": [(B0, "device"), ("", "cpu")]}, delayed_update=True)


def test_a_group_leaves_as_soon_as_its_backward_is_done():
    """Not at the end of backward: blocks.1 goes to the host before backward reaches the input
    of blocks.0 (views that pack a flat buffer made before forward would run their backward
    last, so a hook on the group's flat gradient would fire only once backward is over)."""
    events = []
    model = tiny_gpt()

    def watch_input(module, args):
        if args[0].requires_grad:
            args[0].register_hook(lambda grad: events.append("grad at the input of blocks.0"))

    model.blocks[0].register_forward_pre_hook(watch_input)
    plan = fz.zero(2, groups=GROUPS, placement={"opt_state": "cpu"})
    tx = optim.adamw(1e-2)
    state = fz.init(model, tx, plan, precision=fz.bf16())

    def on_event(e):
        if e.kind == "issue":
            events.append(f"issue {e.group}")

    with testing.host_events(state, on_event=on_event):  # streaming: no non-finite check first
        fz.train_step(model, lm_loss, tx, plan, nonfinite="ignore")(state, batches(1)[0])
    assert events.index("issue blocks.1") < events.index("grad at the input of blocks.0"), events
    assert sorted(e for e in events if e.startswith("issue")) == ["issue blocks.0", "issue blocks.1", "issue rest"]


def _slow_host_update(state, seconds: float, events: list):
    """Each host group update of ``state``'s binding sleeps first, then ``"updated <group>"`` is
    appended to ``events``."""
    def on_event(e):
        if e.kind == "update":
            events.append(f"updated {e.group}")

    return testing.host_events(state, delay=seconds, on_event=on_event)


def test_async_update_overlaps_the_next_forward_and_waits_per_group():
    """async_update: the step returns while its host update runs; the next forward runs each
    module only after its group's update (and copy in) is done, and starts before the whole
    update is done."""
    events = []
    for async_update in (False, True):
        events.clear()
        model = tiny_gpt()
        for name in ("wte", "blocks.0", "blocks.1"):
            model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: events.append(f"forward {name}"))
        plan = fz.zero(2, groups=GROUPS, placement={"opt_state": "cpu"}, async_update=async_update)
        tx = optim.adamw(1e-2)
        state = fz.init(model, tx, plan, precision=fz.bf16())
        step = fz.train_step(model, lm_loss, tx, plan)
        b = batches(2)
        with _slow_host_update(state, 0.2, events):
            state, _ = step(state, b[0])
            events.append("returned")
            first = events.index("returned")
            state, _ = step(state, b[1])
            fz.sync(state)
        second = events[first + 1 :]
        updated_first = [e for e in events[:first] + second if e.startswith("updated")][:3]
        assert sorted(updated_first) == ["updated blocks.0", "updated blocks.1", "updated rest"]
        if not async_update:
            assert all(e.startswith("forward") or e.startswith("updated") for e in events[:first])
            assert sum(e.startswith("updated") for e in events[:first]) == 3  # all done before return
            continue
        assert sum(e.startswith("updated") for e in events[:first]) < 3, events  # returned early
        # each module of the second forward runs after its own group's first update ...
        for mod, g in (("wte", "rest"), ("blocks.0", "blocks.0"), ("blocks.1", "blocks.1")):
            assert events.index(f"updated {g}") < events.index(f"forward {mod}", first), (mod, events)
        # ... and the second forward starts before the first update is over
        last_update = max(events.index(e) for e in updated_first)
        assert events.index("forward wte", first) < last_update, events


def test_async_update_errors_name_the_problem():
    with pytest.raises(ValueError, match="async_update=True needs placement opt_state='cpu'"):
        fz.zero(2, async_update=True)
    with pytest.raises(ValueError, match="async_update=True needs .* got placement=.*nvme"):
        fz.zero(2, placement={"opt_state": "nvme:/tmp"}, async_update=True)
    with pytest.raises(ValueError, match="delayed_update=True"):
        fz.zero(2, placement={"opt_state": "cpu"}, async_update=True, delayed_update=True)


def test_save_state_right_after_an_async_step_saves_the_finished_update(tmp_path):
    """save_state waits for the update still running (the step returned before it finished)."""
    loaded = {}
    for async_update in (False, True):
        model = tiny_gpt()
        plan = fz.zero(2, groups=GROUPS, placement={"opt_state": "cpu"}, async_update=async_update)
        state = fz.init(model, optim.adamw(1e-2), plan, precision=fz.bf16())
        step = fz.train_step(model, lm_loss, optim.adamw(1e-2), plan)
        with _slow_host_update(state, 0.1, []):
            for b in batches(2):
                state, _ = step(state, b)
            fz.save_state(state, plan, str(tmp_path / f"ckpt{async_update}"))
        fresh = fz.init(tiny_gpt(seed=1), optim.adamw(1e-2), plan, precision=fz.bf16())
        fresh = fz.load_state(fresh, plan, str(tmp_path / f"ckpt{async_update}"))
        loaded[async_update] = (fz.gather_params(fresh, plan), [t.clone() for t in _leaves(fresh.opt_state)])
    (p0, o0), (p1, o1) = loaded[False], loaded[True]
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    assert all(torch.equal(a, b) for a, b in zip(o0, o1))
