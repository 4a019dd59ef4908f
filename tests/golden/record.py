"""Write tests/golden/scenarios.json: digests of every scenario in tests/_golden.py.

    .venv/bin/python -m tests.golden.record

Run it only to pin a deliberate change of numerics (and say why in the commit).
"""

from __future__ import annotations

import json
import os
import sys

from tests._dist import run_world
from tests._golden import PINNED_ENV, SCENARIOS, WORLDS


def main() -> None:
    os.environ.update(PINNED_ENV)  # read by torch in the spawned ranks
    out = {"machine": run_world(_machine, 1)[0], "worlds": {}}
    for world in WORLDS:
        out["worlds"][str(world)] = run_world(_all, world, sorted(SCENARIOS), timeout=900)[0]
    path = os.path.join(os.path.dirname(__file__), "scenarios.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    print(f"wrote {path}: {len(SCENARIOS)} scenarios x worlds {WORLDS}", file=sys.stderr)


def _machine(rank, world):
    from tests._golden import machine

    return machine()


def _all(rank, world, names):
    from tests._golden import run_all

    return run_all(rank, world, names)


if __name__ == "__main__":
    main()
