"""How the README's first training command was chosen: LETS-SAM on MiniLM and the shipped SST-2 sample,
timed as a user runs it (the whole `lets-hf glue` command, model loading and evaluation included).

    python benchmarks/first_run.py --threads 1   # ~30 min; resumes, skipping finished runs

Writes benchmarks/results/first_run/results.md and one JSON per run, with the torch thread count, the CPU time
and the wall time of each (one-thread CPU time holds to a few percent on a shared machine; wall time does not).
The bar: at least 80% SST-2 dev accuracy in at most 5 minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from markdown_table import table_header, table_row

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "first_run"
COMMON = ["--task", "sst2", "--data_dir", str(REPO / "examples" / "data" / "glue"), "--model_name_or_path", "minilm",
          "--method", "lets-sam", "--max_seq_length", "64", "--per_device_train_batch_size", "32",
          "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]
#: name -> (learning rate, epochs, rho_update_interval, seed); "readme" is the README's command.
RUNS = {
    "readme": (2e-4, 2, 10, 42),
    "readme-seed1": (2e-4, 2, 10, 1),
    "readme-seed2": (2e-4, 2, 10, 2),
    "old-readme": (5e-5, 1, 1, 42),
    "lr2e-4-1ep-k10": (2e-4, 1, 10, 42),
    "lr1e-4-2ep-k10": (1e-4, 2, 10, 42),
    "lr2e-4-2ep-k1": (2e-4, 2, 1, 42),
}


def majority_share() -> float:
    """The dev accuracy of always predicting the most frequent label: the floor a run must clear by far."""
    from collections import Counter

    from lets_hf.tasks.glue import load_glue

    labels = load_glue("sst2", REPO / "examples" / "data" / "glue")["validation"]["label"]
    return Counter(labels).most_common(1)[0][1] / len(labels)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(name: str, lr: float, epochs: int, interval: int, seed: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as output_dir:
        flags = ["--learning_rate", str(lr), "--num_train_epochs", str(epochs), "--rho_update_interval", str(interval),
                 "--seed", str(seed), "--output_dir", output_dir]
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cpu_before, start = children_cpu_seconds(), time.perf_counter()
        subprocess.run([sys.executable, "-m", "lets_hf.cli", "glue", *COMMON, *flags], check=True, capture_output=True,
                       env=environment)
        wall, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu_before
        metrics = json.loads((Path(output_dir) / "eval_results.json").read_text())
        log = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    rhos = [entry["rho"] for entry in log if "rho" in entry]
    return {"name": name, "learning_rate": lr, "epochs": epochs, "rho_update_interval": interval, "seed": seed,
            "eval_accuracy": metrics["eval_accuracy"], "threads": threads, "cpu_seconds": cpu, "wall_seconds": wall,
            "rho_final": rhos[-1] if rhos else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run (OMP_NUM_THREADS)")
    threads = parser.parse_args().threads
    OUT.mkdir(parents=True, exist_ok=True)
    results = []
    for name, settings in RUNS.items():
        path = OUT / f"{name}.json"
        if not path.is_file() or json.loads(path.read_text()).get("threads") != threads:
            path.write_text(json.dumps(run(name, *settings, threads), indent=2))
        results.append(json.loads(path.read_text()))
        print(results[-1], flush=True)
    lines = table_header(["run", "lr", "epochs", "rho_update_interval", "seed", "SST-2 dev accuracy", "threads",
                           "CPU time (min)", "wall time (min)", "final ρ"])
    for r in results:
        cells = [r["name"], f"{r['learning_rate']:g}", r["epochs"], r["rho_update_interval"], r["seed"],
                 f"{100 * r['eval_accuracy']:.1f}", r["threads"], f"{r['cpu_seconds'] / 60:.2f}",
                 f"{r['wall_seconds'] / 60:.2f}", f"{r['rho_final']:.4f}"]
        lines.append(table_row(map(str, cells)))
    (OUT / "results.md").write_text(
        "LETS-SAM, MiniLM-L6, shipped SST-2 sample (2,000 train sentences, 10% held out for ρ; 872 dev), "
        f"max length 64, batch 32, {threads} torch thread(s); CPU and wall time of the whole command (model loading "
        "and evaluation included). `readme` is the README's first command. Floor: the majority class scores "
        f"{100 * majority_share():.1f}% on this dev set; the bar is 80%.\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
