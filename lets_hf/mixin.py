"""`LETSMixin`: sharpness-aware passes and a learned ρ for any `transformers.Trainer` subclass.

    class LETSTrainer(LETSMixin, Trainer): ...            # lets_hf/trainers.py
    class MyTrainer(LETSMixin, MyOwnTrainer): ...         # the same two lines for any subclass

Per optimizer step (global scope, M accumulation micro-batches):

1. first passes: each micro-batch runs the trainer's own `training_step` under `no_sync`,
   accumulating g in `.grad`; the inputs are cached;
2. on the last micro-batch: average g over ranks (one all-reduce; under FSDP2, its own
   reduce-scatter of that pass, leaving g sharded), update ρ if due (validation pass +
   hypergradient), turn g into ε = ρ·d with the rule, perturb θ;
3. second passes at θ + ε over the cached micro-batches (DDP syncs on the last one),
   then restore θ bit-exactly from a backup;
4. Trainer clips and steps the optimizer as usual; a callback then turns the stored
   H·d into u = ∂θ_{t+1}/∂ρ for the next ρ update.

Under FSDP2 every parameter-shaped tensor (g, ε, the backup, u) is a shard and every norm or inner
product one scalar all-reduce (`lets_hf.tensor_lists`). In the local scope (DDP only) each
micro-batch perturbs with its own (rank-local) gradient. Passes
other than Trainer's own first pass run inside `extra_pass()`, so that a trainer that
records metrics in `compute_loss` (TRL) can count each training token once.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from accelerate.utils import DistributedType
from transformers import TrainerCallback
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    get_last_checkpoint,
    rotate_checkpoints,
    unwrap_peft_model,
)
from transformers.utils import logging

from . import checkpoints, loss_normalization
from .config import LETSArguments, check_fsdp2_settings, check_rho_within_bounds
from .distributed import GradientAverager, average_scalars, local_state, reshard, same_on_all_ranks, sharded_state
from .errors import UsageError
from .loss_normalization import LossNormalization, logits_of
from .nonfinite import NonFiniteGuard
from .optim import lightsam_optimizer_cls_and_kwargs
from .radius import Radius, check_optimizer_supported
from .rules import get_rule
from .tensor_lists import copy_, global_dot, global_norm
from .validation import RhoBatches, own_random_stream, split_for_rho

logger = logging.get_logger(__name__)

LETS_STATE_NAME = "lets_state.pt"
#: Step of the finite-difference Hessian-vector product, relative to ‖d‖ (exact mode fallback).
FD_STEP = 1e-3


class LETSMixin:
    """Put it first among the bases of a `Trainer` subclass; its `args` must be a `LETSArguments`.

    Args:
        rho_dataset: held-out training data for the upper level (learned ρ). When `None`
            and `args.learn_rho`, a fixed-seed `args.rho_val_fraction` of the trainer's
            `train_dataset` (as the trainer prepared it) is held out and never trained on.
            The evaluation set is never used for ρ.
        Every other argument is the trainer's own.
    """

    def __init__(self, *args, rho_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, LETSArguments):
            raise TypeError(
                f"{type(self).__name__} needs args with the LETS fields (LETSConfig, or a dataclass with LETSArguments "
                f"among its bases), got {type(self.args).__name__}."
            )
        args = self.args
        args.check_lets_arguments()  # again: a config whose other base comes first never ran it
        self.loss_normalization = self._configured_loss_normalization()
        self.rule = get_rule(args.sam_variant, args) if args.sam_variant != "none" else None
        self.rho_dataset = self._rho_validation_data(rho_dataset)
        self._staging_checkpoint = False
        self._in_extra_pass = False
        self._nonfinite = NonFiniteGuard(args.nonfinite_patience)
        self._step_skipped = False
        self.add_callback(_NonFiniteStepGuard(self))
        if self.rule is None:
            return
        self._sharded = self._check_distributed_type()
        initial_rho = args.rho if args.rho is not None else self.rule.default_rho
        if args.learn_rho:
            check_rho_within_bounds(initial_rho, args.rho_min, args.rho_max)
            self._use_non_reentrant_checkpointing()
        self.radius = Radius(args, initial_rho, self.args.device)
        self._rho_batches = self._make_rho_batches() if args.learn_rho else None
        self._fixed_rho_batches = None  # the antithetic estimator's, drawn at its first window boundary
        self._average_grads = GradientAverager()
        self._backup: dict[int, torch.Tensor] = {}  # θ before the perturbation, per parameter
        self._cached: list[tuple[dict, object]] = []
        self._micro_batches = 0
        self._first_losses: list[torch.Tensor] = []
        self._hvp_by_double_backward = True
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_counts: dict[str, int] = {}
        self._last_metrics: dict[str, float] = {}
        self.add_callback(_AfterOptimizerStep(self))

    def _check_distributed_type(self) -> bool:
        """DDP or FSDP2 (returns whether parameters are sharded); FSDP1 and DeepSpeed are refused."""
        distributed_type = self.accelerator.distributed_type
        if distributed_type == DistributedType.DEEPSPEED or (
            distributed_type == DistributedType.FSDP and not self.accelerator.is_fsdp2
        ):
            name = "FSDP1" if distributed_type == DistributedType.FSDP else "DeepSpeed"
            raise UsageError(
                f"{type(self).__name__} does not support {name}: its engine owns the gradient buffers the perturbation "
                "needs. Launch with FSDP2 (accelerate launch --config_file examples/accelerate_fsdp2.yaml, or "
                "fsdp_config={'version': 2}) or with DDP (accelerate launch --multi_gpu)."
            )
        if distributed_type != DistributedType.FSDP:
            return False
        check_fsdp2_settings(self.args)  # launched from an accelerate config: TrainingArguments never saw it
        return True

    def _rho_validation_data(self, rho_dataset):
        """`rho_dataset` as the trainer prepares datasets, or a held-out split of the prepared train set."""
        if not self.args.learn_rho:
            return rho_dataset
        if rho_dataset is not None:
            rho_dataset = self._prepare_rho_dataset(rho_dataset)
        elif self.train_dataset is None:
            raise UsageError("learn_rho=True needs validation data: pass train_dataset (split) or rho_dataset.")
        else:
            self.train_dataset, rho_dataset = split_for_rho(
                self.train_dataset, self.args.rho_val_fraction, self.args.rho_seed, self._antithetic_examples()
            )
        if len(rho_dataset) == 0:
            raise UsageError("rho_dataset is empty: learn_rho=True needs validation examples held out from train.")
        return rho_dataset

    def _antithetic_examples(self) -> int | None:
        """The antithetic estimator evaluates only its fixed batches: it holds out exactly their examples
        (fewer than `rho_val_fraction` usually, so training keeps more data). `None` for the other estimators."""
        args = self.args
        if args.rho_estimator != "antithetic":
            return None
        return args.rho_antithetic_batches * (args.rho_batch_size or args.per_device_train_batch_size) * args.world_size

    def _prepare_rho_dataset(self, rho_dataset):
        """Hook for trainers that prepare their datasets in `__init__` (TRL tokenizes, packs): the same for ρ's."""
        return rho_dataset

    def _use_non_reentrant_checkpointing(self) -> None:
        """The ρ update takes gradients with `torch.autograd.grad`, which reentrant checkpointing cannot run."""
        if not self.args.gradient_checkpointing:
            return
        kwargs = dict(self.args.gradient_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant"):
            raise UsageError(
                "learn_rho with gradient checkpointing needs non-reentrant checkpointing (its validation gradient is "
                "taken with torch.autograd.grad). Set gradient_checkpointing_kwargs={'use_reentrant': False}."
            )
        kwargs["use_reentrant"] = False
        self.args.gradient_checkpointing_kwargs = kwargs

    @contextlib.contextmanager
    def extra_pass(self):
        """The passes LETS adds to the trainer's own (perturbed, validation, Hessian): `compute_loss` sees
        `self._in_extra_pass`, so that per-token metrics count each training token once."""
        self._in_extra_pass = True
        try:
            yield
        finally:
            self._in_extra_pass = False

    @property
    def rho(self) -> float:
        """The current perturbation radius (0.0 for `sam_variant="none"`)."""
        return float(self.radius.value) if self.rule is not None else 0.0

    @property
    def grad_scaler(self):
        """Accelerate's fp16 grad scaler while it scales the loss, else `None` (bf16, fp32, or disabled)."""
        scaler = self.accelerator.scaler
        return scaler if scaler is not None and scaler.is_enabled() else None

    # ------------------------------------------------------------------ loss normalization
    @property
    def model_accepts_loss_kwargs(self) -> bool:
        """Trainer infers it in `__init__` from `forward`'s signature; LETSTrainer corrects it by a probe
        (`lets_hf.loss_normalization`). A value assigned after `__init__` is the user's and wins."""
        return self._model_accepts_loss_kwargs

    @model_accepts_loss_kwargs.setter
    def model_accepts_loss_kwargs(self, value: bool) -> None:
        self._model_accepts_loss_kwargs = value
        if "loss_normalization" in self.__dict__:  # set after __init__: the user's explicit choice
            self.loss_normalization = LossNormalization(loss_normalization.USER, reason="model_accepts_loss_kwargs")

    def _configured_loss_normalization(self) -> LossNormalization | None:
        """The normalization known without a probe, or `None` (probe the first batch that has labels)."""
        if self.compute_loss_func is not None:
            return LossNormalization(loss_normalization.USER, reason="compute_loss_func")
        if self.loss_is_scaled_for_ga is not None:
            return LossNormalization(loss_normalization.USER, reason="loss_is_scaled_for_ga")
        if hasattr(unwrap_peft_model(self.accelerator.unwrap_model(self.model)), "accepts_loss_kwargs"):
            return LossNormalization(loss_normalization.USER, reason="the model's accepts_loss_kwargs")
        if self.label_smoother is not None:  # Trainer computes the loss from the logits with num_items_in_batch
            return LossNormalization(loss_normalization.BY_NUM_ITEMS, reason="label smoothing")
        if not self.model_accepts_loss_kwargs:
            return LossNormalization(loss_normalization.MICRO_BATCH_MEAN, reason="its forward takes no **kwargs")
        return None

    def _settle_loss_normalization(self, inputs) -> None:
        """Probe once, on the first batch with labels (every rank agrees), and set Trainer's switches to match."""
        if self.loss_normalization is not None or "labels" not in inputs:
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        verdict = loss_normalization.probe(unwrapped, inputs)
        code = 0 if verdict is None else loss_normalization.VERDICTS.index(verdict) + 1
        lowest, highest = same_on_all_ranks(code, self.args.device)
        if lowest == 0:  # this batch cannot tell on some rank: probe the next one
            return
        if lowest != highest:
            raise RuntimeError(
                "The loss normalization probe gave different verdicts on different ranks "
                f"({loss_normalization.VERDICTS[lowest - 1]} and {loss_normalization.VERDICTS[highest - 1]})."
            )
        split_batches = self.args.gradient_accumulation_steps > 1 or self.args.world_size > 1
        corrected = verdict.kind != loss_normalization.BY_NUM_ITEMS and split_batches  # else Trainer agrees
        if verdict.kind == loss_normalization.MICRO_BATCH_MEAN:
            self._model_accepts_loss_kwargs = False  # Trainer then divides by the accumulation steps, not by processes
        if verdict.shift_labels is not None:
            corrected |= verdict.shift_labels != getattr(self, "_loss_shifts_labels", False)
            self._loss_shifts_labels = verdict.shift_labels  # how Trainer counts num_items_in_batch
        self.loss_normalization = verdict
        message = verdict.describe(unwrap_peft_model(unwrapped)._get_name(), corrects_trainer=corrected)
        (logger.warning if corrected else logger.info)(message)

    def _get_num_items_in_batch(self, batch_samples, device):
        """Where Trainer counts `num_items_in_batch` (training and evaluation): settle the normalization first."""
        if self.loss_normalization is None and batch_samples:
            self._settle_loss_normalization(self._prepare_inputs(batch_samples[0]))
        return super()._get_num_items_in_batch(batch_samples, device)

    def _processes_factor(self, num_items_in_batch) -> int:
        """Trainer's factor for a loss divided by the all-rank count: DDP averages the gradients over ranks."""
        counted_across = self.args.average_tokens_across_devices and num_items_in_batch is not None
        return self.accelerator.num_processes if counted_across else 1

    # ------------------------------------------------------------------ the step
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.rule is None:
            loss = super().training_step(model, inputs, num_items_in_batch)
        elif self.args.sam_scope == "local":
            loss = self._local_step(model, inputs, num_items_in_batch)
        else:
            loss = self._global_step(model, inputs, num_items_in_batch)
        self._nonfinite.observe_loss(loss)
        return loss

    def _likely_causes_of_nonfinite(self) -> str:
        rho = f", a perturbation radius too large (rho = {self.rho:.4g})" if self.rule is not None else ""
        return f"a learning rate too high (learning_rate = {self.args.learning_rate:g}){rho}, or NaN/inf in the data"

    def _end_step_guard(self) -> None:
        """Before the optimizer steps: skip a non-finite step (the optimizer leaves parameters without a
        gradient, and their state, untouched), or stop after `nonfinite_patience` of them in a row."""
        finite = self._nonfinite.end_step(self.state.global_step + 1, self._likely_causes_of_nonfinite)
        if not finite and self.grad_scaler is None:  # a grad scaler skips the step by itself
            self.optimizer.zero_grad(set_to_none=True)
        self._step_skipped = not finite

    def _global_step(self, model, inputs, num_items_in_batch):
        last_micro_batch = self.accelerator.gradient_state.sync_gradients
        with self._first_pass_sync(model, last_micro_batch), self._first_pass():
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._cached.append((inputs, num_items_in_batch))
        self._first_losses.append(loss)
        if not last_micro_batch:
            return loss

        names, params, grads = self._trainable_with_grad(model)
        if not self._sharded:
            self._average_grads(grads)
        if self._unscale_(grads) is not None:
            if self.radius.update_due(self.state.global_step):
                train_loss = torch.stack(self._first_losses).sum()
                if self.radius.antithetic:
                    self._antithetic_boundary(model, train_loss)
                else:
                    self._update_rho(model, params, grads, train_loss, self._cached, micro_batches=1)
            tracked = self._perturb_(names, params, grads, mean_of=1, first_micro_batch=True)
            self._second_passes(model, self._cached)
            if tracked:
                self._hessian_direction_(model, cached=self._cached)
            self._restore_(params)
            self._min_side_passes(model, params)
            if tracked:
                self._clip_coefficient(model)
        self._cached, self._first_losses = [], []
        return loss

    def _first_pass_sync(self, model, last_micro_batch: bool):
        """DDP: no sync (g is all-reduced once, flat, afterwards). FSDP2: its reduce-scatter on the last
        micro-batch averages the accumulated g exactly once and leaves it sharded."""
        if self._sharded and last_micro_batch:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def _synced_on_last(self, model, batches):
        """Yields each of `batches` with gradient sync off but for the last: DDP's all-reduce (FSDP2's
        reduce-scatter) then runs once, over the gradient accumulated from all of them."""
        for i, batch in enumerate(batches):
            with contextlib.nullcontext() if i == len(batches) - 1 else self.accelerator.no_sync(model):
                yield batch

    def _second_passes(self, model, cached):
        """Descent gradient at the perturbed point; DDP all-reduces on the last micro-batch only."""
        for inputs, num_items_in_batch in self._synced_on_last(model, cached):
            with self.extra_pass():
                super().training_step(model, inputs, num_items_in_batch)

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
        self._second_passes(model, self._cached)
        self._restore_(params)
        self.rule.combine_(descent, grad_scale=1.0 / self._scale_inverse())

    def _lr_ratio(self) -> float:
        """lr_t / lr_peak, for rules whose radius follows the learning-rate schedule."""
        peak = self.args.learning_rate
        return self.optimizer.param_groups[0]["lr"] / peak if peak else 1.0

    @contextlib.contextmanager
    def _first_pass(self):
        """Rules with a surrogate objective (BiSAM) use it for the first pass only."""
        self._surrogate_pass = self.rule.first_pass_loss is not None
        try:
            yield
        finally:
            self._surrogate_pass = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss, with the token mean recomputed for heads that drop `num_items_in_batch`,
        and BiSAM's surrogate in its first pass."""
        recompute = "labels" in inputs and self.loss_normalization is not None and (
            self.loss_normalization.kind == loss_normalization.TOKEN_MEAN
        )
        surrogate_pass = getattr(self, "_surrogate_pass", False)
        if not (recompute or surrogate_pass):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]  # Trainer pops them when it smooths labels
        loss, outputs = super().compute_loss(model, dict(inputs), True, num_items_in_batch)
        logits = logits_of(outputs)
        if recompute:
            token_mean = self.loss_normalization.token_loss(logits, labels, num_items_in_batch)
            loss = token_mean * self._processes_factor(num_items_in_batch)
        if surrogate_pass:
            if self.accelerator.unwrap_model(model)._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
                logits, labels = logits[..., :-1, :], labels[..., 1:]  # token t predicts label t+1, as the model's loss
            surrogate = self.rule.first_pass_loss(logits, labels)
            loss = loss.detach() + (surrogate - surrogate.detach())  # reports the model's loss, descends on ∇Q
        return (loss, outputs) if return_outputs else loss

    def _local_step(self, model, inputs, num_items_in_batch):
        """m-sharpness: this micro-batch's own gradient, kept apart from the accumulated descent gradient."""
        names, params = self._trainable(model)
        accumulated = [p.grad for p in params]
        for p in params:
            p.grad = None
        with self.accelerator.no_sync(model), self._first_pass():
            loss = super().training_step(model, inputs, num_items_in_batch)
        first = [p.grad for p in params]
        for p, acc in zip(params, accumulated):
            p.grad = acc
        keep = [i for i, g in enumerate(first) if g is not None]
        names, params, grads = [names[i] for i in keep], [params[i] for i in keep], [first[i] for i in keep]
        first.clear()  # `grads` alone holds the first-pass gradient, so `_perturb_` can free it
        first_micro_batch, self._micro_batches = self._micro_batches == 0, self._micro_batches + 1
        micro_batches = self.current_gradient_accumulation_steps
        if self._unscale_(grads) is None:  # overflow: hand the inf to the grad scaler so the step is skipped
            self._accumulate_(params, grads)
        else:
            if first_micro_batch and self.radius.update_due(self.state.global_step):
                if self.radius.antithetic:
                    self._antithetic_boundary(model, loss * micro_batches)
                else:
                    batch = [(inputs, num_items_in_batch)]
                    self._update_rho(model, params, grads, loss * micro_batches, batch, micro_batches=micro_batches)
            self._perturb_(names, params, grads, mean_of=micro_batches, first_micro_batch=first_micro_batch)
            with self.extra_pass():
                super().training_step(model, inputs, num_items_in_batch)
            self._restore_(params)
        if self.accelerator.gradient_state.sync_gradients:
            if self.radius.tracks_step(self.state.global_step):
                self._hessian_direction_(model, cached=None)
                self._clip_coefficient(model)
            self._micro_batches = 0
        return loss

    def create_optimizer(self, model=None):
        """LightSAM brings its own descent optimizer unless the user passed one."""
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None and self.args.sam_variant.startswith("lightsam"):
            self.optimizer_cls_and_kwargs = lightsam_optimizer_cls_and_kwargs(self.args)
        return super().create_optimizer(model)

    # ------------------------------------------------------------------ pieces
    def _trainable(self, model):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [n for n, _ in named], [p for _, p in named]

    def _trainable_with_grad(self, model):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
        return [n for n, _ in named], [p for _, p in named], [p.grad for _, p in named]

    def _scale_inverse(self) -> float:
        return 1.0 / self.grad_scaler.get_scale() if self.grad_scaler is not None else 1.0

    def _unscale_(self, grads) -> float | None:
        """Undo fp16 loss scaling in place; `None` when the gradient overflowed (the step will be skipped)."""
        inv_scale = self._scale_inverse()
        if inv_scale == 1.0:
            return 1.0
        torch._foreach_mul_(grads, inv_scale)
        return inv_scale if torch.isfinite(global_norm(grads)).item() else None

    def _accumulate_(self, params, grads):
        for p, g in zip(params, grads):
            p.grad = g if p.grad is None else p.grad.add_(g)

    def _perturb_(self, names, params, grads, mean_of: int, first_micro_batch: bool) -> bool:
        """θ ← θ + ρ·d (θ backed up). Returns whether this step tracks d for the next ρ update.

        With `mean_of` > 1 (local scope) the tracked direction is the mean over micro-batches.
        """
        grad_norm = self.rule.direction_(names, params, grads)
        self._record("first_grad_norm", grad_norm)
        self._nonfinite.observe(grad_norm)
        tracked = self.radius.tracks_step(self.state.global_step)
        if tracked:
            u = self._u_for(params)
            if first_micro_batch:
                self.radius.begin_direction_(u)
            torch._foreach_add_(u, grads, alpha=1.0 / mean_of)
        torch._foreach_mul_(grads, self.radius.radius_at(self.state.global_step))
        backup = self._backup_for(params)
        with torch.no_grad():
            copy_(backup, params)
            torch._foreach_add_(params, grads)
        if self.args.sam_scope == "global":
            for p in params:  # free g (now ε) for the second pass, as Trainer's zero_grad does
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

    def _u_for(self, params, model=None):
        all_params = self._trainable(model if model is not None else self.model_wrapped)[1]
        u_all = self.radius.buffers_like(all_params)
        index = {id(p): i for i, p in enumerate(all_params)}
        return [u_all[index[id(p)]] for p in params]

    def _clip_coefficient(self, model):
        """c_t of the final descent gradient (what Trainer clips), for the hypergradient."""
        _, _, descent = self._trainable_with_grad(model)
        self.radius.set_clip_coef(descent, self._scale_inverse())

    def _hessian_direction_(self, model, cached):
        """After the second passes: u ← H·d (θ still perturbed for `exact`)."""
        _, params, descent = self._trainable_with_grad(model)
        descent_scale = self._scale_inverse()
        u = self._u_for(params)
        if self.args.rho_hessian == "exact":
            torch._foreach_copy_(u, self._exact_hvp(model, params, u, cached, descent, descent_scale))
        else:
            self.radius.apply_hessian_(u, descent, descent_scale)

    def _exact_hvp(self, model, params, direction, cached, descent, descent_scale):
        """H(θ+ε)·d over the global batch: double backward, or, where a kernel has no double
        backward (fused attention), the finite difference (∇L(θ+ε+δd) − g̃)/δ."""
        unwrapped = self.accelerator.unwrap_model(model)
        if self._hvp_by_double_backward:
            try:
                hvp = self._double_backward_hvp(unwrapped, params, direction, cached)
                self._average_grads(hvp)
                return hvp
            except RuntimeError as error:
                warnings.warn(
                    f"Double backward unavailable ({str(error).splitlines()[0]}); the exact ρ Hessian falls back "
                    "to a finite difference of gradients."
                )
                self._hvp_by_double_backward = False
        step = FD_STEP / (global_norm(direction) + 1e-12)
        with torch.no_grad():
            torch._foreach_add_(params, torch._foreach_mul(direction, step))
        beyond = self._sum_gradients(unwrapped, params, cached)  # θ is restored from the backup afterwards
        self._average_grads(beyond)
        torch._foreach_sub_(beyond, torch._foreach_mul(descent, descent_scale))
        torch._foreach_div_(beyond, step)
        return beyond

    def _micro_batch_loss(self, model, inputs, num_items_in_batch):
        """The loss of one micro-batch, scaled for accumulation exactly as Trainer scales it."""
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager(), self.extra_pass():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        scaled_for_ga = self.loss_is_scaled_for_ga
        if scaled_for_ga is None:
            scaled_for_ga = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        return loss if scaled_for_ga else loss / self.current_gradient_accumulation_steps

    def _double_backward_hvp(self, model, params, direction, cached):
        hvp = None
        for inputs, num_items in cached:
            loss = self._micro_batch_loss(model, inputs, num_items)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            grads, dirs = zip(*[(g, d) for g, d in zip(grads, direction) if g is not None])
            products = torch.autograd.grad(grads, params, grad_outputs=dirs, allow_unused=True)
            products = [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(products, params)]
            hvp = products if hvp is None else torch._foreach_add(hvp, products)
        return hvp

    def _sum_gradients(self, model, params, cached):
        """Gradient of the training loss over this rank's micro-batches (no DDP hooks); under FSDP2,
        over the global batch (see `_synced_gradients`)."""
        if self._sharded:
            return self._synced_gradients(model, params, cached, self._micro_batch_loss)
        total = None
        for inputs, num_items in cached:
            loss = self._micro_batch_loss(model, inputs, num_items)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            total = grads if total is None else torch._foreach_add(total, grads)
        return total

    def _synced_gradients(self, model, params, batches, loss_of) -> list[torch.Tensor]:
        """FSDP2: the gradient of Σ `loss_of(model, inputs, num_items)` over `batches`, averaged over ranks
        and sharded like `params`. `torch.autograd.grad` cannot reach sharded parameters (FSDP2 all-gathers
        them outside autograd), so this backward goes through FSDP2's hooks, with the `.grad` in use set aside."""
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        for inputs, num_items in self._synced_on_last(model, batches):
            loss_of(model, inputs, num_items).backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        for p, grad in zip(params, kept):
            p.grad = grad
        return grads

    def _antithetic_boundary(self, model, train_loss) -> None:
        """A window boundary of the antithetic estimator: the validation loss on its fixed batches, in eval mode."""
        val_loss, train_loss = average_scalars(torch.stack([self._fixed_validation_loss(model), train_loss.detach().double()]))
        if self.radius.observe_window(val_loss, train_loss, self.state.global_step):
            self._record("gen_gap", val_loss - train_loss)
            self._record("rho_inner", self.radius.last_inner)
            self._record("rho_grad", self.radius.last_grad)

    def _fixed_validation_loss(self, model) -> torch.Tensor:
        """Mean loss of this rank's share of the first `rho_antithetic_batches` validation batches (the same
        batches at every call, a function of `rho_seed` only), without dropout or gradient."""
        if self._fixed_rho_batches is None:
            stream = self._make_rho_batches()
            self._fixed_rho_batches = [next(stream) for _ in range(self.args.rho_antithetic_batches)]
        unwrapped = self.accelerator.unwrap_model(model)
        unwrapped.eval()
        try:
            with torch.no_grad(), self.compute_loss_context_manager(), self.extra_pass():
                losses = [
                    self.compute_loss(
                        unwrapped, self._prepare_inputs(batch),
                        num_items_in_batch=self._get_num_items_in_batch([batch], self.args.device),
                    ).double()
                    for batch in self._fixed_rho_batches
                ]
        finally:
            unwrapped.train()
        if self._sharded:
            reshard(unwrapped)
        return torch.stack(losses).mean()

    def _update_rho(self, model, params, grads, train_loss, batches, micro_batches: int):
        """One upper-level step at θ_{t+1}: the gap L_val − L_train and the inner product of the objective,
        ⟨∇L_val − g, u⟩ (squared gap) or ⟨∇L_val, u⟩ (val-loss); `Radius.update` combines them.

        `grads` is the first-pass gradient of `batches`, scaled by 1/`micro_batches` as Trainer
        scales the loss for accumulation. Rules whose first pass descends on a surrogate pay
        one more backward here for the gradient of the training loss (squared gap only).
        """
        u = self._u_for(params, model)
        with_train = self.radius.needs_train_gradient
        if with_train and self.rule.first_pass_loss is not None:  # the first pass gave ∇Q: take ∇L_train
            grads = self._sum_gradients(self.accelerator.unwrap_model(model), params, batches)
            if self.args.sam_scope == "global" and not self._sharded:
                self._average_grads(grads)
        val_loss, val_dot = self._validation_pass(model, params, u)
        inner = val_dot - global_dot(grads, u) * micro_batches if with_train else val_dot
        val_loss, inner, train_loss = average_scalars(
            torch.stack([val_loss.double(), inner.double(), train_loss.detach().double()])
        )
        gap = val_loss - train_loss
        self.radius.update(gap, inner)
        self._record("gen_gap", gap)
        self._record("rho_inner", inner)
        self._record("rho_grad", self.radius.last_grad)

    def _validation_pass(self, model, params, u):
        """L_val and ⟨∇L_val, u⟩ on this rank's shard of one validation batch, scaled as Trainer scales a
        train batch: their mean over ranks is the global per-example or per-token mean. Under DDP the
        gradient is this rank's (no DDP hooks); under FSDP2 it is already the mean over ranks."""
        batch = next(self._rho_batches)
        num_items_in_batch = self._get_num_items_in_batch([batch], self.args.device)  # counted as a train batch
        unwrapped = self.accelerator.unwrap_model(model)
        scale = 1.0 / self._scale_inverse()
        val_loss = []

        def scaled_loss(model, inputs, num_items):
            with self.compute_loss_context_manager(), self.extra_pass():
                with own_random_stream(self._rho_batches.pass_seed(), self.args.device):
                    loss = self.compute_loss(model, self._prepare_inputs(inputs), num_items_in_batch=num_items)
            val_loss.append(loss.detach())
            return loss * scale

        if self._sharded:
            val_grads = self._synced_gradients(unwrapped, params, [(batch, num_items_in_batch)], scaled_loss)
        else:
            val_grads = torch.autograd.grad(scaled_loss(unwrapped, batch, num_items_in_batch), params, allow_unused=True)
            val_grads, u = zip(*[(g, t) for g, t in zip(val_grads, u) if g is not None])
        return val_loss[0], global_dot(list(val_grads), list(u)) / scale

    def _make_rho_batches(self) -> RhoBatches:
        dataset = self.rho_dataset
        collator = self.data_collator
        if hasattr(dataset, "column_names"):
            dataset = self._remove_unused_columns(dataset, description="rho")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="rho")
        return RhoBatches(
            dataset,
            collator,
            batch_size=self.args.rho_batch_size or self.args.per_device_train_batch_size,
            world_size=self.args.world_size,
            rank=self.args.process_index,
            seed=self.args.rho_seed,
        )

    # ------------------------------------------------------------------ logging
    def _record(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().double()
        self._metric_sums[name] = self._metric_sums.get(name, 0) + value
        self._metric_counts[name] = self._metric_counts.get(name, 0) + 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs get ρ, the averages since the last log and, with learned ρ, the hypergradient's
        running statistics (`lets_hf.diagnostics`): the only host syncs.

        A metric with no new value in this window (ρ updated every k > logging_steps steps)
        repeats its last value, so every logging step carries every curve.
        """
        if self.rule is not None and "loss" in logs:
            for name, total in self._metric_sums.items():
                self._last_metrics[name] = float(total) / self._metric_counts[name]
            self._metric_sums, self._metric_counts = {}, {}
            logs.update(rho=self.rho, **self._last_metrics)
            if self.args.learn_rho:
                logs.update(self.radius.monitor.summary())
            if self.radius.skipped_updates:
                logs["rho_updates_skipped"] = int(self.radius.skipped_updates)
        if "loss" in logs and self._nonfinite.skipped_steps:
            logs["nonfinite_steps_skipped"] = self._nonfinite.skipped_steps
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Trainer's `train`; a checkpoint to resume from is checked for completeness first."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # True: Trainer's own error
        if isinstance(resume_from_checkpoint, str):
            lets_state = [os.path.basename(self._lets_state_path(resume_from_checkpoint))] if self.rule else []
            with_optimizer = not self.args.save_only_model
            checkpoints.check_resumable(resume_from_checkpoint, lets_state, with_optimizer=with_optimizer)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return checkpoints.staging_dir(run_dir) if self._staging_checkpoint else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written under `.staging/` and renamed to `checkpoint-N` once every process is done."""
        run_dir, folder = self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            checkpoints.clear_staged(run_dir, folder)
        self.accelerator.wait_for_everyone()
        self._staging_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_checkpoint = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged = os.path.join(checkpoints.staging_dir(run_dir), folder)
            final = checkpoints.publish(run_dir, folder)
            if self.state.best_model_checkpoint == staged:
                self.state.best_model_checkpoint = final
                checkpoints.save_state_atomically(self.state, final)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.rule is None or not (self.args.should_save or self._rank_local_state()):
            return
        state = local_state({
            "radius": self.radius.state_dict(),
            "rule": self.rule.state_dict(),
            "rho_batches": self._rho_batches.state_dict() if self._rho_batches is not None else None,
        })
        os.makedirs(output_dir, exist_ok=True)
        path = self._lets_state_path(output_dir)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # never a half-written file

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.rule is None:
            return
        path = self._lets_state_path(checkpoint)
        if not os.path.isfile(path):
            raise UsageError(
                f"{path} is missing: this checkpoint was not written by LETSTrainer with this sam_scope and number "
                "of processes, so ρ and its optimizer state cannot be restored. Resume from such a checkpoint or "
                "start a new run."
            )
        device = self.args.device  # "cpu:0" under CPU DDP, which torch.load cannot map to
        state = torch.load(path, map_location="cpu" if device.type == "cpu" else device, weights_only=True)
        if self._sharded:
            state = sharded_state(state, self._trainable(self.model_wrapped)[1][0].device_mesh)
        self.radius.load_state_dict(state["radius"])
        self.rule.load_state_dict(state["rule"])
        if state["rho_batches"] is not None:
            self._rho_batches.load_state_dict(state["rho_batches"])

    def _rank_local_state(self) -> bool:
        """In the local scope each rank's ∂θ/∂ρ and rule statistics come from its own gradients; under
        FSDP2 each rank holds a shard of them."""
        return self._sharded or (self.args.sam_scope == "local" and self.args.world_size > 1)

    def _lets_state_path(self, directory: str) -> str:
        """`lets_state.pt`, or one `lets_state_rank<r>.pt` per rank when the state is rank-local."""
        if self._rank_local_state():
            stem, suffix = os.path.splitext(LETS_STATE_NAME)
            return os.path.join(directory, f"{stem}_rank{self.args.process_index}{suffix}")
        return os.path.join(directory, LETS_STATE_NAME)


class _AfterOptimizerStep(TrainerCallback):
    """Turns H·d into u = ∂θ_{t+1}/∂ρ once the optimizer has stepped (its state is then v̂_t)."""

    def __init__(self, trainer: LETSMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if args.learn_rho:
            check_optimizer_supported(self.trainer.optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer, radius = self.trainer, self.trainer.radius
        if trainer.accelerator.optimizer_step_was_skipped or trainer._step_skipped:
            radius.skip_step()
        elif radius.tracks_step(state.global_step):
            params = trainer._trainable(trainer.model_wrapped)[1]
            radius.apply_descent_jacobian_(trainer.optimizer, params, radius.buffers_like(params))
        radius.step_done()


class _NonFiniteStepGuard(TrainerCallback):
    def __init__(self, trainer: LETSMixin):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._end_step_guard()

