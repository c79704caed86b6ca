"""benchmarks/iwslt14/run.py end to end on its smoke profile: saved runs, report, resume, and settings guard."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
METHODS = ["adamw", "lets-sam"]


def load_script(name: str):
    path = REPO_ROOT / "benchmarks" / "iwslt14" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"iwslt14_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve field types through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_script("run")


@pytest.fixture
def smoke_run(shared_data, bench, tmp_path, one_thread):
    """The smoke profile on the IWSLT'14 sample, adamw and lets-sam."""
    out_dir = tmp_path / "bench"
    argv = ["--profile", "smoke", "--datasets", "iwslt14-subset", "--methods", *METHODS, "--out_dir", str(out_dir)]
    bench.main(argv)
    return out_dir, argv


def test_smoke_profile_saves_every_run_and_writes_the_report(smoke_run):
    out_dir, _ = smoke_run
    for method in METHODS:
        saved = json.loads((out_dir / "runs" / "iwslt14-subset" / method / "seed0.json").read_text())
        assert 0.0 <= saved["metrics"]["eval_bleu"] <= 100.0 and saved["steps"] > 0
        assert any("eval_loss" in entry for entry in saved["log_history"])
        assert any("rho" in entry for entry in saved["log_history"]) == (method == "lets-sam")
        assert not list((out_dir / "runs" / "iwslt14-subset" / method / "seed0").glob("*.safetensors"))
    report = (out_dir / "results.md").read_text()
    assert "| adamw | " in report and "| lets-sam | " in report and "iwslt14-subset valid BLEU" in report
    assert (out_dir / "curves.png").stat().st_size > 0


def test_rerun_skips_finished_runs_and_refuses_other_settings(smoke_run, bench, monkeypatch):
    out_dir, argv = smoke_run

    def must_not_train(_argv):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(bench, "iwslt14_main", must_not_train)
    bench.main(argv)  # every run is already saved with these settings

    smoke = bench.PROFILES["smoke"]
    subset = dataclasses.replace(smoke.datasets["iwslt14-subset"], epochs=3)
    monkeypatch.setitem(bench.PROFILES, "smoke", dataclasses.replace(smoke, datasets={"iwslt14-subset": subset}))
    with pytest.raises(SystemExit, match="made with other settings"):
        bench.main(argv)


def test_multi30k_is_tokenized_lowercased_and_renamed_once(bench, tmp_path):
    raw = tmp_path / "multi30k-de-en"
    raw.mkdir()
    for split in ("train", "val", "test"):
        (raw / f"{split}.de").write_text("Ein Hund läuft.\nZwei Männer, \"draußen\".\n", encoding="utf-8")
        (raw / f"{split}.en").write_text("A dog runs.\nTwo men, \"outside\".\n", encoding="utf-8")

    prepared = bench.prepare_multi30k(raw, tmp_path / "cache")
    assert sorted(p.name for p in prepared.iterdir()) == sorted(
        ["DONE", *(f"{split}.{lang}" for split in ("train", "valid", "test") for lang in ("de", "en"))]
    )
    assert (prepared / "valid.en").read_text(encoding="utf-8").splitlines() == [
        "a dog runs .",
        "two men , &quot; outside &quot; .",
    ]
    (raw / "train.de").unlink()  # a finished cache is reused, not rebuilt from the raw files
    assert bench.prepare_multi30k(raw, tmp_path / "cache") == prepared
