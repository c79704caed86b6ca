"""Preemption (`save_on_sigterm`): SIGTERM, as SLURM sends it before it kills a job, ends training at the next
optimizer-step boundary with a complete checkpoint, and `train` raises `TrainingPreempted` naming it.

The handler only sets a flag, so the step in flight finishes. Every optimizer step the flag is reduced over ranks
(one tiny all-reduce under several processes), so that all ranks save and stop at the same step even when only some
got the signal. The checkpoint is written by the staged, complete-or-absent path (`lets_hf.checkpoints`), whatever
`save_strategy` says, and resuming from it is exact.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .distributed import same_on_all_ranks


class TrainingPreempted(Exception):
    """SIGTERM stopped training; `checkpoint` is the complete checkpoint saved at the step it stopped after."""

    def __init__(self, checkpoint: str):
        super().__init__(f"training stopped on SIGTERM after saving the complete checkpoint {checkpoint}")
        self.checkpoint = checkpoint


class SaveOnSigterm(TrainerCallback):
    """Turns a SIGTERM received during `train` into a save and a stop at the next optimizer-step boundary."""

    def __init__(self):
        self._signalled = False
        self.checkpoint: str | None = None

    @contextlib.contextmanager
    def handling_sigterm(self):
        """SIGTERM only sets the flag while training runs; the previous handler is back afterwards. Python lets only
        the main thread set handlers: elsewhere SIGTERM keeps its handler."""
        self._signalled, self.checkpoint = False, None
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum, frame) -> None:
        self._signalled = True

    def on_step_end(self, args, state, control, **kwargs):
        _, signalled_on_any_rank = same_on_all_ranks(int(self._signalled), args.device)
        if signalled_on_any_rank:
            control.should_save = control.should_training_stop = True
            self.checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
