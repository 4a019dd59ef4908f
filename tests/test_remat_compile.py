"""fz.remat under torch.compile: the same gradients, and the checkpointed regions reach the graph."""

from __future__ import annotations

import copy

import pytest
import torch

import funzero as fz
from tests.test_remat import _case, _grads, _rel


def _compiled(model):
    """``torch.compile(model)`` through aot_eager (dynamo, AOT autograd and its partitioner, no
    code generation), keeping the graphs dynamo hands over."""
    from torch._dynamo.backends.registry import lookup_backend

    graphs, aot = [], lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot(gm, example_inputs)

    return torch.compile(model, backend=backend), graphs


@pytest.mark.parametrize("name,policies", [("gpt", ("full", "selective", "offload")), ("llama", ("selective",))])
def test_policies_under_torch_compile(name, policies):
    """Compiled (dynamo + AOT autograd, whose partitioner does the recompute): the same gradients,
    and "full"/"selective" reach the graph as a checkpointed region; "offload" runs eagerly between
    graphs. (Llama, slower to trace, takes one policy.)"""
    base, rule, inner, loss_of = _case(name)
    ref, _ = _grads(copy.deepcopy(base), loss_of, inner)
    torch._dynamo.reset()
    for policy in policies:
        model = fz.remat(copy.deepcopy(base), [(rule, policy)])
        compiled, graphs = _compiled(model)
        model.zero_grad()
        loss_of(compiled).backward()
        for k, p in model.named_parameters():
            assert _rel(p.grad, ref[k]) < 1e-5, (policy, k, _rel(p.grad, ref[k]))
        regions = sum(
            1 for g in graphs for n in g.graph.nodes if n.op == "call_function" and "checkpoint" in str(n.target)
        )
        assert (regions > 0) == (policy != "offload"), (policy, [str(g.graph) for g in graphs][:1])
        torch._dynamo.reset()
