"""Checkpoints that reshard across tensor-parallel, hierarchical and sequence-parallel layouts
(issue 23). One spawned 4-rank world walks each trained state through every layout: saved at
(dp=2, tp=2), loaded and saved again at flat dp=4, on one rank, at HSDP 2 x 2 and at Ulysses
(dp=2, sp=2), then loaded back at (dp=2, tp=2), each stop at another ZeRO stage. The tests read
what the ranks return and the checkpoints they leave, as a user without funzero would (DCP's
own converter)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint import FileSystemReader

import funzero as fz
from funzero import optim
from shardspec import Mesh
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt
from tests.test_checkpoint import _flat, _full, _tensors
from tests.test_tensor_parallel import GPT_KW, VOCAB, _hf_loss, _rel, tiny_llama

STEPS = 2  # before the save, and again after it
STOPS = ("dp4", "one", "hsdp", "sp")  # where a (dp=2, tp=2) save travels, in order, before it comes back
CHAINS = [  # (model, ZeRO stage at (dp=2, tp=2), precision); stop n takes stage (stage + n) % 4
    ("gpt", 1, "fp64"), ("gpt", 3, "fp64"), ("llama", 2, "fp64"), ("llama-tied", 3, "bf16"),
]
ASYNC = 1  # the chain whose first save writes in the background while it trains on
PRECISIONS = {"fp64": lambda: fz.Precision(torch.float64), "bf16": fz.bf16}


def _tx():
    # a schedule over the step count: a step counter that did not travel would change the updates
    return optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.warmup_cosine(1e-2, 2, 10), weight_decay=0.1))


def _model(kind: str, precision: str):
    dtype = torch.float64 if precision == "fp64" else torch.float32
    if kind == "gpt":
        model = tiny_gpt(dtype=dtype, **GPT_KW)
        model.loss_function = lambda logits, t: F.cross_entropy(logits, t)  # in fp64 (GPT's own rounds to fp32)
        return model
    return tiny_llama(tied=kind == "llama-tied", dtype=dtype)


def _meshes() -> dict:
    """Every layout of the 4 ranks; ``one``: this process alone."""
    return {
        "tp": Mesh.from_env(("dp", "tp"), (2, 2)),
        "dp4": Mesh.from_env(("dp",)),
        "one": Mesh(("dp",), (1,)),
        "hsdp": Mesh.from_env(("replicate", "shard"), (2, 2)),
        "sp": Mesh.from_env(("dp", "sp"), (2, 2)).flatten(("dp", "sp"), "dp_sp"),
    }


def _setup(meshes, layout: str, kind: str, stage: int, precision: str, model=None, **init_kw):
    """``(plan, state, step)`` of a fresh ``kind`` model at ``layout`` and ``stage``."""
    model = model or _model(kind, precision)
    mesh = meshes[layout]
    groups = GROUPS if kind == "gpt" else [r"layers\.(\d+)\."]
    if layout == "tp":
        fz.tensor_parallel(model, mesh, rules="gpt" if kind == "gpt" else "llama")
        plan = fz.zero(stage, mesh=mesh, axis="dp", groups=groups)
    elif layout == "hsdp":
        plan = fz.zero(stage, mesh=mesh, axis="shard", replicate="replicate", groups=groups)
    elif layout == "sp":
        fz.sequence_parallel(model, mesh, axis="sp")
        plan = fz.zero(stage, mesh=mesh, axis="dp_sp", batch="local", groups=groups)
    else:
        plan = fz.zero(stage, mesh=mesh, groups=groups)
    tx = _tx()
    state = fz.init(model, tx, plan, precision=PRECISIONS[precision](), **init_kw)
    return plan, state, fz.train_step(model, lm_loss if kind == "gpt" else _hf_loss, tx, plan)


def _train(state, step, data):
    for b in data:
        state, _ = step(state, b)
    return state


def _chain(meshes, rank: int, directory: str, kind: str, stage: int, precision: str, background: bool) -> dict:
    """Train at (dp=2, tp=2), save, train on; carry the save through every stop and back. What
    rank 0 returns: the parameters gathered at each point, and whether the state that came back
    holds the bits that left (and trains on to the same bits)."""
    data = batches(2 * STEPS, vocab=VOCAB)
    out = {}
    plan, state, step = _setup(meshes, "tp", kind, stage, precision)
    state = _train(state, step, data[:STEPS])
    left = _tensors(state)
    out["saved"] = fz.gather_params(state, plan)
    fz.save_state(state, plan, f"{directory}/tp", async_save=background)
    state = _train(state, step, data[STEPS:])  # while a background save may still be writing
    trained = _tensors(state)
    out["trained"] = fz.gather_params(state, plan)
    src = f"{directory}/tp"
    for n, stop in enumerate(STOPS, 1):
        here, src = src, f"{directory}/{stop}"
        if stop == "one" and rank != 0:
            continue  # one rank alone; the others wait for it in the next stop's init
        plan2, state2, step2 = _setup(meshes, stop, kind, (stage + n) % 4, precision)
        state2 = fz.load_state(state2, plan2, here)
        out[f"loaded {stop}"] = fz.gather_params(state2, plan2)
        fz.save_state(state2, plan2, src)
        if stop == "dp4":  # training goes on from the resharded state
            out["trained dp4"] = fz.gather_params(_train(state2, step2, data[STEPS:]), plan2)
    plan, back, step = _setup(meshes, "tp", kind, stage, precision)
    back = fz.load_state(back, plan, src)
    out["round trip"] = all(torch.equal(a, b) for a, b in zip(left, _tensors(back), strict=True))
    back = _train(back, step, data[STEPS:])
    out["resumed"] = all(torch.equal(a, b) for a, b in zip(trained, _tensors(back), strict=True))
    # fz.init(weights=...) of a tp-split model reads its slices out of the whole tensors
    plan, made, _ = _setup(meshes, "tp", kind, stage, precision, weights=f"{directory}/tp")
    out["weights"] = fz.gather_params(made, plan)
    return out if rank == 0 else {k: out[k] for k in ("round trip", "resumed")}


def _errors(meshes, root: str) -> dict:
    """Loads that cannot work, at (dp=2, tp=2): every rank's message."""
    out = {}
    for name, kind, src in (("shape", "gpt-72", "0"), ("leaves", "llama-tied", "2")):
        if kind == "gpt-72":  # a vocabulary of 72, not 68: only the (tied, vocab-split) embedding differs
            model = tiny_gpt(dtype=torch.float64, **{**GPT_KW, "vocab_size": 72})
            plan, state, _ = _setup(meshes, "tp", "gpt", 2, "fp64", model=model)
        else:
            plan, state, _ = _setup(meshes, "tp", kind, 2, "fp64")
        try:
            fz.load_state(state, plan, f"{root}/{src}/tp")
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def _world(rank, world, root):
    meshes = _meshes()
    chains = [_chain(meshes, rank, f"{root}/{i}", *c, background=i == ASYNC) for i, c in enumerate(CHAINS)]
    return dict(chains=chains, errors=_errors(meshes, root))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_parallel")
    return run_world(_world, 4, str(root), timeout=600), str(root)


