"""BLEU table and training curves of the translation benchmark, rebuilt from the saved per-run files alone.

    python benchmarks/iwslt14/report.py [--out_dir benchmarks/results/iwslt14]

writes results.md and curves.png into out_dir.
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

from lets_hf.methods import METHODS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from markdown_table import table_header, table_row  # noqa: E402
from saved_runs import load_runs, ordered  # noqa: E402  (shared by the benchmark scripts)

DATASET_ORDER = ("iwslt14-subset", "multi30k", "iwslt14")
#: Reported numbers: tokenized BLEU (fairseq's) of valid and, where the dataset has one, test.
BLEU_KEYS = {"eval_bleu": "valid BLEU", "test_bleu": "test BLEU"}
#: curves.png columns: log key, title; the learned ρ and the gap it follows exist for lets-* runs only.
CURVES = (
    ("loss", "train loss"),
    ("eval_loss", "valid loss"),
    ("rho", "ρ (lets-*)"),
    ("gen_gap", "gap L_ρ-val − L_train (lets-*)"),
)


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    std = f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else ""
    return f"{np.mean(values):.2f}{std} (n={len(values)})"


def markdown(runs: list[dict]) -> str:
    """Rows: methods; per dataset, the mean BLEU of each split over seeds; total wall time; final ρ."""
    grouped = defaultdict(list)
    for run in runs:
        grouped[run["dataset"], run["method"]].append(run)
    datasets = ordered({r["dataset"] for r in runs}, DATASET_ORDER)
    methods = ordered({r["method"] for r in runs}, METHODS)
    columns = [
        (d, key) for d in datasets for key in BLEU_KEYS if any(key in r["metrics"] for r in runs if r["dataset"] == d)
    ]
    header = ["method", *(f"{d} {BLEU_KEYS[key]}" for d, key in columns), "wall time (min, all runs)", "final ρ"]
    lines = [
        "Tokenized BLEU (fairseq-generate's, beam search), mean ± std over seeds (n = seeds). "
        "Wall time: training + evaluation + translation, summed over datasets and seeds.",
        "",
        *table_header(header),
    ]
    for method in methods:
        cells = [_cell([r["metrics"][key] for r in grouped[d, method] if key in r["metrics"]]) for d, key in columns]
        method_runs = [r for d in datasets for r in grouped[d, method]]
        wall = sum(r["wall_time_s"] for r in method_runs) / 60
        rho = "–"
        if method.startswith("lets-"):
            rho = ", ".join(f"{d} {_last_rho(grouped[d, method]):.3g}" for d in datasets if grouped[d, method])
        lines.append(table_row([method, *cells, f"{wall:.1f}", rho]))

    lines += ["", "Settings (`lets-hf iwslt14` flags, shared by every method and seed):", ""]
    for dataset in datasets:
        run = next(r for r in runs if r["dataset"] == dataset)
        argv = run["settings"]["argv"]
        flags = " ".join(f"{n} {v}" for n, v in zip(argv[::2], argv[1::2]) if n not in ("--method", "--seed"))
        steps = sorted({r["steps"] for r in runs if r["dataset"] == dataset})
        lines.append(f"- {dataset} (`{run['settings']['source']}`, {steps} steps): `{flags}`")
    return "\n".join(lines) + "\n"


def _last_rho(runs: list[dict]) -> float:
    """ρ at the end of training, mean over seeds."""
    return float(np.mean([[e["rho"] for e in r["log_history"] if "rho" in e][-1] for r in runs]))


def plot_curves(runs: list[dict], path: Path) -> None:
    """Rows: datasets; columns: CURVES; one colour per method, one line per seed."""
    datasets = ordered({r["dataset"] for r in runs}, DATASET_ORDER)
    methods = ordered({r["method"] for r in runs}, METHODS)
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    runs = sorted(runs, key=lambda r: (methods.index(r["method"]), r["seed"]))  # legend in table order
    fig, axes = plt.subplots(
        len(datasets), len(CURVES), figsize=(4.2 * len(CURVES), 3.0 * len(datasets)), squeeze=False
    )
    for row, dataset in enumerate(datasets):
        for col, (key, title) in enumerate(CURVES):
            ax = axes[row][col]
            for run in (r for r in runs if r["dataset"] == dataset):
                points = [(e["step"], e[key]) for e in run["log_history"] if key in e]
                if points and (key != "rho" or run["method"].startswith("lets-")):  # SAM's ρ is a constant
                    steps, values = zip(*points)
                    label = f"{run['method']} seed {run['seed']}"
                    marker = "." if key == "eval_loss" else None  # one point per epoch
                    ax.plot(steps, values, color=colours[run["method"]], lw=1.2, marker=marker, label=label)
            ax.set_title(f"{dataset} · {title}", fontsize=10)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: Path) -> None:
    out_dir = Path(out_dir)
    runs = load_runs(out_dir)
    table = markdown(runs)
    (out_dir / "results.md").write_text("# IWSLT'14 / Multi30k De-En benchmark\n\n" + table)
    plot_curves(runs, out_dir / "curves.png")
    print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parents[1] / "results" / "iwslt14"))
    write_report(parser.parse_args().out_dir)
