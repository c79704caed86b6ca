"""GLUE benchmark: AdamW, SAM (a ρ grid), ASAM, LETS-SAM and LETS-ASAM on SST-2, MRPC, STS-B, RTE and CoLA.

Every (task, method, seed) runs in this process through `LETSTrainer` and is saved as
`<out_dir>/runs/<task>/<method>/seed<k>.json` (settings, dev metrics, wall time, training
log with ρ and the generalization gap). A finished run whose saved settings match is
skipped, and an unfinished one resumes from the checkpoint it saves every --checkpoint_minutes
(`seed<k>.checkpoints/`, removed once the run is saved), so an interrupted benchmark resumes where
it stopped; several workers can share one --out_dir (each run is claimed before it starts).
`report.py` rebuilds the table and plots from those files alone.

Profiles fix one hyperparameter set per task, shared by all methods (see PROFILES). A method is a
`--method` preset, optionally with a fixed radius: `sam@0.02` is SAM with ρ = 0.02.

    python benchmarks/glue/run.py --profile study --out_dir benchmarks/results/glue-study   # "no ρ tuning" (#15)
    python benchmarks/glue/run.py                      # default: MiniLM, 800-2000 examples, ~2 h on 2 CPU cores
    python benchmarks/glue/run.py --profile cpu-full   # MiniLM, whole train sets, 1 epoch (~9 h on 2 CPU cores)
    python benchmarks/glue/run.py --profile paper --data_dir hub   # bert-base-uncased, full train sets (GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

import datasets
import torch
from transformers import AutoTokenizer, DataCollatorWithPadding, set_seed
from transformers.utils import logging as hf_logging

from lets_hf import LETSConfig, LETSTrainer
from lets_hf.methods import METHODS, apply_method
from lets_hf.tasks.glue import get_task, load_glue, load_model, make_compute_metrics, resolve_model_path, tokenize_glue

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from report import write_report  # noqa: E402  (sibling script, not a package)
from study_report import TASKS, write_study_report  # noqa: E402
from saved_runs import checkpoint_dir, resume_point, run_path, save_run, to_run  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "glue"
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results" / "glue"
DEFAULT_METHODS = ("adamw", "sam", "asam", "lets-sam", "lets-asam")
"""The first comparison; any preset of `lets_hf.methods.METHODS` (with `@rho`) can be given with --methods."""
SAM_GRID = (0.01, 0.02, 0.05, 0.1)
STUDY_METHODS = ("adamw", *(f"sam@{rho:g}" for rho in SAM_GRID), "asam@0.5", "lets-sam", "lets-asam")
"""Does a learned ρ save SAM's ρ grid? SAM at each ρ of the grid, ASAM at its usual 0.5, LETS from the defaults."""
SUBSET_SEED = 0
"""Seed of the (fixed) training subset: every method and seed trains on the same examples."""


@dataclasses.dataclass(frozen=True)
class TaskSetting:
    """Per-task knobs: train examples (None = all) and epochs; lr and length when they differ from the profile's."""

    train_samples: int | None
    epochs: float
    learning_rate: float | None = None
    max_seq_length: int | None = None


@dataclasses.dataclass(frozen=True)
class Profile:
    """One hyperparameter set per task, shared by all methods and seeds."""

    model: str
    tasks: dict[str, TaskSetting]
    learning_rate: float
    batch_size: int
    max_seq_length: int
    logging_steps: int
    rho_lr: float | None  # None: LETSConfig's default, 2% of the initial ρ
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    rho_update_interval: int = 1
    eval_batch_size: int = 128


