"""DeepSpeed itself as the oracle for fz.initialize: recorded values, and the code that records them.

``python -m tests._deepspeed_oracle`` (with DeepSpeed installed: ``DS_BUILD_OPS=0 pip install
--no-build-isolation deepspeed``; it runs on the CPU) rewrites ``tests/deepspeed_oracle.json``:

* ``schedules``: the learning rate of each of the first updates under DeepSpeed's scheduler
  classes, driven as its engine drives them (the optimizer's lr is read by the update, then the
  scheduler steps).
* ``engine``: ``deepspeed.initialize`` on one gloo rank training :class:`Net` a few steps per
  config (fp32, ``torch_adam``: torch's Adam/AdamW as the update), with the initial parameters,
  the micro-batches and the parameters after.

The tests read the file, so they need no DeepSpeed; where it is installed they also recompute
the schedules live.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

PATH = Path(__file__).with_name("deepspeed_oracle.json")
NUM_UPDATES = 40

SCHEDULES = [
    ("WarmupLR", {"warmup_min_lr": 0.01, "warmup_max_lr": 0.1, "warmup_num_steps": 10}),
    ("WarmupLR", {"warmup_min_lr": 0.0, "warmup_num_steps": 7, "warmup_type": "linear"}),  # max: the optimizer's lr
    ("WarmupLR", {"warmup_num_steps": 1}),  # DeepSpeed floors the warmup at 2 steps
    ("WarmupDecayLR", {"total_num_steps": 30, "warmup_min_lr": 0.005, "warmup_max_lr": 0.05, "warmup_num_steps": 8}),
    ("WarmupDecayLR", {"total_num_steps": 25, "warmup_max_lr": 0.2, "warmup_num_steps": 5, "warmup_type": "linear"}),
    ("WarmupDecayLR", {"total_num_steps": 4, "warmup_num_steps": 6}),  # total before the warmup ends
    ("WarmupCosineLR", {"total_num_steps": 30, "warmup_num_steps": 6}),
    ("WarmupCosineLR", {"total_num_steps": 20, "warmup_min_ratio": 0.1, "warmup_num_steps": 4,
                        "cos_min_ratio": 0.05, "warmup_type": "linear"}),
    ("WarmupCosineLR", {"total_num_steps": 3, "warmup_num_steps": 5}),  # the floor from the start
]
OPTIMIZER_LR = 0.03  # the optimizer's own lr in the schedule runs

ENGINE = {
    # "Adam" with weight decay is AdamW (adam_w_mode defaults to true); a decaying schedule
    "adam_is_adamw": {
        "train_batch_size": 4,
        "optimizer": {"type": "Adam", "params": {"lr": 0.05, "weight_decay": 0.1, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 8, "warmup_max_lr": 0.05,
                                                          "warmup_num_steps": 3, "warmup_type": "linear"}},
    },
    # torch.optim.AdamW's default decay (0.01); accumulation over 2 micro-batches; clipping that binds
    "accumulate_clip_cosine": {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 0.05,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "betas": [0.8, 0.99], "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 6, "warmup_num_steps": 2}},
    },
    # classic Adam: L2 decay added to the gradient
    "adam_l2_warmup": {
        "train_batch_size": 4,
        "optimizer": {"type": "Adam", "params": {"lr": 0.05, "weight_decay": 0.1, "adam_w_mode": False,
                                                 "eps": 1e-6, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.01, "warmup_num_steps": 4}},
    },
}
ENGINE_CALLS = 8  # micro-batches per engine run


class Net(nn.Module):
    """A small regression net with a list of blocks (one group each under fz.initialize)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        for block in self.blocks:
            h = torch.tanh(block(h))
        return nn.functional.mse_loss(self.head(h).squeeze(-1), y)


def _schedule_lrs(deepspeed, kind: str, params: dict) -> list[float]:
    from deepspeed.runtime import lr_schedules

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=OPTIMIZER_LR)
    sched = getattr(lr_schedules, kind)(opt, **params)
    out = []
    for _ in range(NUM_UPDATES):
        out.append(float(opt.param_groups[0]["lr"]))  # what the update uses
        sched.step()  # what the engine does after each applied update
    return out


def deepspeed_schedules() -> list[dict]:
    import deepspeed

    return [{"type": k, "params": p, "optimizer_lr": OPTIMIZER_LR, "lr": _schedule_lrs(deepspeed, k, p)}
            for k, p in SCHEDULES]


def _engine_run(deepspeed, config: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    model = Net()
    initial = {k: v.detach().clone().tolist() for k, v in model.state_dict().items()}
    micro = config.get("train_micro_batch_size_per_gpu") or config["train_batch_size"] // config.get(
        "gradient_accumulation_steps", 1)
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(micro, 6, generator=g), torch.randn(micro, generator=g)) for _ in range(ENGINE_CALLS)]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    for x, y in data:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
    final = {k: v.detach().clone().tolist() for k, v in engine.module.state_dict().items()}
    return {"config": config, "initial": initial, "data": [(x.tolist(), y.tolist()) for x, y in data], "final": final}


def main() -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out = {
        "deepspeed": deepspeed.__version__,
        "torch": torch.__version__,
        "schedules": deepspeed_schedules(),
        "engine": {name: _engine_run(deepspeed, cfg, seed) for seed, (name, cfg) in enumerate(ENGINE.items())},
    }
    PATH.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
