"""The benchmarks' run files: whole or absent, never mixed settings, and one worker per run."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SETTINGS = {"lr": 1e-4, "epochs": 2}


@pytest.fixture(scope="module")
def saved_runs():
    """benchmarks/saved_runs.py by path: benchmarks/ is scripts, not a package on sys.path."""
    spec = importlib.util.spec_from_file_location("saved_runs", REPO / "benchmarks" / "saved_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_saved_run_is_whole_and_is_not_run_again(saved_runs, tmp_path):
    path = saved_runs.run_path(tmp_path, "sst2", "sam@0.02", 1)
    with saved_runs.to_run(path, SETTINGS) as mine:
        assert mine and path.with_suffix(".claim").read_text() == str(os.getpid())
        saved_runs.save_run(path, {"settings": SETTINGS, "score": 0.8})
    assert json.loads(path.read_text())["score"] == 0.8
    assert sorted(p.name for p in path.parent.iterdir()) == ["seed1.json"]  # no .tmp, claim released
    with saved_runs.to_run(path, SETTINGS) as mine:
        assert not mine


def test_a_run_saved_with_other_settings_is_an_error_not_a_mix(saved_runs, tmp_path):
    path = saved_runs.run_path(tmp_path, "sst2", "adamw", 0)
    path.parent.mkdir(parents=True)
    saved_runs.save_run(path, {"settings": {**SETTINGS, "lr": 2e-4}})
    with pytest.raises(SystemExit, match="other settings"), saved_runs.to_run(path, SETTINGS):
        pass


@pytest.mark.parametrize(("owner", "taken_over"), [("live", False), ("dead", True)])
def test_a_live_workers_claim_is_left_alone_and_a_dead_ones_taken_over(saved_runs, tmp_path, owner, taken_over):
    path = saved_runs.run_path(tmp_path, "mrpc", "lets-sam", 2)
    path.parent.mkdir(parents=True)
    other = os.getppid() if owner == "live" else dead_pid()
    path.with_suffix(".claim").write_text(str(other))
    with saved_runs.to_run(path, SETTINGS) as mine:
        assert mine is taken_over
    # The live worker still holds its claim; the taken-over one is released once this worker is done.
    assert path.with_suffix(".claim").exists() is not taken_over
