"""funzero: ZeRO stages 0-3 and offload as pure functions over (params, grads, opt_state) pytrees.

    plan = funzero.zero(stage=3, groups=[r"blocks\\.(\\d+)\\."])
    state = funzero.init(model, tx, plan, precision=funzero.bf16())
    step = funzero.compile(funzero.train_step(model, loss_fn, tx, plan))  # torch.compile + heuristics
    state, metrics = step(state, batch)
"""

from funzero import losses, optim, testing
from funzero._checkpoint import load_state, save_state, wait_saves
from funzero._compile import compile
from funzero._collectives import CollectiveTimeout, CommCounter, all_gather, all_reduce, count_comm, reduce_scatter
from funzero._activations import ActivationEstimate, gpt_activations
from funzero._binding import Binding, param_count
from funzero._counts import format_bytes, parse_count
from funzero._graph import cuda_graph
from funzero._group import track_gathered
from funzero._materialize import init_weights
from funzero._memory import MemoryEstimate, estimate_memory, layouts_for_num_params
from funzero._plan import STAGES, Plan, StateSpecs, zero
from funzero._planner import Candidate, StageChoice, choose_stage
from funzero._precision import LossScaleConfig, Precision, bf16, fp16, fp32
from funzero._scaler import LossScaleState
from funzero._state import TrainState, gather_params, init, state_nbytes, sync
from funzero._nonfinite import NonFiniteError
from funzero._step import Step, train_step
from funzero._remat import remat, save_matmuls
from funzero._deepspeed import Initialized, block_rules, initialize
from funzero._weights import WeightSource, gather_weights, map_keys, open_weights, save_weights

# tensor parallelism (issue 23)
from funzero._tp import (TPLayout, TPRule, copy_to_tp, gpt2_rules, gpt_rules, llama_rules, reduce_from_tp,
                         tensor_parallel, tp_layout)

__all__ = [
    "ActivationEstimate",
    "Candidate",
    "MemoryEstimate",
    "StageChoice",
    "choose_stage",
    "compile",
    "estimate_memory",
    "format_bytes",
    "gpt_activations",
    "layouts_for_num_params",
    "parse_count",
    "Binding",
    "CollectiveTimeout",
    "CommCounter",
    "LossScaleConfig",
    "LossScaleState",
    "NonFiniteError",
    "Plan",
    "Precision",
    "STAGES",
    "StateSpecs",
    "Step",
    "TrainState",
    "all_gather",
    "all_reduce",
    "bf16",
    "count_comm",
    "cuda_graph",
    "fp16",
    "fp32",
    "gather_params",
    "init",
    "init_weights",
    "load_state",
    "losses",
    "optim",
    "param_count",
    "reduce_scatter",
    "save_state",
    "state_nbytes",
    "sync",
    "testing",
    "track_gathered",
    "train_step",
    "zero",
    "remat",
    "save_matmuls",
    "Initialized",
    "block_rules",
    "initialize",
    "wait_saves",
    "WeightSource",
    "gather_weights",
    "map_keys",
    "open_weights",
    "save_weights",
    # tensor parallelism (issue 23)
    "TPLayout",
    "TPRule",
    "copy_to_tp",
    "gpt2_rules",
    "gpt_rules",
    "llama_rules",
    "reduce_from_tp",
    "tensor_parallel",
    "tp_layout",
]

# sequence parallelism (issue 23)
from funzero._sequence import SequenceBatch, sequence_parallel, split_sequence, ulysses_attention

__all__ += ["SequenceBatch", "sequence_parallel", "split_sequence", "ulysses_attention"]
