"""fz.initialize: DeepSpeed configs read as funzero runs, checked against DeepSpeed and the plan by hand."""

from __future__ import annotations

import copy
import json
import re

import optree
import pytest
import torch

import funzero as fz
import funzero._deepspeed as ds
from funzero import optim
from tests import _deepspeed_oracle as oracle
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt

ORACLE = json.loads(oracle.PATH.read_text())


# The seeds' DeepSpeed snippet, with train_batch_size scaled to the tiny test batches.
SEED = {"train_batch_size": 8, "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}


# --- trains like DeepSpeed's engine ---------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(oracle.ENGINE))
def test_trains_like_deepspeed_engine(name):
    """Recorded runs of deepspeed.initialize (fp32, one rank, torch's AdamW as its update): the
    same parameters after 8 micro-batches to fp32 rounding. Checks the meaning of the keys, not
    only that funzero builds what this module says: "Adam" with decay is AdamW, torch_adam's 0.01,
    the schedules' first update, accumulation, clipping."""
    rec = ORACLE["engine"][name]
    model = oracle.Net()
    model.load_state_dict({k: torch.tensor(v) for k, v in rec["initial"].items()})
    init = fz.initialize(model, rec["config"])
    state = init.state
    for x, y in rec["data"]:
        state, _ = init.step(state, (torch.tensor(x), torch.tensor(y)))
    got = fz.gather_params(state, init.plan)
    for k, want in rec["final"].items():
        want = torch.tensor(want)
        moved = (torch.tensor(rec["initial"][k]) - want).abs().max()
        assert moved > 1e-3, (name, k)  # training moved it: the comparison below means something
        torch.testing.assert_close(got[k], want, rtol=1e-4, atol=2e-6, msg=lambda m: f"{name} {k}: {m}")


# --- the same run as the plan written by hand ----------------------------------------------------
def _configs(tmp: str):
    """(name, DeepSpeed config, the plan / transform / precision it means, written by hand)."""
    def clip(tx, c=1.0):  # DeepSpeed clips at 1.0 unless gradient_clipping says otherwise
        return optim.chain(optim.clip_by_global_norm(c), tx)

    def hand(stage, tx, precision=None, placement=None):
        return stage, tx, precision or fz.fp32(), placement or {}

    return [
        ("seeds", SEED, hand(3, clip(optim.adamw(1e-3, weight_decay=0.0)))),
        ("stage0_clip_warmup", {
            "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.05,
            "zero_optimization": {"stage": 0},
            "optimizer": {"type": "adamw", "params": {"lr": 0.02, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.1}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.001, "warmup_num_steps": 3, "warmup_type": "linear"}},
        }, hand(0, clip(optim.adamw(
            optim.warmup_lr(warmup_min_lr=0.001, warmup_max_lr=0.02, warmup_num_steps=3, warmup_type="linear"),
            0.8, 0.95, 1e-6, weight_decay=0.1), 0.05))),
        ("stage1_accumulate_decay", {
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "zero_optimization": {"stage": 1, "reduce_bucket_size": "auto", "overlap_comm": True},
            "optimizer": {"type": "Adam", "params": {"lr": 0.01, "weight_decay": 0.05}},
            "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 10, "warmup_min_lr": 0.001, "warmup_num_steps": 2}},
            "steps_per_print": 1, "wall_clock_breakdown": True,
        }, hand(1, optim.multi_steps(clip(optim.adamw(optim.warmup_decay_lr(10, warmup_min_lr=0.001, warmup_num_steps=2), weight_decay=0.05)), 2))),
        ("stage2_bf16_cosine_cpu", {
            "train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
            "gradient_clipping": 0,
            "zero_optimization": {"stage": 2, "contiguous_gradients": True, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
            "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
            "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_num_steps": 2, "cos_min_ratio": 0.1}},
        }, hand(2, optim.adamw(optim.warmup_cosine_lr(10, learning_rate=0.01, warmup_num_steps=2, cos_min_ratio=0.1),
                                   weight_decay=0.0), fz.bf16(), {"opt_state": "cpu"})),
        ("stage3_fp16_offload_all", {
            "train_micro_batch_size_per_gpu": 4,
            "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 2, "hysteresis": 1,
                     "min_loss_scale": 0.5},
            "zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1e9,
                                  "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
            "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.01}}, "gradient_clipping": 1.0,
        }, hand(3, clip(optim.adamw(0.01, weight_decay=0.01)),
                    fz.fp16(initial_scale_power=8, loss_scale_window=2, hysteresis=1, min_loss_scale=0.5),
                    {"opt_state": "cpu", "params": "cpu"})),
        ("stage2_adam_l2_nvme", {
            "train_micro_batch_size_per_gpu": 4,
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": tmp, "buffer_count": 4}},
            "optimizer": {"type": "Adam", "params": {"lr": 0.01, "weight_decay": 0.1, "adam_w_mode": False}},
        }, hand(2, clip(optim.chain(optim.add_decayed_weights(0.1), optim.scale_by_adam(0.9, 0.999, 1e-8),
                                        optim.scale_by_learning_rate(0.01))), None, {"opt_state": f"nvme:{tmp}"})),
        ("stage1_lion", {
            "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1},
            "optimizer": {"type": "Lion", "params": {"lr": 0.001, "betas": [0.9, 0.98], "weight_decay": 0.1}},
            "gradient_clipping": 0.5,
        }, hand(1, clip(optim.lion(0.001, 0.9, 0.98, weight_decay=0.1), 0.5))),
        ("torch_adam_bf16_reduce", {
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
            "communication_data_type": "bf16", "data_types": {"grad_accum_dtype": "fp32"},
            "zero_optimization": {"stage": 2},
            "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
        }, hand(2, optim.multi_steps(clip(optim.adamw(0.01, weight_decay=0.01)), 2, accum_dtype=torch.float32),
                    fz.bf16(reduce_dtype=torch.bfloat16))),
    ]