def _read(step_dir: str, tmp: str) -> dict[str, torch.Tensor]:
    return _flat(_full(step_dir, tmp))


def _latest(directory: str) -> str:
    return fz._checkpoint.latest_step(directory)  # noqa: SLF001 - the step directory LATEST names


def _equal(got: dict, want: dict, what) -> None:
    assert got.keys() == want.keys(), what
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), (what, k)


# --- the tests --------------------------------------------------------------------------------
def test_a_tensor_parallel_state_saves_whole_tensors(world, tmp_path):
    """save_state of a tp-split state (refused before) writes every leaf at its whole shape: DCP's
    converter reads back the unsplit parameters (the fp32 master under bf16), each element
    written by exactly one rank, every rank writing its part."""
    (results, root) = world
    for i, (kind, _, precision) in enumerate(CHAINS):
        step_dir = _latest(f"{root}/{i}/tp")
        got = _read(step_dir, str(tmp_path / f"{i}.pt"))
        saved = results[0]["chains"][i]["saved"]
        part = "params" if precision == "fp64" else "master"
        _equal({k.partition("/")[2]: v for k, v in got.items() if k.startswith(part + "/")}, saved, (i, part))
        with open(os.path.join(step_dir, "funzero.json")) as f:
            index = json.load(f)
        assert index["version"] == 2 and index["tensor_parallel"] == {"axis": "tp", "size": 2}
        head = "wte.weight" if kind == "gpt" else "model.embed_tokens.weight"  # split by vocabulary
        assert index["entries"][f"params.{head}"]["shape"] == [VOCAB, saved[head].shape[1]]
        md = FileSystemReader(step_dir).read_metadata()
        files = {info.relative_path for info in md.storage_data.values()}
        assert files == {f"__{r}_0.distcp" for r in range(4)}, files


