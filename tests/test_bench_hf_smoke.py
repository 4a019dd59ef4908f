"""benchmarks/hf_models.py --smoke end to end on the CPU: a process per system, A-B-A, JSON, chart.

The GPU figures come from the same script (benchmarks/NOTES.md, hf_models); this only checks that
one call of it gives the whole table: every row there, the reference twice, the same initial
weights and tokens in every system. (A system that cannot run, such as fz2-eager-patched where
funzero.ops.patch is missing, gives a "not available: ..." row: the full --smoke shows it.)
"""

import json
import os
import sys

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import hf_models  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_smoke_rows_json_and_chart(tmp_path):
    assert hf_models.main(["--smoke", "--systems", "torch-eager,fz2-eager", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "hf_models.json").read_text())["rows"]
    assert [r["system"] for r in rows] == ["torch-eager", "fz2-eager", "torch-eager"]
    ref, fz, ref2 = rows
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        assert r["params"] == 139_584 and len(r["losses"]) == 4 and r["tokens_per_s"] > 0
    assert ref["reference"] and ref2["reference"] and not fz["reference"]
    assert (ref["compile_cache"], fz["compile_cache"], ref2["compile_cache"]) == ("cold", "cold", "the first reference run's")
    assert ref["losses"] == ref2["losses"]  # same process recipe, same seed: bit for bit on the CPU
    assert fz["loss_step1"] == pytest.approx(ref["loss_step1"], abs=5e-3)  # same weights and tokens (fp32 vs autocast)
    assert (tmp_path / "hf_models.png").stat().st_size > 0
    assert len(list((tmp_path / "logs").iterdir())) == 3
