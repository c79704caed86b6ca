"""`LETSEngine`: one optimizer step of a SAM-family rule, with a learned ρ, for any training loop.

It knows nothing about `Trainer`: a loop gives it the model, the optimizer, how to run a micro-batch
(`lets_hf.passes`), an `accelerate.Accelerator` (or nothing for one process) and, for a learned ρ,
the validation batches. `LETSMixin` is its adapter to `Trainer`; a plain loop drives it directly
(README, "Without Trainer"):

    loss = engine.backward(batch)   # every micro-batch: first pass; on the last one perturb, second pass, restore
    engine.step()                   # on the last one: clip, optimizer step, ∂θ/∂ρ

Per optimizer step (global scope, M accumulation micro-batches):

1. first passes: each micro-batch runs the loop's own backward under `no_sync`, accumulating g in
   `.grad`; the micro-batches are cached;
2. on the last micro-batch: average g over ranks (one all-reduce; under FSDP2, its own reduce-scatter
   of that pass, leaving g sharded), update ρ if due (`lets_hf.hypergradient`), turn g into ε = ρ·d
   with the rule, perturb θ;
3. second passes at θ + ε over the cached micro-batches (DDP syncs on the last one), then restore θ
   bit-exactly from a backup;
4. the optimizer steps; `after_optimizer_step` then turns the stored H·d into u = ∂θ_{t+1}/∂ρ.

A `sam_policy` (`lets_hf.policies`) decides on which optimizer steps the perturbation and the second passes run;
on the others, plain steps, the averaged g is the descent gradient (LookSAM adds its reused component) and ρ is
not updated.

Under FSDP2 every parameter-shaped tensor (g, ε, the backup, u) is a shard and every norm or inner
product one scalar all-reduce (`lets_hf.tensor_lists`). In the local scope (DDP only) each micro-batch
perturbs with its own (rank-local) gradient.
"""

from __future__ import annotations

import contextlib

import torch

from .config import check_rho_within_bounds
from .diagnostics import StepMetrics
from .distributed import GradientAverager, check_distributed_type
from .errors import UsageError, setting
from .hypergradient import Hypergradient
from .nonfinite import NonFiniteGuard
from .passes import LoopPasses, SingleProcess, synced_on_last
from .policies import get_policy
from .radius import Radius, check_optimizer_supported
from .rules import get_rule, initial_rho
from .tensor_lists import copy_, global_norm, trainable, trainable_with_grad


