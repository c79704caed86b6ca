"""Real 2-process DDP on CPU (gloo) through `accelerate launch` with tests/distributed/configs/ddp.yaml."""

from pathlib import Path

import pytest
import torch

from lets_hf import available_rules
from tests.distributed.launch import launch

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "train_toy.py"
STEPS = 4

pytestmark = pytest.mark.distributed


def _run(out: Path, processes: int, *flags: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    launch(SCRIPT, "--out", str(out), "--steps", str(STEPS), *flags, processes=processes)
    results = [torch.load(out / f"rank{r}.pt") for r in range(processes)]
    assert all(r["world"] == processes for r in results)  # really 2 processes, not one silently
    return results


def _assert_ranks_identical(results):
    first = results[0]
    for other in results[1:]:
        assert other["rho"] == first["rho"]
        assert all(torch.equal(p, q) for p, q in zip(first["params"], other["params"]))


def test_global_scope_two_ranks_equal_one_rank_with_the_same_global_batch(tmp_path):
    flags = ("--scope", "global", "--learn_rho", "--accumulation", "2")
    two = _run(tmp_path / "two", 2, "--batch", "4", *flags)
    one = _run(tmp_path / "one", 1, "--batch", "8", *flags)
    _assert_ranks_identical(two)
    assert two[0]["rho"] == pytest.approx(one[0]["rho"], rel=1e-10) and one[0]["rho"] != 0.1
    for p, q in zip(two[0]["params"], one[0]["params"]):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    rho_updates = STEPS - 1
    # per step: one DDP all-reduce (second pass, last micro-batch) + one for the first-pass gradient;
    # per ρ update: one all-reduce of three scalars
    assert two[0]["counts"] == {"ddp_buckets": STEPS, "lets_hf": STEPS + rho_updates}


@pytest.mark.parametrize("variant", [rule for rule in available_rules() if rule != "bsam"])  # bsam: global only
def test_local_scope_never_all_reduces_the_first_pass(tmp_path, variant):
    flags = ("--variant", variant, "--scope", "local", "--learn_rho", "--accumulation", "2")
    two = _run(tmp_path / "two", 2, "--batch", "4", *flags)
    _assert_ranks_identical(two)
    assert two[0]["counts"] == {"ddp_buckets": STEPS, "lets_hf": STEPS - 1}  # only the ρ scalars


@pytest.mark.parametrize("variant", [rule for rule in available_rules() if rule != "sam"])
def test_every_rule_global_scope_two_ranks_equal_one_rank(tmp_path, variant):
    two = _run(tmp_path / "two", 2, "--batch", "4", "--variant", variant, "--learn_rho")
    one = _run(tmp_path / "one", 1, "--batch", "8", "--variant", variant, "--learn_rho")
    assert two[0]["rho"] == pytest.approx(one[0]["rho"], rel=1e-10)
    _assert_ranks_identical(two)
    for p, q in zip(two[0]["params"], one[0]["params"]):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["sam", "lightsam-adagrad"])
def test_local_scope_resume_restores_each_ranks_own_state(tmp_path, variant):
    """Each rank's ∂θ/∂ρ (and LightSAM statistics) comes from its own gradients: resuming must give them back."""
    flags = ("--batch", "4", "--variant", variant, "--scope", "local", "--learn_rho", "--accumulation", "2")
    straight = _run(tmp_path / "straight", 2, *flags, "--save_steps", "2")
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoint-2").glob("lets_state*")) == [
        "lets_state_rank0.pt", "lets_state_rank1.pt"
    ]
    resumed = _run(tmp_path / "resumed", 2, *flags, "--resume_from", str(tmp_path / "straight" / "checkpoint-2"))
    for a, b in zip(straight, resumed):
        assert a["rho"] == b["rho"]
        assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))
