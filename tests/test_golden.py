"""The engine trains fixed scenarios to the bits recorded before the issue-19 redesign.

``tests/_golden.py`` lists the scenarios: stages 0-3 x fp32/bf16/fp16 on one and two gloo
ranks, clipping, accumulation, optimizers that take the chain path, and every placement the
engine has (host memory, NVMe files, leaf-path rules, async and delayed host updates).
``tests/golden/scenarios.json`` holds SHA-256 digests of every gathered parameter and of rank
0's parameter buffers, recorded by ``tests/golden/record.py`` from the engine as it stood at
commit ef49f9c. A change that moves any bit of any scenario fails here, naming the leaves.
"""

from __future__ import annotations

import json
import os

import pytest

from tests._dist import run_world
from tests._golden import PINNED_ENV, SCENARIOS, WORLDS

_RECORDED = os.path.join(os.path.dirname(__file__), "golden", "scenarios.json")


def _all(rank, world, names):
    from tests._golden import machine, run_all

    out = run_all(rank, world, names)
    return {"machine": machine(), "scenarios": out}


@pytest.fixture(scope="module")
def recorded():
    with open(_RECORDED) as f:
        return json.load(f)


@pytest.mark.parametrize("world", WORLDS)
def test_scenarios_train_to_the_recorded_bits(world, recorded, monkeypatch):
    for k, v in PINNED_ENV.items():
        monkeypatch.setenv(k, v)  # the spawned ranks dispatch the kernels the recording did
    got = run_world(_all, world, sorted(SCENARIOS), timeout=900, fresh=True)[0]  # env read at import
    assert got["machine"] == recorded["machine"], (
        f"the digests were recorded with {recorded['machine']}, this machine runs {got['machine']}: "
        "bits are only comparable under the same torch and CPU kernels"
    )
    want = recorded["worlds"][str(world)]
    assert sorted(got["scenarios"]) == sorted(want)
    wrong = {}
    for name, w in want.items():
        g = got["scenarios"][name]
        bad = sorted(k for k in w["leaves"] if g["leaves"].get(k) != w["leaves"][k])
        if bad or g["step"] != w["step"] or g["losses"] != w["losses"]:
            wrong[name] = dict(leaves=bad[:4], num_leaves=len(bad), step=(g["step"], w["step"]),
                               losses=(g["losses"], w["losses"]))
    assert not wrong, json.dumps(wrong, indent=1)
