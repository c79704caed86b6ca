"""Issue #45's quality study: do SAM's cheap policies (AE-SAM, LookSAM, random) keep SAM's score?

    nice python benchmarks/glue/policy_study.py             # runs what is missing, then writes the table
    python benchmarks/glue/policy_study.py --report_only    # the table from the saved runs only

On the tasks where SAM differs from AdamW (CoLA, MRPC, RTE), each policy trains `sam@<oracle ρ>+<policy>` on
the seeds of issue #15's study (`run.py --profile study`), whose saved runs give SAM at the same ρ and AdamW at
the same seeds: the oracle ρ is that study's SAM grid's best on dev. Runs are saved under <out_dir>/runs as
run.py saves them: resumable, several workers may share the folder (run one per core, `OMP_NUM_THREADS=1`).
Writes <out_dir>/quality.md, labelled PARTIAL while runs are missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import run  # noqa: E402  (sibling script, not a package)
from markdown_table import table_header, table_row  # noqa: E402
from report import TASK_TITLES  # noqa: E402
from saved_runs import load_runs  # noqa: E402
from rho_study_report import _by_seed, _differences, _paired  # noqa: E402
from study_report import _cpu_per_run, oracle_picks, rho_of, scores  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
STUDY_DIR = RESULTS / "glue-study"
DEFAULT_OUT_DIR = RESULTS / "sam_policies" / "glue"
TASKS = ("cola", "mrpc", "rte")
POLICIES = ("ae-sam", "looksam", "random")


def oracle_rhos(study_dir: Path, tasks) -> dict[str, float]:
    """Per task, the ρ of the SAM grid's best mean dev score in issue #15's saved runs."""
    picks = oracle_picks(scores(load_runs(study_dir)))
    missing = [task for task in tasks if task not in picks]
    if missing:
        raise SystemExit(f"{study_dir} has no SAM grid for {missing}: run `python benchmarks/glue/run.py --profile "
                         f"study --tasks {' '.join(missing)} --out_dir {study_dir}` first.")
    return {task: rho_of(picks[task]) for task in tasks}


def sam_step_share(run_record: dict) -> float:
    """The share of SAM steps over the run: each log window's share weighted by the steps it covers."""
    log = [entry for entry in run_record["log_history"] if "sam_step_share" in entry]
    steps = np.diff([0] + [entry["step"] for entry in log])
    return float(np.average([entry["sam_step_share"] for entry in log], weights=steps))


def task_rows(task: str, rho: float, study: dict, policies: dict) -> list[str]:
    """One row per method: SAM and AdamW (issue #15's runs) as references, then each policy."""
    sam, adamw = study[task].get(f"sam@{rho:g}"), study[task].get("adamw")
    sam_std = float(np.std(sam["score"], ddof=1)) if sam and len(sam["score"]) > 1 else float("nan")
    adamw_cpu = _cpu_per_run(adamw) / 60 if adamw else float("nan")
    rows = []
    for name, cell, share in [("AdamW", adamw, 0.0), (f"SAM ρ={rho:g}", sam, 1.0)] + [
        (policy, policies.get(task, {}).get(f"sam@{rho:g}+{policy}"), None) for policy in POLICIES
    ]:
        if cell is None:
            rows.append(table_row([TASK_TITLES[task], name] + ["–"] * 8))
            continue
        scores_ = cell["score"]
        mean = f"{np.mean(scores_):.1f}" + (f" ± {np.std(scores_, ddof=1):.1f}" if len(scores_) > 1 else "")
        mine, sam_seeds, adamw_seeds = _by_seed(cell), _by_seed(sam), _by_seed(adamw)
        vs_sam, vs_adamw = _differences(mine, sam_seeds), _differences(mine, adamw_seeds)
        vs_sam_text, vs_adamw_text = _paired(mine, sam_seeds), _paired(mine, adamw_seeds)
        verdict = "–"
        if share is None and vs_sam and vs_adamw:
            within = abs(np.mean(vs_sam)) <= sam_std
            nearer = "SAM" if abs(np.mean(vs_sam)) <= abs(np.mean(vs_adamw)) else "AdamW"
            verdict = f"{'yes' if within else 'no'} (nearer {nearer})"
        if share is None:
            share = float(np.mean([sam_step_share(r) for r in cell["runs"]]))
        cpu = _cpu_per_run(cell) / 60
        rows.append(table_row([
            TASK_TITLES[task], name, f"{mean} (n={len(scores_)})", vs_sam_text if name != f"SAM ρ={rho:g}" else "",
            vs_adamw_text if name != "AdamW" else "", verdict, f"{share:.0%}",
            "–" if np.isnan(cpu) else f"{cpu:.1f}", "–" if np.isnan(cpu / adamw_cpu) else f"{cpu / adamw_cpu:.2f}x",
            f"{sam_std:.1f}" if name == f"SAM ρ={rho:g}" else "",
        ]))
    return rows


def write_report(out_dir: Path, study_dir: Path, tasks, seeds: int) -> str:
    rhos = oracle_rhos(study_dir, tasks)
    study = scores(load_runs(study_dir))
    runs_dir = out_dir / "runs"
    policies = scores(load_runs(out_dir)) if any(runs_dir.glob("*/*/seed*.json")) else {}
    expected = len(tasks) * len(POLICIES) * seeds
    done = sum(len(cell["runs"]) for cells in policies.values() for cell in cells.values())
    header = ["task", "method", "dev score", "− SAM (paired)", "− AdamW (paired)", "within SAM's seed noise",
              "SAM steps", "CPU min/run", "CPU vs AdamW", "SAM seed std"]
    lines = [
        "# SAM policies on GLUE: score against SAM at the same ρ and against AdamW",
        "",
        *([f"**PARTIAL: {done} of {expected} policy runs saved; the others are still to run.**", ""]
          if done < expected else []),
        "Dev score ×100 (MiniLM, issue #15's study profile: the same data, hyperparameters and seeds as its SAM "
        "grid and AdamW runs, which this table reuses). SAM runs at the grid's best ρ on dev for the task; each "
        "policy at that ρ with its default knobs. Differences are paired by seed, mean ± std (n seeds). 'Within "
        "SAM's seed noise': |policy − SAM| ≤ SAM's std over seeds; 'nearer': whether the policy's score is nearer "
        "SAM's or AdamW's. SAM steps: the share of optimizer steps that took SAM's second pass. CPU: one-thread "
        "CPU minutes of a whole run (median over seeds), and its ratio to AdamW's.",
        "",
        *table_header(header),
    ]
    for task in tasks:
        lines += task_rows(task, rhos[task], study, policies)
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality.md").write_text(text)
    return text


def main(argv=None) -> None:
    parser = run.study_parser(__doc__, TASKS, DEFAULT_OUT_DIR, STUDY_DIR, "the SAM grid and AdamW")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args(argv)
    out_dir, study_dir = Path(args.out_dir), Path(args.study_dir)
    rhos = oracle_rhos(study_dir, args.tasks)
    if not args.report_only:
        for task in args.tasks:
            run.main(["--profile", "study", "--tasks", task, "--methods",
                      *(f"sam@{rhos[task]:g}+{policy}" for policy in POLICIES),
                      "--seeds", *map(str, args.seeds), "--out_dir", str(out_dir), "--data_dir", args.data_dir])
    print(write_report(out_dir, study_dir, args.tasks, len(args.seeds)))


if __name__ == "__main__":
    main()
