"""The README's plain loop equals `LETSTrainer` on 2 processes (gloo): under DDP and under FSDP2 (the CPU
harness), accumulation 2, θ, ρ and the optimizer state, and ρ identical on every rank."""

from pathlib import Path

import pytest
import torch

from tests.distributed.launch import launch
from tests.distributed.train_loop import DDP_ONLY, RUNS
from tests.integration.test_engine_loop import assert_same_run

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def launched(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    launch(HERE / "train_loop.py", "--out", str(out), "--mode", request.param)
    return request.param, [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("run", RUNS)
def test_plain_loop_on_two_processes_equals_lets_trainer(launched, run):
    mode, ranks = launched
    if mode == "fsdp2" and run in DDP_ONLY:
        pytest.skip("refused under FSDP2")
    loop, trainer = ranks[0][run]["loop"], ranks[0][run]["trainer"]
    assert loop["world"] == trainer["world"] == 2  # really 2 processes
    assert ranks[0][run]["parameter_type"] == ("DTensor" if mode == "fsdp2" else "Parameter")  # really sharded
    assert ranks[1][run]["loop"]["rho"] == loop["rho"]  # every rank holds the same ρ
    torch.testing.assert_close(ranks[1][run]["loop"]["theta"], loop["theta"], rtol=0, atol=0)
    if "adamw" in run:
        assert all("exp_avg_sq" in state for state in loop["optimizer_state"])  # the state compared is there
    assert_same_run(loop, trainer, learned=RUNS[run][1] == "lets-sam")
