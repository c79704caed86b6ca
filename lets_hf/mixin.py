"""`LETSMixin`: `Trainer`'s adapter to the step engine, for any `transformers.Trainer` subclass.

    class LETSTrainer(LETSMixin, Trainer): ...            # lets_hf/trainers.py
    class MyTrainer(LETSMixin, MyOwnTrainer): ...         # the same two lines for any subclass

The step itself (perturbation, second passes, restore, ρ update) lives in `lets_hf.engine`; this
adapter keeps what is Trainer's: `training_step` hands each micro-batch to the engine, `compute_loss`
gives BiSAM its surrogate, the ρ validation data is split off and batched as Trainer batches train data,
callbacks tell the engine when the optimizer steps and `log` adds ρ and the gap. Two bases hold the
rest of Trainer's hooks: `LossNormalizationHooks` (`lets_hf.loss_normalization`) correct the loss
normalization of heads that need it, `CheckpointHooks` (`lets_hf.checkpoints`) write checkpoints
whole, with the engine's state. The engine runs Trainer's own `training_step` for every
extra pass, inside `extra_pass()`, so that a trainer that records metrics in `compute_loss` (TRL)
can count each training token once.
"""

from __future__ import annotations

import contextlib

from transformers import TrainerCallback
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .checkpoints import CheckpointHooks
from .config import LETSArguments
from .engine import LETSEngine
from .errors import UsageError, setting
from .loss_normalization import LossNormalizationHooks, logits_of
from .optim import lightsam_optimizer_cls_and_kwargs
from .preemption import SaveOnSigterm, TrainingPreempted
from .validation import RhoBatches, antithetic_held_out, split_for_rho, validation_batch_size


