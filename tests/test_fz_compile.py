"""fz.compile: the persistent-reduction limit it moves, that the compiler sees it, and that it
leaves nothing behind."""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.nn.functional as F

import funzero as fz
from funzero._inductor_choices import WideRows


class _Features:
    """The two things inductor's persistent-reduction choice reads from a kernel's features."""

    def __init__(self, numel: int, hint) -> None:
        self.reduction_numel = sympy.Integer(numel)
        self.hint = hint

    def get_reduction_hint(self):
        return self.hint


def _decisions(choices, hint, sizes):
    from torch._inductor.graph import GraphLowering
    from torch._inductor.virtualized import V

    with V.set_graph_handler(GraphLowering(torch.fx.symbolic_trace(lambda x: x + 1))):
        return [choices.should_use_persistent_reduction(_Features(n, hint), False) for n in sizes]


def test_rows_up_to_the_limit_are_persistent_the_rest_is_inductors_choice():
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint

    sizes = (512, 1024, 1600, 2048, 2049, 4096)
    assert _decisions(InductorChoices(), ReductionHint.INNER, sizes) == [True, True, False, False, False, False]
    assert _decisions(WideRows(2048), ReductionHint.INNER, sizes) == [True, True, True, True, False, False]
    assert _decisions(WideRows(4096), ReductionHint.INNER, sizes) == [True] * 6
    # reductions across rows (OUTER) keep inductor's answer
    assert _decisions(WideRows(2048), ReductionHint.OUTER, sizes) == _decisions(InductorChoices(), ReductionHint.OUTER, sizes)
    assert WideRows(2048).uuid() != WideRows(4096).uuid()  # the compiled-graph cache tells them apart


def test_the_compiler_sees_the_heuristics_even_after_an_earlier_compile_and_nothing_stays():
    """Inductor keeps the first heuristics object a thread asks for; fz.compile must win over it
    while its function runs, and leave the thread's own object in place afterwards."""
    from torch._inductor.virtualized import V

    torch._dynamo.reset()
    torch.compile(lambda x: x.sin(), backend="eager")(torch.randn(3))  # an earlier compile
    before = V.choices
    seen = []

    def backend(gm, example_inputs):
        seen.append(V.choices)
        return gm.forward

    step = fz.compile(lambda x: (x * 2).cos(), backend=backend, max_persistent_row=4096)
    torch.testing.assert_close(step(torch.ones(4)), torch.full((4,), 2.0).cos())
    assert len(seen) == 1 and isinstance(seen[0], WideRows) and seen[0].limit == 4096
    assert V.choices is before


def test_compiled_with_inductor_matches_eager():
    torch._dynamo.reset()
    x, w, b = torch.randn(6, 1600), torch.randn(1600), torch.randn(1600)

    def fn(x, w, b):
        y = x + 1.0
        return y, F.layer_norm(y, (1600,), w, b)

    got = fz.compile(fn)(x, w, b)
    for g, e in zip(got, fn(x, w, b)):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("bad", [512, 1023, 2048.0, True, "2048"])
def test_bad_limit_is_named(bad):
    with pytest.raises(ValueError, match=r"max_persistent_row must be an int >= 1024 .* got " + repr(bad).replace(".", r"\.")):
        fz.compile(lambda x: x, max_persistent_row=bad)


def test_compiled_train_step_trains_like_the_eager_one():
    """The wrapper hands state and batch through unchanged: fz.compile(train_step) ends where the
    eager step does (float64, one process, stage 2; aot_eager: inductor's own train-step
    compile is tests/test_compile.py's)."""
    from tests._models import GROUPS, batches, lm_loss, tiny_gpt

    out = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = tiny_gpt(dtype=torch.float64)
        plan = fz.zero(2, groups=GROUPS)
        tx = fz.optim.adamw(1e-2, weight_decay=0.1)
        state = fz.init(model, tx, plan, precision=fz.Precision(torch.float64))
        step = fz.train_step(model, lm_loss, tx, plan)
        if compiled:
            step = fz.compile(step, backend="aot_eager")
        for b in batches(2):
            state, metrics = step(state, b)
        out[compiled] = fz.gather_params(state, plan)
    for k, want in out[False].items():
        torch.testing.assert_close(out[True][k], want, rtol=1e-10, atol=1e-12)
