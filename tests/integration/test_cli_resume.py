"""`lets-hf --resume_from_checkpoint` as users type it (`True`, `latest`, `auto`, a run folder), and Ctrl-C: nothing
staged is left, one line names the newest complete checkpoint and the command that resumes from it, exit 130."""

import json
import os
import shlex
import shutil

import pytest

from lets_hf import LETSTrainer, cli
from tests.integration.test_cli_errors import glue, iwslt, refused, tiny_iwslt  # noqa: F401 (a fixture)

#: LETS-SAM on 64 SST-2 rows (6 held out for ρ) in batches of 4, every step logged.
SMALL = ["--method", "lets-sam", "--max_train_samples", "64", "--max_eval_samples", "16", "--max_seq_length", "32",
         "--per_device_train_batch_size", "4", "--logging_steps", "1"]
#: The same, with a checkpoint every 2 steps.
SAVED = [*SMALL, "--save_strategy", "steps", "--save_steps", "2"]


@pytest.fixture(scope="module")
def stopped_run(tiny_model, tmp_path_factory):
    """The output folder of a 4-step run, with checkpoint-2 and checkpoint-4: what a restart with more steps finds."""
    folder = tmp_path_factory.mktemp("stopped")
    cli.main(glue(tiny_model, folder, *SAVED, "--max_steps", "4"))
    return folder / "out"


@pytest.fixture
def out(stopped_run, tmp_path):
    """A copy of `stopped_run`'s folder at `glue(..., tmp_path)`'s output_dir."""
    shutil.copytree(stopped_run, tmp_path / "out")
    return tmp_path / "out"


def train_logs(folder) -> list[dict]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "loss" in entry]


def assert_resumed_from(checkpoint, out, steps: int, stdout: str) -> None:
    """The run said so, ended at `steps`, and its log starts with the checkpoint's (a new run, whose linear schedule
    spans `steps`, would log other learning rates)."""
    assert f"Resuming from {checkpoint}." in stdout
    before = train_logs(checkpoint)
    after = train_logs(out)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == steps
    assert after[: len(before)] == before and [entry["step"] for entry in after] == list(range(1, steps + 1))


@pytest.mark.parametrize("value", ["True", "latest", "auto", "the run folder"])
def test_a_word_or_the_run_folder_resumes_from_the_newest_complete_checkpoint(tiny_model, tmp_path, out, capsys, value):
    value = str(out) if value == "the run folder" else value
    cli.main(glue(tiny_model, tmp_path, *SAVED, "--max_steps", "6", "--resume_from_checkpoint", value))
    assert_resumed_from(out / "checkpoint-4", out, steps=6, stdout=capsys.readouterr().out)


def test_auto_without_a_checkpoint_starts_a_new_run(tiny_model, tmp_path, capsys):
    cli.main(glue(tiny_model, tmp_path, *SAVED, "--max_steps", "2", "--resume_from_checkpoint", "auto"))
    assert "--resume_from_checkpoint auto: " in capsys.readouterr().out
    assert [entry["step"] for entry in train_logs(tmp_path / "out")] == [1, 2]


@pytest.mark.parametrize("value", ["True", "latest", "the run folder"])
def test_no_complete_checkpoint_to_resume_from_is_refused_saying_where_it_looked(tiny_model, tmp_path, capsys, value):
    run_folder = tmp_path / "out"
    os.makedirs(run_folder / ".staging" / "checkpoint-2")  # a save that was interrupted: never complete
    value = str(run_folder) if value == "the run folder" else value
    err = refused(capsys, glue(tiny_model, tmp_path, "--resume_from_checkpoint", value))
    assert f"--resume_from_checkpoint {value}: {run_folder} holds no complete checkpoint" in err
    assert "To start a new run, remove --resume_from_checkpoint; --resume_from_checkpoint auto resumes" in err


