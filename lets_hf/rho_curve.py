"""The ρ curve of a run: ρ, the generalization gap, the inner product, dF/dρ and its signal-to-noise diagnostics
over the optimizer steps, from Trainer's log."""

from __future__ import annotations

import math
from pathlib import Path

from .rules import initial_rho

#: The panels, top to bottom; each is drawn when the log holds its key.
CURVES = ("rho", "gen_gap", "rho_inner", "rho_grad", "rho_grad_snr", "rho_grad_sign_agreement")
#: Curves drawn with the running mean ± std of the last `rho_diagnostics_window` updates as a band.
BANDS = {"gen_gap", "rho_inner"}
#: Curves whose sign is the signal: a red line marks 0.
SIGNED = {"gen_gap", "rho_inner", "rho_grad"}
#: Curves of tiny values (1e-12 to 1e-6), drawn in units of the power of ten their label names: plain tick numbers
#: on a linear axis, where a sign change reads at a glance.
SCALED = {"rho_inner", "rho_grad"}


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


def run_title(args=None, task: str | None = None) -> str:
    """`GLUE SST-2: LETS-SAM (one-step estimator), ρ₀ = 0.05`: which run the curves are of (what is known of it)."""
    parts = [task] if task else []
    if args is not None:
        method = args.sam_variant.upper()
        if args.learn_rho:
            method = f"LETS-{method} ({args.rho_estimator} estimator)"
        parts.append(f"{method}, ρ₀ = {initial_rho(args):g}")
    return ": ".join(parts) or "ρ curve"


def curve_labels(args=None) -> dict[str, tuple[str, str]]:
    """Each panel's quantity and the note under it, in the terms of the run's estimator, objective and ρ update
    space; without the run's arguments (a saved log read alone), both readings of the inner product and of dF/dρ."""
    window_mean = "mean over the logging window"
    if args is None:
        derivative, grad = "dF/dρ", ("dF/dρ or dF/d log ρ", window_mean)
        inner = ("⟨∇L_val (− ∇L_train), ∂θ/∂ρ⟩", "or Δ₊ − Δ₋ (antithetic)")
    else:
        derivative = "dF/d log ρ" if args.rho_update_space == "log" else "dF/dρ"
        if args.rho_estimator == "antithetic":
            grad = (f"{derivative} ≈ (Δ₊ − Δ₋)/2δ", window_mean)
            inner = ("Δ₊ − Δ₋", "L_val's change, ρe$^{+\\delta}$ − ρe$^{-\\delta}$ window")
        else:
            grad = (derivative, window_mean)
            gradients = "∇L_val − ∇L_train" if args.rho_objective == "squared-gap" else "∇L_val"
            inner = (f"⟨{gradients}, ∂θ/∂ρ⟩", "")
    return {
        "rho": ("ρ", ""),
        "gen_gap": ("L_val − L_train", ""),
        "rho_inner": inner,
        "rho_grad": grad,
        "rho_grad_snr": (f"SNR of {derivative}", "|mean|/std"),
        "rho_grad_sign_agreement": (f"sign agreement of {derivative}", ""),
    }


def power_of_ten(values: list[float]) -> int:
    """The exponent that brings the largest finite |value| into [1, 10)."""
    largest = max((abs(value) for value in values if math.isfinite(value)), default=0.0)
    return math.floor(math.log10(largest)) if largest > 0 else 0


def rho_curve_figure(log_history: list[dict], args=None, task: str | None = None):
    """The matplotlib figure of `plot_rho_curve` (the caller closes it); `None` when the log has no ρ.

    `args` (the run's `LETSArguments`) gives the title its method and ρ₀, the labels their estimator, and the ρ
    curve its start at step 0: a run logged once still draws a line from ρ₀."""
    history = rho_history(log_history)
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = curve_labels(args)
    keys = [key for key in CURVES if any(key in entry for entry in history)]
    figure, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False,
                                layout="constrained")
    figure.suptitle(run_title(args, task), fontsize=10)
    for axis, key in zip(axes[:, 0], keys):
        points = [(entry["step"], entry[key]) for entry in history if key in entry]
        if key == "rho" and args is not None and points[0][0] > 0:
            points.insert(0, (0, initial_rho(args)))
        exponent = power_of_ten([value for _, value in points]) if key in SCALED else 0
        scale = 10.0**-exponent
        axis.plot([step for step, _ in points], [value * scale for _, value in points], marker=".", linewidth=1,
                  label="logged")
        if key in BANDS:
            band = [(e["step"], e[f"{key}_mean"] * scale, e[f"{key}_std"] * scale) for e in history
                    if f"{key}_mean" in e]
            if band:
                steps, means, stds = (list(column) for column in zip(*band))
                axis.plot(steps, means, color="black", linewidth=1, label="running mean ± std")
                axis.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                                  color="gray", alpha=0.3)
                axis.legend(fontsize=7, loc="best")
        if key in SIGNED:
            axis.axhline(0, color="red", linewidth=0.6)
        if key == "rho_grad_sign_agreement":
            axis.axhline(0.5, color="red", linewidth=0.6)  # coin flips
            axis.set_ylim(-0.05, 1.05)  # a share: all of [0, 1], with room for the markers at its ends
        quantity, note = labels[key]
        unit = f" (×10$^{{{exponent}}}$)" if exponent else ""
        axis.set_ylabel(f"{quantity}{unit}\n{note}" if note else f"{quantity}{unit}", fontsize=8)
        axis.grid(alpha=0.3)
    starts = epoch_starts(history)
    for step in starts:
        for axis in axes[:, 0]:
            axis.axvline(step, color="gray", linestyle=":", linewidth=1)
    axes[-1, 0].set_xlabel("optimizer step" + (" (dotted: the first logging step of a new epoch)" if starts else ""))
    return figure


def plot_rho_curve(log_history: list[dict], path: str | Path, args=None, task: str | None = None) -> Path | None:
    """Save the curves of `CURVES` that the log holds as a PNG, one panel each under ρ, titled with `task` and the
    run's `args`; `None` when the log has no ρ. The diagnostics panels say whether ρ's signal means anything: a band
    that straddles 0, an SNR near 0 or a sign agreement near 0.5 mean the updates are noise."""
    figure = rho_curve_figure(log_history, args, task)
    if figure is None:
        return None
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def report_outputs(trainer, result_files: list[str], task: str | None = None) -> str:
    """Save `rho_curve.png` (titled with `task` and the run's method) beside the results and say where both are
    (the last lines a CLI run prints)."""
    output_dir = Path(trainer.args.output_dir).resolve()
    lines = [f"Results: {', '.join(str(output_dir / name) for name in result_files)}"]
    curve = plot_rho_curve(trainer.state.log_history, output_dir / "rho_curve.png", trainer.args, task)
    if curve is not None:
        lines.append(f"ρ curve (ρ, gap L_val − L_train, dF/dρ and its signal-to-noise over the steps): {curve}")
    lines.append(f"Training log: {output_dir / 'trainer_state.json'}")
    return "\n".join(lines)
