"""The small AdamW learning-rate sweep that set the study profile's per-task budgets (issue #15).

    python benchmarks/glue/lr_sweep.py [--seeds 0] [--tasks sst2 mrpc ...]

AdamW only, on the `study-sweep` profile's examples, epochs and lengths, at each learning rate
of LRS; one run folder per lr under benchmarks/results/glue-study/lr-sweep/ (resumable, as
run.py), and lr_sweep.md with the primary dev score against each task's floor. The follow-ups
in that table (tasks below their floor, tried with more data or epochs) were run with run.py:

    python benchmarks/glue/run.py --profile study --methods adamw --tasks cola --num_train_epochs 3 \
        --seeds 0 1 2 --out_dir benchmarks/results/glue-study/lr-sweep/cola-all-lr1e-4
    python benchmarks/glue/run.py --profile study --methods adamw --tasks cola --num_train_epochs 5 \
        --seeds 0 1 2 --out_dir benchmarks/results/glue-study/lr-sweep/cola-all-lr1e-4-5ep
    python benchmarks/glue/run.py --profile study --methods adamw --tasks rte --learning_rate 3e-5 \
        --num_train_epochs 5 --seeds 0 1 2 --out_dir benchmarks/results/glue-study/lr-sweep/rte-lr3e-5-5ep
    python benchmarks/glue/run.py --profile study --methods adamw --tasks mrpc --num_train_epochs 3 \
        --seeds 0 1 2 --out_dir benchmarks/results/glue-study/lr-sweep/mrpc-lr2e-4-3ep

    python benchmarks/glue/run.py --profile study --methods adamw --tasks stsb --learning_rate 1e-4 \
        --seeds 0 1 2 --out_dir benchmarks/results/glue-study/lr-sweep/stsb-lr1e-4
    python benchmarks/glue/run.py --profile study --methods adamw --tasks stsb --max_train_samples 0 \
        --seeds 0 1 2 --out_dir benchmarks/results/glue-study/lr-sweep/stsb-all-lr2e-4

`mrpc-lr2e-4-2ep`, `stsb-3000-lr2e-4` and `cola-all-lr1e-4` hold the study's first AdamW runs of those tasks
(3 seeds at the budgets before the follow-ups: MRPC below its floor on average, STS-B's and CoLA's seed std
above 3).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import run  # noqa: E402
from markdown_table import table_header  # noqa: E402
from report import TASK_TITLES  # noqa: E402
from saved_runs import load_runs  # noqa: E402
from study_report import FLOOR, PRIMARY, TASKS  # noqa: E402

LRS = (5e-5, 1e-4, 2e-4)
OUT = Path(__file__).resolve().parents[1] / "results" / "glue-study" / "lr-sweep"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", default=["0"])
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    parser.add_argument("--data_dir", default=str(run.DEFAULT_DATA_DIR))
    parser.add_argument("--report_only", action="store_true", help="rebuild lr_sweep.md from the saved runs")
    cli = parser.parse_args(argv)
    for lr in [] if cli.report_only else cli.lrs:
        run.main(["--profile", "study-sweep", "--methods", "adamw", "--learning_rate", str(lr), "--seeds", *cli.seeds,
                  "--tasks", *cli.tasks, "--data_dir", cli.data_dir, "--out_dir", str(OUT / f"lr{lr:g}")])
    lines = table_header(["task", "floor", *(f"lr {lr:g}" for lr in cli.lrs)])
    for task in cli.tasks:
        cells = []
        for lr in cli.lrs:
            folder = OUT / f"lr{lr:g}"
            found = [r for r in load_runs(folder) if r["task"] == task] if (folder / "runs").is_dir() else []
            values = [100 * r["metrics"][f"eval_{PRIMARY[task]}"] for r in found]
            cells.append(f"{np.mean(values):.1f}" + ("" if len(values) == 1 else f" (n={len(values)})") if values else "–")
        lines.append(f"| {TASK_TITLES.get(task, task)} | {FLOOR[task]:g} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n" + follow_ups() + sweep_cost()
    (OUT / "lr_sweep.md").write_text(
        "# AdamW lr sweep (study profile's examples, epochs and lengths; dev score ×100, seed 0)\n\n" + table
    )
    print(table)


def follow_ups() -> str:
    """Runs saved under lr-sweep/ outside the lr grid (other examples or epochs for a task below its floor)."""
    lines = []
    folders = [p for p in OUT.iterdir() if p.is_dir() and not p.name.startswith("lr") and any(p.glob("runs/*/*/*.json"))]
    for folder in sorted(folders):
        runs = load_runs(folder)
        task, settings = runs[0]["task"], runs[0]["settings"]  # one task and setting per folder
        scores = [100 * r["metrics"][f"eval_{PRIMARY[task]}"] for r in runs]
        score = f"{np.mean(scores):.1f}" + (f" ± {np.std(scores, ddof=1):.1f}" if len(scores) > 1 else "")
        lines.append(
            f"| {TASK_TITLES.get(task, task)} | {FLOOR[task]:g} | {settings['learning_rate']:g} | "
            f"{settings['train_samples'] or 'all'} | {settings['epochs']:g} | {len(scores)} | {score} |"
        )
    if not lines:
        return ""
    header = ["", "Follow-ups (mean ± std over seeds):", "",
              "| task | floor | lr | train examples | epochs | seeds | score |", "|---|---|---|---|---|---|---|"]
    return "\n".join(header + lines) + "\n"


def sweep_cost() -> str:
    """What setting the budgets cost: every AdamW run saved under lr-sweep/ (the first runs recorded no CPU time)."""
    runs = [r for folder in OUT.iterdir() if (folder / "runs").is_dir() for r in load_runs(folder)]
    timed = [r["cpu_time_s"] for r in runs if "cpu_time_s" in r]
    return (f"\nCost: {len(runs)} AdamW runs, {sum(r['wall_time_s'] for r in runs) / 3600:.1f} hours of wall time; "
            f"{len(timed)} of them recorded CPU time, {sum(timed) / 3600:.1f} CPU-hours.\n")


if __name__ == "__main__":
    main()
