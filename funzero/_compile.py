"""Inductor options for compiling a funzero step.

Inductor turns a row reduction (a LayerNorm over the model width, say) into a *persistent*
kernel, which holds each row in registers and reads it once, only while the row has at most
1024 elements; wider rows get a looped kernel that reads them twice (statistics, then the
normalised output). At GPT-2 XL's width (1600) that second read is what separates the two:
on an H100 the residual add + LayerNorm forward of an 8192 x 1600 bf16 batch takes 37 us
persistent against 44 us looped (benchmarks/NOTES.md). :func:`inductor_options` raises the
limit for inner (row) reductions; every other choice stays inductor's.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["inductor_options"]

_DEFAULT_ROW = 2048  # measured at 1600 (H100); inductor's own limit is 1024


@functools.cache
def _choices_class():
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint

    class WideRows(InductorChoices):
        """Inductor's heuristics, with persistent row reductions up to ``limit`` elements."""

        limit = _DEFAULT_ROW

        def should_use_persistent_reduction(self, features, cooperative_reduction: bool) -> bool:
            if (config.triton.persistent_reductions and not cooperative_reduction
                    and features.get_reduction_hint() == ReductionHint.INNER
                    and _known_leq(features.reduction_numel, self.limit)):
                return True
            return super().should_use_persistent_reduction(features, cooperative_reduction)

        def uuid(self) -> str:  # the compiled-graph cache key (torch >= 2.12 asks for it)
            return f"funzero.WideRows(limit={self.limit})"

    return WideRows


def _known_leq(numel: Any, limit: int) -> bool:
    """Whether ``numel`` (an int or a sympy expression) is known to be at most ``limit``."""
    try:
        return int(numel) <= limit
    except TypeError:  # symbolic
        from torch._inductor.virtualized import V

        return bool(V.graph.sizevars.statically_known_leq(numel, limit))


def inductor_options(max_persistent_row: int = _DEFAULT_ROW) -> dict:
    """Options for ``torch.compile(step, options=...)``: persistent row reductions up to
    ``max_persistent_row`` elements (inductor stops at 1024).

    Rows of 1025 to 2048 elements (LayerNorm or RMSNorm over a model width in that range) then
    compile to one read of each row instead of two. The choice is made per compile, nothing
    global changes. On torch < 2.12 the compiled-graph cache does not tell these options apart
    from the defaults: compile one function either always with them or always without, or turn
    the cache off (``fx_graph_cache=False``) when comparing.

    Args:
        max_persistent_row: the widest row (elements) reduced by a persistent kernel; at least
            1024, inductor's own limit.

    Returns:
        A dict for ``options=``; merge your own inductor options into it.

    Example:
        >>> step = torch.compile(fz.train_step(model, loss_fn, tx, plan), options=fz.inductor_options())
    """
    if isinstance(max_persistent_row, bool) or not isinstance(max_persistent_row, int) or max_persistent_row < 1024:
        raise ValueError(f"max_persistent_row must be an int >= 1024 (inductor's own limit), got {max_persistent_row!r}")
    from torch._inductor import config

    if not hasattr(config, "inductor_choices_class"):
        raise RuntimeError(f"this torch ({__import__('torch').__version__}) has no inductor_choices_class option; "
                           "inductor_options needs torch >= 2.11")
    base = _choices_class()
    cls = type("WideRows", (base,), {"limit": max_persistent_row})
    return {"inductor_choices_class": cls}
