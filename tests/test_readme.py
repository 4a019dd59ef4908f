"""The README's "Bring your own model" snippets run as written, on a tiny local Llama config, and
its "Planning a 70B run" table is what the command it names prints.

Only the paths are replaced (a temporary directory for ``path/to/llama`` and ``out/llama``),
``batches`` is given, and the step runs eagerly (compiling costs a minute of CPU;
``tests/test_remat.py`` compiles the same step); the code between is the README's, so the
documentation cannot drift from the API.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

_README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _snippets(section: str) -> list[str]:
    with open(_README) as f:
        text = f.read()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


@pytest.mark.slow
def test_bring_your_own_model_runs_as_written(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                tie_word_embeddings=False).save_pretrained(tmp_path / "llama")
    code = _snippets("Bring your own model")
    assert len(code) == 2, "the test follows the README's two snippets"
    code = [c.replace('"path/to/llama"', repr(str(tmp_path / "llama")))
             .replace('"out/llama"', repr(str(tmp_path / "out"))).replace("fz.compile(", "(") for c in code]
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(2)]
    scope: dict = {"batches": [(x, x) for x in ids]}
    exec(compile(code[0], "README.md", "exec"), scope)
    exec(compile(code[1], "README.md", "exec"), scope)
    fz, state, plan, metrics = scope["fz"], scope["state"], scope["plan"], scope["metrics"]
    assert int(state.step) == 2 and torch.isfinite(metrics["loss"])
    trained = fz.gather_weights(state, plan, names="state_dict")
    loaded = scope["model"].state_dict()
    assert sorted(loaded) == sorted(trained)
    for k, v in trained.items():  # from_pretrained gives back what training made (saved in bf16)
        assert torch.equal(loaded[k], v.to(torch.bfloat16).to(loaded[k].dtype)), k


def _sequence_parallel_snippet(rank, world, code):
    import funzero as fz
    from tests.test_sequence import _llama

    g = torch.Generator().manual_seed(0)
    scope: dict = {
        "torch": torch, "fz": fz, "Mesh": __import__("shardspec").Mesh, "model": _llama().float(),
        "tx": fz.optim.adamw(1e-2), "input_ids": torch.randint(0, 64, (4, 16), generator=g),
    }
    exec(compile(code, "README.md", "exec"), scope)
    state, metrics = scope["step"](fz.init(scope["model"], scope["tx"], scope["plan"]), scope["b"])
    return int(state.step), float(metrics["loss"]), scope["b"].input_ids.shape


def test_sequence_parallel_snippet_runs_as_written_on_four_ranks():
    """The README's sequence-parallel snippet, on 2 x 2 gloo ranks: each rank steps on its
    (B/dp, T/sp) piece and every rank reports the same (global) loss."""
    from tests._dist import run_world

    (code,) = _snippets("Sequence parallelism")
    out = run_world(_sequence_parallel_snippet, 4, code)
    assert {(step, tuple(shape)) for step, _, shape in out} == {(1, (2, 8))}
    losses = [loss for _, loss, _ in out]
    assert losses[0] > 0 and all(loss == losses[0] for loss in losses)


def test_planning_table_is_what_the_named_command_prints():
    """The 70B table is ``benchmarks/plan_table.py``'s output (the planner on a meta Llama with
    Llama-3-70B shapes), caption and rows, not numbers typed by hand."""
    import runpy

    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "plan_table.py")
    want = runpy.run_path(script)["table"]()
    with open(_README) as f:
        text = f.read()
    start = text.index("## Planning a 70B run\n")
    section = text[start:text.find("\n## ", start + 1)]
    assert "`python benchmarks/plan_table.py` prints this table" in section
    assert want in section, want
