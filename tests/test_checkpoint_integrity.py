"""No silent wrong results: a damaged or mismatched checkpoint is an error naming the file, leaf or
group, on every rank, and never a hang."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time

import pytest
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex

import funzero as fz
from funzero import optim
from funzero._checkpoint import latest_step
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt

DATA = "__0_0.distcp"


def _make(n_layer=2, stage=2, seed=0):
    model = tiny_gpt(seed=seed, n_layer=n_layer)
    plan = fz.zero(stage, groups=GROUPS)
    tx = optim.adamw(1e-2)
    return model, plan, tx, fz.init(model, tx, plan)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A one-rank checkpoint of a trained 2-layer model, and its parameters."""
    root = tmp_path_factory.mktemp("saved")
    model, plan, tx, state = _make()
    state, _ = fz.train_step(model, lm_loss, tx, plan)(state, batches(1)[0])
    fz.save_state(state, plan, str(root / "ckpt"))
    return str(root / "ckpt"), fz.gather_params(state, plan)


@pytest.fixture
def ckpt(saved, tmp_path):
    """A fresh copy of the saved checkpoint, to damage: (directory, its step, the parameters)."""
    d = str(tmp_path / "ckpt")
    shutil.copytree(saved[0], d)
    return d, latest_step(d), saved[1]


def _load(d, **kw):
    _, plan, _, state = _make(seed=9)
    return fz.load_state(state, plan, d, **kw), plan


def _read(file):
    with open(file, "rb") as f:
        return bytearray(f.read())


def _write(file, raw):
    with open(file, "wb") as f:
        f.write(bytes(raw))


def _index(step):
    with open(os.path.join(step, "funzero.json")) as f:
        return json.load(f)


def _write_index(step, index):
    with open(os.path.join(step, "funzero.json"), "w") as f:
        json.dump(index, f)


def test_an_intact_copy_loads(ckpt):
    d, _, params = ckpt
    state, plan = _load(d)
    got = fz.gather_params(state, plan)
    assert all(torch.equal(got[k], v) for k, v in params.items())


def test_a_flipped_byte_in_a_piece_names_the_file_and_the_leaf(ckpt):
    d, step, params = ckpt
    leaf = "blocks.0.mlp.c_fc.weight"
    file = os.path.join(step, DATA)
    raw = _read(file)
    at = raw.find(params[leaf].numpy().tobytes())
    assert at > 0
    raw[at + 1001] ^= 0x10  # one bit of one element
    _write(file, raw)
    with pytest.raises(ValueError, match=rf"{DATA}' is corrupted: the piece of leaf 'params\.{leaf}' .*crc32"):
        _load(d)


def test_a_damaged_piece_header_names_the_file_and_the_leaf(ckpt):
    d, step, _ = ckpt
    md = fz._checkpoint.read_metadata(step)
    fqn = "master.blocks.1.attn.c_proj.weight" if "master.blocks.1.attn.c_proj.weight" in md.state_dict_metadata else \
        "params.blocks.1.attn.c_proj.weight"
    info = md.storage_data[MetadataIndex(fqn, torch.Size([0, 0]))]
    file = os.path.join(step, info.relative_path)
    raw = _read(file)
    raw[info.offset : info.offset + 4] = b"XXXX"  # the item's zip signature
    _write(file, raw)
    with pytest.raises(ValueError, match=rf"{DATA}' could not be read at the piece of leaf '{fqn}'"):
        _load(d)


def test_a_shifted_range_in_the_index_names_the_leaf(ckpt):
    d, step, _ = ckpt
    index = _index(step)
    rec = index["entries"]["params.blocks.0.attn.c_attn.weight"]
    lo, hi, crc = rec["pieces"][0]
    rec["pieces"][0] = [lo + 24, hi, crc]  # as if the piece began one row later
    _write_index(step, index)
    with pytest.raises(ValueError, match=r"leaf 'params\.blocks\.0\.attn\.c_attn\.weight': its pieces do not tile"):
        _load(d)


