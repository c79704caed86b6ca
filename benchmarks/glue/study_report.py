"""Issue #15's table and figures: does a learned ρ reach the best SAM of a ρ grid without the grid?

    python benchmarks/glue/study_report.py [--out_dir benchmarks/results/glue-study]

Reads the runs of `run.py --profile study` and writes study.md (table, oracle picks, floors, CPU
time), rho_vs_oracle.png (LETS's ρ over steps against the oracle's ρ, a panel per task) and
score_vs_rho.png (SAM's dev score against ρ, LETS-SAM's final ρ and score marked). While some
task, method or seed is still missing, study.md says PARTIAL at its top.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from markdown_table import table_header, table_row  # noqa: E402
from report import TASK_TITLES  # noqa: E402
from saved_runs import load_runs  # noqa: E402

TASKS = ("sst2", "mrpc", "stsb", "rte", "cola")
#: The score a task is judged by (dev ×100), and the floor AdamW must clear: majority/constant + 10 (RTE + 4;
#: CoLA MCC 20). Majority class on these dev sets: SST-2 50.9% positive, MRPC 68.4%, RTE 52.7%.
PRIMARY = {"sst2": "accuracy", "mrpc": "accuracy", "stsb": "pearson", "rte": "accuracy", "cola": "matthews_correlation"}
FLOOR = {"sst2": 60.9, "mrpc": 78.4, "stsb": 10.0, "rte": 56.7, "cola": 20.0}
MAX_SEED_STD = 3.0
ORACLE = "oracle SAM"
#: The study runs two workers of one thread each on 2 cores (`OMP_NUM_THREADS=1`): SST-2's SAM took 464 s per run
#: two at a time (232 s per run) and 456 CPU-s, against 266 s and 523 CPU-s for one 2-thread process; the scores do
#: not depend on it (SST-2 AdamW bit-identical). CPU time is compared only between such runs; the first runs
#: (2 threads, or no CPU time recorded) keep their scores.
CPU_THREADS = 1


def rho_of(method: str) -> float | None:
    return float(method.partition("@")[2]) if "@" in method else None


def scores(runs: list[dict]) -> dict:
    """task -> method -> list of primary dev scores (×100) and CPU times, over seeds."""
    table = defaultdict(lambda: defaultdict(lambda: {"score": [], "cpu": [], "final_rho": [], "runs": []}))
    for run in runs:
        cell = table[run["task"]][run["method"]]
        cell["score"].append(100 * run["metrics"][f"eval_{PRIMARY[run['task']]}"])
        if run.get("threads") == CPU_THREADS:  # comparable CPU times only (see CPU_THREADS)
            cell["cpu"].append(run["cpu_time_s"])
        cell["final_rho"].append(run["final_rho"])
        cell["runs"].append(run)
    return table


def oracle_picks(table: dict) -> dict[str, str]:
    """Per task, the SAM grid point with the best mean dev score (what a grid search on dev would pick)."""
    picks = {}
    for task, methods in table.items():
        grid = [m for m in methods if m.startswith("sam@")]
        if grid:
            picks[task] = max(grid, key=lambda m: np.mean(methods[m]["score"]))
    return picks


def _cell(values: list[float], seeds: int) -> str:
    """Mean ± std over seeds; one seed has no spread to show, so its cell is the score and (n=1)."""
    if not values:
        return "–"
    spread = f" ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else ""
    return f"{np.mean(values):.1f}{spread}" + (f" (n={len(values)})" if len(values) < seeds else "")


def _cpu_per_run(cell: dict) -> float:
    """CPU seconds of one run of this cell: the median over the runs that recorded it (NaN if none did).

    The median, because a run that shared the 2 cores with other work spends more CPU time too
    (torch's threads spin while they wait): MRPC's SAM took 830 CPU-s alone and 1,190 beside a test run.
    """
    return float(np.median(cell["cpu"])) if cell["cpu"] else float("nan")


def _minutes(seconds: float, digits: int = 0) -> str:
    return "–" if np.isnan(seconds) else f"{seconds / 60:.{digits}f}"


def _hours(seconds: float) -> str:
    return "–" if np.isnan(seconds) else f"{seconds / 3600:.1f}"


#: The reading's comparisons, (a, b): a − b per seed, where both ran.
COMPARISONS = (("lets-sam", ORACLE), ("lets-sam", "adamw"), (ORACLE, "adamw"), ("lets-asam", "adamw"))


def _seed_scores(table: dict, task: str, method: str, picks: dict) -> dict[int, float]:
    cell = table[task].get(picks.get(task) if method == ORACLE else method)
    return {run["seed"]: score for run, score in zip(cell["runs"], cell["score"])} if cell else {}


def reading(table: dict, picks: dict) -> list[str]:
    """The README's questions per task: score differences paired by seed (same data order and head
    initialization), mean ± std over seeds, and what the grid costs against one LETS-SAM run."""
    names = {ORACLE: "oracle", "lets-sam": "LETS-SAM", "lets-asam": "LETS-ASAM", "adamw": "AdamW"}
    header = ["task", *(f"{names[a]} − {names[b]}" for a, b in COMPARISONS), "LETS-SAM final ρ", "grid CPU / LETS-SAM CPU"]
    lines = ["Reading: differences of dev score ×100 paired by seed, mean ± std over the seeds both ran (n).", "",
             *table_header(header)]
    for task in (t for t in TASKS if t in table):
        cells = [TASK_TITLES.get(task, task)]
        for a, b in COMPARISONS:
            first, second = _seed_scores(table, task, a, picks), _seed_scores(table, task, b, picks)
            diffs = [first[seed] - second[seed] for seed in sorted(first.keys() & second.keys())]
            std = f" ± {np.std(diffs, ddof=1):.1f}" if len(diffs) > 1 else ""
            cells.append(f"{np.mean(diffs):+.1f}{std} (n={len(diffs)})" if diffs else "–")
        lets = table[task].get("lets-sam")
        cells.append(f"{np.mean(lets['final_rho']):.3g}" if lets else "–")
        grid_cpu = sum(_cpu_per_run(table[task][m]) for m in table[task] if m.startswith("sam@"))
        ratio = grid_cpu / _cpu_per_run(lets) if lets else float("nan")
        cells.append("–" if np.isnan(ratio) else f"{ratio:.1f}x")
        lines.append(table_row(cells))
    return lines


def rho_paths(table: dict) -> list[str]:
    """How LETS moved ρ: does the hypergradient point one way (path ≈ |net|), or does ρ wander around ρ₀?

    Read from each run's training log (one ρ update per logging window in the study: both every 5 steps),
    mean over seeds. dF/dρ < 0 pushes ρ up; the gap is L_val − L_train at the updates.
    """
    header = ["task", "method", "ρ updates", "pushed up", "top 5", "ρ₀ → final ρ", "path length", "net Δρ per seed",
              "mean gap"]
    lines = ["How LETS moved ρ (mean over seeds; 'pushed up': share of updates with dF/dρ < 0; top 5: share of "
             "Σ|dF/dρ| in the run's 5 largest updates; path length: the sum of |Δρ| over the updates; net Δρ: "
             "final ρ − ρ₀; gap: L_val − L_train):", "",
             *table_header(header)]
    for task in (t for t in TASKS if t in table):
        for method in ("lets-sam", "lets-asam"):
            stats = []
            for run in table[task].get(method, {"runs": []})["runs"]:
                rho = np.array([e["rho"] for e in run["log_history"] if "rho" in e])
                grad = np.array([e["rho_grad"] for e in run["log_history"] if "rho_grad" in e])
                if not grad.size:  # a run that logged no ρ update has no path to show
                    continue
                gap = [e["gen_gap"] for e in run["log_history"] if "gen_gap" in e]
                top = np.sort(np.abs(grad))[::-1]
                stats.append((len(grad), np.mean(grad < 0), top[:5].sum() / top.sum(), rho[0], run["final_rho"],
                              np.abs(np.diff(rho)).sum(), run["final_rho"] - rho[0], np.mean(gap)))
            if not stats:
                continue
            updates, up, top5, start, final, path, net, gap = np.array(stats).T  # one column per seed
            lines.append(f"| {TASK_TITLES.get(task, task)} | {method} | {updates.mean():.0f} | {up.mean():.0%} | "
                         f"{top5.mean():.0%} | {start.mean():.3g} → {final.mean():.3g} | {path.mean():.3f} | "
                         + ", ".join(f"{d:+.3f}" for d in net) + f" | {gap.mean():+.3f} |")
    return lines


def markdown(table: dict, seeds: int) -> str:
    tasks = [t for t in TASKS if t in table]
    picks = oracle_picks(table)
    methods = sorted({m for t in tasks for m in table[t]}, key=lambda m: (m.split("@")[0] != "adamw", m.startswith("lets"), m))
    rows = [m for m in methods if m.startswith(("adamw", "sam"))] + [ORACLE] + [m for m in methods if m.startswith(("asam", "lets"))]
    header = ["method", *(f"{TASK_TITLES.get(t, t)} {PRIMARY[t].replace('matthews_correlation', 'MCC')}" for t in tasks)]
    lines = [
        f"Dev score ×100, mean ± std over {seeds} seeds ((n=k): only k seeds so far). Average: mean of the task "
        "means (GLUE-style, one score per task). CPU: CPU minutes (process time, all threads) of one seed of this "
        "row over its tasks (per task, the median over the seeds that recorded it); the oracle's is the whole grid's.",
        "",
        *table_header(header + ["average", "CPU (min)"]),
    ]
    cpu_per_run = {}  # row -> task -> CPU seconds of one run (the oracle's: the whole grid)
    for row in rows:
        cells, means, cpu = [row], [], cpu_per_run.setdefault(row, {})
        for task in tasks:
            method = picks.get(task) if row == ORACLE else row
            cell = table[task].get(method) if method else None
            cells.append(_cell(cell["score"], seeds) if cell else "–")
            if cell:
                means.append(np.mean(cell["score"]))
                grid = [m for m in table[task] if m.startswith("sam@")] if row == ORACLE else [method]
                cpu[task] = sum(_cpu_per_run(table[task][m]) for m in grid)
        average = f"{np.mean(means):.1f}" if len(means) == len(TASKS) else "–"  # only over every study task
        lines.append(table_row(cells + [average, _minutes(sum(cpu.values()) if cpu else np.nan)]))
    lines += ["", f"{ORACLE}: the grid's best ρ per task on dev, its CPU the whole grid's: "
              + ", ".join(f"{TASK_TITLES.get(t, t)} ρ = {rho_of(picks[t]):g}" for t in tasks if t in picks) + "."]
    lines += ["", "CPU minutes of one run (one thread, median over seeds; the oracle's: the whole grid):", "",
              *table_header(["method", *(TASK_TITLES.get(t, t) for t in tasks)])]
    lines += [f"| {row} | " + " | ".join(_minutes(cpu_per_run[row].get(t, np.nan), 1) for t in tasks) + " |"
              for row in rows]
    cells = {task: table[task].values() for task in tasks}
    per_task = {task: sum(_cpu_per_run(cell) * len(cell["runs"]) for cell in cells[task]) for task in tasks}
    total = sum(per_task.values())
    saved = sum(len(cell["runs"]) for task in tasks for cell in cells[task])
    lines += ["", f"CPU time of the {saved} runs saved: "
              + (f"{_hours(total)} CPU-hours" if not np.isnan(total) else "– (a cell has no one-thread run yet)")
              + " (each run counted at its cell's one-thread median: the first runs used 2 threads or shared the"
              " machine); per task: " + ", ".join(f"{TASK_TITLES.get(t, t)} {_hours(per_task[t])}" for t in tasks) + "."]
    lines += ["", *reading(table, picks)]
    lines += ["", *rho_paths(table)]
    lines += ["", f"Floor (AdamW must clear it, seed std ≤ {MAX_SEED_STD:g}):", "",
              "| task | floor | AdamW | std | met |", "|---|---|---|---|---|"]
    for task in tasks:
        adamw = table[task].get("adamw", {"score": []})["score"]
        if adamw:
            std = np.std(adamw, ddof=1) if len(adamw) > 1 else None  # one seed has no spread to judge
            met = np.mean(adamw) >= FLOOR[task] and (std is None or std <= MAX_SEED_STD)
            so_far = f" (n={len(adamw)})" if len(adamw) < seeds else ""
            lines.append(f"| {TASK_TITLES.get(task, task)} | {FLOOR[task]:g} | {np.mean(adamw):.1f}{so_far} | "
                         f"{'–' if std is None else f'{std:.1f}'} | {'yes' if met else 'NO'} |")
    return "\n".join(lines) + "\n"


def _task_panels(tasks: list[str], draw, xlabel: str, ylabel: str, path: Path) -> None:
    """One panel per task, `draw(ax, task)` fills it; shared titles, grid, labels and legend."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 2.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        draw(ax, task)
        ax.set_title(TASK_TITLES.get(task, task))
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rho_vs_oracle(table: dict, path: Path) -> None:
    tasks = [t for t in TASKS if t in table and "lets-sam" in table[t]]
    picks = oracle_picks(table)

    def draw(ax, task):
        for run in table[task]["lets-sam"]["runs"]:
            points = [(e["step"], e["rho"]) for e in run["log_history"] if "rho" in e]
            ax.plot(*zip(*points), lw=0.9, alpha=0.7, label=f"LETS-SAM seed {run['seed']}")
        if task in picks:
            ax.axhline(rho_of(picks[task]), color="black", ls="--", lw=1, label="oracle SAM ρ")

    if tasks:
        _task_panels(tasks, draw, "optimizer step", "ρ", path)


