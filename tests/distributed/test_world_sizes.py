"""A LETSTrainer checkpoint written on N processes resumes on M (2 → 1, 1 → 2, 2 → 4) under DDP and under FSDP2,
with the same global batch of 8, and continues the N-process run: θ and ρ at step 4 equal the uninterrupted run's.

Float64 heads without dropout built from configs (tests.heads: BERT classification and GPT-2), so the only
difference between world sizes is the order in which gradients are summed: θ to 1e-9 relative (summation order,
amplified over two AdamW steps, stays near 1e-13; GPT-2's loss is computed in float32 by transformers, so 1e-6). What carries over: AdamW's moments, the warmup schedule, ρ with
its Adam state, ∂θ/∂ρ (the paper's estimator), the trace, the antithetic window, LightSAM's statistics and the data
position; the accumulation changes with the world size (tests/distributed/train_world_sizes.py, SPLITS). Resumes that cannot continue the run are refused, saying what to
change.
"""

from pathlib import Path

import pytest
import torch

from tests.distributed.launch import launch
from tests.distributed.train_world_sizes import CASES, MODES

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "train_world_sizes.py"
#: (written on, resumed on)
MOVES = [(2, 1), (1, 2), (2, 4)]

pytestmark = pytest.mark.distributed


def _launch(out: Path, processes: int, *args: str) -> list[dict]:
    launch(SCRIPT, "--out", str(out), *args, processes=processes, torchrun=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(processes)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """processes -> the ranks' results, DDP and FSDP2 alike: straight on 1 and on 2 processes (the latter also
    resuming the 1-process checkpoints), then resumed from 2 on 1 (with the refusals) and on 4."""
    root = tmp_path_factory.mktemp("world_sizes")
    one, two = root / "1", root / "2"
    return {
        "1 straight": _launch(one, 1, "--straight"),
        "2": _launch(two, 2, "--straight", "--resume-from", str(one)),
        "1 resumed": _launch(root / "1-resumed", 1, "--resume-from", str(two), "--refusals"),
        "4": _launch(root / "4", 4, "--resume-from", str(two)),
        "files": {mode: sorted(path.name for path in (two / mode / "straight" / "paper" / "checkpoint-2").iterdir())
                  for mode in MODES},
    }


def _straight(runs, processes: int) -> list[dict]:
    return runs["1 straight"] if processes == 1 else runs["2"]


def _resumed(runs, processes: int) -> list[dict]:
    return {1: runs["1 resumed"], 2: runs["2"], 4: runs["4"]}[processes]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("move", MOVES, ids=lambda move: f"{move[0]}to{move[1]}")
@pytest.mark.parametrize("mode", MODES)
def test_a_checkpoint_resumes_on_another_number_of_processes(runs, mode, move, case):
    written_on, resumed_on = move
    straight = _straight(runs, written_on)[0][f"{mode}/straight/{case}"]
    ranks = [rank[f"{mode}/resumed/{case}"] for rank in _resumed(runs, resumed_on)]
    assert straight["world"] == written_on and all(rank["world"] == resumed_on for rank in ranks)
    sharded = {"ddp": "Parameter", "fsdp2": "DTensor"}[mode]  # each launch runs DDP, then FSDP2
    assert straight["parameter_type"] == ranks[0]["parameter_type"] == sharded
    assert all(rank["rho"] == ranks[0]["rho"] for rank in ranks)  # one ρ on every rank
    assert straight["rho"] != 0.05  # ρ was learned, before and after the checkpoint
    # transformers' causal-LM loss casts the logits to float32 (`logits.float()`): GPT-2's sums in another order
    # differ at float32's rounding, as between 1 and 2 processes without a resume (test_ddp_real_heads.py)
    rtol, atol = (1e-6, 1e-7) if CASES[case][0] == "gpt2" else (1e-9, 1e-12)
    assert ranks[0]["rho"] == pytest.approx(straight["rho"], rel=rtol)
    torch.testing.assert_close(ranks[0]["theta"], straight["theta"], rtol=rtol, atol=atol)


def test_the_engine_state_is_one_file_under_ddp_and_resharded_shards_under_fsdp2(runs):
    """No per-rank files: under DDP one `lets_state.pt` any number of processes reads; under FSDP2 the shards of
    ∂θ/∂ρ in Distributed Checkpoint's format, beside Trainer's own sharded model and optimizer."""
    files = runs["files"]
    assert {"lets_state.pt", "lets_layout.json"} <= set(files["ddp"]) and "lets_state_shards" not in files["ddp"]
    assert {"lets_state.pt", "lets_layout.json", "lets_state_shards", "pytorch_model_fsdp_0"} <= set(files["fsdp2"])
    assert not [name for mode in MODES for name in files[mode] if name.startswith("lets_state_rank")]


@pytest.mark.parametrize("refused, says", [
    ("global batch", "Set per_device_train_batch_size × 1 process(es) × gradient_accumulation_steps = 8"),
    ("rho batch", "Set rho_batch_size to 8 / 1 processes"),
    ("local", "Resume on 2 process(es), or start a new run"),
    ("fsdp2", "it was written without FSDP2 and this run is under it"),
])
def test_a_resume_that_cannot_continue_the_run_is_refused(runs, refused, says):
    assert says in runs["1 resumed"][0]["refused"][refused]