def test_a_missing_piece_names_the_leaf(ckpt):
    d, step, _ = ckpt
    index = _index(step)
    index["entries"]["params.ln_f.bias"]["pieces"] = []
    _write_index(step, index)
    with pytest.raises(ValueError, match=r"leaf 'params\.ln_f\.bias': its pieces cover elements \[0, 0\) of 24"):
        _load(d)


def test_dcp_metadata_that_disagrees_with_the_index_names_the_leaf(ckpt):
    d, step, _ = ckpt
    path = os.path.join(step, ".metadata")
    with open(path, "rb") as f:
        md = pickle.load(f)
    chunk = md.state_dict_metadata["params.wpe.weight"].chunks[0]
    chunk.offsets = torch.Size([1, 0])  # a chunk moved by one row
    with open(path, "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(ValueError, match=r"leaf 'params\.wpe\.weight': the piece \[0, 384\) .* not a chunk DCP's metadata has"):
        _load(d)


def test_garbage_dcp_metadata_names_the_file(ckpt):
    d, step, _ = ckpt
    with open(os.path.join(step, ".metadata"), "wb") as f:
        f.write(b"\x80\x04not a pickle")
    with pytest.raises(ValueError, match=r"checkpoint metadata '.*\.metadata' is unreadable"):
        _load(d)


def test_a_truncated_file_names_the_file_and_a_leaf(ckpt):
    d, step, _ = ckpt
    file = os.path.join(step, DATA)
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=rf"{DATA}' is truncated: {size // 2} bytes, but leaf '.*' \(elements"):
        _load(d)


def test_a_missing_file_names_the_file_and_a_leaf(ckpt):
    d, step, _ = ckpt
    os.remove(os.path.join(step, DATA))
    with pytest.raises(ValueError, match=rf"{DATA}' is missing \(it holds leaf '"):
        _load(d)


def test_extra_and_missing_leaves_are_errors_unless_strict_is_false(ckpt):
    d, step, params = ckpt
    index = _index(step)
    index["entries"]["params.blocks.0.extra"] = dict(index["entries"]["params.ln_f.bias"], group="blocks.0")
    del index["entries"]["params.ln_f.weight"]
    _write_index(step, index)
    with pytest.raises(ValueError, match=r"group 'blocks\.0': 1 leaves the state does not have \(e\.g\. 'params\.blocks\.0\.extra'\)"
                                         r"; group 'rest': 1 leaves the checkpoint does not have \(e\.g\. 'params\.ln_f\.weight'\)"):
        _load(d)
    with pytest.warns(UserWarning, match=r"skipped 2 leaves .*'params\.ln_f\.weight', 'params\.blocks\.0\.extra'"):
        state, plan = _load(d, strict=False)
    got = fz.gather_params(state, plan)
    fresh = fz.gather_params(_make(seed=9)[3], plan)
    for k, v in params.items():
        assert torch.equal(got[k], fresh[k] if k == "ln_f.weight" else v), k  # the skipped leaf kept its value


def test_a_checkpoint_of_another_depth_names_the_group(ckpt, tmp_path):
    d, _, params = ckpt
    _, plan1, _, one = _make(n_layer=1)
    with pytest.raises(ValueError, match=r"group 'blocks\.1': \d+ leaves the state does not have"):
        fz.load_state(one, plan1, d)
    with pytest.warns(UserWarning, match="skipped"):
        fz.load_state(one, plan1, d, strict=False)
    got = fz.gather_params(one, plan1)
    assert set(got) < set(params) and all(torch.equal(got[k], params[k]) for k in got)
    fz.save_state(one, plan1, str(tmp_path / "one"))
    _, plan2, _, two = _make(n_layer=2)
    with pytest.raises(ValueError, match=r"group 'blocks\.1': \d+ leaves the checkpoint does not have"):
        fz.load_state(two, plan2, str(tmp_path / "one"))


def test_a_leaf_of_another_shape_names_both_shapes(ckpt):
    d, _, _ = ckpt
    model = tiny_gpt(n_embd=32)
    plan = fz.zero(2, groups=GROUPS)
    state = fz.init(model, optim.adamw(1e-2), plan)
    with pytest.raises(ValueError, match=r"leaf 'params\.\S+' has shape \([\d, ]+\), the state's has shape \([\d, ]+\)"):
        fz.load_state(state, plan, d)


