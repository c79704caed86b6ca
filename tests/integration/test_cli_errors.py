"""`lets-hf` on user mistakes: one message, exit 2, nothing loaded first; flags mean what they say."""

import shutil

import pytest

from lets_hf import LETSConfig, cli
from lets_hf.errors import UsageError
from lets_hf.nonfinite import NonFiniteTrainingError
from lets_hf.tasks.glue import GlueArguments
from lets_hf.tasks.iwslt14.main import parse_args as parse_iwslt_args
from lets_hf.tasks.iwslt14.prepare import write_lines
from tests.integration.test_glue_cli import SHIPPED_GLUE, write_tsv

QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--save_strategy", "no"]
SENTENCES = [("ein kleines haus", "a small house"), ("der hund schläft", "the dog sleeps"), ("wir gehen", "we go")]


def glue(tiny_model, tmp_path, *flags):
    return ["glue", "--task", "sst2", "--data_dir", str(SHIPPED_GLUE), "--model_name_or_path", str(tiny_model),
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1", *QUIET, *flags]


def iwslt(data_dir, tmp_path, *flags):
    return ["iwslt14", "--data_dir", str(data_dir), "--arch", "transformer_tiny", "--output_dir", str(tmp_path / "out"),
            "--bpe_merges", "40", "--max_tokens", "256", "--max_new_tokens", "6", *QUIET, *flags]


def refused(capsys, argv, code=2) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    return err


@pytest.fixture
def tiny_iwslt(tmp_path):
    """A tokenized IWSLT'14 layout of a few real-looking pairs."""
    folder = tmp_path / "iwslt"
    folder.mkdir()
    for split, copies in (("train", 12), ("valid", 1), ("test", 1)):
        write_lines(folder / f"{split}.de", [de for de, _ in SENTENCES] * copies)
        write_lines(folder / f"{split}.en", [en for _, en in SENTENCES] * copies)
    return folder


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--rho", "nan"], "rho must be a finite number, got nan"),
        (["--method", "adamw", "--learn_rho"], "--learn_rho needs a perturbation"),
        (["--fp16"], "fp16 needs a GPU"),
        (["--method", "lets-sam", "--rho", "20"], "initial --rho (20.0) must lie in [--rho_min, --rho_max] = [0.0, 10.0]"),
    ],
)
def test_bad_flags(tiny_model, tmp_path, capsys, flags, expected):
    assert expected in refused(capsys, glue(tiny_model, tmp_path, *flags))


@pytest.mark.parametrize(
    "flags,settings,on_the_command_line,in_python",
    [
        (["--rho", "-0.05"], dict(rho=-0.05), "use --method adamw.", "use sam_variant='none'."),
        (["--method", "adamw", "--learn_rho"], dict(sam_variant="none", learn_rho=True),
         "--learn_rho needs a perturbation, which --method adamw turns off: use a rule such as --sam_variant sam.",
         "learn_rho=True needs a perturbation, which sam_variant='none' turns off: use a rule such as sam_variant='sam'."),
        (["--fp16"], dict(fp16=True), ": remove --fp16, or use --bf16 where", ": set fp16=False, or use bf16=True where"),
    ],
)
def test_a_mistake_is_named_as_the_user_spelled_it(tiny_model, tmp_path, capsys, flags, settings, on_the_command_line,
                                                   in_python):
    """The same mistake names flags on the command line and Python settings in Python, never the other's."""
    typed = refused(capsys, glue(tiny_model, tmp_path, *flags))
    assert on_the_command_line in typed and "=" not in typed, typed
    with pytest.raises(UsageError) as raised:
        LETSConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **settings)
    written = str(raised.value)
    assert in_python in written and "--" not in written, written


def test_explicit_flags_override_the_method_preset(tiny_model, tmp_path):
    _, config = cli.parse_command_line(GlueArguments, glue(tiny_model, tmp_path, "--method", "lets-sam", "--sam_variant", "asam")[1:])
    assert (config.sam_variant, config.learn_rho) == ("asam", True)
    _, config = cli.parse_command_line(GlueArguments, glue(tiny_model, tmp_path, "--method", "lets-sam", "--learn_rho", "false")[1:])
    assert (config.sam_variant, config.learn_rho) == ("sam", False)


