"""The GLUE study's machinery (issue #15) on its smoke profile: SAM's ρ grid as `sam@rho` methods,
LETS-SAM, the oracle pick, the floors and the figures (shipped SST-2 sample; runs in CI)."""

import json
import os
import subprocess
import sys
import time

from transformers.trainer_utils import get_last_checkpoint

from tests.conftest import REPO


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(*argv: str) -> list[str]:
    """The benchmark script in its own process (its sibling modules must not shadow the IWSLT'14 benchmark's)."""
    return [sys.executable, str(REPO / "benchmarks" / "glue" / "run.py"), *argv]


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(*argv), capture_output=True, text=True, env=ONE_THREAD, timeout=900)


def test_smoke_study_saves_each_grid_point_and_reports_the_oracle(tmp_path):
    methods = ["adamw", "sam@0.02", "sam@0.05", "lets-sam"]
    done = run("--profile", "smoke", "--methods", *methods, "--seeds", "0",
               "--data_dir", str(REPO / "examples" / "data" / "glue"), "--out_dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
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
    done = run("--profile", "smoke", "--methods", "adamw", "sma@0.1", "--out_dir", str(tmp_path))
    assert done.returncode != 0 and "Unknown method 'sma@0.1'" in done.stderr
    done = run("--profile", "smoke", "--methods", "adamw", "lets-sam@0.2+antithetik", "--out_dir", str(tmp_path))
    assert done.returncode != 0 and "Unknown option +antithetik" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_method_options_set_the_lets_fields():
    done = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path[:0] = [sys.argv[1]]; import run; "
         "print(run.parse_method('lets-sam@0.2+antithetic+lr0.1'), run.parse_method('lets-sam+trace+val+mu0.99'), "
         "run.parse_method('lets-sam@0.05+frozen+frac0.02+vb64'))",
         str(REPO / "benchmarks" / "glue")], capture_output=True, text=True, env=ONE_THREAD,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == (
        "('lets-sam', 0.2, {'rho_estimator': 'antithetic', 'rho_update_space': 'log', 'rho_lr': 0.1}) "
        "('lets-sam', None, {'rho_estimator': 'trace', 'rho_objective': 'val-loss', 'rho_trace_decay': 0.99}) "
        "('lets-sam', 0.05, {'rho_optimizer': 'sgd', 'rho_lr': 1e-300, 'rho_val_fraction': 0.02, 'rho_batch_size': 64})"
    ).split()


