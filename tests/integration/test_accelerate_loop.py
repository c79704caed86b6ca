"""examples/accelerate_loop.py (GLUE in a plain Accelerate loop driven by `LETSEngine`) on a tiny BERT and the shipped
SST-2 sample: LETS-SAM trains, logs ρ and the gap and saves its results; a run resumed from a checkpoint equals the
uninterrupted run bit for bit (dropout on, accumulation, across an epoch boundary); bad input stops with one clear
line."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from lets_hf.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "examples" / "accelerate_loop.py"
SHIPPED_GLUE = REPO_ROOT / "examples" / "data" / "glue"


def _import_example():
    spec = importlib.util.spec_from_file_location("accelerate_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


accelerate_loop = _import_example()


@pytest.fixture(autouse=True)
def fresh_accelerate_state(one_thread):
    """Each run builds its own Accelerator: leave no singleton state (accumulation steps, ...) to the next one."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def flags(model: Path, output_dir: Path, **overrides) -> list[str]:
    """LETS-SAM on 40 SST-2 rows (4 held out for ρ), batches of 4, every step logged."""
    values = dict(
        task="sst2", data_dir=SHIPPED_GLUE, model_name_or_path=model, output_dir=output_dir, method="lets-sam",
        max_train_samples=40, max_eval_samples=16, max_seq_length=32, per_device_train_batch_size=4,
        learning_rate=1e-3, logging_steps=1, max_train_steps=4,
    )
    values.update(overrides)
    return [item for name, value in values.items() for item in (f"--{name}", str(value))]


def test_lets_sam_trains_logs_rho_and_the_gap_and_saves_results(tiny_model, tmp_path):
    out = tmp_path / "out"
    results = accelerate_loop.main(flags(tiny_model, out))

    assert json.loads((out / "eval_results.json").read_text()) == results
    assert {"eval_accuracy", "eval_loss", "rho", "step"} <= set(results) and results["step"] == 4
    history = json.loads((out / "log_history.json").read_text())
    train_logs = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [1, 2, 3, 4]
    assert all("rho" in entry and "learning_rate" in entry for entry in train_logs)
    assert all("gen_gap" in entry for entry in train_logs[1:])  # ρ's first update needs ∂θ/∂ρ of step 1
    assert train_logs[0]["rho"] == 0.05 != results["rho"] == train_logs[-1]["rho"]
    assert any("eval_accuracy" in entry for entry in history)  # the evaluation at the end of the epoch
    for name in ("model.safetensors", "config.json", "tokenizer_config.json", "rho_curve.png"):
        assert (out / name).is_file(), name


def test_the_last_step_is_logged_so_the_curves_reach_the_end_of_training(tiny_model, tmp_path):
    """A run shorter than a few logging intervals (12 steps logged every 10) would draw one point per curve."""
    out = tmp_path / "out"
    accelerate_loop.main(flags(tiny_model, out, logging_steps=3, max_train_steps=4))
    train_logs = [entry for entry in json.loads((out / "log_history.json").read_text()) if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [3, 4] and all("gen_gap" in entry for entry in train_logs)


@pytest.mark.parametrize("gap_batches", [{}, {"rho_train_batch": "last", "rho_val_batch": "next"}])
def test_a_resumed_run_equals_the_uninterrupted_one(tiny_model, tmp_path, gap_batches):
    """36 train rows in micro-batches of 4, 2 per step: 5 steps per epoch (the last of 1 micro-batch). The run stops
    after step 7, in epoch 2; resuming from step 3 (mid-epoch) must restore θ, AdamW, the schedule, ρ and its Adam
    state, ∂θ/∂ρ, the ρ validation stream, the data order, accelerate's micro-batch count and the dropout
    stream; with nothing held out (`gap_batches`), the loss and inner products of the batch step 2 stepped on."""
    run = dict(max_train_steps=7, gradient_accumulation_steps=2, checkpointing_steps=3, **gap_batches)
    whole = tmp_path / "whole"
    accelerate_loop.main(flags(tiny_model, whole, **run))
    assert sorted(p.name for p in whole.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert not (whole / ".staging").exists()  # published, nothing left half-written

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-3", resumed / "checkpoint-3")  # what a run stopped after step 3 leaves
    accelerate_loop.main(flags(tiny_model, resumed, **run, resume_from_checkpoint="latest"))

    expected, actual = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    whole_results = json.loads((whole / "eval_results.json").read_text())
    assert json.loads((resumed / "eval_results.json").read_text()) == whole_results
    assert whole_results["rho"] != 0.05
    history = [json.loads((folder / "log_history.json").read_text()) for folder in (whole, resumed)]
    assert history[0] == history[1]


@pytest.mark.parametrize("restart", ["auto", "the run folder"])
def test_one_command_with_auto_starts_the_run_and_its_restart_continues_it(tiny_model, tmp_path, restart):
    """`--resume_from_checkpoint auto` starts a new run where output_dir holds no checkpoint; a restart (with more
    steps) continues from the newest one, as does naming the run folder. A new run would log other learning rates
    (its linear schedule spans 4 steps, not 2)."""
    out = tmp_path / "out"

    def train_logs(steps: int, resume: str) -> list[dict]:
        accelerate_loop.main(flags(tiny_model, out, max_train_steps=steps, checkpointing_steps=2,
                                   resume_from_checkpoint=resume))
        return [entry for entry in json.loads((out / "log_history.json").read_text()) if "loss" in entry]

    first = train_logs(2, "auto")
    restarted = train_logs(4, str(out) if restart == "the run folder" else restart)
    assert restarted[:2] == first and [entry["step"] for entry in restarted] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "lets-foo"}, "Unknown --method 'lets-foo'"),
        ({"max_train_samples": 20}, "fewer than one global validation batch"),  # 2 held out, ρ batches of 4
        ({"max_train_samples": 1}, "too few to hold out"),
        ({"method": "bisam"}, "Use LETSTrainer, or another rule"),  # its surrogate first pass needs Trainer's logits
        ({"resume_from_checkpoint": "latest"}, "holds no complete checkpoint"),
        ({"checkpointing_steps": "often"}, "must be a number of steps or 'epoch'"),
    ],
)
def test_bad_input_is_a_usage_error(tiny_model, tmp_path, overrides, message):
    with pytest.raises(UsageError, match=message):
        accelerate_loop.main(flags(tiny_model, tmp_path / "out", **overrides))


def test_help_lists_the_loop_and_the_lets_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        accelerate_loop.main(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--task", "--data_dir", "--method", "--checkpointing_steps", "--resume_from_checkpoint",
                 "--learn_rho", "--rho_lr", "--rho_val_fraction", "--rho_estimator"):
        assert flag in help_text


def test_the_script_reports_a_usage_error_in_one_line(tiny_model, tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), *flags(tiny_model, tmp_path / "out", method="lets-foo")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("accelerate_loop.py: error: Unknown --method 'lets-foo'")
