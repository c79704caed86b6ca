"""Checkpoints that are complete or absent: staged writes, and a check before resuming.

Trainer writes `checkpoint-N/` file by file; a run killed mid-save leaves a folder that
`resume_from_checkpoint=True` then picks as the newest. LETSTrainer has Trainer write into
`<output_dir>/.staging/checkpoint-N/` and renames it to `<output_dir>/checkpoint-N/` once every
process has finished (the same file system, so the rename is atomic). Trainer's search for the
last checkpoint only matches `checkpoint-<digits>` folders, so it never sees a staged one.
`CheckpointHooks` are the Trainer methods that do it, and that save the engine's state beside
the optimizer's (`lets_state.pt`, or one file per rank where the state is rank-local).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

import torch
from accelerate.utils.constants import FSDP_MODEL_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from .errors import UsageError

LETS_STATE_NAME = "lets_state.pt"
STAGING_DIR = ".staging"
TRAINER_STATE_NAME = "trainer_state.json"
_WEIGHTS = (
    SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME, f"{FSDP_MODEL_NAME}.bin", f"{FSDP_MODEL_NAME}_0",  # FSDP: full; sharded (a folder)
)
#: Trainer's optimizer state: plain, FSDP full, FSDP sharded (a folder).
_OPTIMIZER = ("optimizer.pt", "optimizer.bin", "optimizer_0")
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class IncompleteCheckpointError(UsageError):
    """A checkpoint folder lacks a file, or holds one that cannot be read."""


def staging_dir(run_dir: str) -> str:
    return os.path.join(run_dir, STAGING_DIR)


def clear_staged(run_dir: str, folder: str) -> None:
    """Remove what a killed run left staged under this name (main process, before writing)."""
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
    """What makes `checkpoint` unusable for resuming, in words, or `None` when it is complete.

    A missing LETS state file is left to the trainer, which explains it (a checkpoint of plain
    Trainer, another scope or number of processes); one that is present must load.
    """
    if not os.path.isdir(checkpoint):
        return f"{checkpoint} is not a folder"
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
            torch.load(os.path.join(checkpoint, name), map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated zip, a wrong format: say which file
            return f"{name} cannot be read ({str(error).splitlines()[0]})"
    return None


def check_resumable(checkpoint: str, lets_state_files: list[str], with_optimizer: bool) -> None:
    """Raise `IncompleteCheckpointError` naming the problem and the newest complete earlier checkpoint."""
    problem = missing_or_unreadable(checkpoint, lets_state_files, with_optimizer)
    if problem is None:
        return
    earlier = _earlier_complete(checkpoint, lets_state_files, with_optimizer)
    advice = f"Resume from {earlier} instead." if earlier else "No earlier complete checkpoint exists: start a new run."
    raise IncompleteCheckpointError(
        f"Cannot resume from {checkpoint}: {problem}. The checkpoint is incomplete or damaged (a run stopped "
        f"while saving it?). {advice}"
    )


def _earlier_complete(checkpoint: str, lets_state_files: list[str], with_optimizer: bool) -> str | None:
    parent, name = os.path.split(os.path.normpath(checkpoint))
    match = _CHECKPOINT.match(name)
    if match is None or not os.path.isdir(parent):
        return None
    earlier = sorted(
        (int(m.group(1)), entry)
        for entry in os.listdir(parent)
        if (m := _CHECKPOINT.match(entry)) and int(m.group(1)) < int(match.group(1))
    )
    for _, entry in reversed(earlier):
        path = os.path.join(parent, entry)
        if missing_or_unreadable(path, lets_state_files, with_optimizer) is None:
            return path
    return None


class CheckpointHooks:
    """Trainer's checkpoint hooks (a base of `LETSMixin`, before `Trainer`): checkpoints staged and published
    whole, the engine's state saved beside the optimizer's, and a checkpoint checked before resuming."""

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Trainer's `train`; a checkpoint to resume from is checked for completeness first."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # True: Trainer's own error
        if isinstance(resume_from_checkpoint, str):
            lets_state = [os.path.basename(self._lets_state_path(resume_from_checkpoint))] if self.rule else []
            with_optimizer = not self.args.save_only_model
            check_resumable(resume_from_checkpoint, lets_state, with_optimizer=with_optimizer)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

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
        if self.rule is None or not (self.args.should_save or self.engine.rank_local_state):
            return
        os.makedirs(output_dir, exist_ok=True)
        path = self._lets_state_path(output_dir)
        torch.save(self.engine.state_dict(), path + ".tmp")
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
        self.engine.model = self.model_wrapped
        state = torch.load(path, map_location="cpu" if device.type == "cpu" else device, weights_only=True)
        self.engine.load_state_dict(state)

    def _lets_state_path(self, directory: str) -> str:
        """`lets_state.pt`, or one `lets_state_rank<r>.pt` per rank when the state is rank-local."""
        if self.engine.rank_local_state:
            stem, suffix = os.path.splitext(LETS_STATE_NAME)
            return os.path.join(directory, f"{stem}_rank{self.args.process_index}{suffix}")
        return os.path.join(directory, LETS_STATE_NAME)

