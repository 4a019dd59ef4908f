"""The example GPT: activation recompute keeps the numbers."""

from __future__ import annotations

import pytest
import torch

import funzero as fz
from funzero.models import GPTConfig
from tests._models import tiny_gpt, train_tiny


def test_recompute_trains_to_the_same_bits():
    """Recomputed blocks (what they save: tests/test_memory.py) under funzero's step, synchronous
    and async: backward runs after the step's functional_call has returned, so a recompute that
    used the module's own parameters would differ."""
    finals = {}
    for k in (0, 2):
        for async_update in (False, True):
            state, plan = train_tiny(tiny_gpt(recompute=k), 3, placement={"opt_state": "cpu"},
                                     async_update=async_update)
            finals[k, async_update] = fz.gather_params(state, plan)
    want = finals[0, False]
    for key, got in finals.items():
        assert all(torch.equal(got[n], want[n]) for n in want), key


def test_recompute_out_of_range_names_the_value():
    with pytest.raises(ValueError, match="recompute must be between 0 and n_layer=2, got self.recompute=3"):
        GPTConfig(n_layer=2, recompute=3)
