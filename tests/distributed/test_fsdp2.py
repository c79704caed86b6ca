"""FSDP2 equals DDP on the same global batch, and resumes exactly (2 CPU processes over gloo).

FSDP2 runs on CPU through the harness `tests/distributed/fsdp_on_cpu.py` (accelerate maps FSDP only
on GPU-like devices). Float64 models, so the two modes differ only by summation order.
"""

from pathlib import Path

import pytest
import torch

from tests.distributed.launch import launch
from tests.distributed.train_fsdp2 import RUNS, SFT_RUN
from tests.heads import POLICIES, SAM_STEPS, STEPS

HERE = Path(__file__).resolve().parent
EXAMPLE_CONFIG = HERE.parents[1] / "examples" / "accelerate_fsdp2.yaml"

pytestmark = pytest.mark.distributed


def _launch(out: Path, *args: str, **kwargs) -> list[dict]:
    launch(HERE / "train_fsdp2.py", "--out", str(out), *args, **kwargs)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("ddp"), "--mode", "ddp")


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("fsdp2"), "--mode", "fsdp2")


EXACT_RUNS = [run for run in RUNS if not run.endswith("-bf16")]


@pytest.mark.parametrize("run", EXACT_RUNS)
def test_fsdp2_equals_ddp(ddp, fsdp2, run):
    sharded, whole = fsdp2[0][run], ddp[0][run]
    assert sharded["world"] == whole["world"] == 2
    assert sharded["parameter_type"] == "DTensor" and whole["parameter_type"] == "Parameter"  # really sharded
    assert fsdp2[1][run]["rho"] == sharded["rho"]  # every rank holds the same ρ
    torch.testing.assert_close(fsdp2[1][run]["theta"], sharded["theta"], rtol=0, atol=0)
    torch.testing.assert_close(sharded["theta"], whole["theta"], rtol=1e-9, atol=1e-12)
    assert sharded["rho"] == pytest.approx(whole["rho"], rel=1e-12)
    assert sharded["loss"] == pytest.approx(whole["loss"], rel=1e-12)
    assert sharded["gen_gap"] == pytest.approx(whole["gen_gap"], rel=1e-9)
    assert sharded["normalization"] == whole["normalization"]
    if "/lets-" in run:  # ρ was learned: 2 updates, or 1 for the antithetic windows (steps 0-1 make one pair)
        assert len(sharded["gen_gap"]) == (1 if run.endswith("antithetic") else 2) and abs(sharded["rho"] - 0.05) > 1e-3


#: Synced backward passes per optimizer step, besides one per ρ update (the validation gradient): SAM's
#: first pass is reduce-scattered once for both micro-batches, then the second pass; BSAM adds a third.
BACKWARDS_PER_STEP = {"sam": 2, "asam": 2, "lets-sam": 2, "lets-bisam": 2, "bsam": 3, "lets-sam-last-batch": 2,
                      "lets-sam-next-batch": 2}


@pytest.mark.parametrize("run", [run for run in EXACT_RUNS if run.split("/")[1] in BACKWARDS_PER_STEP])
def test_fsdp2_reduces_each_pass_once(fsdp2, run):
    """With accumulation 2, FSDP2 reduce-scatters each pass's gradient once per step, not once per
    micro-batch; a ρ update adds the validation gradient (and BiSAM's ∇L_train)."""
    sharded = fsdp2[0][run]
    # + ∇L_train (BiSAM's; B_t's again for last-batch); next-batch validates on the first pass: B_t's alone
    per_update = 2 if run.endswith(("lets-bisam", "last-batch")) else 1
    backwards = STEPS * BACKWARDS_PER_STEP[run.split("/")[1]] + per_update * len(sharded["gen_gap"])
    assert sharded["reduce_scatters"] == backwards * sharded["fsdp_units"]


@pytest.mark.parametrize("policy", POLICIES)
def test_fsdp2_takes_the_same_sam_steps_as_ddp_and_reduces_a_plain_steps_gradient_once(ddp, fsdp2, policy):
    """Both ranks and both modes take SAM on the same steps (AE-SAM's norm is the sharded gradient's, one all-reduce),
    and a plain step costs one synced backward: 3 first passes, 2 second passes, 1 validation gradient."""
    run = f"bert-classification/policy-{policy}"
    sharded = fsdp2[0][run]
    assert sharded["sam_steps"] == fsdp2[1][run]["sam_steps"] == ddp[0][run]["sam_steps"] == SAM_STEPS[policy]
    assert abs(sharded["rho"] - 0.05) > 1e-3  # the one ρ update happened
    assert sharded["reduce_scatters"] == (STEPS + sum(SAM_STEPS[policy]) + 1) * sharded["fsdp_units"]