class LETSMixin(CheckpointHooks, LossNormalizationHooks):
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
        self.rho_dataset = self._rho_validation_data(rho_dataset)
        self._staging_checkpoint = False
        self._in_extra_pass = False
        if args.learn_rho:
            self._use_non_reentrant_checkpointing()
        self.engine = LETSEngine(
            self.model, self.optimizer, args, passes=_TrainerPasses(self), accelerator=self.accelerator,
            rho_batches=self.get_rho_batches if args.learn_rho and args.rho_val_batch == "held-out" else None,
            max_grad_norm=args.max_grad_norm, peak_lr=args.learning_rate,
        )
        self.add_callback(_EngineSteps(self))
        self.preemption = SaveOnSigterm() if args.save_on_sigterm else None
        if self.preemption is not None:
            self.add_callback(self.preemption)

    def train(self, *args, **kwargs):
        """Trainer's `train`; with `save_on_sigterm`, a SIGTERM ends it at the next optimizer-step boundary with a
        complete checkpoint, and `TrainingPreempted` names it (what follows training must not run as if it had
        finished)."""
        if self.preemption is None:
            return super().train(*args, **kwargs)
        with self.preemption.handling_sigterm():
            result = super().train(*args, **kwargs)
        if self.preemption.checkpoint is not None:
            raise TrainingPreempted(self.preemption.checkpoint)
        return result

    @property
    def rule(self):
        """The perturbation rule (`None` for `sam_variant="none"`)."""
        return self.engine.rule

    @property
    def radius(self):
        """ρ and its learner (`lets_hf.radius.Radius`)."""
        return self.engine.radius

    @property
    def rho(self) -> float:
        """The current perturbation radius (0.0 for `sam_variant="none"`)."""
        return self.engine.rho

    def _rho_validation_data(self, rho_dataset):
        """`rho_dataset` as the trainer prepares datasets, or a held-out split of the prepared train set."""
        if not self.args.learn_rho:
            return rho_dataset
        if self.args.rho_val_batch == "next":  # nothing held out: the next training batch is the validation batch
            if rho_dataset is not None:
                raise UsageError(
                    f"{setting('rho_val_batch', 'next')} validates on the next training batch: rho_dataset would go "
                    "unused. Drop it, or set rho_val_batch='held-out'."
                )
            return None
        if rho_dataset is not None:
            rho_dataset = self._prepare_rho_dataset(rho_dataset)
        elif self.train_dataset is None:
            raise UsageError("learn_rho=True needs validation data: pass train_dataset (split) or rho_dataset.")
        else:
            self.train_dataset, rho_dataset = split_for_rho(
                self.train_dataset, self.args.rho_val_fraction, self.args.rho_seed,
                antithetic_held_out(self.args, self.args.per_device_train_batch_size, self.args.world_size),
            )
        if len(rho_dataset) == 0:
            raise UsageError("rho_dataset is empty: learn_rho=True needs validation examples held out from train.")
        return rho_dataset

    def _prepare_rho_dataset(self, rho_dataset):
        """Hook for trainers that prepare their datasets in `__init__` (TRL tokenizes, packs): the same for ρ's."""
        return rho_dataset

    def get_rho_batches(self) -> RhoBatches:
        """ρ's validation batches from `rho_dataset`, collated as the train set (unused columns removed), like
        `get_train_dataloader`: the trainer hands them to its engine when it is built; override to draw them
        otherwise."""
        dataset = self.rho_dataset
        collator = self.data_collator
        if hasattr(dataset, "column_names"):
            dataset = self._remove_unused_columns(dataset, description="rho")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="rho")
        return RhoBatches(
            dataset,
            collator,
            batch_size=validation_batch_size(self.args, self.args.per_device_train_batch_size),
            world_size=self.args.world_size,
            rank=self.args.process_index,
            seed=self.args.rho_seed,
        )

    def _use_non_reentrant_checkpointing(self) -> None:
        """The ρ update takes gradients with `torch.autograd.grad`, which reentrant checkpointing cannot run."""
        if not self.args.gradient_checkpointing:
            return
        kwargs = dict(self.args.gradient_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant"):
            raise UsageError(
                f"{setting('learn_rho')} with gradient checkpointing needs non-reentrant checkpointing (its validation "
                "gradient is taken with torch.autograd.grad). Use "
                f"{setting('gradient_checkpointing_kwargs', {'use_reentrant': False})}."
            )
        kwargs["use_reentrant"] = False
        self.args.gradient_checkpointing_kwargs = kwargs

    @contextlib.contextmanager
    def extra_pass(self):
        """The passes LETS adds to the trainer's own (perturbed, validation, Hessian): `compute_loss` sees
        `self._in_extra_pass`, so that per-token metrics count each training token once."""
        outer, self._in_extra_pass = self._in_extra_pass, True
        try:
            yield
        finally:
            self._in_extra_pass = outer

    # ------------------------------------------------------------------ the step: the engine's
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.engine.global_step = self.state.global_step
        return self.engine.backward((inputs, num_items_in_batch), model)

    def _trainer_training_step(self, model, inputs, num_items_in_batch):
        """The base trainer's own `training_step`: the engine's first and second passes."""
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """BiSAM's first pass descends on its surrogate of the logits (and reports the model's loss)."""
        if self.rule is None or not self.engine.surrogate_pass:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]  # Trainer pops them when it smooths labels
        loss, outputs = super().compute_loss(model, dict(inputs), True, num_items_in_batch)
        logits = logits_of(outputs)
        if self.accelerator.unwrap_model(model)._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            logits, labels = logits[..., :-1, :], labels[..., 1:]  # token t predicts label t+1, as the model's loss
        surrogate = self.rule.first_pass_loss(logits, labels)
        loss = loss.detach() + (surrogate - surrogate.detach())
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        """LightSAM brings its own descent optimizer unless the user passed one."""
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None and self.args.sam_variant.startswith("lightsam"):
            self.optimizer_cls_and_kwargs = lightsam_optimizer_cls_and_kwargs(self.args)
        return super().create_optimizer(model)

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs get ρ, the engine's averages since the last log and, with learned ρ, the
        hypergradient's running statistics (`lets_hf.diagnostics`): the only host syncs.

        A metric with no new value in this window (ρ updated every k > logging_steps steps)
        repeats its last value, so every logging step carries every curve.
        """
        if self.rule is not None and "loss" in logs:
            logs.update(rho=self.rho, **self.engine.pop_metrics(repeat_last=True))
            if self.args.learn_rho:
                logs.update(self.radius.monitor.summary())
            if self.radius.skipped_updates:
                logs["rho_updates_skipped"] = int(self.radius.skipped_updates)
        if "loss" in logs and self.engine.nonfinite.skipped_steps:
            logs["nonfinite_steps_skipped"] = self.engine.nonfinite.skipped_steps
        super().log(logs, start_time)


class _TrainerPasses:
    """How Trainer runs a micro-batch for the engine (`lets_hf.passes`); a batch is `(inputs, num_items_in_batch)`."""

    def __init__(self, trainer: LETSMixin):
        self.trainer = trainer

    def backward(self, model, batch):
        return self.trainer._trainer_training_step(model, *batch)

    def loss(self, model, batch):
        """Trainer's loss of one micro-batch, scaled for accumulation exactly as `training_step` scales it."""
        trainer, (inputs, num_items_in_batch) = self.trainer, batch
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, trainer._prepare_inputs(inputs), num_items_in_batch=num_items_in_batch)
        scaled_for_ga = trainer.loss_is_scaled_for_ga
        if scaled_for_ga is None:
            scaled_for_ga = (
                trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or trainer.compute_loss_func is not None
        return loss if scaled_for_ga else loss / trainer.current_gradient_accumulation_steps

    def validation_loss(self, model, batch):
        """A collated ρ batch, its examples counted as Trainer counts a train batch's."""
        trainer = self.trainer
        num_items_in_batch = trainer._get_num_items_in_batch([batch], trainer.args.device)
        with trainer.compute_loss_context_manager():
            return trainer.compute_loss(model, trainer._prepare_inputs(batch), num_items_in_batch=num_items_in_batch)

    def extra_pass(self):
        return self.trainer.extra_pass()

    def accumulation_steps(self) -> int:
        return self.trainer.current_gradient_accumulation_steps


class _EngineSteps(TrainerCallback):
    """Tells the engine when Trainer's optimizer steps: the non-finite guard before, ∂θ/∂ρ after."""

    def __init__(self, trainer: LETSMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.trainer.engine.optimizer = self.trainer.optimizer
        self.trainer.engine.max_steps = state.max_steps  # the run's length (AE-SAM's threshold schedule)
        self.trainer.engine.check_optimizer()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.engine.before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.engine.after_optimizer_step(skipped=self.trainer.accelerator.optimizer_step_was_skipped)
