"""The train step: ``step(state, batch) -> (state, metrics)``, one program for every stage.

    batch ── this rank's slice ── forward + backward through the group path (_group.py) ──▶ gradients
          ── accumulate (optim.multi_steps) ── reduce (if the specs defer it to the step)
          ── non-finite check (_nonfinite.py) ── update where the state lives (_update.py) ──▶ new state

Design note:

* **Gradients come from ``torch.autograd.grad``**, on anchors made inside the step, so the step
  stays a pure function of ``(state, batch)``. Not ``torch.func.grad``: measured on torch 2.13,
  (1) torch.func refuses the saved-tensor hooks that let sharded parameters be gathered again in
  backward, and (2) under ``torch.compile`` dynamo's ``torch.func.grad`` differentiates through a
  custom ``autograd.Function``'s forward and silently drops its backward, i.e. the gradient
  reduce would vanish. ``torch.autograd.grad`` keeps the custom backward under compile, and
  traces into one graph where dynamo allows it (``torch._dynamo.config.trace_autograd_ops``,
  set here when the running torch has it).
* **The model is a template.** ``init`` leaves placeholders in the module; the group path hands
  each owner module its group's parameters during its forward (``_group.py``). ``apply(*args)``
  in ``loss_fn`` is the model's own call.
* **Donation.** The incoming state's buffers are updated in place (fused optimizer kernels, the
  in-place all-gather of replicated parameters); do not use it after the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
from torch import nn

from funzero._collectives import all_reduce
from funzero._group import GroupComm, GroupHooks, Run, forward_regathered, group_modes
from funzero._nonfinite import Guard, NonFinitePolicy, carry_loss
from funzero._plan import Plan
from funzero._state import TrainState, binding_of
from funzero._tp import tp_info
from funzero._update import UpdateJob, gather_into, groupwise, pipelined, update
from funzero.optim import GradientTransformation, ShardInfo
from funzero.optim._base import gradient_tensors
from shardspec import is_sharded

__all__ = ["train_step"]

if hasattr(torch._dynamo.config, "trace_autograd_ops"):
    # Lets dynamo put torch.autograd.grad into the step's graph (torch >= 2.13); older versions
    # break the graph there and compile forward/backward and the update separately.
    torch._dynamo.config.trace_autograd_ops = True

# A compiled step that gathers runs its forward in one checkpoint region (_group.py); the group
# owners' hooks swap parameters into modules in there, a side effect dynamo otherwise refuses in
# a checkpoint (a graph break). Compiled, nothing replays the forward in Python, so there is
# nothing to skip. It applies to every compiled checkpoint in the process, as the switch above.
# A torch without the switch keeps the old form: gathered groups live until backward.
_COMPILED_REGATHER = hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint")
if _COMPILED_REGATHER:
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True

LossFn = Callable[[Callable[..., Any], Any], Any]


def as_transformation(tx) -> GradientTransformation:
    """``tx`` as a :class:`~funzero.optim.GradientTransformation` (an optax-style object with
    ``gradient_transformation()``, such as ``optim.MultiSteps``, is converted)."""
    if not isinstance(tx, GradientTransformation) and callable(getattr(tx, "gradient_transformation", None)):
        tx = tx.gradient_transformation()
    if not isinstance(tx, GradientTransformation):
        torch_opt = isinstance(tx, torch.optim.Optimizer) or (isinstance(tx, type) and issubclass(tx, torch.optim.Optimizer))
        hint = (": funzero takes optax-style transforms, e.g. fz.optim.adamw(lr) for torch.optim.AdamW"
                if torch_opt else "")
        name = tx.__name__ if isinstance(tx, type) else type(tx).__name__
        raise ValueError(f"tx must be a funzero.optim.GradientTransformation, got {name}{hint}")
    return tx


def _local_batch(batch: Any, plan: Plan) -> Any:
    """This rank's slice of dim 0 of every tensor in a global batch (its slice of the whole
    data-parallel world: replicas x shards)."""
    n = plan.num_data_ranks
    if plan.batch == "local" or n == 1:
        return batch
    r = plan.data_rank
    paths, leaves, spec = optree.tree_flatten_with_path(batch, namespace="funzero")
    out = []
    for path, x in zip(paths, leaves):
        if not isinstance(x, torch.Tensor):
            out.append(x)
            continue
        name = ".".join(map(str, path)) or "batch"
        if x.dim() == 0 or x.shape[0] % n:
            raise ValueError(
                f"batch leaf {name!r} has shape {tuple(x.shape)}: dim 0 must divide over {n} ranks"
            )
        b = x.shape[0] // n
        out.append(x[r * b : (r + 1) * b])
    return optree.tree_unflatten(spec, out)


class Step:
    """``step(state, batch) -> (state, metrics)``, from :func:`train_step`.

    Attributes:
        model / loss_fn / tx / plan: as given (``tx`` the transform as given, accumulation
            included).
        leaf_grads: one-rank eager steps may hand a leafwise optimizer the leaves' gradients as
            autograd made them (``funzero.testing.configure`` switches it off for comparisons).
        nonfinite: the :class:`~funzero._nonfinite.NonFinitePolicy` (``nonfinite``, ``max_skips``).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, tx, plan: Plan, has_aux: bool, remat=None,
                 nonfinite: str = "skip", max_skips: int | None = 100) -> None:
        if not isinstance(plan, Plan):
            raise ValueError(f"plan must be a funzero.Plan from funzero.zero(...), got {type(plan).__name__}")
        self.nonfinite = NonFinitePolicy(nonfinite, max_skips)
        self.guard = Guard(self.nonfinite)
        if remat is not None:
            from funzero._remat import remat as apply_remat

            apply_remat(model, remat)
        self.model, self.loss_fn, self.plan, self.has_aux = model, loss_fn, plan, has_aux
        self.tx = as_transformation(tx)
        self.accumulate = self.tx.traits.accumulate
        self.inner = self.accumulate.inner if self.accumulate is not None else self.tx
        self.leaf_grads = True
        self.binding = None
        self.hooks: GroupHooks | None = None
        b = binding_of(model)
        if b is not None:
            self.prepare(b)

    # --- binding ------------------------------------------------------------------------------
    def prepare(self, b) -> None:
        """Make this step ready for states of binding ``b``: checks, and the owners' hooks."""
        if b is self.binding:
            return
        p = self.plan
        if b.num_shards != p.num_shards:
            raise ValueError(
                f"state was initialised for {b.num_shards} ranks on axis {p.axis!r}, the plan's mesh has {p.num_shards}"
            )
        if b.num_replicas != p.num_replicas:
            raise ValueError(f"state was initialised for {b.num_replicas} replicas over {p.specs.replicate}, the "
                             f"plan's mesh has {p.num_replicas}")
        if b.specs != p.specs:
            raise ValueError(f"state was initialised for ZeRO stage {b.stage}, the plan is stage {p.stage}")
        if b.rank != p.rank:
            raise ValueError(f"state belongs to rank {b.rank}, this process is rank {p.rank}")
        if b.precision.loss_scaling is not None and not self.nonfinite.guarded:
            raise ValueError("nonfinite='ignore' cannot apply under fp16: dynamic loss scaling must skip the "
                             "steps that overflow (use 'skip' or 'raise')")
        self.binding = b
        self.guard.prepare(torch.device(b.placement.compute))
        self.comm = GroupComm(p.mesh, p.specs, b.precision.reduce_dtype, b.placement.compute)
        self.info = ShardInfo(
            b.layouts, b.rank,
            sharded=is_sharded(p.specs.opt_state) and p.num_shards > 1,
            psum=lambda x: all_reduce(x.to(b.placement.compute), p.mesh, p.axis, op="sum", tag="norm").to(x.device),
            **tp_info(b.tp, b.placement.compute),
        )
        self.forward_order = {g: i for i, g in enumerate(b.layouts)}
        if self.hooks is not None:
            self.hooks.remove()
        self.hooks = GroupHooks(self.model, b)

    # --- the group path's form for this call --------------------------------------------------------
    def takes_leaves(self, state: TrainState) -> bool:
        """Whether this call hands the optimizer :class:`~funzero.optim.LeafGrads`: eager, one
        rank, nothing gathered, everything on the device, no accumulation, an fp32 target and an
        optimizer whose fused pass reads leaves (see ``_group.py`` for the measured reason)."""
        b, fused = state.binding, self.inner.traits.fused
        target = state.master if state.master is not None else state.params
        return (
            self.leaf_grads
            and not torch.compiler.is_compiling()
            and self.plan.num_data_ranks == 1
            and not self.comm.gathers(b.placement.offloaded("params"))
            and self.accumulate is None
            and fused is not None
            and fused.takes_leaves
            and not b.placement.offloaded("opt_state")
            and not b.placement.offloaded("params")
            and all(t.dtype == torch.float32 for t in target.values())
        )

    def modes(self, state: TrainState) -> dict[str, str]:
        b = state.binding
        return group_modes(self.comm, b.placement, b.layouts, leaves=self.takes_leaves(state))

    def job(self, state: TrainState, opt_state) -> UpdateJob:
        b = state.binding
        specs = self.plan.specs
        params_own = {g: specs.opt_view(t, b.layouts[g], b.rank) for g, t in state.params.items()}
        return UpdateJob(self.inner, opt_state, state.master, state.params, params_own, self.info,
                         gather_into(self.plan, b, state.params), self.forward_order)

    def stream(self, state: TrainState, job: UpdateJob):
        """``fn(group, gradient)`` that starts each offloaded group's host update from inside
        backward, or None: eager steps only (a compiled backward is one graph), and only where a
        group's gradient is final when backward produces it and the update needs nothing global
        first (no clipping norm, no non-finite check, no accumulation, no reduce left to the
        step, not the delayed update, which waits for the previous one first): so only with
        ``nonfinite="ignore"``, as the check needs every gradient before any update."""
        p, b = self.plan, state.binding
        if (
            torch.compiler.is_compiling()
            or p.delayed_update
            or self.accumulate is not None
            or self.checks(b)
            or (p.num_data_ranks > 1 and p.specs.reduce == "step")
        ):
            return None
        gw = groupwise(job)
        if not pipelined(b.placement, gw) or gw.prefix is not None:
            return None
        from funzero._placement._host import group_update

        hosted = [g for g in b.layouts if b.placement.offloaded("opt_state", g)]
        update_fn = group_update(b.placement, job.master, gw, None, None, self.info, job.committed)
        order = self.forward_order if p.async_update else None
        return b.placement.host.begin(hosted, job.params_own, update_fn, order)

    # --- one call -----------------------------------------------------------------------------------
    def loss(self, batch: Any, loss_scale: torch.Tensor | None):
        """``loss_fn`` run on the model: ``(loss, aux, the loss to differentiate)`` (times the fp16
        loss scale, if any)."""
        out = self.loss_fn(self.model, batch)
        if self.has_aux and not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(f"with has_aux=True loss_fn must return (loss, aux), got {type(out).__name__}")
        loss, aux = out if self.has_aux else (out, None)
        _check_loss(loss, self.has_aux)
        return loss, aux, (loss * loss_scale if loss_scale is not None else loss)

    def forward_backward(self, state: TrainState, batch: Any, loss_scale, stream=None):
        """``({group: gradient}, loss, aux)`` of one micro-batch (this rank's slice)."""
        b = state.binding
        eager = not torch.compiler.is_compiling()
        if self.plan.async_update and not eager:
            state.binding.placement.sync()  # a compiled forward cannot wait group by group
        before_use = b.placement.before_use if (eager and self.plan.async_update) else None
        gathers = self.comm.gathers(b.placement.offloaded("params"))
        run = Run(self.hooks, self.comm, state.params, self.modes(state), stream=stream, regather=eager and gathers,
                  recompute=gathers and not eager and _COMPILED_REGATHER, before_use=before_use)
        try:
            with self.hooks.activate(run):
                if run.recompute:
                    loss, aux, scaled = forward_regathered(self.loss, batch, loss_scale)
                else:
                    loss, aux, scaled = self.loss(batch, loss_scale)
                grads = run.gradients(scaled)
        except BaseException:
            if stream is not None:
                stream.abort()  # the worker stops waiting for gradients that will not come
            raise
        return grads, loss.detach(), aux

    def reduce_at_step(self, grads: dict) -> dict:
        """Where the specs defer the reduce to the optimizer step: reduce each full local gradient
        now (dropping each as soon as its reduced form exists)."""
        if self.plan.specs.reduce != "step" or self.plan.num_data_ranks == 1:
            return grads
        out = {}
        for g in list(grads):
            out[g] = self.comm.reduce(grads.pop(g))
        return out

    def checks(self, b) -> bool:
        """Whether steps of binding ``b`` compute the non-finite flag (fp16 always does)."""
        return self.nonfinite.guarded or b.precision.loss_scaling is not None

    def found_nonfinite(self, grads: dict, loss: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """1.0 if any rank's gradient or loss holds an inf/NaN (one all-reduce of a scalar), else
        0.0; then the policy's guard (``step``: ``state.step``, for its messages), which may force
        it on and may raise for an earlier step.

        One read of each gradient, no temporaries (``funzero.ops.nonfinite_``), no host read.
        """
        from funzero import ops

        tensors = gradient_tensors(grads)
        flag = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
        ops.nonfinite_(tensors, flag)
        flag.masked_fill_(~torch.isfinite(loss.to(flag.device)), 1.0)
        flag = all_reduce(flag, self.plan.mesh, self.plan.data_axes, op="max", tag="metrics")
        tp = self.binding.tp  # tp ranks hold different gradients: they skip together, or drift apart
        if tp is not None:
            flag = all_reduce(flag, tp.mesh, tp.axis, op="max", tag="metrics")
        return self.guard.apply(flag, step)

    def check_nonfinite(self) -> None:
        """Judge every non-finite flag still in flight (waiting for them) and raise as the policy
        says: on a GPU the last steps of a loop are otherwise judged by the next call."""
        self.guard.drain()

    def __call__(self, state: TrainState, batch: Any):
        state.check_alive("the train step")
        new_state, metrics = self._step(state, batch)
        state.donated_at = state.step  # its buffers are new_state's now
        return new_state, metrics

    def _step(self, state: TrainState, batch: Any):
        self.prepare(state.binding)
        p, b = self.plan, state.binding
        batch = _local_batch(batch, p)
        cfg = b.precision.loss_scaling
        loss_scale = state.scaler.scale if cfg is not None else None
        opt_state = state.opt_state
        acc = self.accumulate
        inner_state = acc.inner_state(opt_state) if acc is not None else opt_state
        job = self.job(state, inner_state)
        grads, loss, aux = self.forward_backward(state, batch, loss_scale, self.stream(state, job))
        metrics: dict[str, Any] = {}
        checks = self.checks(b)
        if acc is not None:
            if checks:
                grads = carry_loss(grads, loss)  # judged with the accumulated gradient
            ready, grads, opt_state = acc.add(opt_state, grads)
            metrics["applied"] = torch.full((), ready, dtype=torch.bool, device=loss.device)
            if not ready:
                if checks:
                    metrics["skipped"] = torch.zeros((), dtype=torch.bool, device=loss.device)
                metrics["loss"] = all_reduce(loss, p.mesh, p.data_axes, op="avg", tag="metrics")
                return state.replace(opt_state=opt_state), _with_aux(metrics, aux)
        grads = self.reduce_at_step(grads)
        grad_scale = found_inf = None
        if checks:
            found_inf = self.found_nonfinite(grads, loss, state.step)
        if cfg is not None:
            grad_scale = (1.0 / state.scaler.scale).to(torch.float32)
        new_inner, master, params = update(p, b, job, grads, grad_scale, found_inf)
        new_opt = acc.with_inner_state(opt_state, new_inner) if acc is not None else new_inner
        scaler = state.scaler
        step = state.step + 1
        if checks:  # a skipped step is not counted: state.step counts the updates applied
            step = state.step + (found_inf == 0).to(state.step.dtype)
            metrics["skipped"] = found_inf != 0
        if cfg is not None:
            from funzero._scaler import update_scaler

            scaler = update_scaler(state.scaler, found_inf, cfg)
            metrics["loss_scale"] = state.scaler.scale
        metrics["loss"] = all_reduce(loss, p.mesh, p.data_axes, op="avg", tag="metrics")
        new_state = state.replace(step=step, params=params, master=master, opt_state=new_opt, scaler=scaler)
        return new_state, _with_aux(metrics, aux)


def _check_loss(loss, has_aux: bool) -> None:
    """The loss must be a scalar floating tensor that depends on the parameters (its message, built
    only on failure, says what came back instead)."""
    if isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point() and loss.requires_grad:
        return
    if not isinstance(loss, torch.Tensor):
        if hasattr(loss, "loss"):
            raise ValueError(f"loss_fn returned a {type(loss).__name__}: return its `.loss` (a scalar tensor)")
        if isinstance(loss, tuple) and not has_aux:
            raise ValueError("loss_fn returned a tuple: return the loss alone, or (loss, aux) with has_aux=True")
        raise ValueError(f"loss_fn must return a scalar floating-point tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(f"loss_fn returned a tensor of shape {tuple(loss.shape)}: reduce it to a scalar (e.g. .mean())")
    if not loss.is_floating_point():
        raise ValueError(f"loss_fn returned a {loss.dtype} tensor: the loss must be floating point")
    raise ValueError("loss_fn returned a loss that does not depend on the model's parameters (requires_grad is "
                     "False): compute it from apply(...)'s output")


def _with_aux(metrics: dict, aux: Any) -> dict:
    if aux is not None:
        metrics["aux"] = optree.tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, aux)
    return metrics


def train_step(
    model: nn.Module,
    loss_fn: LossFn,
    tx: GradientTransformation,
    plan: Plan,
    *,
    has_aux: bool = False,
    remat=None,
    nonfinite: str = "skip",
    max_skips: int | None = 100,
) -> Step:
    """Build ``step(state, batch) -> (state, metrics)`` for ``model`` under ``plan``.

    Args:
        model: the module passed to :func:`funzero.init` (a template after ``init``).
        loss_fn: ``loss_fn(apply, batch) -> loss`` (or ``(loss, aux)`` with ``has_aux``), where
            ``apply(*args, **kwargs)`` runs the model with the state's parameters.
        tx: the optimizer passed to ``init``.
        plan: the plan passed to ``init``.
        remat: activation checkpointing rules ``[(module path regex, policy), ...]`` applied to
            ``model`` once, here (:func:`funzero.remat`: ``"full"``, ``"selective"``,
            ``"offload"``); a recomputed module's sharded groups are gathered again for the
            recompute.
        nonfinite: what a step whose loss or gradient holds an inf/NaN (on any rank) does, under
            every precision: ``"skip"`` (default) drops its update, on the device: params and
            optimizer state stay bit-identical and ``state.step`` does not advance (it counts the
            updates applied); ``"raise"`` drops it and raises :class:`funzero.NonFiniteError`
            naming the step; ``"ignore"`` applies it (no check; refused under fp16, whose loss
            scaling must skip overflows). With gradient accumulation the optimizer step judges
            the accumulated gradient and every micro-step's loss; a skip drops the window.
        max_skips: under ``"skip"``, the consecutive skipped steps tolerated before
            :class:`funzero.NonFiniteError` (``None``: no bound; an fp16 overflow counts as a skip,
            so ``"raise"`` under fp16 stops at the first one). ``"raise"`` and this bound read the
            flag on the host lazily, never inside the step: as the step ends on the CPU, once its
            copy has landed on a GPU (at the end of a later call, at most two behind;
            ``step.check_nonfinite()`` waits for every flag in flight). Until then the device
            keeps skipping, so the error comes with the last finite state.

    Returns:
        A pure step: the incoming state is donated (updated in place) and must not be reused.
        ``metrics`` holds device tensors (``loss``: the mean over ranks; ``skipped`` unless
        ``nonfinite="ignore"``; ``applied`` with gradient accumulation): nothing in the step waits
        on the host.

    Graph breaks under ``torch.compile``: none on torch >= 2.13 for one-rank steps and stages
    0-2; re-gathering sharded parameters in backward is eager-only (see ``_group.py``). Older
    torch breaks the graph at ``torch.autograd.grad``. Offloaded updates and gradient
    accumulation run on the host (a graph break; accumulation syncs once per micro-step).

    Example:
        >>> def loss_fn(apply, batch):
        ...     x, y = batch
        ...     return F.cross_entropy(apply(x).flatten(0, 1), y.flatten())
        >>> step = fz.compile(train_step(model, loss_fn, tx, plan))
        >>> state, metrics = step(state, batch)
    """
    return Step(model, loss_fn, tx, plan, has_aux, remat, nonfinite, max_skips)