# CPU sizes: (examples x cost per example at the task's padded length) balanced so that 5 methods
# x 3 seeds x 4 tasks fit ~2 h on 2 idle cores (LETS with rho_update_interval 1 costs ~3x adamw,
# SAM/ASAM 2x). lr 1e-4: 3e-4 left MRPC below and STS-B at the majority/mean prediction in
# AdamW probes; unique examples matter more than epochs (STS-B Pearson 0.13 with 560 x 2 epochs,
# 0.15 with 1600 x 1, 0.79 with 2000 x 1: below ~125 steps it stays at the mean prediction).
# CoLA stayed at MCC 0 even with 4000 examples (250 steps, lr 1e-4 or 3e-4), so it gets few.
# Rationale in benchmarks/results/glue/README_section.md.
PROFILES = {
    "default": Profile(
        model="minilm",
        tasks={
            "rte": TaskSetting(1000, 1),
            "mrpc": TaskSetting(1600, 1),
            "stsb": TaskSetting(2000, 1),
            "cola": TaskSetting(800, 1),
        },
        learning_rate=1e-4,
        batch_size=16,
        max_seq_length=128,
        logging_steps=5,
        rho_lr=None,
    ),
    "paper": Profile(
        model="bert-base-uncased",
        tasks={task: TaskSetting(None, 3) for task in TASKS},
        learning_rate=2e-5,
        batch_size=32,
        max_seq_length=128,
        logging_steps=20,
        rho_lr=None,
    ),
}
# The default profile on the whole train sets.
PROFILES["cpu-full"] = dataclasses.replace(
    PROFILES["default"], tasks={task: TaskSetting(None, 1) for task in TASKS if task != "sst2"}, logging_steps=10
)
# Issue #15's study. Budgets: the AdamW lr sweep (benchmarks/glue/lr_sweep.py, seed 0; table in
# benchmarks/results/glue-study/lr-sweep/lr_sweep.md) took each task's best lr among 5e-5, 1e-4, 2e-4:
# SST-2 84.7 (floor 60.9), MRPC 78.7 (78.4), STS-B 82.9 (10). MRPC's 2 epochs then gave 77.9 ± 1.2 over 3 seeds,
# below its floor, so it trains 3: 79.7 ± 0.9. STS-B at lr 2e-4 gave 80.7 ± 4.2 over 3 seeds (std above 3), at
# lr 1e-4 80.1 ± 2.5: the study takes the latter, the cheapest budget that meets both bounds (lr-sweep follow-ups);
# CoLA reached MCC 18.5 at most on 4,000 examples, so it trains on all 8,551: 3 epochs at lr 1e-4 gave 30.8, 30.6,
# 20.9 = 27.5 ± 5.7 (std above 3), 5 epochs 27.5, 30.8, 26.3 = 28.2 ± 2.3, so it trains 5 (~17 CPU-minutes per
# AdamW run).
# RTE stays below its floor (56.7) at every lr of the sweep (54.9, 54.9, 49.1); 5 epochs at lr 3e-5 reach
# 57.8, 57.8, 55.6 = 57.0 ± 1.3 over 3 seeds: above the floor, barely. It runs last: the costliest task per run
# (~24 CPU-minutes per AdamW run) and the nearest its floor.
# LETS updates ρ every 5th step (about 1.1x SAM's cost per run).
PROFILES["study"] = Profile(
    model="minilm",
    tasks={
        "sst2": TaskSetting(4000, 2, learning_rate=5e-5, max_seq_length=64),
        "mrpc": TaskSetting(None, 3, learning_rate=2e-4),
        "stsb": TaskSetting(3000, 2, learning_rate=1e-4),
        "cola": TaskSetting(None, 5, learning_rate=1e-4, max_seq_length=64),
        "rte": TaskSetting(None, 5, learning_rate=3e-5),
    },
    learning_rate=1e-4,
    batch_size=32,
    max_seq_length=128,
    logging_steps=5,
    rho_lr=None,
    rho_update_interval=5,
)
# The budgets the lr sweep started from (its lr is given on the command line).
PROFILES["study-sweep"] = dataclasses.replace(
    PROFILES["study"],
    tasks={
        "sst2": TaskSetting(4000, 2, max_seq_length=64),
        "mrpc": TaskSetting(None, 2),
        "stsb": TaskSetting(3000, 2),
        "rte": TaskSetting(None, 3),
        "cola": TaskSetting(4000, 3, max_seq_length=64),
    },
)
PROFILES["smoke"] = dataclasses.replace(  # the test suite's: a few steps of every method
    PROFILES["study"],
    tasks={"sst2": TaskSetting(96, 1, learning_rate=2e-4, max_seq_length=32)},
    batch_size=8,
    logging_steps=1,
    eval_batch_size=64,
)
LOG_KEYS = (
    "step", "epoch", "loss", "rho", "gen_gap", "rho_inner", "rho_grad", "first_grad_norm", "learning_rate",
    "gen_gap_mean", "gen_gap_std", "rho_inner_mean", "rho_inner_std", "rho_grad_snr", "rho_grad_sign_agreement",
    "sam_step_share",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=list(PROFILES), default="default")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), help="default: the profile's tasks")
    parser.add_argument(
        "--methods", nargs="+", help=f"presets of {list(METHODS)}, optionally with @rho; default: the profile's"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--data_dir", default=str(DEFAULT_DATA_DIR), help="GLUE folder in the original tsv layout, or 'hub'."
    )
    parser.add_argument("--out_dir", default=str(DEFAULT_OUT_DIR))
    parser.add_argument(
        "--checkpoint_minutes", type=float, default=10,
        help="An unfinished run saves a checkpoint this often (wall time) and a restart resumes from it; 0: every step.",
    )
    overrides = parser.add_argument_group("overrides of the profile (applied to every task)")
    overrides.add_argument("--model_name_or_path")
    overrides.add_argument("--max_train_samples", type=int, help="0 = the whole training set.")
    overrides.add_argument("--num_train_epochs", type=float)
    for name in ("learning_rate", "rho_lr", "warmup_ratio", "weight_decay"):
        overrides.add_argument(f"--{name}", type=float)
    for name in ("batch_size", "max_seq_length", "logging_steps", "rho_update_interval", "eval_batch_size"):
        overrides.add_argument(f"--{name}", type=int)
    return parser.parse_args(argv)


