"""Fixed training scenarios whose results are pinned bit for bit (``tests/golden/``).

Each scenario trains the tiny GPT for a few steps through the public API only, so the same
code runs against any version of the engine. ``tests/golden/record.py`` wrote the expected
digests from the engine as it was before the issue-19 redesign; ``tests/test_golden.py``
compares every later engine against them: the redesign may move code, not bits.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import torch

import funzero as fz
from funzero import optim
from tests._models import GROUPS, batches, lm_loss, tiny_gpt

B0 = r"^blocks\.0\."

# name -> (stage, precision, placement, options)
#   options: clip (max norm), accumulate (micro-steps), fused (adamw kernel), opt (optimizer),
#            async / delayed (host update modes), steps
SCENARIOS: dict[str, tuple] = {}
for _stage in (0, 1, 2, 3):
    for _prec in ("fp32", "bf16", "fp16"):
        SCENARIOS[f"s{_stage}-{_prec}"] = (_stage, _prec, {}, {})
SCENARIOS.update({
    "s2-fp32-unfused": (2, "fp32", {}, {"fused": False}),
    "s0-bf16-clip": (0, "bf16", {}, {"clip": 0.05}),
    "s2-bf16-clip": (2, "bf16", {}, {"clip": 0.05}),
    "s3-bf16-clip": (3, "bf16", {}, {"clip": 0.05}),
    "s1-bf16-accum": (1, "bf16", {}, {"accumulate": 2, "steps": 4}),
    "s2-bf16-accum": (2, "bf16", {}, {"accumulate": 2, "steps": 4}),
    "s3-fp32-accum": (3, "fp32", {}, {"accumulate": 2, "steps": 4, "fused": False}),
    "s2-fp32-lamb": (2, "fp32", {}, {"opt": "lamb"}),
    "s3-fp32-sgdm": (3, "fp32", {}, {"opt": "sgd"}),
    "s1-bf16-lion-clip": (1, "bf16", {}, {"opt": "lion", "clip": 1.0}),
    "s2-bf16-named": (2, "bf16", {}, {"opt": "named"}),
    "s1-bf16-cpu": (1, "bf16", {"opt_state": "cpu"}, {}),
    "s2-bf16-cpu": (2, "bf16", {"opt_state": "cpu"}, {}),
    "s3-bf16-cpu": (3, "bf16", {"opt_state": "cpu"}, {}),
    "s2-fp16-cpu": (2, "fp16", {"opt_state": "cpu"}, {}),
    "s2-bf16-cpu-clip": (2, "bf16", {"opt_state": "cpu"}, {"clip": 0.05}),
    "s3-bf16-cpu-params": (3, "bf16", {"opt_state": "cpu", "params": "cpu"}, {}),
    "s2-bf16-cpu-lion": (2, "bf16", {"opt_state": "cpu"}, {"opt": "lion"}),
    "s2-bf16-cpu-named": (2, "bf16", {"opt_state": "cpu"}, {"opt": "named"}),
    "s2-bf16-nvme": (2, "bf16", {"opt_state": "nvme"}, {}),
    "s3-bf16-nvme-params": (3, "bf16", {"opt_state": "nvme", "params": "nvme"}, {}),
    "s3-bf16-nvme-cpu-params": (3, "bf16", {"opt_state": "nvme", "params": "cpu"}, {}),
    "s2-bf16-mixed": (2, "bf16", {"opt_state": [(B0, "device"), ("", "cpu")]}, {"clip": 0.05}),
    "s2-bf16-cpu-async": (2, "bf16", {"opt_state": "cpu"}, {"async": True}),
    "s3-bf16-cpu-async": (3, "bf16", {"opt_state": "cpu"}, {"async": True}),
    "s2-bf16-cpu-delayed": (2, "bf16", {"opt_state": "cpu"}, {"delayed": True}),
    "s1-fp16-cpu-delayed": (1, "fp16", {"opt_state": "cpu"}, {"delayed": True, "clip": 1.0}),
})
WORLDS = (1, 2)


def _precision(name: str) -> fz.Precision:
    return {"fp32": fz.fp32, "bf16": fz.bf16, "fp16": lambda: fz.fp16(initial_scale_power=8)}[name]()


def _tx(opts: dict):
    fused = opts.get("fused", True)
    name = opts.get("opt", "adamw")
    if name == "adamw":
        tx = optim.adamw(1e-2, weight_decay=0.1, mask=r"weight$", fused=fused)
    elif name == "lamb":
        tx = optim.lamb(1e-2, weight_decay=0.1)
    elif name == "sgd":
        tx = optim.sgd(1e-2, momentum=0.9, nesterov=True)
    elif name == "lion":
        tx = optim.lion(1e-3, weight_decay=0.1)
    elif name == "named":
        tx = optim.named_chain(("adamw", optim.adamw(1e-2, weight_decay=0.1, mask=r"weight$")))
    else:
        raise ValueError(name)
    if "clip" in opts:
        tx = optim.chain(optim.clip_by_global_norm(opts["clip"]), tx)
    if "accumulate" in opts:
        tx = optim.multi_steps(tx, opts["accumulate"])
    return tx


def _placed(placement: dict, d: str) -> dict:
    def one(w):
        return f"nvme:{d}" if w == "nvme" else w

    return {k: one(v) if isinstance(v, str) else [(rx, one(w)) for rx, w in v] for k, v in placement.items()}


def digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()[:16]


def run(name: str, rank: int, tmp: str) -> dict:
    """Train scenario ``name``; on rank 0 return ``{leaf: digest}``, the losses and the step."""
    stage, prec, placement, opts = SCENARIOS[name]
    model = tiny_gpt()
    plan = fz.zero(stage, groups=GROUPS, placement=_placed(placement, os.path.join(tmp, f"r{rank}")),
                   async_update=opts.get("async", False), delayed_update=opts.get("delayed", False))
    tx = _tx(opts)
    state = fz.init(model, tx, plan, precision=_precision(prec))
    step = fz.train_step(model, lm_loss, tx, plan)
    losses = []
    for b in batches(opts.get("steps", 3)):
        state, metrics = step(state, b)
        losses.append(float(metrics["loss"]))
    fz.sync(state)
    out = {k: digest(v) for k, v in fz.gather_params(state, plan).items()}
    # the copy the model computes with: rank 0's buffer (full at stages 0-2, its shard at 3)
    out.update({f"params[{g}]": digest(t) for g, t in state.params.items()})
    return {"leaves": out, "losses": losses, "step": int(state.step)}


def run_all(rank: int, world: int, names: list[str]) -> dict:
    # oneDNN takes bf16 matmuls only on CPUs with AVX-512 and rounds them its own way; torch's
    # own kernels take them everywhere else. Pinned to torch's own so that any x86 CPU agrees.
    torch.backends.mkldnn.enabled = False
    torch.manual_seed(0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out[name] = run(name, rank, tmp)
    return out if rank == 0 else {}


# The CPU kernels torch and MKL dispatch decide rounding as much as the code does (AVX2 and
# AVX-512 builds of the same reduction differ in the last bit): the recording and the test both
# pin AVX2, which every x86 machine of the last decade has, so the digests hold on any of them.
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}


def machine() -> dict:
    """What decides the bits besides the code: torch's version and the CPU kernels it dispatches."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
