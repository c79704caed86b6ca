"""The small AdamW learning-rate sweep that set the study profile's per-task budgets (issue #15).

    python benchmarks/glue/lr_sweep.py [--seeds 0] [--tasks sst2 mrpc ...]

AdamW only, on the study profile's examples, epochs and lengths, at each learning rate of LRS;
one run folder per lr under benchmarks/results/glue-study/lr-sweep/ (resumable, as run.py),
and lr_sweep.md with the primary dev score against each task's floor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import run  # noqa: E402
from report import TASK_TITLES  # noqa: E402
from saved_runs import load_runs  # noqa: E402
from study_report import FLOOR, PRIMARY, TASKS  # noqa: E402

LRS = (5e-5, 1e-4, 2e-4, 4e-4)
OUT = Path(__file__).resolve().parents[1] / "results" / "glue-study" / "lr-sweep"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", default=["0"])
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    parser.add_argument("--data_dir", default=str(run.DEFAULT_DATA_DIR))
    cli = parser.parse_args(argv)
    for lr in cli.lrs:
        run.main(["--profile", "study", "--methods", "adamw", "--learning_rate", str(lr), "--seeds", *cli.seeds,
                  "--tasks", *cli.tasks, "--data_dir", cli.data_dir, "--out_dir", str(OUT / f"lr{lr:g}")])
    lines = ["| task | floor | " + " | ".join(f"lr {lr:g}" for lr in cli.lrs) + " |", "|" + "---|" * (len(cli.lrs) + 2)]
    for task in cli.tasks:
        cells = []
        for lr in cli.lrs:
            folder = OUT / f"lr{lr:g}"
            found = [r for r in load_runs(folder) if r["task"] == task] if (folder / "runs").is_dir() else []
            values = [100 * r["metrics"][f"eval_{PRIMARY[task]}"] for r in found]
            cells.append(f"{np.mean(values):.1f} (n={len(values)})" if values else "–")
        lines.append(f"| {TASK_TITLES.get(task, task)} | {FLOOR[task]:g} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (OUT / "lr_sweep.md").write_text(
        "# AdamW lr sweep (study profile's examples, epochs and lengths; dev score ×100)\n\n" + table
    )
    print(table)


if __name__ == "__main__":
    main()
