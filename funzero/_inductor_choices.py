"""The inductor heuristics behind :func:`funzero.compile` (imported only when asked for:
it imports inductor). Module level, so the compiled-graph cache can pickle a reference to it."""

from __future__ import annotations

from torch._inductor import config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V


class WideRows(InductorChoices):
    """Inductor's heuristics, with persistent row reductions up to ``limit`` elements."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def should_use_persistent_reduction(self, features, cooperative_reduction: bool) -> bool:
        if (config.triton.persistent_reductions and not cooperative_reduction
                and features.get_reduction_hint() == ReductionHint.INNER
                and V.graph.sizevars.statically_known_leq(features.reduction_numel, self.limit)):
            return True
        return super().should_use_persistent_reduction(features, cooperative_reduction)

    def uuid(self) -> str:  # the compiled-graph cache key (torch >= 2.12 asks for it)
        return f"funzero.WideRows(limit={self.limit})"

