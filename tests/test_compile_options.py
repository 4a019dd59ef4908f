"""funzero.inductor_options: the persistent-reduction limit it moves, and that torch.compile takes it."""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.nn.functional as F

import funzero as fz


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
    wide = fz.inductor_options()["inductor_choices_class"]()
    assert _decisions(wide, ReductionHint.INNER, sizes) == [True, True, True, True, False, False]
    wider = fz.inductor_options(max_persistent_row=4096)["inductor_choices_class"]()
    assert _decisions(wider, ReductionHint.INNER, sizes) == [True] * 6
    # reductions across rows (OUTER) keep inductor's answer
    assert (_decisions(wide, ReductionHint.OUTER, sizes)
            == _decisions(InductorChoices(), ReductionHint.OUTER, sizes))
    assert wide.uuid() != wider.uuid()  # the compiled-graph cache tells them apart (torch >= 2.12)


def test_torch_compile_takes_the_options():
    torch._dynamo.reset()
    x, w, b = torch.randn(6, 1600), torch.randn(1600), torch.randn(1600)

    def fn(x, w, b):
        y = x + 1.0
        return y, F.layer_norm(y, (1600,), w, b)

    got = torch.compile(fn, options=fz.inductor_options())(x, w, b)
    want = fn(x, w, b)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("bad", [512, 1023, 2048.0, True, "2048"])
def test_bad_limit_is_named(bad):
    with pytest.raises(ValueError, match="max_persistent_row"):
        fz.inductor_options(max_persistent_row=bad)