def test_fsdp2_equals_ddp_in_trl_sft(ddp, fsdp2):
    """TRL's SFTTrainer with LETS-SAM (float32 tiny Llama): FSDP2 = DDP to float32 rounding, TRL's token count too."""
    sharded, whole = fsdp2[0][SFT_RUN], ddp[0][SFT_RUN]
    assert sharded["parameter_type"] == "DTensor" and fsdp2[1][SFT_RUN]["rho"] == sharded["rho"]
    torch.testing.assert_close(sharded["theta"], whole["theta"], rtol=1e-5, atol=1e-6)
    assert sharded["rho"] == pytest.approx(whole["rho"], rel=1e-5) and abs(sharded["rho"] - 0.05) > 1e-3
    assert sharded["gen_gap"] == pytest.approx(whole["gen_gap"], rel=1e-3, abs=1e-6)
    assert sharded["num_tokens"] == whole["num_tokens"]


def test_fsdp2_bf16_trains_like_ddp_bf16(ddp, fsdp2):
    """bf16 differs by rounding only: DDP autocasts, FSDP2 all-gathers bf16 weights and computes the loss in
    bf16 (so its gap has bf16 resolution, 2^-7 near a loss of 1). θ stays within 1e-3; ρ is learned."""
    run = "bert-classification/lets-sam-bf16"
    sharded, whole = fsdp2[0][run], ddp[0][run]
    assert sharded["parameter_type"] == "DTensor" and fsdp2[1][run]["rho"] == sharded["rho"]
    torch.testing.assert_close(sharded["theta"], whole["theta"], rtol=1e-3, atol=1e-3)
    assert all(torch.isfinite(torch.tensor(sharded["loss"] + sharded["gen_gap"])))
    assert len(sharded["gen_gap"]) == 2 and abs(sharded["rho"] - 0.05) > 1e-3
    assert sharded["rho"] == pytest.approx(whole["rho"], rel=0.2)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """LETS-SAM with AdamW saved at step 2 and resumed, in both of Trainer's FSDP checkpoint formats."""
    return _launch(tmp_path_factory.mktemp("resume"), "--mode", "fsdp2", "--resume")


@pytest.mark.parametrize("case", ["FULL_STATE_DICT", "SHARDED_STATE_DICT", "trace", "looksam"])
def test_fsdp2_resume_is_exact(resumed, case):
    """Both checkpoint formats with the paper's estimator, the trace estimator and LookSAM's g_v (sharded format)."""
    for rank in resumed:
        runs = rank[case]
        assert "lets_state_shards" in runs["files"]  # u is sharded: Distributed Checkpoint's format
        assert runs["straight"]["rho"] != 0.05 and runs["resumed"]["rho"] == runs["straight"]["rho"]
        torch.testing.assert_close(runs["resumed"]["theta"], runs["straight"]["theta"], rtol=0, atol=0)


def test_the_example_accelerate_config_runs_fsdp2(ddp, tmp_path):
    """FSDP2 from `accelerate launch --config_file examples/accelerate_fsdp2.yaml` (environment variables,
    no fsdp in TrainingArguments) shards and equals DDP."""
    run = "bert-classification/lets-sam"
    ranks = _launch(tmp_path, "--mode", "accelerate_config", "--runs", run, config=EXAMPLE_CONFIG)
    assert ranks[0][run]["parameter_type"] == "DTensor" and ranks[1][run]["rho"] == ranks[0][run]["rho"]
    torch.testing.assert_close(ranks[0][run]["theta"], ddp[0][run]["theta"], rtol=1e-9, atol=1e-12)
    assert ranks[0][run]["rho"] == pytest.approx(ddp[0][run]["rho"], rel=1e-12)


def test_what_fsdp2_does_not_support_is_refused_when_launched(tmp_path):
    """The accelerate config never reaches TrainingArguments: the trainer itself refuses (here the local scope)."""
    message = "sam_scope='local' is not supported under FSDP2"
    ranks = _launch(
        tmp_path, "--mode", "accelerate_config", "--refused", message, "--override", "sam_scope=local",
        config=EXAMPLE_CONFIG,
    )
    assert all(message in rank["refused"] for rank in ranks)