@pytest.mark.parametrize("content", [b"\x00\x01\x02garbage", b"step-1-0123abcd\x00", b"", b"step-999-deadbeef",
                                     "step-1-ü".encode()])
def test_a_malformed_latest_is_a_clear_error(ckpt, content):
    d, _, _ = ckpt
    with open(os.path.join(d, "LATEST"), "wb") as f:
        f.write(content)
    with pytest.raises(ValueError, match=r"LATEST' (holds .*not the name of a checkpoint step|names step 'step-999-deadbeef', "
                                         r"which does not exist)"):
        _load(d)


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"no complete checkpoint in .*\(no such directory\)"):
        _load(str(tmp_path / "nothing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"no complete checkpoint in .*\(no LATEST file\)"):
        _load(str(tmp_path / "empty"))


def test_the_next_save_removes_interrupted_steps(ckpt):
    d, step, _ = ckpt
    partial = os.path.join(d, "step-7-0badf00d")
    os.makedirs(partial)
    shutil.copy(os.path.join(step, DATA), partial)  # data, no index: a save that never finished
    os.makedirs(os.path.join(d, "notes"))
    state, plan = _load(d)
    new = fz.save_state(state, plan, d, keep=2)
    entries = set(os.listdir(d))
    assert "step-7-0badf00d" not in entries and "notes" in entries
    assert {os.path.basename(step), os.path.basename(new)} <= entries


# --- on every rank -------------------------------------------------------------------------


def _damaged(rank, world, root):
    """Save on 2 ranks, then load copies damaged in a piece only rank 1 reads."""
    import funzero._checkpoint as ck

    model, plan, tx, state = _make(stage=3)
    state, _ = fz.train_step(model, lm_loss, tx, plan)(state, batches(1)[0])
    src = f"{root}/src"
    fz.save_state(state, plan, src)
    step = latest_step(src)
    out = {}
    for case in ("missing", "flipped"):
        d = f"{root}/{case}"
        if rank == 0:
            shutil.copytree(src, d)
            target = os.path.join(latest_step(d), "__1_0.distcp")
            if case == "missing":
                os.remove(target)
            else:
                md = ck.read_metadata(step)
                own = [i for i in md.storage_data.values() if i.relative_path == "__1_0.distcp"]
                big = max(own, key=lambda i: i.length)
                raw = _read(target)
                raw[big.offset + big.length // 2] ^= 0xFF
                _write(target, raw)
        ck._agree(plan.mesh.group(plan.axis), None)  # the copy is ready before anyone loads it
        t0 = time.monotonic()
        _, plan2, _, fresh = _make(stage=3, seed=4)
        try:
            fz.load_state(fresh, plan2, d)
            out[case] = (None, time.monotonic() - t0)
        except ValueError as e:
            out[case] = (str(e), time.monotonic() - t0)
    # Stage 1 in the middle of gradient accumulation: rank-local accumulators cannot be saved.
    acc = optim.multi_steps(optim.adamw(1e-2), 2)
    model = tiny_gpt()
    plan = fz.zero(1, groups=GROUPS)
    state = fz.init(model, acc, plan)
    state, _ = fz.train_step(model, lm_loss, acc, plan)(state, batches(1)[0])
    try:
        fz.save_state(state, plan, f"{root}/acc")
        out["accumulating"] = None
    except ValueError as e:
        out["accumulating"] = str(e)
    return out


@pytest.mark.slow
def test_a_damaged_piece_one_rank_reads_is_an_error_on_every_rank(tmp_path):
    results = run_world(_damaged, 2, str(tmp_path), timeout=120)
    for rank, out in enumerate(results):
        for case, what in (("missing", r"__1_0\.distcp' is missing"), ("flipped", r"__1_0\.distcp' is corrupted")):
            message, seconds = out[case]
            assert message is not None and seconds < 60, (rank, case, seconds)
            assert __import__("re").search(what, message), (rank, case, message)
            if rank == 0:  # rank 0 read nothing damaged: it learns from rank 1
                assert "checkpoint load failed on rank 1" in message, message
        assert "accumulated gradients" in out["accumulating"], out["accumulating"]
