"""shardspec: rules, layouts and meshes (no training involved)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardspec import FlatLayout, Mesh, Replicate, Shard, assign_groups, build_layouts, leaf_paths

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32, torch.int8]


@st.composite
def trees(draw):
    n = draw(st.integers(1, 8))
    blocks = draw(st.integers(1, 4))
    tree = {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        path = draw(st.sampled_from([f"blocks.{i % blocks}.w{i}", f"emb{i}", f"head.b{i}"]))
        g = torch.Generator().manual_seed(i)
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=g).to(dtype)
        else:
            t = torch.randint(-100, 100, shape, generator=g).to(dtype)
        tree[path] = t
    return tree


@settings(max_examples=150, deadline=None)
@given(tree=trees(), world=st.integers(1, 8), per_block=st.booleans(), leaf_align=st.sampled_from([1, 4, 16]), shard_align=st.sampled_from([1, 8, 64]))
def test_shards_reassemble_to_the_original_tree_bit_for_bit(tree, world, per_block, leaf_align, shard_align):
    rules = [r"blocks\.(\d+)\."] if per_block and any(k.startswith("blocks") for k in tree) else None
    groups = assign_groups(list(tree), rules)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in tree.items()}
    layouts = build_layouts(shapes, groups, num_shards=world, leaf_align=leaf_align, shard_align=shard_align)
    seen = {}
    for lay in layouts.values():
        assert lay.padded % (world * shard_align) == 0
        assert lay.padding == lay.padded - sum(s.numel for s in lay.slots) >= 0
        full = lay.pack(tree)
        shards = [lay.shard(full, r).clone() for r in range(world)]  # what each rank holds
        assert all(s.numel() == lay.shard_numel for s in shards)
        back = lay.unpack(torch.cat(shards))  # what an all-gather rebuilds
        for path, v in back.items():
            assert v.dtype == tree[path].dtype and v.shape == tree[path].shape
            # bit for bit: compare the raw bytes
            assert torch.equal(v.reshape(-1).view(torch.uint8), tree[path].reshape(-1).view(torch.uint8)), path
            seen[path] = True
        # the leaves' pieces across shards tile each leaf exactly once
        covered = {s.path: 0 for s in lay.slots}
        for r in range(world):
            for slot, a, b in lay.leaf_ranges(r):
                covered[slot.path] += b - a
        assert covered == {s.path: s.numel for s in lay.slots}
    assert seen.keys() == tree.keys()


def test_unpack_returns_views_and_gradients_flow_as_one_flat_buffer():
    lay = FlatLayout.from_shapes("g", {"a": (3, 5), "b": (7,)}, num_shards=2)
    flat = torch.randn(lay.padded, requires_grad=True)
    leaves = lay.unpack(flat)
    assert leaves["a"].data_ptr() == flat.data_ptr()
    (leaves["a"].sum() * 2 + leaves["b"].sum()).backward()
    want = torch.zeros(lay.padded)
    want[0:15] = 2
    want[16:23] = 1  # b starts at the next 16-element boundary
    assert torch.equal(flat.grad, want)


def test_group_rules_first_match_wins_and_names_groups_by_match():
    paths = ["wte.weight", "blocks.0.attn.w", "blocks.0.mlp.w", "blocks.1.attn.w", "ln_f.weight"]
    g = assign_groups(paths, [r"blocks\.0\.attn", r"blocks\.(\d+)\."])
    assert g == {
        "rest": ["wte.weight", "ln_f.weight"],
        "blocks.0.attn": ["blocks.0.attn.w"],
        "blocks.0": ["blocks.0.mlp.w"],
        "blocks.1": ["blocks.1.attn.w"],
    }
    g = assign_groups(paths, [(r"blocks\.(\d+)\.", r"layer\1")])
    assert g["layer1"] == ["blocks.1.attn.w"]


def test_rule_errors_name_the_leaf_or_rule():
    paths = ["wte.weight", "blocks.0.w"]
    with pytest.raises(ValueError, match=r"'wte.weight'.*rest=None"):
        assign_groups(paths, [r"blocks\.(\d+)\."], rest=None)
    with pytest.raises(ValueError, match=r"'blocks.0.w' is assigned twice"):
        assign_groups(paths, {"a": r"blocks", "b": r"\.w$"})
    with pytest.raises(ValueError, match=r"rule 'decoder.*matches no leaf"):
        assign_groups(paths, [r"decoder\."])
    with pytest.raises(ValueError, match="not a valid regex"):
        assign_groups(paths, [r"blocks\.("])


def test_layout_errors_name_shapes_and_leaves():
    lay = FlatLayout.from_shapes("g", {"a": (2, 2)}, num_shards=2)
    with pytest.raises(ValueError, match=r"leaf 'a' has shape \(4,\)"):
        lay.pack({"a": torch.zeros(4)})
    with pytest.raises(ValueError, match="leaf 'a' is missing"):
        lay.pack({"b": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="num_shards"):
        FlatLayout.from_shapes("g", {"a": (1,)}, num_shards=0)
    with pytest.raises(ValueError, match="rank 2 out of range"):
        lay.shard_range(2)


def test_one_process_mesh_needs_no_launcher():
    mesh = Mesh.from_env(("dp",), device_type="cpu")
    assert (mesh.size("dp"), mesh.rank("dp"), mesh.group("dp")) == (1, 0, None)
    with pytest.raises(ValueError, match="not 'tp'"):
        mesh.size("tp")
    with pytest.raises(ValueError, match="does not cover the world"):
        Mesh.from_env(("dp",), (2,), device_type="cpu")
    assert repr(Shard("dp")) == "Shard('dp')" and repr(Replicate()) == "Replicate()"


def _mesh_on_a_gpu_machine(rank, world):
    torch.cuda.is_available = lambda: True  # as on a GPU machine: the group below is gloo all the same
    mesh = Mesh.from_env(("dp",))
    x = torch.full((1,), float(rank))
    torch.distributed.all_reduce(x, group=mesh.group("dp"))
    return mesh.device_type, x.item()


def test_a_gloo_world_meshes_on_cpu_even_where_cuda_is_available():
    """A gloo default group on a GPU machine (tests, CPU-only jobs) gets a cpu mesh, not a cuda
    one its backend cannot serve (on the GPU box that hung the spawned test worlds)."""
    from tests._dist import run_world

    assert run_world(_mesh_on_a_gpu_machine, 2) == [("cpu", 1.0), ("cpu", 1.0)]


def test_leaf_paths_of_nested_trees():
    tree = {"a": [torch.zeros(1), {"b": torch.ones(2)}]}
    assert list(leaf_paths(tree)) == ["a.0", "a.1.b"]
    with pytest.raises(ValueError, match="'a.0' is a int"):
        leaf_paths({"a": [1]})
    assert math.prod(()) == 1