def test_missing_model_folder_and_folder_that_is_not_a_model(tmp_path, capsys):
    assert "no such folder" in refused(capsys, glue(tmp_path / "nope", tmp_path))
    (tmp_path / "empty").mkdir()
    assert "folder without config.json: not a saved model" in refused(capsys, glue(tmp_path / "empty", tmp_path))


def test_output_dir_that_is_a_file(tiny_model, tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    err = refused(capsys, glue(tiny_model, tmp_path))
    assert f"--output_dir {tmp_path / 'out'} is a file" in err


def test_empty_split_and_bad_file(tiny_model, tmp_path, capsys):
    data = tmp_path / "glue"
    shutil.copytree(SHIPPED_GLUE, data)
    write_tsv(data / "SST-2" / "train.tsv", [["sentence", "label"]])
    argv = glue(tiny_model, tmp_path, "--method", "sam")
    argv[argv.index("--data_dir") + 1] = str(data)
    err = refused(capsys, argv)
    assert "The train split of GLUE SST-2" in err and "has no examples" in err
    write_tsv(data / "SST-2" / "train.tsv", [["sentence", "label"], ["a fine film", "maybe"]])
    assert "line 2: unknown label 'maybe'" in refused(capsys, argv)


def test_debug_keeps_the_traceback_and_program_bugs_keep_theirs(tiny_model, tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="rho must be a finite number"):
        cli.main(glue(tiny_model, tmp_path, "--rho", "nan", "--debug"))
    monkeypatch.setenv("LETS_HF_DEBUG", "1")
    with pytest.raises(UsageError):
        cli.main(glue(tiny_model, tmp_path, "--rho", "nan"))
    monkeypatch.delenv("LETS_HF_DEBUG")

    def bug(argv):
        raise KeyError("a program bug")

    monkeypatch.setattr("lets_hf.tasks.glue.main", bug)
    with pytest.raises(KeyError):
        cli.main(glue(tiny_model, tmp_path))


def test_a_diverged_run_exits_1_with_its_message(tiny_model, tmp_path, capsys, monkeypatch):
    def diverged(argv):
        raise NonFiniteTrainingError("Training stopped at step 6: ...")

    monkeypatch.setattr("lets_hf.tasks.glue.main", diverged)
    assert "Training stopped at step 6" in refused(capsys, glue(tiny_model, tmp_path), code=1)


def test_iwslt_max_tokens_is_checked_before_any_data(tmp_path, capsys):
    assert "--max_tokens must be > 0, got 0" in refused(capsys, iwslt(tmp_path / "absent", tmp_path, "--max_tokens", "0"))


def test_iwslt_batch_size_above_one_needs_an_explicit_max_tokens(tmp_path, capsys):
    argv = ["iwslt14", "--data_dir", "d", "--output_dir", str(tmp_path), "--per_device_train_batch_size", "16"]
    assert "65,536 tokens per step" in refused(capsys, argv)
    _, config = parse_iwslt_args([*argv[1:], "--max_tokens", "4096"])
    assert config.per_device_train_batch_size == 16


def test_iwslt_empty_valid_file(tiny_iwslt, tmp_path, capsys):
    write_lines(tiny_iwslt / "valid.de", [])
    write_lines(tiny_iwslt / "valid.en", [])
    assert "The valid split" in refused(capsys, iwslt(tiny_iwslt, tmp_path))


def test_iwslt_greedy_search_saves_checkpoints_and_translates(tiny_iwslt, tmp_path, one_thread):
    cli.main(iwslt(tiny_iwslt, tmp_path, "--num_beams", "1", "--max_steps", "2", "--save_strategy", "steps",
                   "--save_steps", "1", "--eval_strategy", "no"))
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "generation_config.json").is_file()
    assert len((out / "eval_hypotheses.txt").read_text(encoding="utf-8").splitlines()) == len(SENTENCES)