def test_a_damaged_newest_checkpoint_is_refused_by_path_and_skipped_by_latest(tiny_model, tmp_path, out, capsys,
                                                                              caplog):
    os.remove(out / "checkpoint-4" / "model.safetensors")
    err = refused(capsys, glue(tiny_model, tmp_path, "--resume_from_checkpoint", str(out / "checkpoint-4")))
    assert "it has no model weights" in err and f"Resume from {out / 'checkpoint-2'} instead." in err

    cli.main(glue(tiny_model, tmp_path, *SAVED, "--max_steps", "6", "--resume_from_checkpoint", "latest"))
    assert_resumed_from(out / "checkpoint-2", out, steps=6, stdout=capsys.readouterr().out)
    assert f"{out / 'checkpoint-4'}: it has no model weights" in caplog.text


def test_a_path_that_is_no_checkpoint_names_the_newest_complete_one_in_output_dir(tiny_model, tmp_path, out, capsys):
    err = refused(capsys, glue(tiny_model, tmp_path, "--resume_from_checkpoint", str(out / "chekpoint-4")))
    assert "is not a folder" in err and f"Resume from {out / 'checkpoint-4'} instead." in err


def test_iwslt14_resumes_with_auto(tiny_iwslt, tmp_path, capsys, one_thread):
    saved = ["--num_beams", "1", "--save_strategy", "steps", "--save_steps", "1", "--eval_strategy", "no"]
    cli.main(iwslt(tiny_iwslt, tmp_path, *saved, "--max_steps", "2"))
    cli.main(iwslt(tiny_iwslt, tmp_path, *saved, "--max_steps", "3", "--resume_from_checkpoint", "auto"))
    out = tmp_path / "out"
    assert f"Resuming from {out / 'checkpoint-2'}." in capsys.readouterr().out
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3


class CtrlCWhileSavingStep4(LETSTrainer):
    """Ctrl-C while checkpoint-4 is written: its model and optimizer are staged, its RNG state and
    trainer_state.json are not."""

    def _save_rng_state(self, output_dir):
        if self.state.global_step == 4:
            assert os.path.isfile(os.path.join(output_dir, "model.safetensors"))  # under .staging/
            raise KeyboardInterrupt
        super()._save_rng_state(output_dir)


class CtrlCAtStep2(LETSTrainer):
    """Ctrl-C in the third step."""

    def training_step(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return super().training_step(*args, **kwargs)


def interrupted(capsys, argv) -> str:
    """The one line `lets-hf` prints on Ctrl-C, which must exit 130 (the shell's code for it)."""
    with pytest.raises(SystemExit) as exited:
        try:
            cli.main(argv)
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped lets-hf")  # and would stop pytest itself
    assert exited.value.code == 130
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "interrupted" in line]
    return line


def test_ctrl_c_removes_the_staged_checkpoint_and_prints_the_command_that_resumes(tiny_model, tmp_path, capsys,
                                                                                monkeypatch):
    argv = glue(tiny_model, tmp_path, *SAVED, "--max_steps", "6", "--resume_from_checkpoint=auto")
    with monkeypatch.context() as patched:
        patched.setattr("lets_hf.tasks.glue.LETSTrainer", CtrlCWhileSavingStep4)
        line = interrupted(capsys, argv)
    out = tmp_path / "out"
    assert not (out / ".staging").exists() and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert line.startswith(f"lets-hf glue: interrupted. The newest complete checkpoint is {out / 'checkpoint-2'}; ")

    command = shlex.split(line.split("to resume from it: ", 1)[1])
    assert command == ["lets-hf", *argv[:-1], "--resume_from_checkpoint", "auto"]  # in place of the flag given
    cli.main(command[1:])
    assert_resumed_from(out / "checkpoint-2", out, steps=6, stdout=capsys.readouterr().out)


def test_ctrl_c_without_a_checkpoint_says_how_to_get_one(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lets_hf.tasks.glue.LETSTrainer", CtrlCAtStep2)
    line = interrupted(capsys, glue(tiny_model, tmp_path, *SMALL, "--max_steps", "4"))
    assert line == (f"lets-hf glue: interrupted. {tmp_path / 'out'} holds no complete checkpoint to resume from (add "
                    "--save_strategy steps --save_steps N to save some).")
