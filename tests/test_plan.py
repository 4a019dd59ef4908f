"""Plans are specs: the stage table, what the specs allow, and that nothing else reads a stage."""

from __future__ import annotations

import pathlib
import re

import pytest

import funzero as fz
from funzero import optim, testing
from shardspec import Replicate, Shard
from tests._models import GROUPS, batches, lm_loss, tiny_gpt


def test_the_stage_table_is_the_zero_paper():
    """Rajbhandari et al. 2020, sec. 5: P_os (1), P_os+g (2), P_os+g+p (3); stage 1 reduces once
    per optimizer step, the others in backward."""
    want = {
        0: (Replicate("dp"), Replicate("dp"), Replicate("dp"), "backward"),
        1: (Replicate("dp"), Shard("dp"), Shard("dp"), "step"),
        2: (Replicate("dp"), Shard("dp"), Shard("dp"), "backward"),
        3: (Shard("dp"), Shard("dp"), Shard("dp"), "backward"),
    }
    for stage, (params, grads, opt, when) in want.items():
        specs = fz.zero(stage).specs
        assert (specs.params, specs.grads, specs.opt_state, specs.reduce) == (params, grads, opt, when), stage
    assert fz.zero(3, axis="dp").specs.axis == "dp"


@pytest.mark.parametrize("bad", [4, -1, 2.0, True, "2", None])
def test_a_stage_that_is_not_an_int_0_to_3_is_refused(bad):
    with pytest.raises(ValueError, match=re.escape(f"got stage={bad!r}")):
        fz.zero(bad)


def test_specs_that_cannot_train_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"grads=Shard\('dp'\) differs from opt_state=Replicate\(\)"):
        fz.StateSpecs(Replicate(), Shard(), Replicate())
    with pytest.raises(ValueError, match=r"sharded params=Shard\('dp'\) need a sharded opt_state"):
        fz.StateSpecs(Shard(), Replicate(), Replicate())
    with pytest.raises(ValueError, match="reduce must be one of"):
        fz.StateSpecs(Replicate(), Replicate(), Replicate(), "later")
    with pytest.raises(ValueError, match=r"grads=Shard\('dp', dim=1\): flat group buffers have one dimension"):
        fz.StateSpecs(Replicate(), Shard("dp", dim=1), Shard("dp", dim=1))  # a leaf's spec may split dim 1, a buffer's not
    with pytest.raises(ValueError, match=r"axes \['dp', 'tp'\]"):
        fz.StateSpecs(Replicate("tp"), Shard("dp"), Shard("dp"))


def test_no_module_but_the_plan_compares_a_stage_number():
    """The stage is a label outside the table: code reads specs (user-facing messages and the
    checks that a given stage agrees with a given plan aside)."""
    root = pathlib.Path(fz.__file__).parent
    pattern = re.compile(r"\bstage\s*(==|!=|>=|<=|<|>)\s*\d|\bstage\s+in\s*\(")
    found = []
    for f in root.rglob("*.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if pattern.search(code) and '"' not in code and "'" not in code:
                found.append(f"{f.relative_to(root)}:{i}: {line.strip()}")
    assert not found, found


def test_named_chain_keeps_the_pipelined_host_update():
    """named_chain once rebuilt its fused pass without the per-group capability, so an
    offloaded step silently fell back to the whole-tree host update."""
    for tx in (optim.adamw(1e-2), optim.named_chain(("adamw", optim.adamw(1e-2)))):
        model = tiny_gpt()
        plan = fz.zero(2, groups=GROUPS, placement={"opt_state": "cpu"})
        state = fz.init(model, tx, plan, precision=fz.bf16())
        step = fz.train_step(model, lm_loss, tx, plan)
        assert testing.route(step, state).pipelined
        with testing.host_events(state) as events:
            state, _ = step(state, batches(1)[0])
        assert sorted(e.group for e in events if e.kind == "update") == sorted(state.binding.layouts)
