"""2 processes × 4 examples equal 1 process × 8 on real 🤗 heads (accelerate launch, gloo):
θ, ρ, the logged loss and every gap, with `average_tokens_across_devices` on and off.

With it off, Trainer normalizes a token loss by each rank's own count, so 2 ranks equal one
only when the ranks hold equal token counts: the "off" runs use such data (`balanced`).
"""

from pathlib import Path

import pytest
import torch

from tests.distributed.launch import launch
from tests.heads import CASES, ESTIMATORS, EXPECTED_NORMALIZATION, GLOBAL_BATCH, HEADS, POLICIES, SAM_STEPS, train

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every head × case × average_tokens setting, trained in one 2-process launch."""
    out = tmp_path_factory.mktemp("two_ranks")
    launch(HERE / "train_heads.py", "--out", str(out))
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("average_tokens", ["on", "off"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("head", HEADS)
def test_two_ranks_equal_one_rank_with_the_same_global_batch(two_ranks, tmp_path, one_thread, head, case, average_tokens):
    key = f"{head}/{case}/{average_tokens}"
    ranks = [results[key] for results in two_ranks]
    assert all(run["world"] == 2 for run in ranks)  # really 2 processes, not one silently
    assert ranks[1]["rho"] == ranks[0]["rho"] and torch.equal(ranks[1]["theta"], ranks[0]["theta"])
    assert ranks[1]["gen_gap"] == ranks[0]["gen_gap"]
    one = train(head, case, str(tmp_path), batch=GLOBAL_BATCH, balanced=average_tokens == "off")
    two = ranks[0]
    torch.testing.assert_close(two["theta"], one["theta"], rtol=1e-6, atol=1e-7)
    assert two["rho"] == pytest.approx(one["rho"], rel=1e-6, abs=1e-6)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6, abs=2e-6)
    assert two["gen_gap"] == pytest.approx(one["gen_gap"], rel=1e-6, abs=2e-6)
    assert two["normalization"] == EXPECTED_NORMALIZATION[head][0]
    if case == "lets-sam":
        assert len(two["gen_gap"]) == 2 and abs(two["rho"] - 0.05) > 1e-3


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_two_ranks_equal_one_rank_with_the_new_estimators(two_ranks, tmp_path, one_thread, estimator):
    """The trace (val-loss objective, log space) and the antithetic windows: ρ identical on both ranks and
    equal to one process's with the same global batch."""
    ranks = [results[f"bert-classification/{estimator}"] for results in two_ranks]
    assert all(run["world"] == 2 for run in ranks)
    assert ranks[1]["rho"] == ranks[0]["rho"] and torch.equal(ranks[1]["theta"], ranks[0]["theta"])
    one = train("bert-classification", "lets-sam", str(tmp_path), batch=GLOBAL_BATCH, **ESTIMATORS[estimator])
    torch.testing.assert_close(ranks[0]["theta"], one["theta"], rtol=1e-6, atol=1e-7)
    assert ranks[0]["rho"] == pytest.approx(one["rho"], rel=1e-9) and abs(one["rho"] - 0.05) > 1e-3
    assert ranks[0]["gen_gap"] == pytest.approx(one["gen_gap"], rel=1e-6, abs=2e-6)


@pytest.mark.parametrize("policy", POLICIES)
def test_two_ranks_equal_one_rank_with_each_sam_policy(two_ranks, tmp_path, one_thread, policy):
    """Every rank takes the same branch (AE-SAM reads the gradient averaged over ranks, the random draw is the
    seed's, LookSAM counts steps), and 2 processes equal 1 with the same global batch, θ, ρ and which steps took SAM."""
    ranks = [results[f"bert-classification/{policy}"] for results in two_ranks]
    assert all(run["world"] == 2 for run in ranks)
    assert ranks[0]["sam_steps"] == ranks[1]["sam_steps"] == SAM_STEPS[policy]  # both kinds of step, on both ranks
    assert ranks[1]["rho"] == ranks[0]["rho"] and torch.equal(ranks[1]["theta"], ranks[0]["theta"])
    one = train("bert-classification", "lets-sam", str(tmp_path), batch=GLOBAL_BATCH, **POLICIES[policy])
    assert one["sam_steps"] == SAM_STEPS[policy]
    torch.testing.assert_close(ranks[0]["theta"], one["theta"], rtol=1e-6, atol=1e-7)
    assert ranks[0]["rho"] == pytest.approx(one["rho"], rel=1e-6) and abs(one["rho"] - 0.05) > 1e-3