def test_rho_study_report_pairs_lets_with_sam_at_its_start_and_the_oracle(tmp_path):
    """Issue #34's report on hand-made runs: STS-B, SAM 0.01 (the oracle, 80) and 0.05 (60) from the old
    study; LETS from ρ₀ = 0.05 at 70, 72 and 74 over seeds 0-2 with 4 ρ updates each (one logged twice: a
    logging step without a new update repeats the last), 1 pushing ρ up. The gap: ±0.1 in the first epoch
    (t = 0), 0.1, 0.2, 0.3 after it (t = 3.5 per seed, 6.9 pooled); the later dF/dρ 2, −1, 3 (d = 0.74: 7
    updates for a 2σ sign)."""
    study, new = tmp_path / "study", tmp_path / "new"
    for seed in range(3):
        for method, score in (("sam@0.01", 0.80), ("sam@0.05", 0.60), ("lets-sam", (0.55, 0.60, 0.62)[seed])):
            _save_synthetic_run(study, method, seed, score, 60, threads=1, task="stsb", metric="pearson")
        _save_synthetic_run(new, "sam@0.2", seed, 0.10, 60, threads=1, task="stsb", metric="pearson")
        _save_synthetic_run(new, "lets-sam@0.2+antithetic+lr0.2+k2", seed, 0.75 + 0.02 * seed, 60, threads=1,
                            task="stsb", metric="pearson", final_rho=0.02)
        log = [{"step": 5 * k, "epoch": epoch, "rho": 0.05 / (k + 1), "rho_grad": g, "gen_gap": gap, "rho_grad_snr": 0.5,
                "rho_grad_sign_agreement": 0.75}  # 2.0 logged twice
               for k, (g, gap, epoch) in enumerate(zip((1.0, 2.0, 2.0, -1.0, 3.0), (0.1, -0.1, 0.1, 0.2, 0.3),
                                                      (0.5, 1.0, 1.5, 2.0, 2.5)))]
        _save_synthetic_run(new, "lets-sam@0.05+antithetic", seed, 0.70 + 0.02 * seed, 120, threads=1, task="stsb",
                            metric="pearson", final_rho=0.0125, log_history=log)
    lines = _rho_study_report(new, study)
    assert ("| lets-sam+antithetic | 0.05 | STS-B | 72.0 ± 2.0 | 0.0125 | 60.0 ± 0.0 | +12.0 ± 2.0 (n=3) | "
            "80.0 ± 0.0 (0.01) | -8.0 ± 2.0 (n=3) |") in lines
    assert "| lets-sam@0.05+antithetic | STS-B | 4 | 25% | 0.50 | 0.75 | 0.05 → 0.0125, 0.0125, 0.0125 | 2.0 |" in lines
    assert ("| lets-sam@0.05+antithetic | STS-B | +0.0 (+0.0, +0.0, +0.0) | +6.9 (+3.5, +3.5, +3.5) | – | – | +2.2 "
            "| 0% / 33% | 7 |") in lines
    assert any(line.startswith("**PARTIAL") for line in lines)  # STS-B lacks the default from 0.01 and 0.2
    assert any(line.startswith("**Not run: MRPC, SST-2, CoLA, none of part 4's runs") for line in lines)
    # part 4's table and goals: the default from 0.05 is the old study's `lets-sam` (55, 60, 62: −5, 0, +2 against
    # SAM, a miss of 1.0 whose standard error is 2.1); the antithetic windows from 0.2 score 75, 77, 79 against
    # SAM 0.2's 10 and the oracle's 80
    assert ("| STS-B | 0.05 | – | 80.0 ± 0.0 (0.01) | 60.0 ± 0.0 | 59.0 ± 3.6 | 0.05 | -1.0 ± 3.6 (n=3) | "
            "-21.0 ± 3.6 (n=3) | – | – | – | – |") in lines
    assert ("| STS-B | 0.2 | – | 80.0 ± 0.0 (0.01) | 10.0 ± 0.0 | – | – | – | – | 77.0 ± 2.0 | 0.02 | "
            "+67.0 ± 2.0 (n=3) | -3.0 ± 2.0 (n=3) |") in lines
    assert not any(line.startswith("| STS-B | 0.01 |") for line in lines)  # no candidate ran from 0.01
    assert ("- ≥ SAM at ρ₀ from every ρ₀ on every task (paired mean ≥ 0): STS-B from 0.05: -1.0 ± 3.6 (n=3): "
            "missed by 1.0 (within seed noise, t -0.5).") in lines
    assert "- From 0.2 within 5 of oracle SAM on STS-B: -3.0 ± 2.0 (n=3): met." in lines
    assert "- From 0.05, within 1.0 of oracle SAM averaged over tasks: -21.0 over STS-B: missed." in lines
    assert (new / "rho_paths.png").is_file()
    for seed in range(3):  # the rest of part 4's runs on STS-B: the report is complete for it
        for method in ("lets-sam@0.01", "lets-sam@0.2", "lets-sam@0.05+antithetic+lr0.2+k2"):
            _save_synthetic_run(new, method, seed, 0.7, 60, threads=1, task="stsb", metric="pearson")
    assert not any(line.startswith("**PARTIAL") for line in _rho_study_report(new, study))


