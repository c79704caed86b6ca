"""Runs that would end with exit 0 and wrong numbers: non-finite steps and ρ, bad ρ settings,
half-written checkpoints. Each ends in a correct run or a clear error."""

import math
import os
import subprocess
import sys

import pytest
import torch

from lets_hf import LETSConfig, LETSTrainer
from lets_hf.checkpoints import IncompleteCheckpointError
from lets_hf.errors import UsageError
from lets_hf.nonfinite import NonFiniteTrainingError
from lets_hf.radius import Radius
from tests.heads import build_model, train_rows, validation_rows
from tests.toy import TinyClassifier, ToyDataset

F64 = torch.float64


class _NaNOnCall(TinyClassifier):
    """A NaN loss on the chosen forward calls (1-based)."""

    def __init__(self, nan_calls, **kwargs):
        super().__init__(**kwargs)
        self.nan_calls, self.calls = set(nan_calls), 0

    def forward(self, x, labels=None):
        self.calls += 1
        out = super().forward(x, labels)
        if self.calls in self.nan_calls:
            out["loss"] = out["loss"] * float("nan")
        return out


def _lets(make_args, **overrides):
    settings = dict(sam_variant="sam", rho=0.1, learn_rho=True, rho_lr=0.01, per_device_train_batch_size=4,
                    rho_batch_size=4, optim="adamw_torch", learning_rate=0.01)
    return make_args(**{**settings, **overrides})


class _Snapshots:
    """θ, ρ and Adam's first moment after every optimizer step."""

    def __init__(self):
        self.after = []

    def __call__(self, trainer):
        optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        moments = [optimizer.state[p]["exp_avg"].clone() for p in trainer.model.parameters() if p in optimizer.state]
        params = [p.detach().clone() for p in trainer.model.parameters()]
        self.after.append((params, trainer.rho, moments))


def _train_with_snapshots(trainer):
    from transformers import TrainerCallback

    snapshots = _Snapshots()

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots(trainer)

    trainer.add_callback(Record())
    trainer.train()
    return snapshots.after


def test_a_nonfinite_step_is_skipped_for_theta_rho_and_the_optimizer(make_args):
    """Forward calls: step 1 = 1, 2; step 2 = 3, 4 (validation), 5; step 3 = 6 (NaN first pass), 7, 8."""
    args = _lets(make_args, max_steps=5)
    trainer = LETSTrainer(model=_NaNOnCall({6}, dtype=F64), args=args, train_dataset=ToyDataset(64, dtype=F64),
                          rho_dataset=ToyDataset(16, seed=1, dtype=F64))
    after = _train_with_snapshots(trainer)
    (theta_2, rho_2, moments_2), (theta_3, rho_3, moments_3) = after[1], after[2]
    assert all(torch.equal(p, q) for p, q in zip(theta_2, theta_3))
    assert rho_3 == rho_2 and all(torch.equal(m, n) for m, n in zip(moments_2, moments_3))
    assert not all(torch.equal(p, q) for p, q in zip(theta_3, after[3][0]))  # training goes on
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters()) and math.isfinite(trainer.rho)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry.get("nonfinite_steps_skipped", 0) for entry in logs] == [0, 0, 1, 1, 1]
    assert logs[2]["rho_updates_skipped"] == 1  # its ρ update saw the NaN gradient


def test_a_nonfinite_rho_update_leaves_rho_and_its_optimizer_unchanged(make_args):
    radius = Radius(_lets(make_args), initial=0.1, device=torch.device("cpu"))
    radius.update(torch.tensor(0.5, dtype=F64), torch.tensor(2.0, dtype=F64))
    before = [t.clone() for t in (radius.value, radius.step, radius.exp_avg, radius.exp_avg_sq)]
    for gap, inner in ((math.nan, 1.0), (1.0, math.inf), (math.inf, 0.0)):
        radius.update(torch.tensor(gap, dtype=F64), torch.tensor(inner, dtype=F64))
    after = (radius.value, radius.step, radius.exp_avg, radius.exp_avg_sq)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert int(radius.skipped_updates) == 3
    radius.update(torch.tensor(0.5, dtype=F64), torch.tensor(2.0, dtype=F64))
    assert float(radius.value) != float(before[0])


@pytest.mark.parametrize("case", ["none", "sam", "lets-sam"])
def test_divergence_stops_with_an_error_naming_step_loss_and_causes(tmp_path, one_thread, case):
    """lr 1e30 on a real BERT head (float32): the first step blows the weights up, five skipped steps later it stops."""
    args = LETSConfig(
        output_dir=str(tmp_path), sam_variant="none" if case == "none" else "sam", learn_rho=case == "lets-sam",
        rho_batch_size=8, per_device_train_batch_size=8, learning_rate=1e30, optim="sgd", max_steps=20,
        report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1,
    )
    trainer = LETSTrainer(model=build_model("bert-classification").float(), args=args, train_dataset=train_rows("bert-classification") * 7,
                          rho_dataset=validation_rows("bert-classification") if case == "lets-sam" else None)
    with pytest.raises(NonFiniteTrainingError) as raised:
        trainer.train()
    message = str(raised.value)
    assert "Training stopped at step 6" in message and "5 optimizer steps in a row, since step 2" in message
    assert "The last finite training loss was 1.09" in message and "at step 1" in message
    assert "learning_rate = 1e+30" in message and "nonfinite_patience=0" in message
    assert ("rho = 0.05" in message) == (case != "none")


