"""Issue #44's signal map: at each frozen ρ, which way does each estimator's hypergradient push, and how surely?

    nice python benchmarks/glue/signal_map.py            # runs what is missing (resumable), then the report
    python benchmarks/glue/signal_map.py --report_only   # signal_map.md and signal_map.png from the saved runs

Each run is LETS-SAM with ρ frozen (`+frozen`: SGD on ρ with a negligible step) under the study profile
(`run.py --profile study`), a ρ update on every step (`+k1`) and the signal probes (`+probes`, `rho_signal_probes`
0, 0.9, 0.99, 0.999): on the same steps and validation batches it logs dF/dρ of the one-step estimator and of
traces with those memories, under both objectives (squared gap, validation loss). Two ways to measure the gap
(VARIANTS): the paper's (L_val on a held-out batch, 10% of train held out; L_train on the next batch) and nothing
held out (`+next`: L_val on the next batch, L_train on the one just stepped on; such a frozen run trains exactly as
SAM on the whole train set, so it is also SAM's grid point at that ρ). Order: seed 0 at every ρ of RHOS, both
variants, task by task; then seeds 1 and 2 at the map's two ρ values around the task's best (issue #15's SAM grid,
3 seeds), both variants.

The report, per task, estimator and objective: at each ρ the mean of dF/d log ρ over the run (ρ·dF/dρ), its
t-statistic (over the log windows' means: 5 updates each, pooled over seeds), the same in the first epoch and
after it, and whether the sign points towards the grid's best (dF/dρ < 0 below it: ρ grows; > 0 above it). The
plot: the SAM grid's dev score against ρ on top (and the frozen runs' own, trained on the 90% of train that the ρ
validation split leaves), each estimator's t against ρ below, zero and ±2 marked.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import run  # noqa: E402  (sibling script, not a package)
from markdown_table import table_header, table_row  # noqa: E402
from report import TASK_TITLES  # noqa: E402
from saved_runs import load_runs  # noqa: E402
from study_report import PRIMARY, oracle_picks, rho_of, scores  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
STUDY_DIR = RESULTS / "glue-study"  # issue #15: AdamW and the SAM grid, 3 seeds
RHO_STUDY_DIR = RESULTS / "glue-rho-study"  # issue #34: SAM at 0.2 on some tasks
DEFAULT_OUT_DIR = RESULTS / "rho-signal-map"
TASKS = ("cola", "mrpc", "stsb")
RHOS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
#: How the gap is measured -> the method's suffix (see the module docstring).
VARIANTS = {"held out (the paper's)": "", "nothing held out (next/last)": "+next"}
METHOD = "lets-sam@{rho:g}+frozen+k1+probes{variant}"
PROBES = run.LETS_OPTIONS["probes"]["rho_signal_probes"]
OBJECTIVES = {"squared_gap": "squared gap", "val_loss": "val loss"}
ESTIMATOR_NAMES = {0.0: "one-step", 0.9: "trace μ=0.9", 0.99: "trace μ=0.99", 0.999: "trace μ=0.999"}
EXTRA_SEEDS = (1, 2)


def grid_best(study_dir: Path, tasks) -> dict[str, float]:
    """Per task, the ρ of the SAM grid's best mean dev score (issue #15's runs)."""
    picks = oracle_picks(scores(load_runs(study_dir)))
    missing = [task for task in tasks if task not in picks]
    if missing:
        raise SystemExit(f"{study_dir} has no SAM grid for {missing}: run `benchmarks/glue/run.py --profile study`.")
    return {task: rho_of(picks[task]) for task in tasks}


def around(best: float) -> list[float]:
    """The map's two ρ values around `best`: its neighbours in RHOS (both above it at the grid's edge)."""
    i = RHOS.index(best) if best in RHOS else int(np.searchsorted(RHOS, best))
    below, above = RHOS[max(i - 1, 0)], RHOS[min(i + 1, len(RHOS) - 1)]
    return [below, above] if below != best else [RHOS[i + 1], RHOS[i + 2]]


def method(rho: float, variant: str) -> str:
    return METHOD.format(rho=rho, variant=VARIANTS[variant])


def planned(best: dict[str, float], tasks) -> list[tuple[str, list[str], list[int]]]:
    """(task, methods, seeds) in the order they run: seed 0 everywhere first, task by task (both variants: CoLA, where
    ρ matters both ways, is complete first), then the extra seeds."""
    order = [(task, [method(rho, variant) for variant in VARIANTS for rho in RHOS], [0]) for task in tasks]
    return order + [(task, [method(rho, variant) for variant in VARIANTS for rho in around(best[task])],
                     list(EXTRA_SEEDS)) for task in tasks]


def key(mu: float, objective: str) -> str:
    return f"rho_probe_mu{mu:g}_{objective}"


def autocorrelation_time(deviations: np.ndarray) -> float:
    """How many consecutive log windows count as one independent value: τ = −1 + 2·Σ_m Γ_m, Γ_m = ρ_2m + ρ_2m+1
    (ρ_0 = 1) summed while positive (Geyer's initial positive sequence), at least 1. A long trace's dF/dρ stays
    correlated over many windows (μ = 0.999: τ ≈ 13 on CoLA's first epochs), and counting its windows as independent
    would overstate t by √τ."""
    n, variance = deviations.size, float(deviations @ deviations)
    if n < 4 or variance == 0:
        return 1.0

    def rho(lag: int) -> float:
        return float(deviations[:-lag] @ deviations[lag:]) / variance if lag else 1.0

    tau, m = -1.0, 0
    while 2 * m + 1 < n:
        pair = rho(2 * m) + rho(2 * m + 1)
        if pair <= 0:
            break
        tau, m = tau + 2 * pair, m + 1
    return max(tau, 1.0)


def t_statistic(series: list[np.ndarray]) -> float:
    """The mean of every run's values pooled, over its standard error: each run's share of the variance of the mean
    widened by its autocorrelation time (deviations from the pooled mean, so a seed's offset counts as correlated)."""
    total = sum(x.size for x in series)
    if total < 2:
        return np.nan
    mean = sum(x.sum() for x in series) / total
    variance = sum((x.size / total) ** 2 * np.mean((x - mean) ** 2) * autocorrelation_time(x - mean) / x.size
                   for x in series if x.size)
    return mean / np.sqrt(variance) if variance > 0 else np.nan


def _fmt(t: float) -> str:
    return "–" if np.isnan(t) else f"{t:+.1f}"


def signal(runs: list[dict], mu: float, objective: str, rho: float, epochs: str = "all") -> list[np.ndarray]:
    """dF/d log ρ of every log window (a mean of 5 updates), a series per run; `epochs`: "all", "1" or "later"."""
    series = []
    for record in runs:
        values = [rho * entry[key(mu, objective)] for entry in record["log_history"]
                  if key(mu, objective) in entry and (epochs == "all" or (entry["epoch"] <= 1) == (epochs == "1"))]
        series.append(np.array(values))
    return series


def verdict(t: float, rho: float, best: float) -> str:
    """Whether the mean pushes ρ towards `best` (descent: ρ grows where dF/dρ < 0), and how surely."""
    if rho == best or np.isnan(t):
        return "at best" if rho == best else "–"
    right = (t < 0) == (rho < best)
    return ("right" if right else "WRONG") + ("" if abs(t) >= 2 else " (noise)")


def map_table(table: dict, best: dict[str, float], tasks) -> list[str]:
    header = ["task", "gap measured", "estimator", "objective", *(f"ρ={rho:g}" for rho in RHOS), "right / significant"]
    lines = ["Per ρ: mean dF/d log ρ over the run, t-statistic [first epoch / later epochs] (seeds), and the verdict: "
             "'right' when the sign pushes ρ towards the grid's best, 'WRONG' when away, '(noise)' when |t| < 2. The "
             "t's standard error counts correlated log windows as fewer (Geyer's autocorrelation time, per run).", "",
             *table_header(header)]
    for task in tasks:
        for variant in VARIANTS:
            cells_of = {rho: table.get(task, {}).get(method(rho, variant)) for rho in RHOS}
            if not any(cells_of.values()):
                continue
            for mu in PROBES:
                for objective, title in OBJECTIVES.items():
                    cells, right, significant = [], 0, 0
                    for rho, cell in cells_of.items():
                        if cell is None:
                            cells.append("–")
                            continue
                        values = signal(cell["runs"], mu, objective, rho)
                        t = t_statistic(values)
                        first, later = (t_statistic(signal(cell["runs"], mu, objective, rho, e)) for e in ("1", "later"))
                        word = verdict(t, rho, best[task])
                        right += word.startswith("right")
                        significant += not word.endswith("(noise)") and word not in ("at best", "–")
                        cells.append(f"{np.concatenate(values).mean():+.2e}, t {_fmt(t)} [{_fmt(first)} / {_fmt(later)}] "
                                     f"(n={len(cell['runs'])}): {word}")
                    compared = sum(1 for rho, cell in cells_of.items() if rho != best[task] and cell is not None)
                    lines.append(table_row([TASK_TITLES[task], variant, ESTIMATOR_NAMES.get(mu, f"μ={mu:g}"), title,
                                            *cells, f"{right} of {compared} right, {significant} significant"]))
    return lines


def sam_scores(study_dirs: list[Path], task: str) -> dict[float, list[float]]:
    """SAM's dev scores (×100) per ρ, from every saved study that has them (issue #15's grid, issue #34's 0.2)."""
    by_rho = defaultdict(list)
    for folder in study_dirs:
        for record in load_runs(folder):
            if record["task"] == task and record["method"].startswith("sam@") and "+" not in record["method"]:
                by_rho[rho_of(record["method"])].append(100 * record["metrics"][f"eval_{PRIMARY[task]}"])
    return dict(by_rho)


def plot(table: dict, best: dict[str, float], tasks, study_dirs: list[Path], path: Path) -> None:
    """A column per task: SAM's score against ρ on top, then each variant's t of dF/d log ρ against ρ."""
    fig, axes = plt.subplots(1 + len(VARIANTS), len(tasks), figsize=(5 * len(tasks), 10), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [1] + [1.4] * len(VARIANTS)})
    styles = {"held out (the paper's)": ("s", ":", "grey", "frozen, 10% held out"),
              "nothing held out (next/last)": ("^", "--", "C1", "frozen, nothing held out (= SAM)")}
    for column, task in enumerate(tasks):
        top = axes[0][column]
        sam = sam_scores(study_dirs, task)
        rhos = sorted(sam)
        top.errorbar(rhos, [np.mean(sam[r]) for r in rhos], yerr=[np.std(sam[r]) for r in rhos], marker="o",
                     color="black", label="SAM (train set, seeds)")
        top.axvline(best[task], color="C3", ls="--", lw=1, label="grid's best ρ")
        top.set_title(TASK_TITLES[task])
        top.set_ylabel(f"dev {PRIMARY[task].replace('_', ' ')} ×100")
        for row, variant in enumerate(VARIANTS, start=1):
            bottom = axes[row][column]
            frozen = {rho: table[task][method(rho, variant)] for rho in RHOS if method(rho, variant) in table.get(task, {})}
            marker, line, color, label = styles[variant]
            if frozen:
                top.plot(list(frozen), [np.mean(c["score"]) for c in frozen.values()], marker=marker, ls=line,
                         color=color, label=label)
            for i, mu in enumerate(PROBES):
                for objective, style in (("squared_gap", "-"), ("val_loss", "--")):
                    points = [(rho, t_statistic(signal(cell["runs"], mu, objective, rho))) for rho, cell in frozen.items()]
                    if points:
                        bottom.plot(*zip(*points), ls=style, marker="o", color=f"C{i}",
                                    label=f"{ESTIMATOR_NAMES[mu]}, {OBJECTIVES[objective]}")
            for level, style in ((0, "-"), (2, ":"), (-2, ":")):
                bottom.axhline(level, color="black", lw=0.8, ls=style)
            bottom.axvline(best[task], color="C3", ls="--", lw=1)
            bottom.set_xscale("log")
            bottom.set_ylabel(f"t of dF/d log ρ, gap {variant.split(' (')[0]}")
        axes[-1][column].set_xlabel("ρ (frozen)")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reproduces_sam(table: dict, tasks, study_dirs: list[Path]) -> list[str]:
    """A frozen run with nothing held out trains as SAM does (tested bit for bit): its score must be SAM's at the
    same ρ and seed, where the grid has that run."""
    lines = []
    for task in tasks:
        grid = {(rho_of(r["method"]), r["seed"]): 100 * r["metrics"][f"eval_{PRIMARY[task]}"]
                for folder in study_dirs for r in load_runs(folder)
                if r["task"] == task and r["method"].startswith("sam@") and "+" not in r["method"]}
        for rho in RHOS:
            cell = table.get(task, {}).get(method(rho, "nothing held out (next/last)"))
            for record, score in zip(cell["runs"], cell["score"]) if cell else ():
                if (rho, record["seed"]) in grid:
                    lines.append(f"- {TASK_TITLES[task]} ρ={rho:g} seed {record['seed']}: frozen, nothing held out "
                                 f"{score:.2f}; SAM {grid[rho, record['seed']]:.2f}")
    return ["SAM reproduced by the frozen runs with nothing held out (the same θ: the scores must agree):", "",
            *lines] if lines else []


def write_report(out_dir: Path, study_dir: Path, tasks) -> str:
    best = grid_best(study_dir, tasks)
    table = scores(load_runs(out_dir)) if any((out_dir / "runs").glob("*/*/seed*.json")) else {}
    expected = sum(len(methods) * len(seeds) for _, methods, seeds in planned(best, tasks))
    done = sum(len(cell["runs"]) for cells in table.values() for cell in cells.values())
    text = "\n".join([
        "# The signal map: which way each ρ estimator pushes at a frozen ρ",
        "",
        *([f"**PARTIAL: {done} of {expected} runs saved; '–': not yet run.**", ""] if done < expected else []),
        "LETS-SAM with ρ frozen, MiniLM, issue #15's study profile, a ρ update on every step; every estimator is "
        "measured on the same steps and batches (`rho_signal_probes`), dF/d log ρ < 0 pushes ρ up. Gap measured "
        "held out: L_val on a held-out batch (10% of train held out), L_train on the next batch (the paper's); "
        "nothing held out: L_val on the next batch, L_train on the batch just stepped on (`+next`). Grid's best ρ "
        "(SAM, 3 seeds): " + ", ".join(f"{TASK_TITLES[t]} {best[t]:g}" for t in tasks) + ".",
        "",
        *map_table(table, best, tasks),
        "",
        *reproduces_sam(table, tasks, [study_dir, RHO_STUDY_DIR]),
        "",
        "![signal map](signal_map.png)",
        "",
    ])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "signal_map.md").write_text(text)
    if table:
        plot(table, best, [t for t in tasks if t in table], [study_dir, RHO_STUDY_DIR], out_dir / "signal_map.png")
    return text


def main(argv=None) -> None:
    args = run.study_parser(__doc__, TASKS, DEFAULT_OUT_DIR, STUDY_DIR, "the SAM grid").parse_args(argv)
    out_dir, study_dir = Path(args.out_dir), Path(args.study_dir)
    if not args.report_only:
        for task, methods, seeds in planned(grid_best(study_dir, args.tasks), args.tasks):
            run.main(["--profile", "study", "--tasks", task, "--methods", *methods, "--seeds", *map(str, seeds),
                      "--out_dir", str(out_dir), "--data_dir", args.data_dir])
            write_report(out_dir, study_dir, args.tasks)  # after each task's runs: the partial map so far
    print(write_report(out_dir, study_dir, args.tasks))


if __name__ == "__main__":
    main()
