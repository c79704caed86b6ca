"""The ρ curve of a run: ρ, the generalization gap, the inner product, dF/dρ and its signal-to-noise diagnostics
over the optimizer steps, from Trainer's log."""

from __future__ import annotations

from pathlib import Path

CURVES = (
    ("rho", "ρ"),
    ("gen_gap", "L_val − L_train"),
    ("rho_inner", "⟨∇L_val (− ∇L_train), ∂θ/∂ρ⟩\nor Δ₊ − Δ₋ (antithetic)"),
    ("rho_grad", "dF/dρ (log space: dF/d log ρ),\nmean over the logging window"),
    ("rho_grad_snr", "SNR of dF/dρ, |mean|/std"),
    ("rho_grad_sign_agreement", "sign agreement of dF/dρ"),
)
#: Curves drawn with the running mean ± std of the last `rho_diagnostics_window` updates as a band.
BANDS = {"gen_gap", "rho_inner"}


def rho_history(log_history: list[dict]) -> list[dict]:
    """The training-log entries that carry ρ (LETSTrainer adds it at every logging step)."""
    return [entry for entry in log_history if "rho" in entry]


def epoch_starts(history: list[dict]) -> list[int]:
    """Steps of the logged entries where a new epoch has begun. In the first epoch LETS's L_train comes from
    batches θ has not seen yet, as L_val does: the gap estimates zero there, so the curves mark where it ends."""
    starts, epoch = [], 1
    for entry in history:
        while entry.get("epoch", 0) > epoch:
            starts.append(entry["step"])
            epoch += 1
    return starts


def plot_rho_curve(log_history: list[dict], path: str | Path) -> Path | None:
    """Save the curves of `CURVES` that the log holds as a PNG, one panel each under ρ; `None` when the log
    has no ρ. The diagnostics panels say whether ρ's signal means anything: a band that straddles 0, an SNR
    near 0 or a sign agreement near 0.5 mean the updates are noise."""
    history = rho_history(log_history)
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(key, label) for key, label in CURVES if any(key in entry for entry in history)]
    figure, axes = plt.subplots(len(curves), 1, figsize=(7, 2.2 * len(curves)), sharex=True, squeeze=False)
    for axis, (key, label) in zip(axes[:, 0], curves):
        points = [(entry["step"], entry[key]) for entry in history if key in entry]
        axis.plot(*zip(*points), marker=".", linewidth=1, label="logged")
        if key in BANDS:
            band = [(e["step"], e[f"{key}_mean"], e[f"{key}_std"]) for e in history if f"{key}_mean" in e]
            if band:
                steps, means, stds = (list(column) for column in zip(*band))
                axis.plot(steps, means, color="black", linewidth=1, label="running mean ± std")
                axis.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                                  color="gray", alpha=0.3)
                axis.legend(fontsize=7, loc="best")
            axis.axhline(0, color="red", linewidth=0.6)
        if key == "rho_grad_sign_agreement":
            axis.axhline(0.5, color="red", linewidth=0.6)  # coin flips
            axis.set_ylim(0.4, 1.02)
        axis.set_ylabel(label, fontsize=8)
        axis.grid(alpha=0.3)
        if key == "rho_grad":
            nonzero = [abs(v) for _, v in points if v]
            axis.set_yscale("symlog", linthresh=max(1e-14, min(nonzero)) if nonzero else 1e-12)
    for step in epoch_starts(history):
        for axis in axes[:, 0]:
            axis.axvline(step, color="gray", linestyle=":", linewidth=1)
    axes[-1, 0].set_xlabel("optimizer step (dotted: the first logging step of a new epoch)")
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
        lines.append(f"ρ curve (ρ, gap L_val − L_train, dF/dρ and its signal-to-noise over the steps): {curve}")
    lines.append(f"Training log: {output_dir / 'trainer_state.json'}")
    return "\n".join(lines)
