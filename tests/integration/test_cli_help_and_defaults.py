"""`lets-hf` as a first run meets it: `--help` opens on the task's and LETS's flags, a run writes no checkpoint
unless asked, and `--bf16` runs on a CPU without `--use_cpu`."""

import dataclasses

import pytest
import torch
from transformers import HfArgumentParser

from lets_hf import LETSArguments, LETSConfig, cli
from lets_hf.config import FIELD_GROUPS
from lets_hf.tasks.glue import GlueArguments
from tests.integration.test_cli_errors import glue

TASK_HEADINGS = {"glue": "GLUE task, data and model:", "iwslt14": "IWSLT'14 task, data and model:"}
SHORT = ["--max_seq_length", "32", "--max_train_samples", "64", "--max_eval_samples", "16"]  # tiny_model: 64 positions


def without(argv: list[str], flag: str) -> list[str]:
    """`argv` less `flag` and its value."""
    at = argv.index(flag)
    return argv[:at] + argv[at + 2 :]


@pytest.mark.parametrize("task", TASK_HEADINGS)
def test_help_opens_on_the_task_and_lets_flags_in_named_groups(capsys, task):
    with pytest.raises(SystemExit) as exited:
        cli.main([task, "--help"])
    assert exited.value.code == 0
    lines = capsys.readouterr().out.splitlines()

    def line_of(flag: str) -> int:
        return next(number for number, line in enumerate(lines) if line.startswith(f"  {flag} "))

    assert max(line_of("--method"), line_of("--sam_variant"), line_of("--rho")) < min(120, line_of("--learning_rate"))
    headings = [line for line in lines[1:] if line and not line.startswith(" ")]
    assert headings == ["options:", TASK_HEADINGS[task], *(f"{title}:" for title in FIELD_GROUPS),
                        "Trainer (transformers.TrainingArguments):"]
    save_strategy = line_of("--save_strategy")
    assert "(default: no)" in " ".join(lines[save_strategy : save_strategy + 4])


def test_every_lets_field_is_in_exactly_one_help_group():
    grouped = [name for names in FIELD_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(field.name for field in dataclasses.fields(LETSArguments))


def test_grouping_the_help_changes_no_parsed_value(tiny_model, tmp_path):
    argv = glue(tiny_model, tmp_path, "--max_seq_length", "32", "--rho", "0.1", "--learn_rho", "--rho_lr", "0.01",
                "--bisam_mu", "2", "--nonfinite_patience", "3", "--learning_rate", "2e-4", "--logging_steps", "5",
                "--no_average_tokens_across_devices")[1:]
    task_args, config = cli.parse_command_line(GlueArguments, argv)
    plain = HfArgumentParser((GlueArguments, LETSConfig))
    plain.set_defaults(**cli.DEFAULTS)
    plain_task_args, plain_config = plain.parse_args_into_dataclasses(args=argv)
    assert task_args == plain_task_args and config.to_dict() == plain_config.to_dict()
    assert (config.rho, config.learn_rho, config.bisam_mu, config.average_tokens_across_devices) == (0.1, True, 2, False)


def test_a_run_saves_no_checkpoint_unless_asked(tiny_model, tmp_path, one_thread):
    cli.main(without(glue(tiny_model, tmp_path / "default", *SHORT, "--max_steps", "2"), "--save_strategy"))
    default = tmp_path / "default" / "out"
    assert (default / "model.safetensors").is_file() and (default / "eval_results.json").is_file()
    assert not list(default.glob("checkpoint-*")) and not (default / ".staging").exists()

    cli.main(glue(tiny_model, tmp_path / "asked", *SHORT, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1"))
    assert sorted(path.name for path in (tmp_path / "asked" / "out").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="bf16 runs on the GPU there")
def test_bf16_runs_on_a_cpu_without_use_cpu(tiny_model, tmp_path, one_thread):
    cli.main(without(glue(tiny_model, tmp_path, *SHORT, "--bf16"), "--use_cpu"))
    args = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)
    assert args.bf16 and args.use_cpu