def _save_synthetic_run(out_dir, method: str, seed: int, accuracy: float, cpu_time_s: float, threads: int,
                        final_rho: float = 0.05, log_history: list | None = None, task: str = "sst2",
                        metric: str = "accuracy"):
    record = {"task": task, "method": method, "seed": seed, "settings": {}, "wall_time_s": 1.0,
              "metrics": {f"eval_{metric}": accuracy}, "final_rho": final_rho, "log_history": log_history or [],
              "cpu_time_s": cpu_time_s, "threads": threads}
    path = out_dir / "runs" / task / method / f"seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _report(script: str, report: str, out_dir, *argv: str) -> list[str]:
    """A report script of benchmarks/glue in its own process; the lines of the report it wrote to out_dir."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "glue" / script), "--out_dir", str(out_dir), *argv],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return (out_dir / report).read_text().splitlines()


def _rho_study_report(out_dir, study_dir) -> list[str]:
    return _report("rho_study_report.py", "rho_study.md", out_dir, "--study_dir", str(study_dir))


def _study_report(out_dir) -> list[str]:
    return _report("study_report.py", "study.md", out_dir)


def test_study_report_cpu_and_reading_from_synthetic_runs(tmp_path):
    """Synthetic saved runs (no training). CPU: per task the median over seeds, so one run slowed by other work
    does not move it; the oracle pays for the whole grid; two-thread runs are not compared ('–' until a cell has
    a one-thread run). Reading: score differences paired by seed, and the grid's CPU against one LETS-SAM run."""
    cpu = {"adamw": (60, 60, 600), "sam@0.01": (120, 120, 120), "sam@0.02": (180, 1800, 180),
           "lets-sam": (60, 60, 60), "lets-asam": (30, 30, 30)}
    accuracy = {"adamw": (0.80, 0.81, 0.82), "sam@0.01": (0.81,) * 3, "sam@0.02": (0.83, 0.84, 0.85),
                "lets-sam": (0.82, 0.82, 0.82), "lets-asam": (0.80,) * 3}
    _save_synthetic_run(tmp_path, "adamw", 0, 0.80, 60, threads=1)
    lines = _study_report(tmp_path)
    assert "| SST-2 | 60.9 | 80.0 (n=1) | – | yes |" in lines  # one seed: no spread to judge yet
    assert "| adamw | 80.0 (n=1) | – | 1 |" in lines  # nor to show in the table
    for method, seconds in cpu.items():
        for seed in range(3):
            threads = 2 if method == "lets-asam" else 1
            _save_synthetic_run(tmp_path, method, seed, accuracy[method][seed], seconds[seed], threads)
    lines = _study_report(tmp_path)
    # The table (CPU minutes of one seed), the per-run CPU table, the reading, the total.
    assert "| adamw | 81.0 ± 1.0 | – | 1 |" in lines and "| sam@0.02 | 84.0 ± 1.0 | – | 3 |" in lines
    assert "| oracle SAM | 84.0 ± 1.0 | – | 5 |" in lines  # ρ 0.02 picked, and the grid's 2 + 3 CPU-minutes
    assert "| lets-asam | 80.0 ± 0.0 | – | – |" in lines and "| lets-asam | – |" in lines
    assert "| oracle SAM | 5.0 |" in lines and "| lets-sam | 1.0 |" in lines
    # LETS-SAM − oracle per seed: -1, -2, -3; − AdamW: +2, +1, 0; oracle − AdamW: +3 each; grid 300 s / LETS 60 s.
    assert "| SST-2 | -2.0 ± 1.0 (n=3) | +1.0 ± 1.0 (n=3) | +3.0 ± 0.0 (n=3) | -1.0 ± 1.0 (n=3) | 0.05 | 5.0x |" in lines
    assert any(line.startswith("CPU time of the 15 runs saved: – ") and line.endswith("per task: SST-2 –.")
               for line in lines)
    assert "| SST-2 | 60.9 | 81.0 | 1.0 | yes |" in lines  # the floor, met over 3 seeds
    _save_synthetic_run(tmp_path, "lets-asam", 2, 0.80, 30, threads=1)  # now every cell has a one-thread run
    lines = _study_report(tmp_path)
    assert "| lets-asam | 0.5 |" in lines
    # Each run at its cell's median: 3 × (60 + 120 + 180 + 60 + 30) s = 0.375 h.
    assert any(line.startswith("CPU time of the 15 runs saved: 0.4 CPU-hours") and line.endswith("per task: SST-2 0.4.")
               for line in lines)


