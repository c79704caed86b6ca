"""`lets-hf <task> [flags]`: one entry point; each task adapter brings its own `main(argv)`.

User mistakes (`lets_hf.errors.UsageError`) print one message, which names settings as flags,
and exit 2; a run stopped by non-finite losses exits 1 with its message. Ctrl-C removes the
checkpoint being written, prints the command that resumes from the newest complete one, and exits
130. SIGTERM (SLURM's warning before it kills a job; `--save_on_sigterm false` leaves it fatal) saves a complete
checkpoint at the next optimizer-step boundary, prints the command that resumes from it, and exits 75
(`PREEMPTED_EXIT`, EX_TEMPFAIL: try again later), on which a job script requeues the same command with
`--resume_from_checkpoint auto`; it also leaves `<output_dir>/preempted` (`PREEMPTED_MARKER`) for launchers that
replace the exit code (torchrun). `--debug` (or `LETS_HF_DEBUG=1`) keeps tracebacks.
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib
import os
import shlex
import sys
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from . import checkpoints
from .config import FIELD_GROUPS, LETSConfig
from .engine_state import lets_state_files
from .errors import UsageError, command_line, setting, user_inputs
from .methods import PRESET_FIELDS, apply_method
from .nonfinite import NonFiniteTrainingError
from .preemption import TrainingPreempted

TASKS = {
    "glue": ("lets_hf.tasks.glue", "Fine-tune on a GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli)."),
    "iwslt14": ("lets_hf.tasks.iwslt14.main", "Train a translation model on IWSLT'14 De-En and report BLEU."),
}
DEBUG_FLAG = "--debug"
#: TrainingArguments' defaults that every task changes (a task's own `defaults` win): Trainer would save a
#: checkpoint (optimizer state included) at the end of every run; a command saves one only when asked, or when
#: SIGTERM warns that the job is about to be killed.
DEFAULTS = {"save_strategy": "no", "save_on_sigterm": True}
TRAINER_GROUP = "Trainer (transformers.TrainingArguments)"
#: The shell's exit code for a command stopped by Ctrl-C (128 + SIGINT).
INTERRUPTED_EXIT = 130
#: The exit code of a command stopped by SIGTERM after saving a checkpoint: EX_TEMPFAIL (sysexits.h), for a job
#: script to requeue on.
PREEMPTED_EXIT = 75
#: Written into output_dir when SIGTERM stopped the run after saving (the checkpoint, then the command that resumes),
#: removed when the next run on that folder starts: what a job script checks where a launcher hides the exit code
#: (torchrun exits 1 after forwarding SIGTERM, whatever its workers return).
PREEMPTED_MARKER = "preempted"
#: The running command's settings once parsed: what Ctrl-C needs to say where the run can resume from.
_PARSED_CONFIG = contextvars.ContextVar("lets_hf_parsed_config", default=None)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    debug = DEBUG_FLAG in argv or os.environ.get("LETS_HF_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    if not argv or argv[0] not in TASKS:
        lines = [f"  {name:<8} {summary}" for name, (_, summary) in TASKS.items()]
        print("usage: lets-hf <task> [--flag value ...] [--debug]\n\ntasks:\n" + "\n".join(lines))
        print("\n`lets-hf <task> --help` lists every flag, including all TrainingArguments.")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    task = argv[0]
    parsed = _PARSED_CONFIG.set(None)
    try:
        with command_line():
            importlib.import_module(TASKS[task][0]).main(argv[1:])
    except (UsageError, NonFiniteTrainingError) as error:
        if debug:
            raise
        print(f"lets-hf {task}: error: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, UsageError) else 1)
    except KeyboardInterrupt:
        config = _PARSED_CONFIG.get()
        if config is None or config.should_save:  # the processes that write checkpoints
            print(f"lets-hf {task}: interrupted. {_where_to_resume(config, argv)}".rstrip(), file=sys.stderr)
        if debug:
            raise
        sys.exit(INTERRUPTED_EXIT)
    except TrainingPreempted as preempted:
        config = _PARSED_CONFIG.get()
        if config.should_save:
            command = _resume_command(argv)
            _mark_preempted(config.output_dir, preempted.checkpoint, command)
            print(f"lets-hf {task}: preempted (SIGTERM). Saved {preempted.checkpoint}; to resume from it: {command}",
                  file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    finally:
        _PARSED_CONFIG.reset(parsed)


def _mark_preempted(output_dir: str, checkpoint: str, command: str) -> None:
    path = os.path.join(output_dir, PREEMPTED_MARKER)
    with open(path + ".tmp", "w") as file:
        file.write(f"{checkpoint}\n{command}\n")
    os.replace(path + ".tmp", path)  # never half-written


def _where_to_resume(config: LETSConfig | None, argv: list[str]) -> str:
    """After Ctrl-C: what is staged is removed (a staged checkpoint is never complete); then the newest complete
    checkpoint and the command that resumes from it, or how to get checkpoints."""
    if config is None:  # stopped before its settings were read
        return ""
    checkpoints.clear_staged(config.output_dir)
    newest, _ = checkpoints.newest_complete(config.output_dir, _checkpoint_problem(config))
    if newest is None:
        advice = " (add --save_strategy steps --save_steps N to save some)" if config.save_strategy == "no" else ""
        return f"{config.output_dir} holds no complete checkpoint to resume from{advice}."
    return f"The newest complete checkpoint is {newest}; to resume from it: {_resume_command(argv)}"


def _resume_command(argv: list[str]) -> str:
    """The command that resumes this one from its newest complete checkpoint: the same, with `resume_from_checkpoint`
    auto."""
    return shlex.join(["lets-hf", *with_flag(argv, "resume_from_checkpoint", checkpoints.AUTO)])


def parse_command_line(task_fields, argv: list[str] | None, defaults: dict | None = None):
    """(task arguments, LETSConfig) from `argv`. `--method` presets `sam_variant` and `learn_rho`; an explicit
    `--sam_variant` or `--learn_rho` wins over it. Checks what needs no model: the output folder."""
    parser = HfArgumentParser((task_fields, LETSConfig))
    parser.set_defaults(**{**DEFAULTS, **(defaults or {})})
    _list_lets_flags_first(parser)
    with user_inputs():
        task_args, config = parser.parse_args_into_dataclasses(args=argv)
        if task_args.method is not None:
            config = apply_method(config, task_args.method, keep=flags_given(argv or sys.argv[1:], PRESET_FIELDS))
    if Path(config.output_dir).exists() and not Path(config.output_dir).is_dir():
        raise UsageError(f"--output_dir {config.output_dir} is a file: give a folder (new or existing).")
    _PARSED_CONFIG.set(config)
    return task_args, config


def checkpoint_to_resume(config: LETSConfig) -> str | None:
    """The checkpoint `--resume_from_checkpoint` names (`True`, `latest`, `auto`, a run folder or a checkpoint:
    `lets_hf.checkpoints.checkpoint_to_resume`), found and checked before anything loads; `None` for a new run."""
    checkpoint = checkpoints.checkpoint_to_resume(config.resume_from_checkpoint, config.output_dir,
                                                  _checkpoint_problem(config))
    if config.should_save:  # this run is no longer the preempted one
        Path(config.output_dir, PREEMPTED_MARKER).unlink(missing_ok=True)
    if config.should_save and checkpoint is not None:
        print(f"Resuming from {checkpoint}.")
    elif config.should_save and config.resume_from_checkpoint is not None:
        print(f"{setting('resume_from_checkpoint', config.resume_from_checkpoint)}: {config.output_dir} holds no "
              "complete checkpoint, so this is a new run.")
    return checkpoint


def _checkpoint_problem(config: LETSConfig) -> checkpoints.Problem:
    """What makes a checkpoint unusable for this run, before the trainer knows whether its LETS state is per rank."""
    return checkpoints.resume_problem(config, lets_state_files(config.process_index))


def _list_lets_flags_first(parser: HfArgumentParser) -> None:
    """`--help` lists the task's flags, then LETS's in the sections of `LETSArguments`' docstring, and then the
    200-odd TrainingArguments flags under one heading; the usage line names the required flags only (all of them
    would fill a screen). Argparse has no public way to move a flag between groups."""
    titles = {name: title for title, names in FIELD_GROUPS.items() for name in names}
    titles.update((field.name, TRAINER_GROUP) for field in dataclasses.fields(TrainingArguments))
    groups = {title: parser.add_argument_group(title) for title in (*FIELD_GROUPS, TRAINER_GROUP)}
    options = parser._optionals
    for action in list(options._group_actions):
        if action.dest in titles:
            options._group_actions.remove(action)
            groups[titles[action.dest]]._group_actions.append(action)
    required = [f"{action.option_strings[0]} {action.dest.upper()}" for action in parser._actions if action.required]
    parser.usage = " ".join(["%(prog)s", *required, "[--flag value ...]"])


def flags_given(argv: list[str], names) -> set[str]:
    """Which of the fields `names` the command line sets explicitly (`--name`, `--name=v`, `--no_name`)."""
    return {name for arg in argv for name in names if _sets(arg, name)}


def with_flag(argv: list[str], name: str, value: str) -> list[str]:
    """`argv` with `--name value` (at the end) in place of what it gave the field `name`."""
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif _sets(arg, name):
            skip_value = "=" not in arg
        else:
            kept.append(arg)
    return [*kept, f"--{name}", value]


def _sets(arg: str, name: str) -> bool:
    """Whether `arg` is a flag of the field `name`: `--name`, `--name=v`, `--no_name`, `--name-with-dashes`."""
    return arg.split("=", 1)[0] in (f"--{name}", f"--no_{name}", f"--{name.replace('_', '-')}")


def check_model_folder(name_or_path: str) -> None:
    """A local path must be a saved model (config.json); anything else is left to the hub."""
    path = Path(name_or_path)
    looks_local = path.is_absolute() or name_or_path.startswith(".") or path.exists()
    if looks_local and not path.is_dir():
        raise UsageError(f"--model_name_or_path {name_or_path}: no such folder.")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(
            f"--model_name_or_path {name_or_path} is a folder without config.json: not a saved model. Give a folder "
            "written by save_pretrained, or a hub name."
        )


if __name__ == "__main__":
    main()
