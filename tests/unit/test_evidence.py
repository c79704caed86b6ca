"""`rho_step_rule="evidence"` (lets_hf.evidence): against a hand computation, its false-move rate on zero-mean
streams, its detection of a biased one, and its state across a skipped step and a checkpoint."""

import math

import numpy as np
import pytest
import torch

from lets_hf import LETSArguments
from lets_hf.errors import UsageError
from lets_hf.evidence import EvidenceGate
from lets_hf.radius import Radius

DEFAULTS = LETSArguments()


def log_rho_paths(streams: np.ndarray) -> np.ndarray:
    """log ρ / ρ₀ after each hypergradient, for each row of `streams` (a seed's), under the default rule."""
    evidence = EvidenceGate(DEFAULTS.rho_evidence_threshold, DEFAULTS.rho_evidence_min_updates,
                            DEFAULTS.rho_evidence_factor, torch.device("cpu"), shape=(len(streams),))
    value, path = torch.ones(len(streams), dtype=torch.float64), []
    for grads in torch.from_numpy(streams).T:
        evidence.step_(value, grads)
        path.append(value.log())
    return torch.stack(path, dim=1).numpy()


def streams(kind: str, n: int, bias: float = 0.0) -> np.ndarray:
    """Seeds 0-99, a row each: unit-variance noise, normal or heavy-tailed (Student-t, 3 degrees of freedom)."""
    rows = []
    for seed in range(100):
        generator = np.random.default_rng(seed)
        rows.append(generator.standard_normal(n) if kind == "normal" else generator.standard_t(3, n) / math.sqrt(3))
    return np.stack(rows) + bias


def test_a_move_against_a_hand_computation():
    evidence, value = EvidenceGate(threshold=2.0, min_updates=2, factor=2.0, device=torch.device("cpu")), torch.ones(())
    value = value.double()
    for grad in (1.0, 2.0):  # n = 2: mean 1.5, std √0.5, t = 1.5 / (√0.5 / √2) = 3 ≥ 2: ρ halves (mean > 0)
        evidence.step_(value, torch.tensor(grad, dtype=torch.float64))
    assert value.item() == 0.5 and evidence.last_t.item() == pytest.approx(3.0)
    assert [t.item() for t in evidence.tensors()] == [0] * 6  # the evidence starts again at the new ρ
    for grad in (-1.0, 1.0, -3.0):  # t = −1 / (2 / √3) = −0.87: no move
        evidence.step_(value, torch.tensor(grad, dtype=torch.float64))
    assert value.item() == 0.5 and evidence.last_t.item() == pytest.approx(-math.sqrt(3) / 2)
    evidence.step_(value, torch.tensor(-5.0, dtype=torch.float64))  # n = 4: mean −2, t = −2 / (√(20/3) / 2) = −1.55
    assert value.item() == 0.5
    # n = 5: mean −2.6, s² = 6.8, but the values drift: lag-1 autocorrelation r = 11.04 / 27.2, less its bias:
    # r + (1 + 3r)/5 = 0.85, so the variance of the mean is s²/n·(1 + r)/(1 − r) and t = −0.64: still no move
    evidence.step_(value, torch.tensor(-5.0, dtype=torch.float64))
    r = 11.04 / 27.2 + (1 + 3 * 11.04 / 27.2) / 5
    assert value.item() == 0.5
    assert evidence.last_t.item() == pytest.approx(-2.6 / math.sqrt(6.8 / 5 * (1 + r) / (1 - r)))
    fresh = EvidenceGate(threshold=2.0, min_updates=2, factor=2.0, device=torch.device("cpu"))
    for grad in (-2.0, -3.0):  # n = 2, mean −2.5, s² = 0.5, r < 0 counts as 0: t = −5, ρ doubles
        fresh.step_(value, torch.tensor(grad, dtype=torch.float64))
    assert value.item() == 1.0 and fresh.last_t.item() == pytest.approx(-5.0)


@pytest.mark.parametrize("kind", ["normal", "heavy-tailed"])
def test_a_zero_mean_stream_of_1000_updates_moves_log_rho_by_less_than_0_1_on_95_of_100_seeds(kind):
    quiet = int((np.abs(log_rho_paths(streams(kind, 1000))[:, -1]) < 0.1).sum())
    assert quiet >= 95
    assert quiet == {"normal": 95, "heavy-tailed": 97}[kind]  # lets_hf.evidence quotes these