def test_workers_sharing_an_out_dir_skip_runs_claimed_by_a_live_worker_and_take_over_a_dead_ones(tmp_path):
    """Two workers share the study (one thread each): a run is claimed by a PID file before it starts."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claims = {"adamw": dead.pid, "sam@0.02": os.getpid()}  # a killed worker's claim, a live worker's claim
    for method, pid in claims.items():
        claim = tmp_path / "runs" / "sst2" / method / "seed0.claim"
        claim.parent.mkdir(parents=True)
        claim.write_text(str(pid))
    done = run("--profile", "smoke", "--methods", *claims, "--seeds", "0",
               "--data_dir", str(REPO / "examples" / "data" / "glue"), "--out_dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    adamw, sam = (tmp_path / "runs" / "sst2" / method for method in claims)
    assert (adamw / "seed0.json").is_file() and not (adamw / "seed0.claim").exists()  # taken over, run, released
    assert not (sam / "seed0.json").exists() and (sam / "seed0.claim").read_text() == str(os.getpid())
    assert json.loads((adamw / "seed0.json").read_text())["threads"] == 1  # run() sets OMP_NUM_THREADS=1


def test_study_runs_task_by_task_with_every_adamw_seed_first():
    """A task's floor check (AdamW over all seeds) comes before its grid; other profiles go seed by seed."""
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import json, run; "
        "print(json.dumps([run.run_order(p, ['sst2', 'mrpc'], ['adamw', 'sam@0.01', 'lets-sam'], [0, 1]) "
        "for p in ('study', 'default')]))"
    )
    benchmarks = REPO / "benchmarks"
    done = subprocess.run([sys.executable, "-c", code, str(benchmarks / "glue"), str(benchmarks)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    study, default = json.loads(done.stdout)
    assert study[:6] == [["sst2", "adamw", 0], ["sst2", "adamw", 1], ["sst2", "sam@0.01", 0],
                         ["sst2", "lets-sam", 0], ["sst2", "sam@0.01", 1], ["sst2", "lets-sam", 1]]
    assert study[6] == ["mrpc", "adamw", 0] and len(study) == 12
    assert default[:4] == [["sst2", "adamw", 0], ["sst2", "sam@0.01", 0], ["sst2", "lets-sam", 0], ["mrpc", "adamw", 0]]


def test_a_killed_run_resumes_from_its_last_checkpoint_and_ends_as_if_never_stopped(tmp_path):
    """A worker killed mid-run (the end of a session) loses at most --checkpoint_minutes: the restart resumes
    the run's checkpoint, and metrics, ρ and the training log equal those of an uninterrupted run."""
    argv = ["--profile", "smoke", "--methods", "lets-sam", "--seeds", "0",
            "--data_dir", str(REPO / "examples" / "data" / "glue")]
    checkpoints = tmp_path / "killed" / "runs" / "sst2" / "lets-sam" / "seed0.checkpoints"
    worker = subprocess.Popen(command(*argv, "--checkpoint_minutes", "0", "--out_dir", str(tmp_path / "killed")),
                              env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not (checkpoints / "checkpoint-4").is_dir():
            assert worker.poll() is None and time.monotonic() < deadline, "the run ended before its 4th checkpoint"
            time.sleep(0.05)
    finally:
        worker.kill()
        worker.wait()
    stopped_at = int(get_last_checkpoint(str(checkpoints)).rpartition("-")[2])
    state = json.loads((checkpoints / f"checkpoint-{stopped_at}" / "trainer_state.json").read_text())
    cpu_before = state["stateful_callbacks"]["RunClock"]["args"]["cpu_s"]
    assert 4 <= stopped_at < 12 and cpu_before > 0  # 12 steps in all

    for out_dir in ("killed", "whole"):
        done = run(*argv, "--out_dir", str(tmp_path / out_dir))
        assert done.returncode == 0, done.stderr[-3000:]
    resumed, whole = (json.loads((tmp_path / d / "runs" / "sst2" / "lets-sam" / "seed0.json").read_text())
                      for d in ("killed", "whole"))
    assert resumed["resumed_from_step"] == stopped_at and whole["resumed_from_step"] is None
    for key in ("metrics", "final_rho", "log_history", "steps"):
        assert resumed[key] == whole[key], key
    assert resumed["cpu_time_s"] > cpu_before  # the time before the kill is counted
    assert not checkpoints.exists()  # a saved run keeps no checkpoint


def test_study_report_says_how_lets_moved_rho_from_the_training_logs(tmp_path):
    """A hand-made LETS-SAM log: 6 ρ updates, 5 with dF/dρ < 0 (pushing ρ up), the 5 largest |dF/dρ| carrying
    4.2 of 4.3 (×1e-5); ρ 0.05 → 0.055 over a path of 0.007 (one step back); gap 0.1 at every update."""
    rho = (0.050, 0.051, 0.052, 0.051, 0.053, 0.054, 0.055)
    grads = (-1e-5, -1e-5, 1e-6, -2e-5, -1e-6, -1e-6)
    log = [{"step": 0, "rho": rho[0]}] + [
        {"step": 5 * k, "rho": r, "rho_grad": g, "gen_gap": 0.1} for k, (r, g) in enumerate(zip(rho[1:], grads), 1)]
    for seed in range(3):
        _save_synthetic_run(tmp_path, "lets-sam", seed, 0.8, 60, threads=1, final_rho=0.055, log_history=log)
    _save_synthetic_run(tmp_path, "lets-asam", 0, 0.8, 60, threads=1)  # no ρ updates logged: no row
    lines = _study_report(tmp_path)
    assert "| SST-2 | lets-sam | 6 | 83% | 98% | 0.05 → 0.055 | 0.007 | +0.005, +0.005, +0.005 | +0.100 |" in lines
    assert not any(line.startswith("| SST-2 | lets-asam | ") and "→" in line for line in lines)


def test_study_md_says_partial_until_every_task_method_and_seed_is_saved(tmp_path):
    """The label comes from the saved runs, not from a flag: run.py rewrites study.md after every grid run."""
    metric = {"sst2": "accuracy", "mrpc": "accuracy", "stsb": "pearson", "rte": "accuracy",
              "cola": "matthews_correlation"}
    for task, name in metric.items():
        for method in ("adamw", "sam@0.01", "lets-sam"):
            for seed in range(3):
                if (task, method, seed) != ("rte", "lets-sam", 2):
                    _save_synthetic_run(tmp_path, method, seed, 0.8, 60, threads=1, task=task, metric=name)
    lines = _study_report(tmp_path)
    assert lines[2].startswith("**PARTIAL") and "| lets-sam | 80.0 ± 0.0 | 80.0 ± 0.0 | 80.0 ± 0.0 | 80.0 ± 0.0 (n=2) |" \
        in "\n".join(lines)
    _save_synthetic_run(tmp_path, "lets-sam", 2, 0.8, 60, threads=1, task="rte")
    lines = _study_report(tmp_path)
    assert not any("PARTIAL" in line for line in lines)
    assert any(line.startswith("| lets-sam | 80.0 ± 0.0 |") and "| 80.0 |" in line for line in lines)  # the average


def test_rho_signal_splits_an_update_into_its_factors_and_their_noise(tmp_path):
    """`rho_signal.py`'s statistics on a hand-made snapshot: validation batches (loss, ⟨∇L, u⟩) = (1.0, 2), (1.2, 5),
    training batches (0.8, 1), (0.6, 3). gap 1.1 − 0.7 = 0.4; inner 3.5 − 2 = 1.5 with variances 4.5 (validation)
    and 2 (training); the four pairs' gap·inner 0.2, −0.4, 1.6, 1.2: mean 0.65, of which 0.6 = 0.4·1.5."""
    record = {"task": "mrpc", "method": "lets-sam@0.05+frozen", "seed": 0, "step": 5, "epoch": 0.25,
              "validation": [[1.0, 2.0], [1.2, 5.0]], "train": [[0.8, 1.0], [0.6, 3.0]]}
    (tmp_path / "snapshot.json").write_text(json.dumps(record))
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, 'benchmarks/glue'); "
        "from rho_signal import summarize, write_table; "
        f"write_table(Path({str(tmp_path)!r})); print(json.dumps(summarize(json.loads(Path({str(tmp_path / 'snapshot.json')!r}).read_text()))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads(done.stdout.splitlines()[-1])
    expected = {"gap": 0.4, "gap_snr": 2.0, "inner": 1.5, "inner_snr": 1.5 / 6.5 ** 0.5,
                "inner_var_from_validation": 4.5 / 6.5, "inner_snr_validation_x8": 1.5 / (4.5 / 8 + 2) ** 0.5,
                "grad_mean": 0.65, "grad_from_covariance": 1 - 0.6 / 0.65,
                # pair means by validation batch −0.1, 1.4 and by training batch 0.9, 0.4: se² = 1.125/2 + 0.125/2
                "grad_t": 0.65 / 0.625 ** 0.5,
                "grad_snr": 0.65 / (2.51 / 3) ** 0.5, "updates_for_2sigma": (2 / (0.65 / (2.51 / 3) ** 0.5)) ** 2,
                "val_loss_grad_t": 3.5 / (4.5 / 2) ** 0.5, "val_loss_grad_snr": 3.5 / 4.5 ** 0.5}
    for name, value in expected.items():
        assert abs(stats[name] - value) < 1e-9 * max(1.0, abs(value)), name
    assert [round(r, 9) for r in stats["loss_inner_correlation"]] == [1.0, -1.0]  # two points each: ±1
    table = (tmp_path / "signal.md").read_text().splitlines()
    assert ("| MRPC | lets-sam@0.05+frozen | 0 | 5 (0.25) | 2 / 2 | +0.400 (+2.8) | 2.00 | +0.8 | 0.588 | 69% | 0.937 | "
            "+1.00 / -1.00 | +6.50e-01 (+0.8) | 8% | 0.711 | 8 | +2.3 (1.65) |") in table
    assert (tmp_path / "signal.png").stat().st_size > 10_000


def test_rho_signal_stops_a_run_where_u_is_fresh_and_measures_every_held_out_batch(tmp_path):
    """The smoke profile on the shipped SST-2 sample (86 train, 10 held out, ρ batches of 4: 2 of them), stopped
    at step 5 (ρ every 5 steps: u_4 tracked). Every batch's ⟨∇L, u⟩ is non-zero, so u is the fresh one; a step
    where u is not is refused."""
    script = REPO / "benchmarks" / "glue" / "rho_signal.py"
    common = ["--profile", "smoke", "--task", "sst2", "--method", "lets-sam@0.05+frozen+vb4", "--train_batches", "3",
              "--data_dir", str(REPO / "examples" / "data" / "glue"), "--out_dir", str(tmp_path)]
    done = subprocess.run([sys.executable, str(script), *common, "--step", "5"], capture_output=True, text=True,
                          env=ONE_THREAD, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "sst2-lets-sam@0.05+frozen+vb4-seed0-step5.json").read_text())
    assert record["step"] == 5 and len(record["validation"]) == 2 and len(record["train"]) == 3
    assert all(loss > 0 and inner != 0 for loss, inner in record["validation"] + record["train"])
    assert "| SST-2 | lets-sam@0.05+frozen+vb4 | 0 | 5 (" in (tmp_path / "signal.md").read_text()
    refused = subprocess.run([sys.executable, str(script), *common, "--step", "4"], capture_output=True, text=True,
                             env=ONE_THREAD, timeout=900)
    assert refused.returncode != 0 and "multiple of rho_update_interval (5)" in refused.stderr
