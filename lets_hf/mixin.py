"""`LETSMixin`: `Trainer`'s adapter to the step engine, for any `transformers.Trainer` subclass.

    class LETSTrainer(LETSMixin, Trainer): ...            # lets_hf/trainers.py
    class MyTrainer(LETSMixin, MyOwnTrainer): ...         # the same two lines for any subclass

The step itself (perturbation, second passes, restore, ρ update) lives in `lets_hf.engine`; this
adapter keeps what is Trainer's: `training_step` hands each micro-batch to the engine, `compute_loss`
corrects the loss normalization of heads that need it (`lets_hf.loss_normalization`) and gives
BiSAM its surrogate, the ρ validation data is split off and batched as Trainer batches train data,
callbacks tell the engine when the optimizer steps, `log` adds ρ and the gap, and checkpoints carry
the engine's state, written atomically. The engine runs Trainer's own `training_step` for every
extra pass, inside `extra_pass()`, so that a trainer that records metrics in `compute_loss` (TRL)
can count each training token once.
"""

from __future__ import annotations

import contextlib
import os

import torch
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
from .config import LETSArguments
from .distributed import local_state, same_on_all_ranks, sharded_state
from .engine import LETSEngine
from .errors import UsageError
from .loss_normalization import LossNormalization, logits_of
from .optim import lightsam_optimizer_cls_and_kwargs
from .validation import RhoBatches, split_for_rho

logger = logging.get_logger(__name__)

LETS_STATE_NAME = "lets_state.pt"


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
        self.rho_dataset = self._rho_validation_data(rho_dataset)
        self._staging_checkpoint = False
        self._in_extra_pass = False
        self._last_metrics: dict[str, float] = {}
        if args.learn_rho:
            self._use_non_reentrant_checkpointing()
        self.engine = LETSEngine(
            self.model, self.optimizer, args, passes=_TrainerPasses(self), accelerator=self.accelerator,
            rho_batches=self._make_rho_batches if args.learn_rho else None,
            max_grad_norm=args.max_grad_norm, peak_lr=args.learning_rate,
        )
        self.add_callback(_EngineSteps(self))

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
        outer, self._in_extra_pass = self._in_extra_pass, True
        try:
            yield
        finally:
            self._in_extra_pass = outer

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

    # ------------------------------------------------------------------ the step: the engine's
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.engine.global_step = self.state.global_step
        return self.engine.backward((inputs, num_items_in_batch), model)

    def _trainer_training_step(self, model, inputs, num_items_in_batch):
        """The base trainer's own `training_step`: the engine's first and second passes."""
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss, with the token mean recomputed for heads that drop `num_items_in_batch`,
        and BiSAM's surrogate in its first pass."""
        recompute = "labels" in inputs and self.loss_normalization is not None and (
            self.loss_normalization.kind == loss_normalization.TOKEN_MEAN
        )
        surrogate_pass = self.rule is not None and self.engine.surrogate_pass
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
            self._last_metrics.update(self.engine.pop_metrics())
            logs.update(rho=self.rho, **self._last_metrics)
            if self.args.learn_rho:
                logs.update(self.radius.monitor.summary())
            if self.radius.skipped_updates:
                logs["rho_updates_skipped"] = int(self.radius.skipped_updates)
        if "loss" in logs and self.engine.nonfinite.skipped_steps:
            logs["nonfinite_steps_skipped"] = self.engine.nonfinite.skipped_steps
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
        state = local_state(self.engine.state_dict())
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
        if self.engine.sharded:
            state = sharded_state(state, self.engine.trainable(self.model_wrapped)[1][0].device_mesh)
        self.engine.load_state_dict(state)

    def _rank_local_state(self) -> bool:
        """In the local scope each rank's ∂θ/∂ρ and rule statistics come from its own gradients; under
        FSDP2 each rank holds a shard of them."""
        return self.engine.sharded or (self.args.sam_scope == "local" and self.args.world_size > 1)

    def _lets_state_path(self, directory: str) -> str:
        """`lets_state.pt`, or one `lets_state_rank<r>.pt` per rank when the state is rank-local."""
        if self._rank_local_state():
            stem, suffix = os.path.splitext(LETS_STATE_NAME)
            return os.path.join(directory, f"{stem}_rank{self.args.process_index}{suffix}")
        return os.path.join(directory, LETS_STATE_NAME)


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
        self.trainer.engine.check_optimizer()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.engine.before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.engine.after_optimizer_step(skipped=self.trainer.accelerator.optimizer_step_was_skipped)
