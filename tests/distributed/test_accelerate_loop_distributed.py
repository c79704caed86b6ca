"""examples/accelerate_loop.py on 2 processes over gloo: LETS-SAM under `torchrun --nproc_per_node 2` (DDP) on 2 × 4
examples equals 1 process × 8 (θ and ρ to float64 rounding), and under FSDP2 (`accelerate launch --config_file
examples/accelerate_fsdp2.yaml`) equals DDP; a run resumed from its checkpoint equals the uninterrupted one bit for
bit, under DDP and under FSDP2 (shards of ∂θ/∂ρ in Distributed Checkpoint's format), and to float64 rounding on
another number of processes with the same global batch.

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


def launcher(name: str, processes: int) -> list[str]:
    """The command that starts the example: one process, `torchrun` (DDP over gloo) or `accelerate launch` with
    examples/accelerate_fsdp2.yaml (FSDP2, through the CPU harness)."""
    if name == "one process":
        return [sys.executable, str(EXAMPLE)]
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                str(EXAMPLE)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no", "--num_processes",
            str(processes), "--config_file", str(REPO_ROOT / "examples" / "accelerate_fsdp2.yaml"),
            str(HERE / "example_on_fsdp2.py")]


pytestmark = pytest.mark.distributed


def run_example(name: str, output_dir: Path, model: Path, *extra: str, processes: int = 2, accumulation: int = 1) -> dict:
    """LETS-SAM on 64 SST-2 rows (16 held out for ρ: two global ρ batches of 8), a global batch of 8 (per-device
    batch × processes × accumulation), checkpoints every 2 steps."""
    processes = 1 if name == "one process" else processes
    values = dict(
        task="sst2", data_dir=REPO_ROOT / "examples" / "data" / "glue", model_name_or_path=model, output_dir=output_dir,
        method="lets-sam", max_train_samples=64, rho_val_fraction=0.25, max_eval_samples=16, max_seq_length=32,
        per_device_train_batch_size=8 // processes // accumulation, gradient_accumulation_steps=accumulation,
        rho_batch_size=8 // processes, learning_rate=1e-3, max_train_steps=STEPS, logging_steps=1, checkpointing_steps=2,
    )
    command = [*launcher(name, processes), *(item for key, value in values.items() for item in (f"--{key}", str(value)))]
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
def one_rank(float64_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_rank")
    run_example("one process", out, float64_model)
    return out


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


@pytest.fixture(scope="module")
def fsdp2_one_rank(float64_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2_one_rank")
    run_example("fsdp2", out, float64_model, processes=1)
    return out


def _lets_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "lets_state.pt", weights_only=True)


def _results(run: Path) -> dict:
    return json.loads((run / "eval_results.json").read_text())


def test_two_ranks_equal_one_rank_with_the_same_global_batch(two_ranks, one_rank):
    final = two_ranks / f"checkpoint-{STEPS}"
    assert json.loads((final / "loop_state.json").read_text())["num_processes"] == 2  # not 2 one-process runs
    one, two = _results(one_rank), _results(two_ranks)
    assert two["rho"] == pytest.approx(one["rho"], rel=1e-10) and one["rho"] != 0.05
    assert two["rho"] == _lets_state(final)["radius"]["rho"].item()
    _assert_close(two_ranks, one_rank)


def test_fsdp2_equals_ddp(fsdp2, two_ranks):
    final = fsdp2 / f"checkpoint-{STEPS}"
    assert (final / "pytorch_model_fsdp_0").is_dir()  # really FSDP2: sharded model state, not DDP
    # ∂θ/∂ρ went to Distributed Checkpoint as each rank's shard; lets_state.pt holds a placeholder for it
    assert sorted(path.name for path in (final / "lets_state_shards").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert set(_lets_state(final)["radius"]["u"][0]) == {"dcp_key", "shape", "dtype"}
    assert _results(fsdp2)["rho"] == pytest.approx(_results(two_ranks)["rho"], rel=1e-12)
    _assert_close(fsdp2, two_ranks)


@pytest.mark.parametrize("launcher", ["torchrun", "fsdp2"])
def test_a_resumed_two_rank_run_equals_the_uninterrupted_one(launcher, float64_model, tmp_path, request):
    whole = request.getfixturevalue({"torchrun": "two_ranks", "fsdp2": "fsdp2"}[launcher])
    resumed = _resume(whole, tmp_path, launcher, float64_model, processes=2)

    assert _results(resumed) == _results(whole)
    expected, actual = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    straight, again = (_lets_state(run / f"checkpoint-{STEPS}") for run in (whole, resumed))
    assert torch.equal(straight["radius"]["rho"], again["radius"]["rho"])
    assert straight["rho_batches"] == again["rho_batches"]


#: (the run that wrote checkpoint-2, how the resume is launched, its processes, its accumulation): the global batch
#: stays 8.
MOVES = {
    "ddp 2 to 1, accumulating 2": ("two_ranks", "one process", 1, 2),
    "ddp 1 to 2": ("one_rank", "torchrun", 2, 1),
    "ddp 2 to 4": ("two_ranks", "torchrun", 4, 1),
    "fsdp2 2 to 1": ("fsdp2", "fsdp2", 1, 1),
    "fsdp2 1 to 2": ("fsdp2_one_rank", "fsdp2", 2, 1),
    "fsdp2 2 to 4": ("fsdp2", "fsdp2", 4, 1),
}


@pytest.mark.parametrize("move", MOVES)
def test_a_checkpoint_resumes_on_another_number_of_processes(move, float64_model, tmp_path, request):
    """The continuation equals the run that wrote the checkpoint to float64 rounding (the ranks sum gradients in
    another order): the same data position, ρ, ∂θ/∂ρ, optimizer and schedule."""
    written_by, launcher, processes, accumulation = MOVES[move]
    whole = request.getfixturevalue(written_by)
    resumed = _resume(whole, tmp_path, launcher, float64_model, processes=processes, accumulation=accumulation)
    assert json.loads((resumed / f"checkpoint-{STEPS}" / "loop_state.json").read_text())["num_processes"] == processes
    assert _results(resumed)["rho"] == pytest.approx(_results(whole)["rho"], rel=1e-9)
    _assert_close(resumed, whole)


def _resume(whole: Path, tmp_path: Path, launcher: str, model: Path, **launch) -> Path:
    """`whole`'s checkpoint-2 resumed with `--resume_from_checkpoint latest` in a fresh output folder."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    run_example(launcher, resumed, model, "--resume_from_checkpoint", "latest", **launch)
    return resumed


def _assert_close(run: Path, reference: Path) -> None:
    theta, expected = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert theta.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(theta[name], expected[name], rtol=1e-9, atol=1e-12)
