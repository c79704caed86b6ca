"""The ρ curve of a run: ρ, the generalization gap and dF/dρ over the optimizer steps, from Trainer's log."""

from __future__ import annotations

from pathlib import Path

CURVES = (("rho", "ρ"), ("gen_gap", "L_val − L_train"), ("rho_grad", "dF/dρ (mean over the logging window)"))


def rho_history(log_history: list[dict]) -> list[dict]:
    """The training-log entries that carry ρ (LETSTrainer adds it at every logging step)."""
    return [entry for entry in log_history if "rho" in entry]


def plot_rho_curve(log_history: list[dict], path: str | Path) -> Path | None:
    """Save the curves of `CURVES` that the log holds as a PNG; `None` when the log has no ρ."""
    history = rho_history(log_history)
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(key, label) for key, label in CURVES if any(key in entry for entry in history)]
    figure, axes = plt.subplots(len(curves), 1, figsize=(7, 2.4 * len(curves)), sharex=True, squeeze=False)
    for axis, (key, label) in zip(axes[:, 0], curves):
        points = [(entry["step"], entry[key]) for entry in history if key in entry]
        axis.plot(*zip(*points), marker=".", linewidth=1)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if key == "rho_grad":
            nonzero = [abs(v) for _, v in points if v]
            axis.set_yscale("symlog", linthresh=max(1e-14, min(nonzero)) if nonzero else 1e-12)
    axes[-1, 0].set_xlabel("optimizer step")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def report_outputs(trainer, result_files: list[str]) -> str:
    """Save `rho_curve.png` beside the results and say where both are (the last lines a CLI run prints)."""
    output_dir = Path(trainer.args.output_dir).resolve()
    lines = [f"Results: {', '.join(str(output_dir / name) for name in result_files)}"]
    curve = plot_rho_curve(trainer.state.log_history, output_dir / "rho_curve.png")
    if curve is not None:
        lines.append(f"ρ curve (ρ, gap L_val − L_train, dF/dρ over the steps): {curve}")
    lines.append(f"Training log: {output_dir / 'trainer_state.json'}")
    return "\n".join(lines)
