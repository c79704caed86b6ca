"""rho_curve.png itself (issue #47): a title that names the run, labels in the terms of the run's estimator, every
point inside its panel, readable dF/dρ ticks, and a line even from a run logged once."""

import math

import matplotlib.pyplot as plt
import pytest

from lets_hf import LETSArguments
from lets_hf.rho_curve import CURVES, rho_curve_figure


def _history() -> list[dict]:
    """Three logging steps of a LETS run whose dF/dρ changes sign at 1e-10 and whose sign agreement falls to 1/3."""
    values = [(0.049, 0.02, -3e-9, 1e-10, 2.0, 1.0), (0.048, 0.05, 2e-9, -1e-10, 0.1, 1 / 3),
              (0.050, -0.01, 4e-9, 1e-10, float("inf"), 0.5)]
    return [
        {"step": step, "epoch": step / 10, "loss": 0.7, "rho": rho, "gen_gap": gap, "gen_gap_mean": gap,
         "gen_gap_std": 0.01, "rho_inner": inner, "rho_inner_mean": inner, "rho_inner_std": 1e-9, "rho_grad": grad,
         "rho_grad_snr": snr, "rho_grad_sign_agreement": agreement}
        for step, (rho, gap, inner, grad, snr, agreement) in zip((5, 10, 15), values)
    ]


def _draw(log_history, args=None, task=None) -> dict:
    figure = rho_curve_figure(log_history, args, task)
    plt.close(figure)
    return figure, dict(zip([key for key in CURVES if any(key in entry for entry in log_history)], figure.axes))


def test_the_title_names_the_task_the_method_its_estimator_and_rho0():
    figure, _ = _draw(_history(), LETSArguments(learn_rho=True, rho_estimator="trace"), "GLUE SST-2")
    assert figure.get_suptitle() == "GLUE SST-2: LETS-SAM (trace estimator), ρ₀ = 0.05"  # ρ unset: SAM's default
    figure, _ = _draw(_history(), LETSArguments(sam_variant="asam", rho=0.2))
    assert figure.get_suptitle() == "ASAM, ρ₀ = 0.2"


def test_every_point_lies_inside_its_panel():
    _, panels = _draw(_history(), LETSArguments(learn_rho=True))
    for key, axis in panels.items():
        low, high = axis.get_ylim()
        for line in (line for line in axis.get_lines() if line.get_transform() == axis.transData):  # not axh/vline
            assert all(low <= y <= high for y in line.get_ydata() if math.isfinite(y)), key


def test_tiny_hypergradients_read_in_a_named_power_of_ten():
    """±1e-10 on a linear axis in units of 1e-10 (plain ticks −1, 0, 1), not symlog's −10⁻¹⁰, 0, 10⁻¹⁰."""
    _, panels = _draw(_history(), LETSArguments(learn_rho=True))
    axis = panels["rho_grad"]
    assert axis.get_yscale() == "linear" and "10$^{-10}$" in axis.get_ylabel()
    assert sorted(axis.get_lines()[0].get_ydata()) == pytest.approx([-1, 1, 1])
    inner = panels["rho_inner"]
    assert "10$^{-9}$" in inner.get_ylabel() and max(inner.get_lines()[0].get_ydata()) == pytest.approx(4)


@pytest.mark.parametrize(
    "settings, inner, derivative",
    [
        (dict(), "⟨∇L_val − ∇L_train, ∂θ/∂ρ⟩", "dF/dρ (×"),
        (dict(rho_objective="val-loss", rho_update_space="log"), "⟨∇L_val, ∂θ/∂ρ⟩", "dF/d log ρ (×"),
        (dict(rho_estimator="antithetic", rho_update_space="log"), "Δ₊ − Δ₋ (×", "dF/d log ρ ≈ (Δ₊ − Δ₋)/2δ (×"),
    ],
)
def test_the_labels_are_those_of_the_run_s_estimator(settings, inner, derivative):
    _, panels = _draw(_history(), LETSArguments(learn_rho=True, **settings))
    assert panels["rho_inner"].get_ylabel().startswith(inner)
    assert ("Δ" in panels["rho_inner"].get_ylabel()) == (settings.get("rho_estimator") == "antithetic")
    assert panels["rho_grad"].get_ylabel().startswith(derivative)


def test_a_run_logged_once_draws_rho_from_rho0_at_step_0():
    _, panels = _draw([{"step": 10, "loss": 0.7, "rho": 0.04}], LETSArguments(learn_rho=True, rho=0.05))
    assert panels["rho"].get_lines()[0].get_xydata().tolist() == [[0, 0.05], [10, 0.04]]
