"""Plot ρ, the generalization gap and dF/dρ from a run's Trainer log, and summarize them.

    lets-hf glue --task rte ... --method lets-sam --output_dir out/rte   # writes out/rte/trainer_state.json
    python benchmarks/rho_curve.py out/rte/trainer_state.json --out benchmarks/results/rte_lets_sam

Any LETSTrainer run works: the curves come from `state.log_history`, where LETSTrainer
logs `rho`, `gen_gap` and `rho_grad` at every logging step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lets_hf.rho_curve import plot_rho_curve, rho_history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trainer_state", help="trainer_state.json of a LETSTrainer run")
    parser.add_argument("--out", required=True, help="output stem: writes <out>.png and <out>.json")
    cli = parser.parse_args(argv)
    log_history = json.loads(Path(cli.trainer_state).read_text())["log_history"]
    history = rho_history(log_history)
    if not history:
        raise SystemExit(f"{cli.trainer_state} has no `rho` in its log: was it a LETSTrainer run with logging on?")
    stem = Path(cli.out)
    plot_rho_curve(log_history, stem.with_suffix(".png"))

    rhos = [entry["rho"] for entry in history]
    grads = [abs(entry["rho_grad"]) for entry in history if entry.get("rho_grad")]
    summary = {
        "steps": history[-1]["step"],
        "rho_first_logged": rhos[0],
        "rho_last": rhos[-1],
        "rho_min": min(rhos),
        "rho_max": max(rhos),
        "gen_gap_last": history[-1].get("gen_gap"),
        "abs_rho_grad_min": min(grads, default=None),
        "abs_rho_grad_max": max(grads, default=None),
    }
    stem.with_suffix(".json").write_text(json.dumps({"summary": summary, "log": history}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
