"""`lets-hf iwslt14` end to end on transformer_tiny: 2 training steps with every method, beam search, BLEU files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import MarianMTModel

from lets_hf.methods import METHODS
from lets_hf.tasks.iwslt14.bpe import IwsltBpeTokenizer
from lets_hf.tasks.iwslt14.data import PREPARED_NAME, TranslationCollator, batch_dataset, encode
from lets_hf.tasks.iwslt14.main import main
from lets_hf.tasks.iwslt14.prepare import LANGS, read_lines, write_lines
from lets_hf.tasks.iwslt14.translate import translate
from tests.unit.test_iwslt14_prepare import write_raw_release

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_RUN = [
    "--arch", "transformer_tiny", "--max_steps", "2", "--warmup_steps", "1", "--bpe_merges", "300",
    "--max_tokens", "512", "--max_new_tokens", "8", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
    "--seed", "0", "--logging_steps", "1", "--disable_tqdm", "true",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # transformer_tiny (tests/conftest.py)


@pytest.fixture
def shared_iwslt(shared_data) -> Path:
    folder = shared_data / "iwslt14.tokenized.de-en"
    if not folder.is_dir():
        pytest.skip(f"real IWSLT'14 lines not found at {folder}")
    return folder


@pytest.fixture
def real_lines(shared_iwslt, tmp_path) -> Path:
    """120 real training pairs, 8 valid and 8 test pairs (from valid) of the shared IWSLT'14 copy."""
    folder = tmp_path / "data"
    folder.mkdir()
    for lang in LANGS:
        train, valid = read_lines(shared_iwslt / f"train.{lang}"), read_lines(shared_iwslt / f"valid.{lang}")
        for split, lines in (("train", train[:120]), ("valid", valid[:8]), ("test", valid[8:16])):
            write_lines(folder / f"{split}.{lang}", lines)
    return folder


def results(output_dir: Path, split: str) -> dict:
    return json.loads((output_dir / f"{split}_results.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_reports_bleu(real_lines, tmp_path, method):
    output_dir = tmp_path / "out"
    main(["--data_dir", str(real_lines), "--output_dir", str(output_dir), "--method", method, *TINY_RUN])

    for split, prefix in (("eval", "eval"), ("test", "test")):
        metrics = results(output_dir, split)
        assert 0.0 <= metrics[f"{prefix}_bleu"] <= 100.0 and 0.0 <= metrics[f"{prefix}_sacrebleu"] <= 100.0
        assert "tok:13a" in metrics[f"{prefix}_sacrebleu_signature"] and f"{prefix}_loss" in metrics
        assert len(read_lines(output_dir / f"{prefix}_hypotheses.txt")) == 8
    state = json.loads((output_dir / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == 2
    train_logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(train_logs) == 2
    assert ("rho" in train_logs[0]) == (method != "adamw")  # LETSTrainer's perturbation ran
    assert ("gen_gap" in train_logs[-1]) == method.startswith("lets-")  # and learned ρ (from step 2 on)


def test_saved_model_and_tokenizer_reproduce_the_hypotheses(real_lines, tmp_path):
    output_dir = tmp_path / "out"
    main(["--data_dir", str(real_lines), "--output_dir", str(output_dir), "--method", "adamw", *TINY_RUN])
    model = MarianMTModel.from_pretrained(output_dir)
    tokenizer = IwsltBpeTokenizer.from_pretrained(output_dir)
    encoded = encode(tokenizer, read_lines(real_lines / "valid.de"), read_lines(real_lines / "valid.en"), "valid")
    valid = batch_dataset(encoded, max_tokens=512)
    collator = TranslationCollator(tokenizer.pad_token_id, model.config.decoder_start_token_id)
    assert translate(model, tokenizer, valid, collator) == read_lines(output_dir / "eval_hypotheses.txt")


def test_memorizes_a_few_real_pairs(shared_iwslt, tmp_path):
    """250 steps on 16 pairs, scored on the same pairs: a wrong decoder shift, mask or decode would stay near 0."""
    for lang in LANGS:
        lines = read_lines(shared_iwslt / f"train.{lang}")[:16]
        write_lines(tmp_path / f"train.{lang}", lines)
        write_lines(tmp_path / f"valid.{lang}", lines)
    output_dir = tmp_path / "out"
    overrides = ["--max_steps", "250", "--warmup_steps", "10", "--learning_rate", "3e-3", "--max_tokens", "1024",
                 "--bpe_merges", "200", "--max_new_tokens", "64", "--eval_strategy", "no"]  # fmt: skip
    main(["--data_dir", str(tmp_path), "--output_dir", str(output_dir), "--method", "adamw", *TINY_RUN, *overrides])
    assert results(output_dir, "eval")["eval_bleu"] > 50


def test_raw_release_is_prepared_under_output_dir(tmp_path):
    raw = write_raw_release(tmp_path / "release", train_pairs=60, segments=2)
    output_dir = tmp_path / "out"
    main(["--data_dir", str(raw), "--output_dir", str(output_dir), "--method", "sam", *TINY_RUN])
    prepared = output_dir / "prepared" / PREPARED_NAME
    assert read_lines(prepared / "valid.en")[0] == "sentence number 20 &amp; more ."  # line 23 with the 2 header lines
    assert len(read_lines(prepared / "test.en")) == 10
    assert results(output_dir, "test")["test_bleu"] >= 0.0


def test_example_script_exposes_the_command():
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "run_iwslt14.py"), "--help"], capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    for flag in ("--data_dir", "--rho_lr", "transformer_tiny", "--label_smoothing_factor"):
        assert flag in completed.stdout
