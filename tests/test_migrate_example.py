"""examples/migrate_deepspeed.py: the seeds' DeepSpeed snippet moved to fz.initialize runs and learns."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path


def test_migration_example_runs_and_the_loss_goes_down():
    script = Path(__file__).resolve().parents[1] / "examples" / "migrate_deepspeed.py"
    out = subprocess.run([sys.executable, str(script), "--steps", "30", "--seq", "16", "--train-batch-size", "32"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    losses = [float(m) for m in re.findall(r"loss ([0-9.]+)", out.stdout)]
    assert len(losses) >= 3 and all(math.isfinite(v) for v in losses), out.stdout
    assert losses[-1] < losses[0] - 0.2, out.stdout
