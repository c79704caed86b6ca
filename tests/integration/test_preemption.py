"""SIGTERM (SLURM's warning before it kills a job): `lets-hf` saves a complete checkpoint at the next step boundary,
names the command that resumes, exits 75 and leaves `<output_dir>/preempted` saying so (until the next run starts),
and that command finishes the run exactly as an uninterrupted one; in
Python, Trainer's SIGTERM stays untouched unless `save_on_sigterm` is set."""

import os
import shlex
import signal

import pytest
import torch
from safetensors.torch import load_file

from lets_hf import LETSTrainer, cli
from lets_hf.preemption import TrainingPreempted
from tests.integration.test_cli_errors import glue
from tests.integration.test_cli_resume import SMALL, train_logs
from tests.toy import TinyClassifier, ToyDataset


class SigtermReachedTheTest(Exception):
    """SIGTERM got past lets-hf to the handler the test had before."""


@pytest.fixture
def sigterm_fails_the_test():
    """A SIGTERM that lets-hf does not catch fails the test instead of killing pytest; the fixture's handler."""

    def fail(signum, frame):
        raise SigtermReachedTheTest

    previous = signal.signal(signal.SIGTERM, fail)
    yield fail
    signal.signal(signal.SIGTERM, previous)


class SigtermInStep3(LETSTrainer):
    """SIGTERM to this process while the third optimizer step runs."""

    def training_step(self, *args, **kwargs):
        if self.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().training_step(*args, **kwargs)


def test_sigterm_saves_a_checkpoint_exits_75_and_the_printed_command_resumes_exactly(
    tiny_model, tmp_path, capsys, monkeypatch, sigterm_fails_the_test, one_thread
):
    uninterrupted = tmp_path / "uninterrupted"
    cli.main(glue(tiny_model, uninterrupted, *SMALL, "--max_steps", "6"))

    argv = glue(tiny_model, tmp_path, *SMALL, "--max_steps", "6")
    with monkeypatch.context() as patched, pytest.raises(SystemExit) as exited:
        patched.setattr("lets_hf.tasks.glue.LETSTrainer", SigtermInStep3)
        cli.main(argv)
    assert exited.value.code == cli.PREEMPTED_EXIT == 75
    assert signal.getsignal(signal.SIGTERM) is sigterm_fails_the_test
    out = tmp_path / "out"
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint-3", "preempted"]  # no .staging, no final model
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "preempted" in line]
    assert line.startswith(f"lets-hf glue: preempted (SIGTERM). Saved {out / 'checkpoint-3'}; to resume from it: ")

    command = shlex.split(line.split("to resume from it: ", 1)[1])
    assert command == ["lets-hf", *argv, "--resume_from_checkpoint", "auto"]
    assert (out / cli.PREEMPTED_MARKER).read_text() == f"{out / 'checkpoint-3'}\n{shlex.join(command)}\n"
    cli.main(command[1:])
    assert f"Resuming from {out / 'checkpoint-3'}." in capsys.readouterr().out
    assert not (out / cli.PREEMPTED_MARKER).exists()  # the requeued run finished: nothing to requeue
    assert train_logs(out) == train_logs(uninterrupted / "out")  # losses, learning rates and ρ, step by step
    resumed, expected = load_file(out / "model.safetensors"), load_file(uninterrupted / "out" / "model.safetensors")
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[name], expected[name]) for name in expected)


class RecordsTheSigtermHandler(LETSTrainer):
    """Records the SIGTERM handler in the first step and, with `send_sigterm`, sends SIGTERM there."""

    def __init__(self, *args, send_sigterm: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.send_sigterm, self.handler_while_training = send_sigterm, None

    def training_step(self, *args, **kwargs):
        if self.state.global_step == 0:
            self.handler_while_training = signal.getsignal(signal.SIGTERM)
            if self.send_sigterm:
                os.kill(os.getpid(), signal.SIGTERM)
        return super().training_step(*args, **kwargs)


def test_sigterm_is_handled_only_with_save_on_sigterm_only_while_training_and_raises_naming_the_checkpoint(
    make_args, tmp_path, sigterm_fails_the_test
):
    plain = RecordsTheSigtermHandler(model=TinyClassifier(), args=make_args(sam_variant="sam"),
                                     train_dataset=ToyDataset(32), send_sigterm=False)
    plain.train()
    assert plain.handler_while_training is sigterm_fails_the_test  # Trainer's behaviour, unchanged

    args = make_args(sam_variant="sam", save_on_sigterm=True, max_steps=3)
    trainer = RecordsTheSigtermHandler(model=TinyClassifier(), args=args, train_dataset=ToyDataset(32),
                                       send_sigterm=True)
    with pytest.raises(TrainingPreempted) as preempted:
        trainer.train()
    assert trainer.handler_while_training not in (sigterm_fails_the_test, signal.SIG_DFL)
    assert signal.getsignal(signal.SIGTERM) is sigterm_fails_the_test
    assert preempted.value.checkpoint == str(tmp_path / "out" / "checkpoint-1") and trainer.state.global_step == 1
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-1"]