def _train(step, state, data):
    for b in data:
        state, _ = step(state, b)
    return state


def _leaves(state):
    return [t.clone() for t in optree.tree_leaves(state, namespace="funzero") if isinstance(t, torch.Tensor)]


def _against_hand_built(rank, world, tmp):
    out = {}
    for name, config, (stage, tx, precision, placement) in _configs(tmp):
        init = fz.initialize(tiny_gpt(), config)
        micro = init.micro_batch_size
        # this rank's micro-batches: its rows of each global batch (DeepSpeed's data-parallel view)
        data = [tuple(t[rank * micro:(rank + 1) * micro] for t in b) for b in batches(4, batch=micro * world)]
        a = _train(init.step, init.state, data)
        model = tiny_gpt()
        plan = fz.zero(stage, groups=GROUPS, placement=placement, batch="local")
        state = fz.init(model, tx, plan, precision=precision)
        b = _train(fz.train_step(model, lm_loss, tx, plan), state, data)
        fz.sync(a)
        fz.sync(b)
        same = [torch.equal(x, y) for x, y in zip(_leaves(a), _leaves(b))]
        moved = not torch.equal(fz.gather_params(a, init.plan)["blocks.0.mlp.c_fc.weight"],
                                tiny_gpt().blocks[0].mlp.c_fc.weight.detach())
        out[name] = (all(same) and len(same) > 0, moved, init.plan.stage, dict(init.plan.placement),
                     init.micro_batch_size, init.gradient_accumulation_steps, init.train_batch_size)
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_initialize_trains_like_the_plan_written_by_hand(world, tmp_path):
    """Bit for bit: every leaf of the state (params, master, optimizer state, scaler) after four
    micro-batches, for the seeds' config and configs that use each supported key."""
    res = run_world(_against_hand_built, world, str(tmp_path))
    for rank_out in res:
        for name, (same, moved, stage, placement, micro, accum, train) in rank_out.items():
            assert same, (world, name)
            assert moved, (world, name)
            assert train == micro * accum * world, (name, train, micro, accum)
    first = res[0]
    assert first["seeds"][2:] == (3, {}, 8 // world, 1, 8)
    assert first["stage2_bf16_cosine_cpu"][3] == {"opt_state": "cpu"}
    assert first["stage3_fp16_offload_all"][3] == {"opt_state": "cpu", "params": "cpu"}
    assert first["stage1_accumulate_decay"][4:] == (2, 2, 4 * world)


# --- errors and resolution ----------------------------------------------------------------------
def _config(**patch):
    cfg = copy.deepcopy(SEED)
    for dotted, value in patch.items():
        node = cfg
        *head, last = dotted.split("__")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


BAD = [
    (_config(tensorboard={"enabled": True}), r"unknown DeepSpeed config key 'tensorboard'"),
    (_config(zero_optimization__stage3_gather_16bit_weights_on_model_save=True),
     r"key 'zero_optimization.stage3_gather_16bit_weights_on_model_save' is not supported: save full weights with fz.gather_params"),
    (_config(zero_optimization__offload_optimizer={"device": "cpu", "fast_init": False, "nvme_buffers": 2}),
     r"unknown DeepSpeed config key 'zero_optimization.offload_optimizer.nvme_buffers'"),
    (_config(zero_optimization__zero_quantized_weights=True),
     r"key 'zero_optimization.zero_quantized_weights' is supported only as false, got true"),
    (_config(fp16={"enabled": True, "loss_scale": 128}), r"key 'fp16.loss_scale' is supported only as 0, got 128"),
    (_config(bf16={"enabled": True, "check_grad_overflow": True}), r"key 'bf16.check_grad_overflow' is supported only as false"),
    (_config(activation_checkpointing={"partition_activations": True}), r"'activation_checkpointing' is not supported: use fz.remat"),
    (_config(optimizer={"type": "OneBitAdam"}), r"optimizer.type 'OneBitAdam' is not supported"),
    (_config(optimizer={"type": "Lion", "params": {"eps": 1e-8}}), r"key 'optimizer.params.eps' is not a parameter of Lion"),
    (_config(optimizer={"type": "AdamW", "params": {"max_grad_norm": 1.0}}), r"unknown DeepSpeed config key 'optimizer.params.max_grad_norm'"),
    (_config(optimizer={"type": "AdamW", "params": {"amsgrad": True}}), r"'optimizer.params.amsgrad' is supported only as false"),
    (_config(scheduler={"type": "OneCycle", "params": {}}), r"scheduler.type 'OneCycle' is not supported"),
    (_config(scheduler={"type": "WarmupCosineLR", "params": {"total_num_steps": 9, "warmup_max_lr": 0.1}}),
     r"key 'scheduler.params.warmup_max_lr' is not a parameter of WarmupCosineLR"),
    (_config(scheduler={"type": "WarmupDecayLR", "params": {}}), r"'scheduler.params.total_num_steps' is required by WarmupDecayLR"),
    (_config(scheduler={"type": "WarmupLR", "params": {"warmup_type": "cosine"}}), r"'scheduler.params.warmup_type' must be"),
    (_config(zero_optimization={"stage": 2, "offload_param": {"device": "cpu"}}),
     r"'zero_optimization.offload_param.device' = \"cpu\" needs zero_optimization.stage in \(3,\), got 2"),
    (_config(zero_optimization={"stage": 0, "offload_optimizer": {"device": "cpu"}}),
     r"'zero_optimization.offload_optimizer.device' = \"cpu\" needs zero_optimization.stage in \(1, 2, 3\), got 0"),
    (_config(zero_optimization={"stage": 3, "offload_optimizer": {"device": "nvme"}}),
     r"needs zero_optimization.offload_optimizer.nvme_path"),
    (_config(zero_optimization={"stage": 4}), r"'zero_optimization.stage' must be 0, 1, 2 or 3, got 4"),
    (_config(zero_optimization={"stage": 3, "cpu_offload": True}), r"'zero_optimization.cpu_offload' is not supported: deprecated"),
    (_config(fp16={"enabled": True}, bf16={"enabled": True}), r"enables both fp16.enabled and bf16.enabled"),
    (_config(prescale_gradients=True), r"'prescale_gradients' is supported only as false, got true"),
    (_config(zero_optimization=[3]), r"'zero_optimization' must be an object"),
    (_config(gradient_clipping=-1), r"'gradient_clipping' must be a number >= 0, got -1"),
    (_config(communication_data_type="fp8"), r"'communication_data_type' must be one of"),
    ({"train_batch_size": 8}, r"no optimizer.type"),
]


@pytest.mark.parametrize("config,message", BAD, ids=[m[:40] for _, m in BAD])
def test_unsupported_and_unknown_keys_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        fz.initialize(tiny_gpt(), config)


@pytest.mark.parametrize("sizes,message", [
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 3},
     "train_batch_size=10, train_micro_batch_size_per_gpu=3, gradient_accumulation_steps=unset on a world of 1 "
     "rank(s): train_batch_size is not a whole multiple of micro x world = 3"),
    ({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3},
     "train_batch_size=8, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=3 on a world of 1 rank(s): "
     "train_batch_size must equal micro x accumulation x world = 6"),
    ({"train_batch_size": 9, "gradient_accumulation_steps": 2},
     "train_batch_size=9, train_micro_batch_size_per_gpu=unset, gradient_accumulation_steps=2 on a world of 1 "
     "rank(s): train_batch_size is not a whole multiple of accumulation x world = 2"),
    ({"gradient_accumulation_steps": 4},
     "train_batch_size=unset, train_micro_batch_size_per_gpu=unset, gradient_accumulation_steps=4 on a world of 1 "
     "rank(s): give train_batch_size or train_micro_batch_size_per_gpu"),
    ({"train_batch_size": 0}, "'train_batch_size' must be an integer > 0, got 0"),
    ({"train_micro_batch_size_per_gpu": 2.5}, "'train_micro_batch_size_per_gpu' must be an integer > 0, got 2.5"),
])
def test_batch_size_arithmetic_errors_name_all_three(sizes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fz.initialize(tiny_gpt(), {**sizes, "optimizer": {"type": "AdamW"}})


@pytest.mark.parametrize("sizes,want", [
    ({"train_batch_size": 8}, (8, 8, 1)),
    ({"train_micro_batch_size_per_gpu": 2}, (2, 2, 1)),
    ({"train_batch_size": 8, "gradient_accumulation_steps": 4}, (8, 2, 4)),
    ({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2}, (8, 2, 4)),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, (6, 2, 3)),
    ({"train_batch_size": 8, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}, (8, 8, 1)),
    ({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, (8, 4, 2)),
])
def test_batch_sizes_resolve_like_deepspeed(sizes, want):
    init = fz.initialize(tiny_gpt(), {**sizes, "optimizer": {"type": "AdamW"}})
    assert (init.train_batch_size, init.micro_batch_size, init.gradient_accumulation_steps) == want
    assert (init.tx.traits.accumulate is not None) == (want[2] > 1)  # optim.multi_steps declares it
    assert tuple(init.config[k] for k in ds._BATCH_KEYS) == want


def test_auto_values_resolve_as_the_hf_trainer_would():
    config = {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                          "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    }
    with pytest.raises(ValueError, match=r"key 'scheduler.params.total_num_steps' is \"auto\" and funzero has no Trainer"):
        fz.initialize(tiny_gpt(), config)
    with pytest.raises(ValueError, match=r"auto= gives a value for 'optimizer.params.eps', which the config does not set to \"auto\""):
        fz.initialize(tiny_gpt(), {**config, "optimizer": {"type": "AdamW", "params": {"eps": 1e-6}}},
                      auto={"optimizer.params.eps": 1e-7, "scheduler.params.total_num_steps": 5})
    init = fz.initialize(tiny_gpt(), config, auto={"scheduler.params.total_num_steps": 100, "optimizer.params.lr": 0.02})
    c = init.config
    assert (c["train_batch_size"], c["gradient_accumulation_steps"]) == (4, 1)
    assert c["gradient_clipping"] == 1.0 and c["bf16"]["enabled"] is False and c["fp16"]["enabled"] is False
    assert c["optimizer"]["params"] == {"lr": 0.02, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    assert c["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 0.02, "warmup_num_steps": 1,
                                        "total_num_steps": 100}
    assert c["zero_optimization"]["reduce_bucket_size"] == "auto"  # ignored keys stay as they were
    assert init.precision == fz.fp32()
    want = optim.warmup_decay_lr(100, warmup_max_lr=0.02, warmup_num_steps=1)
    counts = torch.arange(120)
    assert torch.equal(init.lr_schedule(counts), want(counts))
    assert isinstance(init.tx, optim.GradientTransformation) and init.tx.traits.accumulate is None


def test_config_from_a_json_file_and_bad_files(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(SEED))
    init = fz.initialize(tiny_gpt(), str(path))
    assert init.plan.stage == 3 and init.plan.groups == GROUPS
    with pytest.raises(ValueError, match=r"DeepSpeed config file '.*missing.json' does not exist"):
        fz.initialize(tiny_gpt(), tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"DeepSpeed config file '.*bad.json' is not JSON"):
        fz.initialize(tiny_gpt(), tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"config must be a dict or a path to a JSON file, got int"):
        fz.initialize(tiny_gpt(), 3)


def test_block_rules_find_the_repeated_blocks():
    from transformers import LlamaConfig, LlamaForCausalLM

    assert fz.block_rules(tiny_gpt()) == GROUPS
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, vocab_size=101))
    assert fz.block_rules(llama) == [r"model\.layers\.(\d+)\."]
    mixed = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3))
    assert fz.block_rules(mixed) == []  # not blocks of one kind
    assert fz.block_rules(oracle.Net()) == [r"blocks\.(\d+)\."]


