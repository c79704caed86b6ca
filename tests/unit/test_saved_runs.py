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


def test_a_run_resumes_its_last_checkpoint_with_the_time_spent_before_it(saved_runs, tmp_path):
    """The clock a resumed run starts from is the one its checkpoint recorded; a fresh run's starts at zero."""
    path = saved_runs.run_path(tmp_path, "rte", "sam@0.05", 1)
    checkpoint, clock = saved_runs.resume_point(path, SETTINGS, save_every_s=600)
    assert checkpoint is None and clock.cpu_s < 60 and clock.wall_s < 60 and clock.resumed_from_step is None
    for step, cpu_s in ((40, 1000.0), (80, 2000.0)):  # Trainer keeps the newest
        folder = saved_runs.checkpoint_dir(path) / f"checkpoint-{step}"
        folder.mkdir()
        state = {"global_step": step, "stateful_callbacks": {"RunClock": {"args": {"cpu_s": cpu_s, "wall_s": 3 * cpu_s}}}}
        (folder / "trainer_state.json").write_text(json.dumps(state))
    checkpoint, clock = saved_runs.resume_point(path, SETTINGS, save_every_s=600)
    assert checkpoint.endswith("checkpoint-80") and clock.resumed_from_step == 80
    assert 2000 <= clock.cpu_s < 2060 and 6000 <= clock.wall_s < 6060
    assert clock.state()["args"]["cpu_s"] >= 2000  # and the next checkpoint carries it on
    with pytest.raises(SystemExit, match="other settings"):
        saved_runs.resume_point(path, {**SETTINGS, "lr": 3e-5}, save_every_s=600)
    (saved_runs.checkpoint_dir(path) / "settings.json").unlink()  # a folder made by hand
    with pytest.raises(SystemExit, match="none recorded"):
        saved_runs.resume_point(path, SETTINGS, save_every_s=600)
    saved_runs.save_run(path, {"settings": SETTINGS})
    assert not saved_runs.checkpoint_dir(path).exists()
