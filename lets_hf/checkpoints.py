"""Checkpoints that are complete or absent: staged writes, and a check before resuming.

Trainer writes `checkpoint-N/` file by file; a run killed mid-save leaves a folder that
`resume_from_checkpoint=True` then picks as the newest. LETSTrainer has Trainer write into
`<output_dir>/.staging/checkpoint-N/` and renames it to `<output_dir>/checkpoint-N/` once every
process has finished (the same file system, so the rename is atomic). Only `checkpoint-<digits>`
folders are searched for the newest, so a staged one is never found. `CheckpointHooks` are the
Trainer methods that do it, and that save the engine's state beside the optimizer's
(`lets_hf.engine_state`: resumable on another number of processes).

`checkpoint_to_resume` reads `resume_from_checkpoint` as users type it (`True`, `latest`, `auto`,
a run folder or a checkpoint), for `LETSTrainer.train`, the `lets-hf` commands and plain loops.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
from typing import Callable

import torch
from accelerate.utils.constants import FSDP_MODEL_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    logging,
)

from .engine_state import SHARDS_DIR, check_saved_layout, lets_state_files, load_engine_state, save_engine_state
from .errors import UsageError, setting, unset

logger = logging.get_logger(__name__)

STAGING_DIR = ".staging"
TRAINER_STATE_NAME = "trainer_state.json"
_WEIGHTS = (
    SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME, f"{FSDP_MODEL_NAME}.bin", f"{FSDP_MODEL_NAME}_0",  # FSDP: full; sharded (a folder)
)
#: Trainer's optimizer state: plain, FSDP full, FSDP sharded (a folder).
_OPTIMIZER = ("optimizer.pt", "optimizer.bin", "optimizer_0")
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
#: `resume_from_checkpoint` words (any case) for the newest complete checkpoint in output_dir; `True` is Trainer's.
NEWEST = ("true", "latest")
#: The newest complete checkpoint in output_dir, or a new run where there is none: one command for the first start
#: and every restart.
AUTO = "auto"
#: What makes a checkpoint folder unusable for resuming, in words, or `None` (`missing_or_unreadable`, bound).
Problem = Callable[[str], str | None]


class IncompleteCheckpointError(UsageError):
    """A checkpoint folder lacks a file, or holds one that cannot be read."""


def staging_dir(run_dir: str) -> str:
    return os.path.join(run_dir, STAGING_DIR)


def clear_staged(run_dir: str, folder: str = "") -> None:
    """Remove what a killed run left staged under this name (main process, before writing), or by default all that
    is staged (an interrupted run: a staged checkpoint is never complete)."""
    shutil.rmtree(os.path.join(staging_dir(run_dir), folder), ignore_errors=True)


def publish(run_dir: str, folder: str) -> str:
    """Move the staged, complete checkpoint to its final name; returns that path."""
    final = os.path.join(run_dir, folder)
    if os.path.isdir(final):  # saved again at the same step: the new one replaces it
        shutil.rmtree(final)
    os.replace(os.path.join(staging_dir(run_dir), folder), final)
    with contextlib.suppress(OSError):  # other checkpoints may be staged there by a parallel run
        os.rmdir(staging_dir(run_dir))
    return final


def save_state_atomically(state, checkpoint: str) -> None:
    """Rewrite `trainer_state.json` of a published checkpoint without a moment where it is half-written."""
    path = os.path.join(checkpoint, TRAINER_STATE_NAME)
    state.save_to_json(path + ".tmp")
    os.replace(path + ".tmp", path)


def missing_or_unreadable(checkpoint: str, lets_state_files: list[str], with_optimizer: bool) -> str | None:
    """What makes the folder `checkpoint` unusable for resuming, in words, or `None` when it is complete.

    A missing LETS state file is left to the trainer, which explains it (a checkpoint of plain
    Trainer, another scope or number of processes); one that is present must load.
    """
    if not any(os.path.exists(os.path.join(checkpoint, name)) for name in _WEIGHTS):
        return f"it has no model weights (none of {', '.join(_WEIGHTS)})"
    state = os.path.join(checkpoint, TRAINER_STATE_NAME)
    if not os.path.isfile(state):
        return f"{TRAINER_STATE_NAME} is missing"
    try:
        with open(state) as file:
            json.load(file)
    except (OSError, ValueError) as error:
        return f"{TRAINER_STATE_NAME} cannot be read ({error})"
    if with_optimizer:  # Trainer would start them afresh
        if not any(os.path.exists(os.path.join(checkpoint, name)) for name in _OPTIMIZER):
            return f"the optimizer state is missing (none of {', '.join(_OPTIMIZER)})"
        if not os.path.isfile(os.path.join(checkpoint, "scheduler.pt")):
            return "scheduler.pt is missing"
    for name in lets_state_files:
        if not os.path.isfile(os.path.join(checkpoint, name)):
            continue
        try:
            torch.load(os.path.join(checkpoint, name), map_location="cpu", weights_only=True, mmap=True)  # no copy
        except Exception as error:  # a truncated zip, a wrong format: say which file
            return f"{name} cannot be read ({str(error).splitlines()[0]})"
    shards = os.path.join(checkpoint, SHARDS_DIR)
    if os.path.isdir(shards) and not os.path.isfile(os.path.join(shards, ".metadata")):
        return f"{SHARDS_DIR}/.metadata is missing"
    return None


def resume_problem(args, lets_state_files: list[str]) -> Problem:
    """`missing_or_unreadable` for this run's checkpoints: these LETS state files, and the optimizer's state unless
    `save_only_model`."""
    return functools.partial(missing_or_unreadable, lets_state_files=lets_state_files,
                             with_optimizer=not args.save_only_model)


def checkpoint_to_resume(value: str | bool | None, output_dir: str, problem: Problem) -> str | None:
    """The checkpoint that `resume_from_checkpoint` names as typed, or `None` for a new run.

    `True` or `latest`: the newest complete checkpoint in `output_dir`; `auto`: the same, or a new run where there is
    none; a run folder (one that holds checkpoints): its newest complete one; any other path: itself, refused by
    `check_resumable` if incomplete.
    """
    if value is None or value is False:
        return None
    word = str(value).lower()
    if word not in (*NEWEST, AUTO) and not is_run_folder(value):
        check_resumable(value, problem, output_dir)
        return value
    run_dir = output_dir if word in (*NEWEST, AUTO) else value
    checkpoint, damaged = newest_complete(run_dir, problem)
    if checkpoint is None and word != AUTO:
        found = "; ".join(damaged) or f"no {PREFIX_CHECKPOINT_DIR}-<step> folder"
        raise UsageError(
            f"{setting('resume_from_checkpoint', value)}: {run_dir} holds no complete checkpoint ({found}). To start "
            f"a new run, {unset('resume_from_checkpoint', None)}; {setting('resume_from_checkpoint', AUTO)} resumes "
            "from the newest complete checkpoint where there is one and starts a new run where there is none."
        )
    if damaged:
        logger.warning(f"Not resuming from incomplete or damaged checkpoints: {'; '.join(damaged)}.")
    return checkpoint


def is_run_folder(path: str) -> bool:
    """A folder of checkpoints (an output_dir), not one checkpoint: not named `checkpoint-<N>`, no optimizer state."""
    return (
        os.path.isdir(path)
        and not _CHECKPOINT.match(os.path.basename(os.path.normpath(path)))
        and not any(os.path.exists(os.path.join(path, name)) for name in _OPTIMIZER)
    )


def newest_complete(run_dir: str, problem: Problem, before: int | None = None) -> tuple[str | None, list[str]]:
    """The newest `checkpoint-<N>` folder in `run_dir` (with N < `before`, if given) that `problem` finds complete,
    and what is wrong with each newer one."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    found = [(int(m.group(1)), name) for name in names if (m := _CHECKPOINT.match(name))]
    damaged = []
    for step, name in sorted(found, reverse=True):
        path = os.path.join(run_dir, name)
        if (before is not None and step >= before) or not os.path.isdir(path):
            continue
        why = problem(path)
        if why is None:
            return path, damaged
        damaged.append(f"{path}: {why}")
    return None, damaged


