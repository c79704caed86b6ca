"""Issue #34's report: does LETS now find ρ by itself, from any ρ₀?

    python benchmarks/glue/rho_study_report.py [--out_dir benchmarks/results/glue-rho-study]

Reads the new runs (`run.py --profile study --out_dir benchmarks/results/glue-rho-study`: LETS estimators from
several ρ₀, SAM at 0.2) beside issue #15's saved study (AdamW, the SAM grid, one-step LETS-SAM), which it
never reruns, and writes rho_study.md:

- the ρ₀-robustness table: per LETS method and ρ₀, each task's dev score and final ρ;
- LETS − SAM at the same ρ₀ and LETS − oracle SAM, paired by seed;
- the diagnostics per estimator: share of updates that pushed ρ up, the hypergradient's mean SNR and sign
  agreement over the run (`lets_hf.diagnostics`), and how far ρ moved;
- CPU minutes per run;
- the signal by epoch: the t-statistic of the logged gap, of the inner product and of dF/dρ in the first epoch and
  after it, pooled over seeds, and how many ρ updates a 2σ sign of dF/dρ would take;

rho_paths.png (ρ over the steps of every LETS run, a panel per task, the oracle's ρ dashed) and
diagnostics/<method>.png (ρ, the gap, the inner product, dF/dρ, its SNR and sign agreement over the steps of
each LETS method's STS-B seed 0). While one of part 4's runs (`planned_methods`) lacks a seed on a task that
has any of them, rho_study.md says PARTIAL; it names the tasks that have none (the budget drops CoLA first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from lets_hf.rho_curve import plot_rho_curve  # noqa: E402
from markdown_table import table_header, table_row  # noqa: E402
from report import TASK_TITLES  # noqa: E402
from saved_runs import load_runs  # noqa: E402
from study_report import ORACLE, _cell, _cpu_per_run, _minutes, _task_panels, oracle_picks, scores  # noqa: E402

STUDY_DIR = Path(__file__).resolve().parents[1] / "results" / "glue-study"
#: The tasks issue #34 reruns (RTE optional), in report order.
TASKS = ("stsb", "mrpc", "sst2", "cola")
#: Part 4's starts, and the candidates run from each: the default a user gets (the paper's one-step estimator)
#: and the best other estimator, as `{rho}` patterns of their study names.
START_RHOS = (0.01, 0.05, 0.2)
DEFAULT_RHO = 0.05
CANDIDATES = {"one-step (default)": "lets-sam@{rho}", "antithetic windows": "lets-sam@{rho}+antithetic+lr0.2+k2"}


def planned_methods() -> list[str]:
    """Part 4's new runs: the default from each ρ₀ but 0.05 (issue #15 ran it), the best other estimator from
    0.05, and SAM at 0.2, which the grid lacks."""
    default, other = CANDIDATES.values()
    return ([default.format(rho=rho) for rho in START_RHOS if rho != DEFAULT_RHO]
            + [other.format(rho=DEFAULT_RHO), "sam@0.2"])


def split_method(method: str) -> tuple[str, float | None]:
    """`lets-sam@0.2+trace+val` -> ("lets-sam+trace+val", 0.2): the estimator, and ρ₀ (None: the rule's)."""
    head, plus, options = method.partition("+")
    preset, _, rho = head.partition("@")
    return preset + plus + options, float(rho) if rho else None


def _by_seed(cell: dict | None) -> dict[int, float]:
    return {run["seed"]: score for run, score in zip(cell["runs"], cell["score"])} if cell else {}


def _differences(first: dict[int, float], second: dict[int, float]) -> list[float]:
    return [first[seed] - second[seed] for seed in sorted(first.keys() & second.keys())]


def _mean_spread(diffs: list[float]) -> str:
    std = f" ± {np.std(diffs, ddof=1):.1f}" if len(diffs) > 1 else ""
    return f"{np.mean(diffs):+.1f}{std} (n={len(diffs)})"


def _paired(first: dict[int, float], second: dict[int, float]) -> str:
    diffs = _differences(first, second)
    return _mean_spread(diffs) if diffs else "–"


def _sam_at(table: dict, task: str, rho: float | None) -> dict | None:
    return table[task].get(f"sam@{rho if rho is not None else DEFAULT_RHO:g}")


def _oracle_cell(oracle: dict | None, pick: str | None, seeds: int) -> str:
    """The oracle SAM's score and, in brackets, its ρ."""
    return f"{_cell(oracle['score'], seeds)} ({pick.partition('@')[2]})" if oracle else "–"


def robustness(table: dict, lets_methods: list[str], seeds: int) -> list[str]:
    """Per LETS method (ρ₀ in its name): score, final ρ, and the paired differences, one row per task."""
    picks = oracle_picks(table)
    header = ["method", "ρ₀", "task", "LETS score", "final ρ", "SAM at ρ₀", "LETS − SAM at ρ₀", "oracle SAM (ρ)",
              "LETS − oracle"]
    lines = table_header(header)
    for method in lets_methods:
        estimator, rho0 = split_method(method)
        for task in (t for t in TASKS if method in table.get(t, {})):
            cell, sam = table[task][method], _sam_at(table, task, rho0)
            oracle = table[task].get(picks.get(task))
            lines.append(table_row([
                estimator, f"{rho0:g}" if rho0 else "default", TASK_TITLES.get(task, task), _cell(cell["score"], seeds),
                f"{np.mean(cell['final_rho']):.3g}", _cell(sam["score"], seeds) if sam else "–",
                _paired(_by_seed(cell), _by_seed(sam)), _oracle_cell(oracle, picks.get(task), seeds),
                _paired(_by_seed(cell), _by_seed(oracle)),
            ]))
    return lines


def candidate_method(pattern: str, rho0: float) -> str:
    """A candidate's study name from ρ₀; from the rule's default ρ₀ the default is issue #15's `lets-sam`."""
    name = pattern.format(rho=f"{rho0:g}")
    return "lets-sam" if name == f"lets-sam@{DEFAULT_RHO:g}" else name


def candidates_table(table: dict, seeds: int) -> list[str]:
    """Part 4's table: per task and ρ₀, the baselines beside each candidate's score, final ρ and paired
    differences to SAM at ρ₀ and to the oracle."""
    picks = oracle_picks(table)
    header = ["task", "ρ₀", "AdamW", "oracle SAM (ρ)", "SAM at ρ₀"]
    for name in CANDIDATES:
        header += [name, "final ρ", "− SAM at ρ₀", "− oracle"]
    lines = table_header(header)
    for task in (t for t in TASKS if t in table):
        oracle, adamw = table[task].get(picks.get(task)), table[task].get("adamw")
        for rho0 in (r for r in START_RHOS if any(candidate_method(p, r) in table[task] for p in CANDIDATES.values())):
            sam = _sam_at(table, task, rho0)
            cells = [TASK_TITLES.get(task, task), f"{rho0:g}", _cell(adamw["score"], seeds) if adamw else "–",
                     _oracle_cell(oracle, picks.get(task), seeds), _cell(sam["score"], seeds) if sam else "–"]
            for pattern in CANDIDATES.values():
                cell = table[task].get(candidate_method(pattern, rho0))
                cells += [_cell(cell["score"], seeds), f"{np.mean(cell['final_rho']):.3g}",
                          _paired(_by_seed(cell), _by_seed(sam)), _paired(_by_seed(cell), _by_seed(oracle))] \
                    if cell else ["–"] * 4
            lines.append(table_row(cells))
    return lines


def _verdict(diffs: list[float], floor: float) -> str:
    """Met or missed by how much; a miss whose margin is under two standard errors says so (t: margin / SE)."""
    mean = np.mean(diffs)
    if mean >= floor:
        return f"{_mean_spread(diffs)}: met"
    verdict = f"missed by {floor - mean:.1f}"
    error = np.std(diffs, ddof=1) / np.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    if floor - mean < 2 * error:
        verdict += f" (within seed noise, t {(mean - floor) / error:+.1f})"
    return f"{_mean_spread(diffs)}: {verdict}"


def goals(table: dict) -> list[str]:
    """The issue's three goals per candidate, with the margin by which each is met or missed (means of
    seed-paired differences; a cell counts with the seeds it has)."""
    picks, lines = oracle_picks(table), []
    tasks = [t for t in TASKS if t in table and t in picks]
    for name, pattern in CANDIDATES.items():
        def vs(task, rho0, baseline):
            cell = table[task].get(candidate_method(pattern, rho0))
            return _differences(_by_seed(cell), _by_seed(baseline)) if cell and baseline else []

        below = [f"{TASK_TITLES.get(t, t)} from {rho0:g}: {_verdict(d, 0.0)}"
                 for t in tasks for rho0 in START_RHOS if (d := vs(t, rho0, _sam_at(table, t, rho0)))]
        stsb = vs("stsb", 0.2, table["stsb"].get(picks["stsb"])) if "stsb" in tasks else []
        per_task = {t: d for t in tasks if (d := vs(t, DEFAULT_RHO, table[t].get(picks[t])))}
        average = "no runs yet"
        if per_task:
            mean = np.mean([np.mean(d) for d in per_task.values()])
            average = (f"{mean:+.1f} over {', '.join(TASK_TITLES.get(t, t) for t in per_task)}: "
                       + ("met" if mean >= -1.0 else "missed"))
        lines += [f"**{name}**", "",
                  "- ≥ SAM at ρ₀ from every ρ₀ on every task (paired mean ≥ 0): "
                  + ("; ".join(below) if below else "no runs yet") + ".",
                  "- From 0.2 within 5 of oracle SAM on STS-B: " + (_verdict(stsb, -5.0) if stsb else "no runs yet") + ".",
                  f"- From {DEFAULT_RHO:g}, within 1.0 of oracle SAM averaged over tasks: {average}.", ""]
    return lines


def _updates(logged: list[float]) -> list[float]:
    """The ρ updates in a log: a logging step without a new update repeats the last value (an antithetic pair
    spans two logging windows in the study), and two real updates are never bit-equal."""
    return [value for i, value in enumerate(logged) if i == 0 or value != logged[i - 1]]


def diagnostics(table: dict, lets_methods: list[str]) -> list[str]:
    """How each LETS method moved ρ and whether its signal carried information, mean over seeds."""
    header = ["method", "task", "ρ updates", "pushed up", "mean SNR", "mean sign agreement", "ρ₀ → final ρ (seeds)",
              "CPU min/run"]
    lines = table_header(header)
    for method in lets_methods:
        for task in (t for t in TASKS if method in table.get(t, {})):
            cell, stats = table[task][method], []
            for run in cell["runs"]:
                log = run["log_history"]
                grads = np.array(_updates([e["rho_grad"] for e in log if "rho_grad" in e]))
                snr = [e["rho_grad_snr"] for e in log if "rho_grad_snr" in e]
                agreement = [e["rho_grad_sign_agreement"] for e in log if "rho_grad_sign_agreement" in e]
                stats.append((len(grads), np.mean(grads < 0) if grads.size else np.nan,
                              np.mean(snr) if snr else np.nan, np.mean(agreement) if agreement else np.nan))
            updates, up, snr, agreement = np.array(stats).T
            rho0 = split_method(method)[1]
            finals = ", ".join(f"{rho:.3g}" for rho in cell["final_rho"])
            lines.append(f"| {method} | {TASK_TITLES.get(task, task)} | {updates.mean():.0f} | {np.nanmean(up):.0%} | "
                         f"{np.nanmean(snr):.2f} | {np.nanmean(agreement):.2f} | {rho0 if rho0 else 'default'} → {finals} | "
                         f"{_minutes(_cpu_per_run(cell), 1)} |")
    return lines


def _t(values: np.ndarray) -> float:
    """Mean over its standard error: |t| < 2 is a mean indistinguishable from zero."""
    return values.mean() / (values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else np.nan


def signal_by_epoch(table: dict, methods: list[str]) -> list[str]:
    """Which factor of dF/dρ carries a mean: the gap and the inner product (`rho_inner`) of every logged update,
    in the first epoch and after it, pooled over seeds (per-seed t's in brackets for the gap); the share of
    logged dF/dρ < 0 (pushing ρ up) in each. The last column is (2/d)², d = |mean|/std of the later epochs'
    dF/dρ: how many updates a 2σ sign of it would take."""
    header = ["method", "task", "gap t, epoch 1 (seeds)", "gap t, later (seeds)", "inner t, epoch 1", "inner t, later",
              "dF/dρ t, later", "pushed up, epoch 1 / later", "updates for a 2σ sign"]
    lines = table_header(header)
    for method in methods:
        for task in (t for t in TASKS if method in table.get(t, {})):
            columns = {}
            for key in ("gen_gap", "rho_inner", "rho_grad"):
                for epoch, first in (("1", True), ("later", False)):
                    per_seed = [np.array([e[key] for e in run["log_history"] if key in e and (e["epoch"] <= 1) == first])
                                for run in table[task][method]["runs"]]
                    columns[key, epoch] = (np.concatenate(per_seed), [_t(v) for v in per_seed])
            later = columns["rho_grad", "later"][0]
            d = abs(later.mean()) / later.std(ddof=1) if later.size > 1 else np.nan
            cells = [f"{_t(columns['gen_gap', e][0]):+.1f} ({', '.join(f'{t:+.1f}' for t in columns['gen_gap', e][1])})"
                     for e in ("1", "later")]
            cells += [f"{_t(columns[key, e][0]):+.1f}" if columns[key, e][0].size else "–"
                      for key, e in (("rho_inner", "1"), ("rho_inner", "later"), ("rho_grad", "later"))]
            up = [np.mean(columns["rho_grad", e][0] < 0) if columns["rho_grad", e][0].size else np.nan for e in ("1", "later")]
            lines.append(f"| {method} | {TASK_TITLES.get(task, task)} | " + " | ".join(cells)
                         + f" | {up[0]:.0%} / {up[1]:.0%} | {(2 / d) ** 2:,.0f} |")
    return lines


def plot_rho_paths(table: dict, lets_methods: list[str], path: Path) -> None:
    tasks = [t for t in TASKS if any(m in table.get(t, {}) for m in lets_methods)]
    picks = oracle_picks(table)
    colors = {method: f"C{i % 10}" for i, method in enumerate(lets_methods)}

    def draw(ax, task):
        for method in (m for m in lets_methods if m in table[task]):
            for i, run in enumerate(table[task][method]["runs"]):
                points = [(e["step"], e["rho"]) for e in run["log_history"] if "rho" in e]
                ax.plot(*zip(*points), lw=0.9, alpha=0.8, color=colors[method], label=method if i == 0 else None)
        if task in picks:
            ax.axhline(float(picks[task].partition("@")[2]), color="black", ls="--", lw=1, label=ORACLE + " ρ")
        ax.set_yscale("log")

    if tasks:
        _task_panels(tasks, draw, "optimizer step", "ρ (log scale)", path)


def write_report(out_dir: Path, study_dir: Path = STUDY_DIR, seeds: int = 3) -> str:
    new = load_runs(out_dir)
    table = scores([run for run in load_runs(study_dir) if run["task"] in TASKS] + new)
    lets_methods = sorted({run["method"] for run in new if run["method"].startswith("lets-")},
                          key=lambda m: (split_method(m)[0], split_method(m)[1] or 0))
    planned = planned_methods()
    not_run = [task for task in TASKS if not any(method in table[task] for method in planned)]
    partial = any(len(table[task].get(method, {"runs": []})["runs"]) < seeds
                  for task in TASKS if task not in not_run for method in planned)
    cpu_hours = sum(run.get("cpu_time_s", 0) for run in new) / 3600
    text = "\n".join([
        "# Does LETS now find ρ by itself? (issue #34)", "",
        *(["**PARTIAL: runs are still to come; a cell with (n=k) has k of 3 seeds, a task without a row none "
           "yet.**", ""] if partial else []),
        *([f"**Not run: {', '.join(TASK_TITLES[task] for task in not_run)}, none of part 4's runs (the issue's "
           "CPU budget drops CoLA first); such a task's rows hold issue #15's runs only.**", ""] if not_run else []),
        "Dev score ×100, mean ± std over seeds; differences paired by seed. SAM grid, AdamW and one-step "
        "LETS-SAM are issue #15's saved runs (`benchmarks/results/glue-study`); the LETS runs here and SAM at 0.2 "
        "are new, with the same study profile.", "",
        "## The default and the best other estimator from each ρ₀", "",
        "The issue's part 4: the default (the paper's one-step estimator; from 0.05, issue #15's LETS-SAM, whose runs "
        "predate the validation passes' own random stream) and the "
        "best other estimator (antithetic windows, `+antithetic+lr0.2+k2`) from ρ₀ = 0.01, 0.05, 0.2, beside "
        "AdamW, oracle SAM and SAM at ρ₀ (0.2 run here). Differences are paired by seed.", "",
        *candidates_table(table, seeds), "",
        "### The issue's goals", "", *goals(table),
        "## ρ₀ robustness, every LETS run", "", *robustness(table, lets_methods, seeds), "",
        "## Diagnostics per estimator", "",
        "'pushed up': share of updates with dF/dρ < 0 (d/d log ρ in the log space); SNR: |mean|/std of dF/dρ over the last 20 updates, "
        "averaged over the logging steps; sign agreement: share of those updates with the mean's sign. Pure noise "
        "(20 independent zero-mean updates, normal or heavy-tailed) gives an SNR of 0.19 and a sign agreement of "
        "0.56-0.57: only values well above those carry signal. CPU: one-thread CPU minutes per run (median over "
        "seeds).", "",
        *diagnostics(table, lets_methods), "",
        "## The signal by epoch", "",
        "dF/dρ = gap × inner (`squared-gap`). t = mean / standard error of the values logged every 5 steps (one ρ "
        "update each for one-step LETS-SAM, issue #15's runs), pooled over seeds; |t| < 2 is a mean indistinguishable "
        "from zero. LETS measures L_train on the batch it is about to step on, which in the first epoch θ has never "
        "seen, as it has never seen D_val: the gap there estimates zero by construction. The antithetic rows' "
        "inner is Δ₊ − Δ₋ and their gap is measured in eval mode at window boundaries.", "",
        *signal_by_epoch(table, ["lets-sam"] + lets_methods), "",
        f"CPU time of the {len(new)} new runs: {cpu_hours:.1f} CPU-hours.", "",
    ])
    (out_dir / "rho_study.md").write_text(text)
    plot_rho_paths(table, lets_methods, out_dir / "rho_paths.png")
    for run in new:  # each LETS method's diagnostics, from its first STS-B seed
        if run["method"] in lets_methods and run["task"] == "stsb" and run["seed"] == 0:
            plot_rho_curve(run["log_history"], out_dir / "diagnostics" / f"{run['method']}.png")
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parents[1] / "results" / "glue-rho-study"))
    parser.add_argument("--study_dir", default=str(STUDY_DIR), help="issue #15's saved runs (AdamW, the SAM grid)")
    cli = parser.parse_args()
    print(write_report(Path(cli.out_dir), Path(cli.study_dir)))