def test_the_module_table_lists_every_key():
    doc = ds.__doc__
    for key, rule in ds._RULES.items():
        row = re.search(rf"^{re.escape(key)} +(\w+) ", doc, re.M)
        assert row, key
        kind = rule if isinstance(rule, str) else rule[0]
        assert row.group(1) == {"map": "mapped", "ignore": "ignored", "error": "error", "only": "only"}[kind], key
    rows = re.findall(r"^([a-z0-9_.]+) +(?:mapped|only|ignored|error) ", doc, re.M)
    assert sorted(rows) == sorted(ds._RULES), set(rows) ^ set(ds._RULES)


def _with(dotted: str, value) -> dict:
    cfg = copy.deepcopy(SEED)
    if dotted.startswith("scheduler."):
        cfg["scheduler"] = {"type": "WarmupLR"}
    node = cfg
    *head, last = dotted.split(".")
    for part in head:
        node = node.setdefault(part, {})
    node[last] = value
    return cfg


def _other(value):
    """A value other than the one a key is accepted at."""
    return (not value) if isinstance(value, bool) else value + 1


REFUSED = sorted(k for k, r in ds._RULES.items() if isinstance(r, tuple))


@pytest.mark.parametrize("key", REFUSED)
def test_every_refused_key_is_named_with_its_dotted_path(key):
    """Each key the table refuses, and each key accepted at one value when given another."""
    rule = ds._RULES[key]
    value = True if rule[0] == "error" else _other(rule[1])
    with pytest.raises(ValueError, match=re.escape(f"DeepSpeed config key {key!r} is not supported" if rule[0] == "error"
                                                   else f"DeepSpeed config key {key!r} is supported only as")):
        fz.initialize(tiny_gpt(), _with(key, value))
    if rule[0] == "only":  # and at its one value it is accepted
        fz.initialize(tiny_gpt(), _with(key, rule[1]))


