"""Per-run result files shared by the benchmark scripts: one JSON per (dataset, method, seed).

A finished run is skipped when the benchmark is restarted; a run saved with other settings
is an error, never a silent mix of configurations in one table. Several workers can share one
output folder: each run is claimed before it starts.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def run_path(out_dir: Path, dataset: str, method: str, seed: int) -> Path:
    return out_dir / "runs" / dataset / method / f"seed{seed}.json"


def load_finished(path: Path, settings: dict) -> dict | None:
    """The saved run if it exists and was made with these settings."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved["settings"] != settings:
        raise SystemExit(
            f"{path} was made with other settings ({saved['settings']}), not {settings}. "
            "Use another --out_dir, or delete the old runs to replace them."
        )
    return saved


def save_run(path: Path, record: dict) -> None:
    """Writes the run's JSON beside it first and then renames it: never a half-written run file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


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
    if load_finished(path, settings) is not None:
        yield False
        return
    with claimed(path) as mine:
        yield mine and load_finished(path, settings) is None


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