@pytest.mark.parametrize("kind", ["normal", "heavy-tailed"])
def test_a_stream_biased_by_a_fifth_of_its_std_moves_rho_2x_within_300_updates(kind):
    """A positive hypergradient says: shrink ρ. On most seeds it halves; never does it grow. Not on 95 of 100: after
    300 updates the bias is 3.5 standard errors from zero, and a test that stays quiet for 1,000 updates needs ~3."""
    paths = log_rho_paths(streams(kind, 300, bias=0.2))
    assert paths.max() <= 0
    halved = int((paths.min(axis=1) <= -math.log(2)).sum())
    assert halved == {"normal": 81, "heavy-tailed": 81}[kind]  # lets_hf.evidence quotes these


def autocorrelated_streams(phi: float, n: int) -> np.ndarray:
    """Seeds 0-99: zero-mean unit-variance AR(1) noise, x_t = φ·x_{t−1} + √(1 − φ²)·e_t (a trace's hypergradients
    share their ∂θ/∂ρ from one update to the next)."""
    rows = []
    for seed in range(100):
        noise, x, row = np.random.default_rng(seed).standard_normal(n), 0.0, []
        for e in noise:
            x = phi * x + math.sqrt(1 - phi * phi) * e
            row.append(x)
        rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize("phi, expected", [(0.5, 93), (0.9, 91), (0.99, 55)])
def test_correlated_zero_mean_streams_count_as_fewer_updates(phi, expected):
    """The t-statistic's standard error is widened by the lag-1 autocorrelation: without it these streams moved ρ on
    32, 84 and 94 of 100 seeds (φ = 0.5, 0.9, 0.99). φ = 0.99 holds ~5 independent updates in 1,000: no test can tell
    its noise from a signal (lets_hf.evidence says so)."""
    quiet = int((np.abs(log_rho_paths(autocorrelated_streams(phi, 1000))[:, -1]) < 0.1).sum())
    assert quiet == expected


def _radius(**fields) -> Radius:
    args = LETSArguments(learn_rho=True, rho_step_rule="evidence", rho_evidence_min_updates=3, **fields)
    return Radius(args, 0.05, torch.device("cpu"))


def test_the_radius_moves_on_evidence_only_and_keeps_its_optimizer_state_untouched():
    radius = _radius(rho_update_space="log")
    for inner in (1.0, 1.1, 0.9):  # squared gap: dF/dρ = gap·inner > 0 every time, and alike: ρ halves at n = 3
        radius.update(torch.tensor(0.5, dtype=torch.float64), torch.tensor(inner, dtype=torch.float64))
        radius.step_done()
    assert radius.value.item() == pytest.approx(0.025) and radius.step.item() == 0 and radius.exp_avg.item() == 0


def test_a_skipped_step_undoes_the_evidence_and_a_checkpoint_carries_it():
    radius = _radius()
    radius.update(torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    radius.step_done()
    radius.update(torch.tensor(0.5, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64))
    radius.skip_step()  # the optimizer skipped this step: its hypergradient is not evidence
    assert [t.item() for t in radius.evidence.tensors()] == [1, 0.5, 0.25, 0, 0.5, 0.5]  # n, Σ, Σ², lag, first, last
    resumed = _radius()
    resumed.load_state_dict(radius.state_dict())
    for copy in (radius, resumed):
        copy.update(torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    assert [t.item() for t in resumed.evidence.tensors()] == [t.item() for t in radius.evidence.tensors()] == [
        2, 1.5, 1.25, 0.5, 0.5, 1.0]


@pytest.mark.parametrize("fields", [{"rho_evidence_threshold": 0.0}, {"rho_evidence_min_updates": 1},
                                    {"rho_evidence_factor": 1.0}, {"rho_step_rule": "sometimes"}])
def test_settings_that_cannot_work_are_refused(fields):
    with pytest.raises(UsageError, match="rho_evidence|rho_step_rule"):
        LETSArguments(learn_rho=True, **{"rho_step_rule": "evidence", **fields})


def test_a_trace_too_long_for_the_rule_is_warned_about(caplog):
    with caplog.at_level("WARNING", logger="lets_hf.config"):
        LETSArguments(learn_rho=True, rho_step_rule="evidence", rho_estimator="trace", rho_trace_decay=0.999)
    assert "use a decay below 0.99" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lets_hf.config"):
        LETSArguments(learn_rho=True, rho_step_rule="evidence", rho_estimator="trace", rho_trace_decay=0.9)
    assert "decay below" not in caplog.text