def test_with_patience_zero_nonfinite_steps_are_only_skipped(make_args):
    args = _lets(make_args, max_steps=4, nonfinite_patience=0)
    trainer = LETSTrainer(model=_NaNOnCall(range(3, 100), dtype=F64), args=args, train_dataset=ToyDataset(64, dtype=F64),
                          rho_dataset=ToyDataset(16, seed=1, dtype=F64))
    trainer.train()  # steps 2-4 are NaN from their first pass on
    assert trainer.state.log_history[-2]["nonfinite_steps_skipped"] == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize(
    "settings,expected",
    [
        (dict(rho=math.nan), "rho must be a finite number"),
        (dict(rho=math.inf), "rho must be a finite number"),
        (dict(rho_lr=math.nan), "rho_lr must be a finite number"),
        (dict(rho_max=math.inf), "rho_max must be a finite number"),
        (dict(rho=20.0, learn_rho=True), r"initial rho \(20.0\) must lie in \[rho_min, rho_max\] = \[0.0, 10.0\]"),
        (dict(rho=0.01, learn_rho=True, rho_min=0.02), r"must lie in \[rho_min, rho_max\]"),
        (dict(nonfinite_patience=-1), "nonfinite_patience must be >= 0"),
        (dict(fp16=True), "fp16 needs a GPU"),
    ],
)
def test_bad_settings_are_refused(make_args, settings, expected):
    with pytest.raises(UsageError, match=expected):
        make_args(**settings)


def test_a_rule_default_rho_outside_the_bounds_is_refused(make_args):
    args = make_args(sam_variant="asam", learn_rho=True, rho_max=0.1)  # ASAM's default ρ is 0.5
    with pytest.raises(UsageError, match=r"initial rho \(0.5\)"):
        LETSTrainer(model=TinyClassifier(), args=args, train_dataset=ToyDataset(64))


# ---------------------------------------------------------------------------- checkpoints


def _checkpointing_trainer(output_dir, make_args, **overrides):
    args = _lets(make_args, output_dir=str(output_dir), max_steps=3, save_strategy="steps", save_steps=1, **overrides)
    return LETSTrainer(model=TinyClassifier(dtype=F64), args=args, train_dataset=ToyDataset(64, dtype=F64),
                       rho_dataset=ToyDataset(16, seed=1, dtype=F64))


def _fail_on_save(trainer, call: int):
    """Fault injection: the `call`-th RNG-state save (the last file but trainer_state.json) raises."""
    save_rng_state, calls = trainer._save_rng_state, [0]

    def failing(output_dir):
        calls[0] += 1
        if calls[0] == call:
            raise OSError("disk full (injected)")
        save_rng_state(output_dir)

    trainer._save_rng_state = failing


def test_a_save_that_fails_halfway_leaves_no_checkpoint_folder(tmp_path, make_args):
    out = tmp_path / "out"
    trainer = _checkpointing_trainer(out, make_args)
    _fail_on_save(trainer, call=2)
    with pytest.raises(OSError, match="injected"):
        trainer.train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / ".staging" / "checkpoint-2" / "model.safetensors").is_file()  # the half-written one stays staged
    assert not (out / "checkpoint-2").exists()

    resumed = _checkpointing_trainer(out, make_args)
    resumed.train(resume_from_checkpoint=True)  # finds checkpoint-1, the newest complete one
    straight = _checkpointing_trainer(tmp_path / "straight", make_args)
    straight.train()
    assert resumed.rho == pytest.approx(straight.rho, rel=1e-12)
    for p, q in zip(resumed.model.parameters(), straight.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not (out / ".staging").exists()


@pytest.mark.parametrize(
    "damage,expected",
    [
        (lambda folder: os.remove(folder / "trainer_state.json"), "trainer_state.json is missing"),
        (lambda folder: (folder / "trainer_state.json").write_text("{"), "trainer_state.json cannot be read"),
        (lambda folder: os.remove(folder / "model.safetensors"), "it has no model weights"),
        (lambda folder: os.remove(folder / "optimizer.pt"), "the optimizer state is missing"),
        (lambda folder: _truncate(folder / "lets_state.pt"), "lets_state.pt cannot be read"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_previous_one(tmp_path, make_args, damage, expected):
    out = tmp_path / "out"
    _checkpointing_trainer(out, make_args).train()
    damage(out / "checkpoint-3")
    with pytest.raises(IncompleteCheckpointError, match=expected) as raised:
        _checkpointing_trainer(out, make_args).train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert f"Resume from {out / 'checkpoint-2'} instead" in str(raised.value)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_plain_trainer_checkpoint_is_refused_for_learned_rho(tmp_path, make_args):
    out = tmp_path / "out"
    _checkpointing_trainer(out, make_args, sam_variant="none", learn_rho=False).train()
    with pytest.raises(UsageError, match="lets_state.pt is missing: this checkpoint was not written by LETSTrainer"):
        _checkpointing_trainer(out, make_args).train(resume_from_checkpoint=str(out / "checkpoint-3"))


def test_processes_launched_together_on_a_cpu_machine_without_use_cpu_are_refused(tmp_path):
    """torchrun on a machine without GPUs: TrainingArguments then forms no process group (each process has
    world_size 1) unless use_cpu, so each process would train alone, all writing to one output_dir."""
    script = tmp_path / "config.py"
    script.write_text(f"from lets_hf import LETSConfig\nLETSConfig(output_dir={str(tmp_path)!r}, report_to='none')\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("one of 2 launched together (WORLD_SIZE=2)") == 2  # both ranks
    assert "Set use_cpu=True" in done.stderr
