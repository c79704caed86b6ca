"""`lets-hf glue` end to end on a tiny BERT (2 steps): needs the core `LETSTrainer` and `lets_hf.methods`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lets_hf.tasks.glue import main

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_GLUE = REPO_ROOT / "examples" / "data" / "glue"


def write_tsv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def synthetic_glue(tmp_path_factory) -> Path:
    """MNLI (two dev sets) and STS-B (regression) in the GLUE layout, 8 examples per file."""
    root = tmp_path_factory.mktemp("glue")
    mnli_header = ["index", "sentence1", "sentence2", "label1", "gold_label"]
    nli_labels = ["entailment", "neutral", "contradiction"]
    mnli_rows = [
        [str(i), f"a cat number {i} sleeps", f"an animal {i % 3} rests", "x", nli_labels[i % 3]]
        for i in range(8)
    ]
    for file in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        write_tsv(root / "MNLI" / file, [mnli_header, *mnli_rows])
    stsb_header = [
        "index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score",
    ]
    stsb_rows = [
        [str(i), "g", "f", "y", str(i), "none", "none", f"a man plays {i}", f"a man sings {i}", f"{i % 6}.000"]
        for i in range(8)
    ]
    for file in ("train.tsv", "dev.tsv"):
        write_tsv(root / "STS-B" / file, [stsb_header, *stsb_rows])
    return root


@pytest.mark.parametrize(
    ("task", "method", "data", "expected_keys"),
    [
        ("sst2", "lets-sam", "shipped", {"eval_accuracy", "eval_loss"}),
        ("mnli", "adamw", "synthetic", {"eval_accuracy", "eval_mm_accuracy", "eval_loss", "eval_mm_loss"}),
        ("stsb", "sam", "synthetic", {"eval_pearson", "eval_spearmanr", "eval_loss"}),
    ],
)
def test_two_step_run_writes_glue_metrics(tiny_model, synthetic_glue, tmp_path, task, method, data, expected_keys):
    data_dir = SHIPPED_GLUE if data == "shipped" else synthetic_glue
    output_dir = tmp_path / "out"
    main(
        [
            "--task", task,
            "--data_dir", str(data_dir),
            "--model_name_or_path", str(tiny_model),
            "--method", method,
            "--output_dir", str(output_dir),
            "--max_steps", "2",
            "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "8",
            "--max_train_samples", "64",  # 10% of it (6) is held out for ρ: more than one ρ batch
            "--max_eval_samples", "16",
            "--max_seq_length", "32",
            "--save_strategy", "no",
            "--report_to", "none",
            "--disable_tqdm", "true",
            "--use_cpu", "true",
        ]
    )

    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    assert expected_keys <= set(eval_results)
    assert json.loads((output_dir / "train_results.json").read_text())["epoch"] > 0
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "config.json").is_file()
    saved_config = json.loads((output_dir / "config.json").read_text())
    assert saved_config["problem_type"] == ("regression" if task == "stsb" else "single_label_classification")


def test_example_script_exposes_glue_and_trainer_flags():
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "run_glue.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in ("--task", "--data_dir", "--method", "--max_seq_length", "--learn_rho", "--rho_lr", "--learning_rate"):
        assert flag in completed.stdout
