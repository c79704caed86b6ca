"""The GLUE study's machinery (issue #15) on its smoke profile: SAM's ρ grid as `sam@rho` methods,
LETS-SAM, the oracle pick, the floors and the figures (shipped SST-2 sample; runs in CI)."""

import json
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks" / "glue"))
import run  # noqa: E402  (the benchmark script)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_smoke_study_saves_each_grid_point_and_reports_the_oracle(tmp_path):
    methods = ["adamw", "sam@0.02", "sam@0.05", "lets-sam"]
    run.main(["--profile", "smoke", "--methods", *methods, "--seeds", "0",
              "--data_dir", str(REPO / "examples" / "data" / "glue"), "--out_dir", str(tmp_path)])
    saved = {m: json.loads((tmp_path / "runs" / "sst2" / m / "seed0.json").read_text()) for m in methods}
    assert saved["sam@0.02"]["final_rho"] == 0.02 and saved["sam@0.05"]["final_rho"] == 0.05
    assert saved["adamw"]["final_rho"] == 0.0 and saved["lets-sam"]["final_rho"] != 0.05
    assert saved["sam@0.02"]["settings"]["learning_rate"] == 2e-4  # the task's own lr
    study = (tmp_path / "study.md").read_text()
    scores = {m: 100 * saved[m]["metrics"]["eval_accuracy"] for m in ("sam@0.02", "sam@0.05")}
    best = max(scores, key=scores.get)
    assert f"SST-2 ρ = {best.partition('@')[2]}" in study
    oracle_row = next(line for line in study.splitlines() if line.startswith("| oracle SAM |"))
    assert f"{scores[best]:.1f}" in oracle_row
    assert "| SST-2 | 60.9 |" in study  # the floor table
    assert (tmp_path / "rho_vs_oracle.png").is_file() and (tmp_path / "score_vs_rho.png").is_file()


def test_a_typo_in_a_method_is_refused_before_any_run(tmp_path):
    with pytest.raises(SystemExit, match="Unknown method 'sam@'|Unknown method 'sma@0.1'"):
        run.main(["--profile", "smoke", "--methods", "adamw", "sma@0.1", "--out_dir", str(tmp_path)])
    assert not (tmp_path / "runs").exists()
