"""Per-GPU model-state memory of Llama-3-70B shapes at the planner's choice: the README's table.

    python benchmarks/plan_table.py        # prints the Markdown the README's "Planning a 70B run" holds

The model is a Hugging Face ``LlamaForCausalLM`` built on the meta device with Llama-3-70B's
shapes (nothing is allocated); ``funzero.choose_stage`` splits it over tp = 8 by the ``llama``
rules, tries every stage, offload and replica count for the given GPUs, and returns the fastest
that fits (its order is in ``funzero/_planner.py``). Every number comes from
``funzero.estimate_memory`` on the engine's own layouts; ``tests/test_readme.py`` checks that the
README's table is this script's output. No GPU is needed.
"""

from __future__ import annotations

import torch

import funzero as fz

LLAMA_3_70B = dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                   intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False)
GPUS = (8, 64, 512)
TP = 8
GPU_GB, RESERVE_GB, HOST_GB, GPUS_PER_NODE = 80, 8, 2000, 8


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**LLAMA_3_70B))


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f}"


def table() -> str:
    """The caption and the Markdown table (GB = 1e9 bytes)."""
    model = _model()
    kw = dict(precision=fz.bf16(), tx="adamw", groups=fz.block_rules(model))
    lines = [
        f"Llama-3-70B shapes ({fz.param_count(model):,} parameters), bf16 parameters, fp32 master and AdamW "
        f"moments, tp = {TP}, one group per decoder layer; budget {GPU_GB} GB per GPU ({RESERVE_GB} GB kept "
        f"free), {HOST_GB:,} GB host per node of {GPUS_PER_NODE} GPUs; GB = 1e9 bytes.",
        "",
        "| GPUs | plan (fastest that fits) | model states per GPU (GB): params + grads + optimizer | "
        "GPU peak (GB) | host per node (GB) | stage 3 over all dp ranks (GB) |",
        "|---|---|---|---|---|---|",
    ]
    for gpus in GPUS:
        choice = fz.choose_stage(model, gpus=gpus, tp=TP, gpu_bytes=GPU_GB * 1e9, reserve_bytes=RESERVE_GB * 1e9,
                                 cpu_bytes=HOST_GB * 1e9, gpus_per_node=GPUS_PER_NODE, **kw)
        best = choice.best
        e = best.estimate
        dp = gpus // TP
        floor = fz.estimate_memory(model, stage=3, num_shards=dp, tp=TP, **kw)
        ms = e.model_states
        plan = (f"stage {e.stage}, offload {best.offload}, dp {dp} x tp {e.tp}, "
                f"sharded over {e.num_shards} x {e.num_replicas} replica{'s' if e.num_replicas > 1 else ''}")
        lines.append(
            f"| {gpus} | {plan} | {_gb(ms['total'])} = {_gb(ms['params'])} + {_gb(ms['grads'])} + "
            f"{_gb(ms['optimizer'])} | {_gb(e.gpu)} | {_gb(best.cpu_node)} | {_gb(floor.model_states['total'])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
