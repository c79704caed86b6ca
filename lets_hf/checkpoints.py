"""Checkpoints that are complete or absent: staged writes, and a check before resuming.

Trainer writes `checkpoint-N/` file by file; a run killed mid-save leaves a folder that
`resume_from_checkpoint=True` then picks as the newest. LETSTrainer has Trainer write into
`<output_dir>/.staging/checkpoint-N/` and renames it to `<output_dir>/checkpoint-N/` once every
process has finished (the same file system, so the rename is atomic). Trainer's search for the
last checkpoint only matches `checkpoint-<digits>` folders, so it never sees a staged one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

import torch
from accelerate.utils.constants import FSDP_MODEL_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from .errors import UsageError

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