def test_column_splits_are_stored_as_boxes_of_the_whole_tensor(world):
    """A leaf split along dim 1 (a row-wise projection's weight) is written as blocks of whole
    rows and half the columns, which the index records by offsets and sizes; a fused q/k/v split
    by sections comes out as the unsplit weight (the first test reads it back)."""
    (_, root) = world
    with open(os.path.join(_latest(f"{root}/0/tp"), "funzero.json")) as f:
        rec = json.load(f)["entries"]["params.blocks.0.attn.c_proj.weight"]
    rows, cols = rec["shape"]
    boxes = [p for p in rec["pieces"] if isinstance(p[0], list)]
    assert boxes and all(sizes[1] == cols // 2 and offsets[1] in (0, cols // 2) for offsets, sizes, _ in boxes)


def test_every_stop_of_the_journey_holds_the_same_bits(world, tmp_path):
    """Loaded at flat dp=4, one rank, HSDP 2 x 2 and (dp=2, sp=2), each at another stage, the
    gathered parameters are the saved ones; and what each stop saves again is, leaf by leaf
    (parameters, master, every optimizer moment, the step counter), the checkpoint that left
    (dp=2, tp=2), bit for bit."""
    (results, root) = world
    for i in range(len(CHAINS)):
        chain = results[0]["chains"][i]
        want = _read(_latest(f"{root}/{i}/tp"), str(tmp_path / f"{i}-tp.pt"))
        assert {k.split("/")[0] for k in want} >= {"step", "params", "opt_state"}
        assert int(want["step"]) == STEPS
        for stop in STOPS:
            _equal(chain[f"loaded {stop}"], chain["saved"], (i, stop))
            _equal(_read(_latest(f"{root}/{i}/{stop}"), str(tmp_path / f"{i}-{stop}.pt")), want, (i, stop))


def test_back_at_dp2_tp2_the_state_is_the_one_that_left_and_trains_on_identically(world):
    """Every tensor every rank holds (its slices and shards of parameters, master, moments; the
    step) after the journey equals what it held at the save, and two more steps from it land
    on the bits of the run that never stopped, on every rank."""
    (results, _) = world
    for rank, r in enumerate(results):
        for i, chain in enumerate(r["chains"]):
            assert chain["round trip"], (rank, i)
            assert chain["resumed"], (rank, i)


def test_training_resumed_at_another_layout_equals_training_without_the_reshard(world):
    """fp64: two steps at flat dp=4 (another stage, no tp) from the resharded checkpoint land
    where two steps at (dp=2, tp=2) from the state itself do."""
    (results, _) = world
    for i, (_, _, precision) in enumerate(CHAINS):
        if precision != "fp64":
            continue  # bf16 compute rounds differently on another layout
        chain = results[0]["chains"][i]
        assert chain["trained"].keys() == chain["trained dp4"].keys()
        for k, v in chain["trained"].items():
            assert _rel(chain["trained dp4"][k], v) < 1e-10, (i, k, _rel(chain["trained dp4"][k], v))
            assert not torch.equal(v, chain["saved"][k]), (i, k)  # it trained


def test_init_reads_a_tensor_parallel_checkpoint_as_weights(world):
    (results, _) = world
    for i, chain in enumerate(results[0]["chains"]):
        _equal(chain["weights"], chain["saved"], i)


def test_loads_that_disagree_with_the_model_name_the_leaf_and_both_shapes(world):
    """On every rank: a model of another vocabulary names the leaf and both whole shapes (and the
    slice each tp rank holds); a tied model names a leaf only the checkpoint has."""
    (results, _) = world
    for r in results:
        shape, leaves = r["errors"]["shape"], r["errors"]["leaves"]
        assert shape is not None and leaves is not None
        assert ("leaf 'params.wte.weight' has shape (68, 24), the state's has shape (72, 24) "
                "(split over 2 tensor-parallel ranks, (36, 24) on each)") in shape, shape
        assert "leaves the state does not have (e.g. 'params.lm_head.weight')" in leaves, leaves


# --- damaged boxes, read by one process ---------------------------------------------------------
LEAF = "params.blocks.0.attn.c_proj.weight"  # split along dim 1 at (dp=2, tp=2): stored as boxes


def _copy(world, tmp_path) -> tuple[str, dict]:
    """A fresh copy of chain 0's (dp=2, tp=2) checkpoint: (its step directory, its index)."""
    (_, root) = world
    d = str(tmp_path / "ckpt")
    shutil.copytree(f"{root}/0/tp", d)
    step = _latest(d)
    with open(os.path.join(step, "funzero.json")) as f:
        return step, json.load(f)


def _load_alone(step: str, index: dict | None = None):
    """Load ``step`` (with ``index`` written over its own first) into chain 0's model, one rank."""
    if index is not None:
        with open(os.path.join(step, "funzero.json"), "w") as f:
            json.dump(index, f)
    plan, state, _ = _setup({"one": Mesh(("dp",), (1,))}, "one", "gpt", 2, "fp64")
    return fz.load_state(state, plan, os.path.dirname(step)), plan


def test_box_pieces_that_overlap_or_leave_a_gap_name_the_leaf(world, tmp_path):
    step, index = _copy(world, tmp_path)
    pieces = index["entries"][LEAF]["pieces"]
    boxes = [i for i, p in enumerate(pieces) if isinstance(p[0], list)]
    first, second = pieces[boxes[0]], pieces[boxes[1]]
    pieces[boxes[1]] = [first[0], second[1], second[2]]  # two pieces at one place
    with pytest.raises(ValueError, match=rf"leaf '{LEAF}': its pieces at .* and at .* in funzero.json overlap"):
        _load_alone(step, index)
    pieces[boxes[1]] = second
    del pieces[boxes[0]]
    rows, cols = index["entries"][LEAF]["shape"]
    hole = first[1][0] * first[1][1]
    with pytest.raises(ValueError, match=rf"leaf '{LEAF}': its pieces cover {rows * cols - hole} of its {rows * cols}"):
        _load_alone(step, index)
    pieces.insert(boxes[0], [first[0], [rows + 1, cols], first[2]])
    with pytest.raises(ValueError, match=rf"leaf '{LEAF}': the piece at .* is not a box of its shape \({rows}, {cols}\)"):
        _load_alone(step, index)


def test_a_flipped_byte_in_a_box_names_the_file_and_the_block(world, tmp_path):
    step, index = _copy(world, tmp_path)
    whole = _read(step, str(tmp_path / "whole.pt"))[LEAF.replace(".", "/", 1)]
    offsets, sizes, _ = next(p for p in index["entries"][LEAF]["pieces"] if isinstance(p[0], list))
    block = whole[offsets[0] : offsets[0] + sizes[0], offsets[1] : offsets[1] + sizes[1]]
    for name in sorted(os.listdir(step)):
        file = os.path.join(step, name)
        with open(file, "rb") as f:
            raw = bytearray(f.read())
        at = raw.find(block.contiguous().numpy().tobytes())
        if at >= 0:
            raw[at + 3] ^= 0x10
            with open(file, "wb") as f:
                f.write(bytes(raw))
            break
    else:
        raise AssertionError("the block's bytes are in no file")
    with pytest.raises(ValueError, match=rf"{name}' is corrupted: the piece of leaf '{LEAF}' with the block at "
                                         rf"\({offsets[0]}, {offsets[1]}\) of size \({sizes[0]}, {sizes[1]}\)"):
        _load_alone(step)


def test_a_version_1_index_of_flat_pieces_still_loads(world, tmp_path):
    """What an earlier funzero wrote (no tensor parallelism: every piece a flat range) loads."""
    (results, root) = world
    shutil.copytree(f"{root}/0/dp4", tmp_path / "v1")
    step = _latest(str(tmp_path / "v1"))
    with open(os.path.join(step, "funzero.json")) as f:
        index = json.load(f)
    assert all(isinstance(p[0], int) for rec in index["entries"].values() for p in rec["pieces"])
    index["version"] = 1
    del index["tensor_parallel"]
    state, plan = _load_alone(step, index)
    _equal(fz.gather_params(state, plan), results[0]["chains"][0]["saved"], "v1")