def study_parser(doc: str, tasks, out_dir: Path, study_dir: Path, study_runs: str) -> argparse.ArgumentParser:
    """The arguments every study script built on these runs shares (its tasks, folders and --report_only)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=tasks, default=list(tasks))
    parser.add_argument("--out_dir", default=str(out_dir))
    parser.add_argument("--study_dir", default=str(study_dir), help=f"issue #15's runs: {study_runs}")
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--report_only", action="store_true", help="write the report from the saved runs only")
    return parser


def resolve_profile(args: argparse.Namespace) -> Profile:
    """The chosen profile with the command-line overrides applied."""
    profile = PROFILES[args.profile]
    fields = {f.name for f in dataclasses.fields(Profile)} - {"model", "tasks"}
    changes = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    if args.model_name_or_path:
        changes["model"] = args.model_name_or_path
    tasks = dict(profile.tasks)
    for task, setting in tasks.items():
        if args.max_train_samples is not None:
            setting = dataclasses.replace(setting, train_samples=args.max_train_samples or None)
        if args.num_train_epochs is not None:
            setting = dataclasses.replace(setting, epochs=args.num_train_epochs)
        if args.learning_rate is not None:  # the override wins over the task's own value too
            setting = dataclasses.replace(setting, learning_rate=None)
        if args.max_seq_length is not None:
            setting = dataclasses.replace(setting, max_seq_length=None)
        tasks[task] = setting
    return dataclasses.replace(profile, tasks=tasks, **changes)


#: `+option` suffixes of a method: the LETS settings a run compares (`lets-sam@0.2+trace+val+log`).
LETS_OPTIONS = {
    "trace": {"rho_estimator": "trace"},
    "antithetic": {"rho_estimator": "antithetic", "rho_update_space": "log"},
    "val": {"rho_objective": "val-loss"},
    "log": {"rho_update_space": "log"},
    "exact": {"rho_hessian": "exact"},
    "frozen": {"rho_optimizer": "sgd", "rho_lr": 1e-300},  # ρ never moves: what LETS's machinery costs by itself
    "last": {"rho_train_batch": "last"},  # L_train on the batch just stepped on (a gap in the first epoch too)
    "next": {"rho_train_batch": "last", "rho_val_batch": "next"},  # + L_val on the next batch: nothing held out
    # the signal map's probes (issue #44): the one-step estimator and traces of 3 memories beside the estimator
    "probes": {"rho_signal_probes": [0.0, 0.9, 0.99, 0.999]},
    # SAM on some steps only (issue #45), with the policies' default knobs: `sam@0.02+ae-sam`
    **{policy: {"sam_policy": policy} for policy in ("ae-sam", "looksam", "random")},
}
#: `+name<number>` suffixes: a numeric LETS field (`+mu0.99`, `+lr0.05`, `+k2`: ρ updates or windows every 2 steps,
#: `+frac0.02`: hold out 2% of train for ρ, `+vb64`: validation batches of 64).
LETS_NUMBERS = {"mu": "rho_trace_decay", "lr": "rho_lr", "k": "rho_update_interval", "frac": "rho_val_fraction",
                "vb": "rho_batch_size"}


def parse_method(spec: str) -> tuple[str, float | None, dict]:
    """`sam@0.02` -> ("sam", 0.02, {}); `lets-sam@0.2+trace+mu0.99` -> ("lets-sam", 0.2, {LETS fields});
    a plain preset keeps the rule's default ρ."""
    head, *options = spec.split("+")
    preset, _, rho = head.partition("@")
    if preset not in METHODS:
        raise SystemExit(f"Unknown method {spec!r}: a preset of {list(METHODS)}, optionally with @rho and +options.")
    fields = {}
    for option in options:
        number = next((name for name in LETS_NUMBERS if option.startswith(name)), None)
        if option in LETS_OPTIONS:
            fields.update(LETS_OPTIONS[option])
        elif number is not None:
            value = float(option[len(number) :])
            fields[LETS_NUMBERS[number]] = int(value) if number in ("k", "vb") else value
        else:
            raise SystemExit(f"Unknown option +{option} in {spec!r}: one of {list(LETS_OPTIONS)} or {list(LETS_NUMBERS)}<value>.")
    return preset, float(rho) if rho else None, fields


