"""`rho_signal_probes` on a real head (BERT classification, float64): each probe logs what the estimator with its
decay and either objective would have used, on the same steps and validation batches; probes never change the run;
their traces resume exactly; settings they cannot follow are refused.

The reference for a probe is a second run with that estimator as its own: the estimators' hypergradients are
checked against hand-written and autograd references in test_rho_estimators.py and test_hypergradient.py. With ρ
frozen (a negligible SGD step) every run follows the same θ, so the values must agree to rounding.
"""

import re

import pytest
import torch

from lets_hf.errors import UsageError
from tests.heads import GLOBAL_BATCH, train

FROZEN = dict(rho_optimizer="sgd", rho_lr=1e-300, max_steps=5)
PROBES = [0.0, 0.5]


def logged(run: dict, key: str) -> list[float]:
    return [entry[key] for entry in run["log_history"] if key in entry]


def run(tmp_path, name: str, **fields) -> dict:
    return train("bert-classification", "lets-sam", str(tmp_path / name), batch=GLOBAL_BATCH, **fields)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_each_probe_logs_its_estimators_hypergradient_under_both_objectives(tmp_path, one_thread, accumulation):
    batch = dict(batch=GLOBAL_BATCH // accumulation, accumulation=accumulation)
    probed = train("bert-classification", "lets-sam", str(tmp_path / "probed"), rho_signal_probes=PROBES,
                   **batch, **FROZEN)
    assert len(logged(probed, "rho_grad")) == 4  # updates at steps 1-4, each with the probes beside it
    # the probe with the estimator's own decay (one-step) is the estimator itself, bit for bit
    assert logged(probed, "rho_probe_mu0_squared_gap") == logged(probed, "rho_grad")
    for estimator in ({"rho_estimator": "one-step"}, {"rho_estimator": "trace", "rho_trace_decay": 0.5}):
        mu = estimator.get("rho_trace_decay", 0.0)
        for objective in ("squared-gap", "val-loss"):
            own = train("bert-classification", "lets-sam", str(tmp_path / f"{mu}-{objective}"),
                        rho_objective=objective, **estimator, **batch, **FROZEN)
            torch.testing.assert_close(
                torch.tensor(logged(probed, f"rho_probe_mu{mu:g}_{objective.replace('-', '_')}")),
                torch.tensor(logged(own, "rho_grad")), rtol=1e-12, atol=0,
            )
            torch.testing.assert_close(own["theta"], probed["theta"], rtol=0, atol=0)  # the same θ throughout


@pytest.mark.parametrize("estimator", [{}, {"rho_estimator": "trace", "rho_trace_decay": 0.5}])
def test_probes_leave_the_run_unchanged(tmp_path, one_thread, estimator):
    """With a learned ρ updated every 2nd step: probes make every step tracked, which must not change the
    estimator's own u (the one-step estimator then recomputes it on steps whose u no update reads)."""
    fields = dict(rho_update_interval=2, max_steps=5, **estimator)
    plain = run(tmp_path, "plain", **fields)
    probed = run(tmp_path, "probed", rho_signal_probes=[0.9, 0.0], **fields)
    assert probed["rho"] == plain["rho"] != 0.05
    torch.testing.assert_close(probed["theta"], plain["theta"], rtol=0, atol=0)
    assert logged(probed, "rho_grad") == logged(plain, "rho_grad")
    # logged from the first ρ update on (a log repeats the last value between updates), as ρ's own
    assert [("rho_grad" in e) for e in probed["log_history"]] == [
        ("rho_probe_mu0.9_val_loss" in e) for e in probed["log_history"]]


def test_probe_traces_resume_exactly(tmp_path, one_thread):
    fields = dict(rho_signal_probes=[0.9], save_strategy="steps", save_steps=2, **FROZEN)
    straight = run(tmp_path, "straight", **fields)
    resumed = run(tmp_path, "resumed", resume=str(tmp_path / "straight" / "checkpoint-2"), **fields)
    after = [e for e in straight["log_history"] if e.get("step", 0) > 2 and "rho_probe_mu0.9_squared_gap" in e]
    again = [e for e in resumed["log_history"] if e.get("step", 0) > 2 and "rho_probe_mu0.9_squared_gap" in e]
    assert len(after) == 3
    for key in ("rho_probe_mu0.9_squared_gap", "rho_probe_mu0.9_val_loss"):
        assert [e[key] for e in again] == [e[key] for e in after]


@pytest.mark.parametrize(
    "fields, needs",
    [
        (dict(learn_rho=False), "learn_rho=True"),
        (dict(rho_estimator="antithetic", rho_update_space="log"), "rho_estimator='one-step'"),
        (dict(rho_hessian="exact"), "rho_hessian='diagonal'"),
        (dict(sam_policy="random"), "sam_policy='every'"),
        (dict(rho_signal_probes=[1.0]), "trace decays in [0, 1)"),
    ],
)
def test_settings_the_probes_cannot_follow_are_refused(tmp_path, fields, needs):
    from lets_hf import LETSConfig

    with pytest.raises(UsageError, match=re.escape(needs)):
        LETSConfig(output_dir=str(tmp_path), **{"sam_variant": "sam", "learn_rho": True, "rho_signal_probes": [0.0],
                                                **fields})
