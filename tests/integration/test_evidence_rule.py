"""`rho_step_rule="evidence"` on a real head (BERT classification, float64): ρ moves only by its factor, with every
estimator, and a resumed run equals the uninterrupted one (the evidence since ρ's last move is in the checkpoint)."""

import math

import pytest
import torch

from tests.heads import ESTIMATORS, GLOBAL_BATCH, train

#: A low bar, so that a 6-step run moves ρ: the rule's statistics are tested in tests/unit/test_evidence.py.
EVIDENCE = dict(rho_step_rule="evidence", rho_evidence_min_updates=2, rho_evidence_threshold=0.5, max_steps=6,
                save_strategy="steps", save_steps=3)


@pytest.mark.parametrize("estimator", ["one-step", *ESTIMATORS])
def test_rho_moves_by_its_factor_and_resumes_exactly(tmp_path, one_thread, estimator):
    fields = {**EVIDENCE, **ESTIMATORS.get(estimator, {})}
    straight = train("bert-classification", "lets-sam", str(tmp_path / "straight"), batch=GLOBAL_BATCH, **fields)
    moves = math.log2(straight["rho"] / 0.05)
    assert moves != 0 and moves == round(moves)  # ρ₀ · 2^k: it moved, by whole factors only
    assert any("rho_evidence_t" in entry for entry in straight["log_history"])
    resumed = train("bert-classification", "lets-sam", str(tmp_path / "resumed"), batch=GLOBAL_BATCH,
                    resume=str(tmp_path / "straight" / "checkpoint-3"), **fields)
    assert resumed["rho"] == straight["rho"]
    torch.testing.assert_close(resumed["theta"], straight["theta"], rtol=0, atol=0)