def plot_score_vs_rho(table: dict, path: Path) -> None:
    tasks = [t for t in TASKS if t in table and any(m.startswith("sam@") for m in table[t])]

    def draw(ax, task):
        grid = sorted((rho_of(m), cell["score"]) for m, cell in table[task].items() if m.startswith("sam@"))
        ax.errorbar([r for r, _ in grid], [np.mean(s) for _, s in grid],
                    yerr=[np.std(s, ddof=1) if len(s) > 1 else 0 for _, s in grid], marker="o", capsize=3, label="SAM")
        lets = table[task].get("lets-sam")
        if lets:
            ax.errorbar([np.mean(lets["final_rho"])], [np.mean(lets["score"])], xerr=[np.std(lets["final_rho"])],
                        marker="*", markersize=11, color="C3", ls="none", label="LETS-SAM (final ρ)")
        if "adamw" in table[task]:
            ax.axhline(np.mean(table[task]["adamw"]["score"]), color="grey", ls=":", label="AdamW")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([r for r, _ in grid], labels=[f"{r:g}" for r, _ in grid])

    if tasks:
        _task_panels(tasks, draw, "ρ", "dev score ×100", path)


def is_complete(table: dict, seeds: int) -> bool:
    """Every study task has every method seen in any task, each on `seeds` seeds: only then is there a verdict."""
    methods = {m for cells in table.values() for m in cells}
    return all(len(table.get(task, {}).get(m, {"runs": []})["runs"]) >= seeds for task in TASKS for m in methods)


def write_study_report(out_dir: Path, seeds: int = 3) -> str:
    """study.md and the figures from the saved runs; a table with runs still to come is labelled PARTIAL."""
    out_dir = Path(out_dir)
    table = scores(load_runs(out_dir))
    text = markdown(table, seeds)
    if not is_complete(table, seeds):
        text = (f"**PARTIAL: the study is still running; cells with (n=k) have k of {seeds} seeds, "
                "'–' none yet.**\n\n" + text)
    (out_dir / "study.md").write_text("# GLUE study: a learned ρ against SAM's ρ grid\n\n" + text)
    plot_rho_vs_oracle(table, out_dir / "rho_vs_oracle.png")
    plot_score_vs_rho(table, out_dir / "score_vs_rho.png")
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parents[1] / "results" / "glue-study"))
    cli = parser.parse_args()
    print(write_study_report(Path(cli.out_dir)))