def check_resumable(checkpoint: str, problem: Problem, run_dir: str) -> None:
    """Raise `IncompleteCheckpointError` naming the problem and a complete checkpoint to resume from instead: the
    newest earlier one beside a `checkpoint-<N>`, else the newest in `run_dir` (output_dir)."""
    why = problem(checkpoint) if os.path.isdir(checkpoint) else f"{checkpoint} is not a folder"
    if why is None:
        return
    parent, name = os.path.split(os.path.normpath(checkpoint))
    match = _CHECKPOINT.match(name)
    folder, before = (parent or os.curdir, int(match.group(1))) if match else (run_dir, None)
    instead, _ = newest_complete(folder, problem, before)
    if instead:
        advice = f"Resume from {instead} instead."
    else:
        advice = f"{folder} holds no {'earlier ' if match else ''}complete checkpoint: start a new run."
    raise IncompleteCheckpointError(
        f"Cannot resume from {checkpoint}: {why}. The checkpoint is incomplete or damaged (a run stopped "
        f"while saving it?). {advice}"
    )


class CheckpointHooks:
    """Trainer's checkpoint hooks (a base of `LETSMixin`, before `Trainer`): checkpoints staged and published
    whole, the engine's state saved beside the optimizer's, and a checkpoint checked before resuming."""

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Trainer's `train`; `resume_from_checkpoint` is read by `checkpoint_to_resume` (`True`, `latest`, `auto`,
        a run folder: the newest complete checkpoint), and a checkpoint is checked for completeness first."""
        lets_state = lets_state_files(self.args.process_index) if self.rule else []
        problem = resume_problem(self.args, lets_state)
        checkpoint = checkpoint_to_resume(resume_from_checkpoint, self.args.output_dir, problem)
        if checkpoint is not None and self.rule is not None:  # before Trainer loads anything
            check_saved_layout(self.engine, checkpoint, self.get_total_train_batch_size(self.args))
        return super().train(checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return staging_dir(run_dir) if self._staging_checkpoint else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written under `.staging/` and renamed to `checkpoint-N` once every process is done."""
        run_dir, folder = self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            clear_staged(run_dir, folder)
        self.accelerator.wait_for_everyone()
        self._staging_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_checkpoint = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged = os.path.join(staging_dir(run_dir), folder)
            final = publish(run_dir, folder)
            if self.state.best_model_checkpoint == staged:
                self.state.best_model_checkpoint = final
                save_state_atomically(self.state, final)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.rule is not None:
            save_engine_state(self.engine, output_dir, self.get_total_train_batch_size(self.args))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.rule is None:
            return
        self.engine.model = self.model_wrapped
        load_engine_state(self.engine, checkpoint, self.get_total_train_batch_size(self.args))  # checks layout again
