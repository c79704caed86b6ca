"""Per-run result files shared by the benchmark scripts: one JSON per (dataset, method, seed).

A finished run is skipped when the benchmark is restarted; a run saved with other settings
is an error, never a silent mix of configurations in one table. Several workers can share one
output folder: each run is claimed before it starts. An unfinished run can keep Trainer checkpoints
beside its file (`RunClock` saves one every few minutes) and resume from the last one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback, TrainerState
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import get_last_checkpoint


def run_path(out_dir: Path, dataset: str, method: str, seed: int) -> Path:
    return out_dir / "runs" / dataset / method / f"seed{seed}.json"


def is_finished(path: Path, settings: dict) -> bool:
    """Whether the run is saved; one saved with other settings is an error."""
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())["settings"]
    if saved != settings:
        raise SystemExit(
            f"{path} was made with other settings ({saved}), not {settings}. "
            "Use another --out_dir, or delete the old runs to replace them."
        )
    return True


def save_run(path: Path, record: dict) -> None:
    """Writes the run's JSON beside it first and then renames it: never a half-written run file.

    The run's checkpoints go: a finished run is never resumed."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    shutil.rmtree(checkpoint_dir(path), ignore_errors=True)


def checkpoint_dir(path: Path) -> Path:
    """The Trainer output folder of the unfinished run saved at `path` (`seed1.checkpoints/`)."""
    return path.with_suffix(".checkpoints")


def resume_point(path: Path, settings: dict, save_every_s: float) -> tuple[str | None, RunClock]:
    """The last checkpoint of the run saved at `path` (None: start afresh) and a clock that goes on from it.

    The checkpoint folder records the settings it was made with: another run's checkpoint is an error."""
    folder = checkpoint_dir(path)
    recorded = folder / "settings.json"
    checkpoint = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if checkpoint is None:
        folder.mkdir(parents=True, exist_ok=True)
        recorded.write_text(json.dumps(settings))
        return None, RunClock(save_every_s)
    if not recorded.is_file() or json.loads(recorded.read_text()) != settings:
        raise SystemExit(f"{folder} holds checkpoints made with other settings (or none recorded in its settings.json),"
                         f" not {settings}. Delete it to start afresh.")
    state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    clock = state.stateful_callbacks[RunClock.__name__]["args"]
    return checkpoint, RunClock(save_every_s, cpu_s=clock["cpu_s"], wall_s=clock["wall_s"],
                                resumed_from_step=state.global_step)


class RunClock(TrainerCallback, ExportableState):
    """Asks Trainer for a checkpoint every `save_every_s` seconds of wall time, and times the whole run.

    Each checkpoint records the CPU and wall time spent so far (Trainer saves `state()` in its
    trainer_state.json), so a resumed run reports what one uninterrupted run costs, plus one model load.
    """

    def __init__(self, save_every_s: float, cpu_s: float = 0.0, wall_s: float = 0.0,
                 resumed_from_step: int | None = None):
        self.save_every_s = save_every_s
        self.resumed_from_step = resumed_from_step  # the checkpoint's step; None for a run started afresh
        self._cpu_start, self._wall_start = time.process_time() - cpu_s, time.perf_counter() - wall_s
        self._last_save = time.perf_counter()

    @property
    def cpu_s(self) -> float:
        """CPU seconds of this process (all threads) in the run, earlier processes' included."""
        return time.process_time() - self._cpu_start

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self._wall_start

    def state(self) -> dict:
        return {"args": {"save_every_s": self.save_every_s, "cpu_s": self.cpu_s, "wall_s": self.wall_s}, "attributes": {}}

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self._last_save >= self.save_every_s:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self._last_save = time.perf_counter()


@contextlib.contextmanager
def claimed(path: Path):
    """Yields whether this process owns the run saved at `path` (True) or another live worker does (False).

    The claim is a file beside the run holding the owner's PID, created atomically; one left by a
    process that died (a killed worker) is taken over, so a restarted benchmark resumes every run.
    """
    claim = path.with_suffix(".claim")
    claim.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if _alive(claim.read_text()):
            yield False
            return
        claim.write_text(str(os.getpid()))
    else:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
    try:
        yield True
    finally:
        claim.unlink(missing_ok=True)


@contextlib.contextmanager
def to_run(path: Path, settings: dict):
    """Yields whether this process makes the run saved at `path`: it is not saved yet and no live worker has it.

    Checked again once claimed: another worker may have finished it meanwhile.
    """
    if is_finished(path, settings):
        yield False
        return
    with claimed(path) as mine:
        yield mine and not is_finished(path, settings)


def _alive(pid: str) -> bool:
    if not pid:  # created this instant, PID not written yet
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def load_runs(out_dir: Path) -> list[dict]:
    """Every saved run under `out_dir/runs`; none at all is an error (nothing to report)."""
    runs = [json.loads(path.read_text()) for path in sorted((out_dir / "runs").glob("*/*/seed*.json"))]
    if not runs:
        raise SystemExit(f"No saved runs under {out_dir / 'runs'}.")
    return runs


def ordered(names, order) -> list[str]:
    """`names` in the preferred `order`, unknown ones last and sorted."""
    return [n for n in order if n in names] + sorted(set(names) - set(order))
