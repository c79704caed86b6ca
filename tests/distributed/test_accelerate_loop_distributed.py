"""examples/accelerate_loop.py on 2 processes over gloo: LETS-SAM under `torchrun --nproc_per_node 2` (DDP) on 2 × 4
examples equals 1 process × 8 (θ and ρ to float64 rounding) with the same ρ on both ranks, and under FSDP2
(`accelerate launch --config_file examples/accelerate_fsdp2.yaml`) equals DDP; a run resumed from its checkpoint
equals the uninterrupted one bit for bit, under DDP and under FSDP2 (per-rank shards of ∂θ/∂ρ).

The model is float64 and dropout-free: 2 ranks draw dropout masks for 4 examples each where 1 process draws them
for 8, and float32 would leave only the reduction order's ~1e-7 to compare."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertModel, BertTokenizer

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
EXAMPLE = REPO_ROOT / "examples" / "accelerate_loop.py"
STEPS = 4
LAUNCHERS = {
    "one process": [sys.executable, str(EXAMPLE)],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE)],
    "fsdp2": [
        sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no",
        "--config_file", str(REPO_ROOT / "examples" / "accelerate_fsdp2.yaml"), str(HERE / "example_on_fsdp2.py"),
    ],
}

pytestmark = pytest.mark.distributed


def run_example(launcher: str, output_dir: Path, model: Path, *extra: str) -> dict:
    """LETS-SAM on 64 SST-2 rows (16 held out for ρ: two global ρ batches of 8), a global batch of 8, checkpoints
    every 2 steps."""
    values = dict(
        task="sst2", data_dir=REPO_ROOT / "examples" / "data" / "glue", model_name_or_path=model, output_dir=output_dir,
        method="lets-sam", max_train_samples=64, rho_val_fraction=0.25, max_eval_samples=16, max_seq_length=32,
        per_device_train_batch_size=8 if launcher == "one process" else 4, learning_rate=1e-3, max_train_steps=STEPS,
        logging_steps=1, checkpointing_steps=2,
    )
    command = [*LAUNCHERS[launcher], *(item for name, value in values.items() for item in (f"--{name}", str(value)))]
    command += extra
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0 and "terminate called without an active exception" in done.stderr:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)  # see launch.py
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((output_dir / "eval_results.json").read_text())


@pytest.fixture(scope="module")
def float64_model(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert-float64")
    model = BertModel.from_pretrained(tiny_model, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.double().save_pretrained(folder)
    BertTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def two_ranks(float64_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_ranks")
    run_example("torchrun", out, float64_model)
    return out


@pytest.fixture(scope="module")
def fsdp2(float64_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    run_example("fsdp2", out, float64_model)
    return out


def _lets_states(checkpoint: Path) -> list[dict]:
    return [torch.load(checkpoint / f"lets_state_rank{rank}.pt", weights_only=True) for rank in range(2)]


def test_two_ranks_equal_one_rank_with_the_same_global_batch(two_ranks, float64_model, tmp_path):
    final = two_ranks / f"checkpoint-{STEPS}"
    assert json.loads((final / "loop_state.json").read_text())["num_processes"] == 2  # not 2 one-process runs
    rank0, rank1 = _lets_states(final)
    assert torch.equal(rank0["radius"]["rho"], rank1["radius"]["rho"])
    assert all(torch.equal(a, b) for a, b in zip(rank0["radius"]["u"], rank1["radius"]["u"]))

    one = run_example("one process", tmp_path / "one", float64_model)
    two = json.loads((two_ranks / "eval_results.json").read_text())
    assert two["rho"] == pytest.approx(one["rho"], rel=1e-10) and one["rho"] != 0.05
    assert two["rho"] == rank0["radius"]["rho"].item()
    _assert_close(two_ranks, tmp_path / "one")


def test_fsdp2_equals_ddp(fsdp2, two_ranks):
    final = fsdp2 / f"checkpoint-{STEPS}"
    assert (final / "pytorch_model_fsdp_0").is_dir()  # really FSDP2: sharded model state, not DDP
    for state in _lets_states(final):  # each rank saved its own piece of ∂θ/∂ρ
        u = state["radius"]["u"][0]
        assert u["local_shard"].shape[0] < u["global_shape"][0]
    results, ddp = (json.loads((out / "eval_results.json").read_text()) for out in (fsdp2, two_ranks))
    assert results["rho"] == pytest.approx(ddp["rho"], rel=1e-12)
    _assert_close(fsdp2, two_ranks)


@pytest.mark.parametrize("launcher", ["torchrun", "fsdp2"])
def test_a_resumed_two_rank_run_equals_the_uninterrupted_one(launcher, float64_model, tmp_path, request):
    whole = request.getfixturevalue({"torchrun": "two_ranks", "fsdp2": "fsdp2"}[launcher])
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    results = run_example(launcher, resumed, float64_model, "--resume_from_checkpoint", "latest")

    assert results == json.loads((whole / "eval_results.json").read_text())
    expected, actual = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    final = f"checkpoint-{STEPS}"
    for straight, again in zip(_lets_states(whole / final), _lets_states(resumed / final)):  # rank by rank
        assert torch.equal(straight["radius"]["rho"], again["radius"]["rho"])
        assert straight["rho_batches"] == again["rho_batches"]


def _assert_close(run: Path, reference: Path) -> None:
    theta, expected = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert theta.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(theta[name], expected[name], rtol=1e-9, atol=1e-12)