def test_ignored_keys_are_accepted_with_any_value_and_change_nothing():
    ignored = [k for k, r in ds._RULES.items() if r == "ignore"]
    cfg = copy.deepcopy(SEED)
    for key in ignored:
        node = cfg
        *head, last = key.split(".")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = "auto"
    cfg["zero_optimization"]["offload_optimizer"]["device"] = "none"
    cfg["zero_optimization"]["offload_param"]["device"] = "none"
    init = fz.initialize(tiny_gpt(), cfg)
    plain = fz.initialize(tiny_gpt(), SEED)
    fields = lambda p: (p.stage, p.groups, dict(p.placement), p.batch)  # noqa: E731
    assert fields(init.plan) == fields(plain.plan) and init.precision == plain.precision
    a, b = init.state, plain.state
    for x in batches(2):
        a, _ = init.step(a, x)
        b, _ = plain.step(b, x)
    assert all(torch.equal(x, y) for x, y in zip(_leaves(a), _leaves(b)))
    with pytest.raises(ValueError, match=r"auto= gives a value for 'zero_optimization.overlap_comm', which funzero ignores"):
        fz.initialize(tiny_gpt(), cfg, auto={"zero_optimization.overlap_comm": True})


def test_a_hugging_face_model_with_dict_batches():
    """A Hugging Face causal LM as DeepSpeed users bring it: dict batches, the loss from its output,
    one group per decoder layer; bit for bit the plan written by hand."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, vocab_size=101))

    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": torch.randint(0, 101, (4, 8), generator=g), "labels": torch.randint(0, 101, (4, 8), generator=g)}
            for _ in range(3)]
    init = fz.initialize(llama(), {**SEED, "train_batch_size": 4, "bf16": {"enabled": True}})
    assert init.plan.groups == [r"model\.layers\.(\d+)\."]
    a = _train(init.step, init.state, data)
    model = llama()
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3, weight_decay=0.0))
    plan = fz.zero(3, groups=[r"model\.layers\.(\d+)\."], batch="local")
    b = _train(fz.train_step(model, lambda apply, x: apply(**x).loss, tx, plan),
               fz.init(model, tx, plan, precision=fz.bf16()), data)
    assert all(torch.equal(x, y) for x, y in zip(_leaves(a), _leaves(b)))
    assert not torch.equal(a.master["model.layers.0"], fz.init(llama(), tx, plan, precision=fz.bf16()).master["model.layers.0"])