class LETSEngine:
    """SAM-family steps and a learned ρ around a loop's own forward and backward.

    Args:
        model: the model the loop trains (wrapped by `accelerator.prepare` where there is one).
        optimizer: its optimizer; may be set later (`engine.optimizer = ...`), before the first step.
        args: the LETS fields (`LETSArguments`, or any config with them, such as `LETSConfig`).
        loss_fn: `loss_fn(model, batch)`, the mean loss of one micro-batch, for a plain loop.
        passes: how to run a micro-batch, instead of `loss_fn` (`LETSMixin` passes Trainer's).
        accelerator: an `accelerate.Accelerator` (DDP, FSDP2, mixed precision, accumulation), or `None`.
        rho_batches: validation batches of the upper level (a `lets_hf.RhoBatches`), or a function that makes
            them once the settings are checked; needed with `learn_rho`.
        max_grad_norm: clipping of the descent gradient (0: none); it enters the hypergradient.
        gradient_accumulation_steps: micro-batches per step without an accelerator (with one, its own).
        peak_lr: learning rate at the peak of the schedule (BSAM's min side follows lr/peak); default: the
            optimizer's initial learning rate.
        max_steps: optimizer steps of the whole run; needed by `sam_policy="ae-sam"`, whose threshold follows the
            run's progress (`LETSMixin` sets it from Trainer's state).
    """

    def __init__(self, model, optimizer, args, *, loss_fn=None, passes=None, accelerator=None, rho_batches=None,
                 max_grad_norm: float = 0.0, gradient_accumulation_steps: int = 1, peak_lr: float | None = None,
                 max_steps: int | None = None):
        args.check_lets_arguments()
        self.args, self.model, self.optimizer = args, model, optimizer
        self.accelerator = accelerator if accelerator is not None else SingleProcess(model, gradient_accumulation_steps)
        if passes is None and loss_fn is None:
            raise UsageError("LETSEngine needs loss_fn(model, batch) (or passes) to run a micro-batch.")
        self.passes = passes if passes is not None else LoopPasses(loss_fn, self.accelerator)
        self.max_grad_norm, self.peak_lr, self.max_steps = max_grad_norm, peak_lr, max_steps
        self.rule = get_rule(args.sam_variant, args) if args.sam_variant != "none" else None
        self.nonfinite = NonFiniteGuard(args.nonfinite_patience)
        self.global_step = 0  # optimizer steps done; `LETSMixin` sets it from Trainer's state
        self.step_skipped = False
        self.metrics = StepMetrics()
        self.sharded = False
        if self.rule is None:
            return
        if self.rule.first_pass_loss is not None and passes is None:
            raise UsageError(
                f"sam_variant={args.sam_variant!r} descends on a surrogate of the logits in its first pass, which a "
                "plain loss_fn cannot give. Use LETSTrainer, or another rule (sam, asam, ...)."
            )
        self.sharded = check_distributed_type(self.accelerator, args)
        rho0 = initial_rho(args)
        if args.learn_rho:
            check_rho_within_bounds(rho0, args.rho_min, args.rho_max)
            if rho_batches is None and args.rho_val_batch == "held-out":
                raise UsageError(
                    "learn_rho=True needs validation data: pass rho_batches (held out from training), or set "
                    f"{setting('rho_val_batch', 'next')} (the next training batch, with rho_train_batch='last')."
                )
            if args.rho_val_batch == "next" and rho_batches is not None:
                raise UsageError(
                    f"{setting('rho_val_batch', 'next')} validates on the next training batch: rho_batches would go "
                    "unused. Drop them, or set rho_val_batch='held-out'."
                )
            rho_batches = rho_batches() if callable(rho_batches) else rho_batches
        self.radius = Radius(args, rho0, self.accelerator.device)
        self.hypergradient = Hypergradient(self, rho_batches)
        self.average_grads = GradientAverager()
        self._backup: dict[int, torch.Tensor] = {}  # θ before the perturbation, per parameter
        self._cached: list = []
        self._stepped: list = []  # the micro-batches of the step just taken (`rho_train_batch="last"` only)
        self._first_losses: list[torch.Tensor] = []
        self._micro_batches = 0
        self.surrogate_pass = False  # BiSAM: the adapter's loss reads it (its first pass descends on ∇Q)
        self.policy = get_policy(args, self.accelerator.device)  # which steps take SAM (`lets_hf.policies`)
        self._sam_step: bool | None = None  # this step's decision (None: AE-SAM's, after the last first pass)
        self._step_tracked = False  # this step carries ∂θ/∂ρ forward (`after_optimizer_step` finishes it)
        if self.policy.decides_from_gradient and max_steps is None and passes is None:
            self.policy.threshold_coefficient(0, None)  # raises: a plain loop must say how long the run is
        self.check_optimizer()

    @property
    def rho(self) -> float:
        """The current perturbation radius (0.0 for `sam_variant="none"`)."""
        return float(self.radius.value) if self.rule is not None else 0.0

    @property
    def grad_scaler(self):
        """Accelerate's fp16 grad scaler while it scales the loss, else `None` (bf16, fp32, or disabled)."""
        scaler = self.accelerator.scaler
        return scaler if scaler is not None and scaler.is_enabled() else None

    # ------------------------------------------------------------------ the loop's calls
    def backward(self, batch, model=None) -> torch.Tensor:
        """One micro-batch: the loop's own forward and backward; on the last micro-batch of a step, also the
        perturbation, the second passes and the restore. Returns the first pass's loss, scaled as the loop's."""
        model = self.model = model if model is not None else self.model
        if isinstance(self.accelerator, SingleProcess):
            self.accelerator.start_micro_batch()
        if self.rule is None:
            loss = self.passes.backward(model, batch)
        elif self.args.sam_scope == "local":
            loss = self._local_step(model, batch)
        else:
            loss = self._global_step(model, batch)
        self.nonfinite.observe_loss(loss)
        return loss

    def step(self) -> bool:
        """For a plain loop, after `backward` on every micro-batch: on the last one, clip, step the optimizer
        and track ∂θ/∂ρ. Returns whether this was the last micro-batch (the optimizer stepped or skipped)."""
        if not self.accelerator.sync_gradients:
            return False
        if self.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.before_optimizer_step()
        self.optimizer.step()
        self.after_optimizer_step(skipped=self.accelerator.optimizer_step_was_skipped)
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def before_optimizer_step(self) -> None:
        """Skip a non-finite step (the optimizer leaves parameters without a gradient, and their state,
        untouched), or stop after `nonfinite_patience` of them in a row."""
        finite = self.nonfinite.end_step(self.global_step + 1, self._likely_causes_of_nonfinite)
        if not finite and self.grad_scaler is None:  # a grad scaler skips the step by itself
            self.optimizer.zero_grad(set_to_none=True)
        self.step_skipped = not finite

    def after_optimizer_step(self, skipped: bool = False) -> None:
        """Turns H·d into u = ∂θ_{t+1}/∂ρ once the optimizer has stepped (its state is then v̂_t)."""
        if self.rule is not None:
            if skipped or self.step_skipped:
                self.radius.skip_step()
                self.policy.skip_step(sam_step=self._sam_step is not False)
            elif self._step_tracked:
                params = trainable(self.model)[1]
                self.radius.apply_descent_jacobian_(self.optimizer, params, self.radius.directions_like(params))
                if self.radius.measures_stepped_batch(self.global_step, self.max_steps):
                    self.hypergradient.measure_stepped_batch(self.model, params, self._stepped)
            elif self.radius.tracks_step(self.global_step):
                self.radius.plain_step_untracked()
            self.radius.step_done()
        self._stepped = []
        self.global_step += 1

    def check_optimizer(self) -> None:
        """A learned ρ differentiates through the optimizer's step: refuse one it cannot, before training."""
        if self.args.learn_rho and self.optimizer is not None:
            check_optimizer_supported(self.optimizer)

    def _likely_causes_of_nonfinite(self) -> str:
        rho = f", a perturbation radius too large (rho = {self.rho:.4g})" if self.rule is not None else ""
        lr = self.peak_lr if self.peak_lr is not None else self.optimizer.param_groups[0]["lr"]
        return f"a learning rate too high (learning_rate = {lr:g}){rho}, or NaN/inf in the data"

    # ------------------------------------------------------------------ the step
    def _global_step(self, model, batch):
        last_micro_batch = self.accelerator.sync_gradients
        if not self._cached:  # the step's first micro-batch
            self._begin_step()
        with self._first_pass_sync(model, last_micro_batch), self._first_pass():
            loss = self.passes.backward(model, batch)
        self._cached.append(batch)
        self._first_losses.append(loss)
        if not last_micro_batch:
            return loss

        names, params, grads = trainable_with_grad(model)
        if not self.sharded:
            self.average_grads(grads)
        if self._sam_step is None:  # AE-SAM: the global gradient's norm decides, the same on every rank
            grad_norm = global_norm(grads) * self.scale_inverse()
            self._sam_step = self.policy.decide(self.global_step, grad_norm, self.max_steps)
        if not self._sam_step:
            if self.radius.antithetic and self.radius.update_due(self.global_step):  # its windows count every step
                self._update_rho(model, params, grads)
            self._plain_step(model, names, params, grads, cached=self._cached)
        elif self._unscale_(grads) is not None:
            if self.radius.update_due(self.global_step):
                self._update_rho(model, params, grads)
            self.policy.keep_first_gradient_(names, grads)
            tracked = self._step_tracked = self._perturb_(names, params, grads, mean_of=1, first_micro_batch=True)
            self.second_passes(model, self._cached)
            if tracked:
                self.hypergradient.hessian_direction_(model, cached=self._cached)
            self._restore_(params)
            self._min_side_passes(model, params)
            if tracked:
                self.hypergradient.clip_coefficient(model)
            self.policy.after_sam_step_(names, [p.grad for p in params])
        self._record_sam_step()
        self._stepped = self._cached if self.args.rho_train_batch == "last" else []  # measured after the step
        self._cached, self._first_losses = [], []
        return loss

    def _update_rho(self, model, params, grads) -> None:
        """ρ's update at this step, from the first passes' losses and the cached micro-batches."""
        train_loss = torch.stack(self._first_losses).sum()
        self.hypergradient.update_rho(model, params, grads, train_loss, self._cached, micro_batches=1)

    def _begin_step(self) -> None:
        """The policy's decision where it needs no gradient (`None`: AE-SAM decides after the first passes)."""
        self._sam_step, self._step_tracked = self.policy.before_step(self.global_step), False

    def _plain_step(self, model, names, params, grads, cached) -> None:
        """A step the policy turned down, once its gradient is averaged: g (in `.grad`, at the loop's grad scale) is
        the descent gradient, which the policy may change (LookSAM). ρ is not updated; the trace carries ∂θ/∂ρ
        across, h ← μ·(I − A_t)·h with no d_t term (a plain step does not depend on ρ)."""
        grad_norm = global_norm(grads)
        inv_scale = self.scale_inverse()
        if inv_scale != 1.0 and not torch.isfinite(grad_norm).item():
            return  # fp16 overflow: the grad scaler skips the step
        self.metrics.record("first_grad_norm", grad_norm * inv_scale)
        self.nonfinite.observe(grad_norm)
        self.policy.plain_step_(names, grads, grad_norm)
        if self._trace_crosses_plain_step():
            self.radius.begin_direction_(self.directions_for(params))  # u ← μ·h_t, and nothing added: d_t = 0
            self.hypergradient.hessian_direction_(model, cached=cached)
            self.hypergradient.clip_coefficient(model)

    def _trace_crosses_plain_step(self) -> bool:
        """The trace estimator, with a trace to carry, on a plain step (sets `_step_tracked`)."""
        crosses = bool(self.radius.trace_decay) and self.radius.u_valid and self.radius.tracks_step(self.global_step)
        self._step_tracked = crosses
        return crosses

    def _record_sam_step(self) -> None:
        """The log's `sam_step_share`: the share of SAM steps since the last log (with a policy other than `every`)."""
        if self.policy.name != "every":
            self.metrics.record("sam_step_share", torch.tensor(float(bool(self._sam_step))))

    def _first_pass_sync(self, model, last_micro_batch: bool):
        """DDP: no sync (g is all-reduced once, flat, afterwards). FSDP2: its reduce-scatter on the last
        micro-batch averages the accumulated g exactly once and leaves it sharded."""
        if self.sharded and last_micro_batch:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def second_passes(self, model, cached):
        """Descent gradient at the perturbed point; DDP all-reduces on the last micro-batch only."""
        for batch in synced_on_last(self.accelerator, model, cached):
            with self.passes.extra_pass():
                self.passes.backward(model, batch)

    def _min_side_passes(self, model, params):
        """Bilateral rules (BSAM): a third gradient at θ − ρ_min·d, combined by the rule."""
        if not self.rule.bilateral:
            return
        min_radius = self.rule.min_side_radius(self._lr_ratio())
        descent = [p.grad for p in params]
        self.rule.keep_ascent_gradient_(descent)
        torch._foreach_zero_(descent)
        with torch.no_grad():
            torch._foreach_add_(params, self.rule.min_side_perturbation(min_radius))
        self.second_passes(model, self._cached)
        self._restore_(params)
        self.rule.combine_(descent, grad_scale=1.0 / self.scale_inverse())

    def _lr_ratio(self) -> float:
        """lr_t / lr_peak, for rules whose radius follows the learning-rate schedule."""
        group = self.optimizer.param_groups[0]
        peak = self.peak_lr if self.peak_lr is not None else group.get("initial_lr", group["lr"])
        return group["lr"] / peak if peak else 1.0

    @contextlib.contextmanager
    def _first_pass(self):
        """Rules with a surrogate objective (BiSAM) use it for the first pass only, of SAM steps only."""
        self.surrogate_pass = self.rule.first_pass_loss is not None and self._sam_step is not False
        try:
            yield
        finally:
            self.surrogate_pass = False

    def _local_step(self, model, batch):
        """m-sharpness: this micro-batch's own gradient, kept apart from the accumulated descent gradient."""
        if self._micro_batches == 0:
            self._begin_step()  # `random` or `every`: the only policies of the local scope decide before the step
        if not self._sam_step:
            return self._plain_local_micro_batch(model, batch)
        names, params = trainable(model)
        accumulated = [p.grad for p in params]
        for p in params:
            p.grad = None
        with self.accelerator.no_sync(model), self._first_pass():
            loss = self.passes.backward(model, batch)
        first = [p.grad for p in params]
        for p, acc in zip(params, accumulated):
            p.grad = acc
        keep = [i for i, g in enumerate(first) if g is not None]
        names, params, grads = [names[i] for i in keep], [params[i] for i in keep], [first[i] for i in keep]
        first.clear()  # `grads` alone holds the first-pass gradient, so `_perturb_` can free it
        first_micro_batch, self._micro_batches = self._micro_batches == 0, self._micro_batches + 1
        micro_batches = self.passes.accumulation_steps()
        if self._unscale_(grads) is None:  # overflow: hand the inf to the grad scaler so the step is skipped
            for p, g in zip(params, grads):
                p.grad = g if p.grad is None else p.grad.add_(g)
        else:
            if first_micro_batch and self.radius.update_due(self.global_step):
                self.hypergradient.update_rho(model, params, grads, loss * micro_batches, [batch], micro_batches)
            self._perturb_(names, params, grads, mean_of=micro_batches, first_micro_batch=first_micro_batch)
            with self.passes.extra_pass():
                self.passes.backward(model, batch)
            self._restore_(params)
        if self.accelerator.sync_gradients:
            if self.radius.tracks_step(self.global_step):
                self._step_tracked = True
                self.hypergradient.hessian_direction_(model, cached=None)
                self.hypergradient.clip_coefficient(model)
            self._record_sam_step()
            self._micro_batches = 0
        return loss

    def _plain_local_micro_batch(self, model, batch):
        """A micro-batch of a plain step in the local scope: the loop's own backward (DDP syncs on the last one)."""
        first_micro_batch, self._micro_batches = self._micro_batches == 0, self._micro_batches + 1
        loss = self.passes.backward(model, batch)
        if first_micro_batch and self.radius.antithetic and self.radius.update_due(self.global_step):
            micro_batches = self.passes.accumulation_steps()
            self.hypergradient.update_rho(model, None, None, loss * micro_batches, [batch], micro_batches)
        if self.accelerator.sync_gradients:
            names, params, grads = trainable_with_grad(model)
            self._plain_step(model, names, params, grads, cached=None)
            self._record_sam_step()
            self._micro_batches = 0
        return loss

    # ------------------------------------------------------------------ pieces
    def scale_inverse(self) -> float:
        return 1.0 / self.grad_scaler.get_scale() if self.grad_scaler is not None else 1.0

    def _unscale_(self, grads) -> float | None:
        """Undo fp16 loss scaling in place; `None` when the gradient overflowed (the step will be skipped)."""
        inv_scale = self.scale_inverse()
        if inv_scale == 1.0:
            return 1.0
        torch._foreach_mul_(grads, inv_scale)
        return inv_scale if torch.isfinite(global_norm(grads)).item() else None

    def _perturb_(self, names, params, grads, mean_of: int, first_micro_batch: bool) -> bool:
        """θ ← θ + ρ·d (θ backed up). Returns whether this step tracks d for the next ρ update.

        With `mean_of` > 1 (local scope) the tracked direction is the mean over micro-batches.
        """
        grad_norm = self.rule.direction_(names, params, grads)
        self.metrics.record("first_grad_norm", grad_norm)
        self.nonfinite.observe(grad_norm)
        tracked = self.radius.tracks_step(self.global_step)
        if tracked:
            directions = self.directions_for(params)
            if first_micro_batch:
                self.radius.begin_direction_(directions)
            for h in directions:
                torch._foreach_add_(h, grads, alpha=1.0 / mean_of)
        torch._foreach_mul_(grads, self.radius.radius_at(self.global_step))
        backup = self._backup_for(params)
        with torch.no_grad():
            copy_(backup, params)
            torch._foreach_add_(params, grads)
        if self.args.sam_scope == "global":
            for p in params:  # free g (now ε) for the second pass, as the loop's zero_grad does
                p.grad = None
        grads.clear()  # ε's last reference is the caller's list: θ comes back from the backup, not from θ − ε
        return tracked

    def _restore_(self, params):
        with torch.no_grad():
            copy_(params, self._backup_for(params))

    def _backup_for(self, params):
        for p in params:  # allocated once per parameter, reused every step
            if id(p) not in self._backup:
                self._backup[id(p)] = torch.empty_like(p)
        return [self._backup[id(p)] for p in params]

    def directions_for(self, params, model=None) -> list[list[torch.Tensor]]:
        """u (∂θ/∂ρ), then the signal probes' traces, each aligned with `params` (trainable parameters)."""
        all_params = trainable(model if model is not None else self.model)[1]
        index = {id(p): i for i, p in enumerate(all_params)}
        return [[h[index[id(p)]] for p in params] for h in self.radius.directions_like(all_params)]

    def u_for(self, params, model=None):
        return self.directions_for(params, model)[0]

    # ------------------------------------------------------------------ logging and state
    def pop_metrics(self, repeat_last: bool = False) -> dict[str, float]:
        """The means since the last call (first-pass gradient norm, the gap, the hypergradient), then clears them;
        with `repeat_last`, a metric without a new value repeats its last mean (what a log shows)."""
        return self.metrics.pop(repeat_last)

    def state_dict(self) -> dict:
        """ρ, its optimizer and ∂θ/∂ρ, the rule's statistics, the validation stream's position and the metrics
        not yet logged (under FSDP2 the parameter-shaped tensors are `DTensor` shards); `lets_hf.engine_state`
        writes it into a checkpoint."""
        if self.rule is None:
            return {"global_step": self.global_step}
        batches = self.hypergradient.rho_batches
        return {
            "radius": self.radius.state_dict(),
            "rule": self.rule.state_dict(),
            "rho_batches": batches.state_dict() if batches is not None else None,
            "global_step": self.global_step,
            "metrics": self.metrics.state_dict(),
            "policy": self.policy.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_step = state.get("global_step", self.global_step)  # absent in checkpoints of LETSTrainer < 0.2
        if self.rule is None:
            return
        self.radius.load_state_dict(state["radius"])
        self.rule.load_state_dict(state["rule"])
        if state["rho_batches"] is not None:
            self.hypergradient.rho_batches.load_state_dict(state["rho_batches"])
        if "metrics" in state:  # absent in older checkpoints: the first log then covers the steps since the checkpoint
            self.metrics.load_state_dict(state["metrics"])
        if "policy" in state:  # absent in checkpoints from before sam_policy
            self.policy.load_state_dict(state["policy"])