def task_learning_rate(profile: Profile, task: str) -> float:
    return profile.tasks[task].learning_rate or profile.learning_rate


def task_max_seq_length(profile: Profile, task: str) -> int:
    return profile.tasks[task].max_seq_length or profile.max_seq_length


def run_settings(profile: Profile, task: str) -> dict:
    """Everything that determines a run besides method and seed; saved runs are reused only if it matches."""
    settings = dataclasses.asdict(profile)
    settings.update(settings.pop("tasks")[task])
    # the values the run uses: the task's own where it has one, else the profile's
    settings.update(learning_rate=task_learning_rate(profile, task), max_seq_length=task_max_seq_length(profile, task))
    settings["subset_seed"] = SUBSET_SEED
    return settings


def prepare_task(task_name: str, profile: Profile, data_dir: str | None):
    """Tokenized train subset and full dev set of one task, and its tokenizer (shared by all its runs)."""
    task = get_task(task_name)
    splits = load_glue(task.name, data_dir)
    train_samples = profile.tasks[task.name].train_samples
    if train_samples is not None and train_samples < len(splits["train"]):
        # A seeded shuffle, not the first rows: GLUE train files are ordered (CoLA by source paper).
        splits["train"] = splits["train"].shuffle(seed=SUBSET_SEED).select(range(train_samples))
    model_path = resolve_model_path(profile.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return task, model_path, tokenizer, tokenize_glue(splits, tokenizer, task, task_max_seq_length(profile, task.name))


def make_trainer(task, model_path, tokenizer, encoded, profile: Profile, method: str, seed: int, output_dir: Path,
                 callbacks=()) -> LETSTrainer:
    """The study's trainer for one (task, method, seed): the profile's hyperparameters, the method's fields,
    checkpoints only when a callback asks for them."""
    config = LETSConfig(
        output_dir=str(output_dir),
        seed=seed,
        learning_rate=task_learning_rate(profile, task.name),
        num_train_epochs=profile.tasks[task.name].epochs,
        per_device_train_batch_size=profile.batch_size,
        per_device_eval_batch_size=profile.eval_batch_size,
        warmup_steps=profile.warmup_ratio,
        weight_decay=profile.weight_decay,
        logging_steps=profile.logging_steps,
        save_strategy="no",
        save_total_limit=1,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        rho_lr=profile.rho_lr,
        rho_update_interval=profile.rho_update_interval,
    )
    preset, rho, lets_fields = parse_method(method)
    config = dataclasses.replace(apply_method(config, preset), rho=rho, **lets_fields)
    set_seed(seed)
    return LETSTrainer(
        model=load_model(model_path, task),
        args=config,
        train_dataset=encoded["train"],
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=make_compute_metrics(task),
        callbacks=list(callbacks),
    )


def train_one(task, model_path, tokenizer, encoded, profile: Profile, settings: dict, method: str, seed: int,
              path: Path, save_every_s: float) -> dict:
    """Fine-tune once (resuming the run's last checkpoint if it has one) and evaluate on every dev split.

    Returns metrics, wall and CPU time and the training log. CPU time (this process, all threads) is what the
    study compares: unlike wall time it does not grow when other work shares the machine."""
    checkpoint, clock = resume_point(path, settings, save_every_s)  # RunClock asks for checkpoints by the clock
    trainer = make_trainer(task, model_path, tokenizer, encoded, profile, method, seed, checkpoint_dir(path), [clock])
    trainer.train(resume_from_checkpoint=checkpoint)
    metrics = {}
    for dev in task.dev_splits:
        metrics.update(trainer.evaluate(eval_dataset=encoded[dev.hub_split], metric_key_prefix=dev.metric_prefix))
    log = [{k: v for k, v in entry.items() if k in LOG_KEYS or k.startswith("rho_probe_")}
           for entry in trainer.state.log_history if "loss" in entry]
    return {
        "metrics": {k: v for k, v in metrics.items() if k.removeprefix("eval_").removeprefix("mm_") in task.metric_names},
        "wall_time_s": clock.wall_s,
        "cpu_time_s": clock.cpu_s,
        "threads": torch.get_num_threads(),
        "resumed_from_step": clock.resumed_from_step,
        "train_examples": len(trainer.train_dataset),
        "rho_examples": len(trainer.rho_dataset) if trainer.rho_dataset is not None else 0,
        "steps": trainer.state.global_step,
        "final_rho": trainer.rho,
        "log_history": log,
    }


def run_order(profile: str, tasks: list[str], methods: list[str], seeds: list[int]) -> list[tuple[str, str, int]]:
    """(task, method, seed) in the order they run.

    The study goes task by task, so each task's table is complete before the next one starts, and within
    a task AdamW runs every seed first: a task whose baseline misses its floor shows before its grid is
    paid for. Other profiles go seed by seed: an interrupted run still has every task and method for its
    first seeds.
    """
    if profile == "study":
        by_seed = sorted(itertools.product(methods, seeds), key=lambda run: (run[0] != "adamw", run[1]))
        return [(task, method, seed) for task in tasks for method, seed in by_seed]
    return [(task, method, seed) for seed in seeds for task in tasks for method in methods]


def main(argv=None) -> None:
    args = parse_args(argv)
    profile = resolve_profile(args)
    out_dir = Path(args.out_dir)
    data_dir = None if args.data_dir == "hub" else args.data_dir
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a checkpoint's "Writing model shards" bar
    datasets.disable_progress_bars()
    print(f"profile {args.profile}: {profile}", flush=True)
    tasks = args.tasks or list(profile.tasks)
    methods = args.methods or list(STUDY_METHODS if args.profile in ("study", "smoke") else DEFAULT_METHODS)
    for method in methods:
        parse_method(method)  # refuse a typo before hours of runs
    prepared = {}
    for task_name, method, seed in run_order(args.profile, tasks, methods, args.seeds):
        settings = run_settings(profile, task_name)
        path = run_path(out_dir, task_name, method, seed)
        with to_run(path, settings) as mine:
            if not mine:
                continue
            if task_name not in prepared:
                prepared[task_name] = prepare_task(task_name, profile, data_dir)
            result = train_one(*prepared[task_name], profile, settings, method, seed, path, 60 * args.checkpoint_minutes)
            record = {"task": task_name, "method": method, "seed": seed, "settings": settings, **result}
            save_run(path, record)
        print(
            f"{task_name} {method} seed{seed}: {result['metrics']} steps {result['steps']} "
            f"rho {result['final_rho']:.4g} wall {result['wall_time_s']:.0f}s",
            flush=True,
        )
    if not args.profile.startswith(("study", "smoke")):
        write_report(out_dir)
    elif set(methods) <= set(STUDY_METHODS) and any("@" in method for method in methods):  # issue #15's grid
        print(write_study_report(out_dir))


if __name__ == "__main__":
    main()
