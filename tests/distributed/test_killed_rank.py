"""A rank killed mid-run, and a preemption, under torchrun on 2 CPU processes (gloo), with the launch command of
docs/many-gpus.md ("A killed rank"):

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nproc_per_node 2 --max-restarts 1 \
        --rdzv-backend c10d --rdzv-endpoint localhost:0 <program> ... --resume_from_checkpoint auto

- One rank SIGKILLed on torchrun's first attempt, (a) after the forward of a step's second (SAM) pass, at the perturbed
  θ, and (b) while a checkpoint is being written (some of its files staged, not yet published): torchrun restarts the
  group, which resumes from the last complete checkpoint and never loads what `.staging/` holds, and ends with the
  θ and ρ of the same command without the kill, bit for bit: the same processes run the same float64 operations in the
  same order from a checkpoint that holds θ, the optimizer, ρ and its state, every rank's RNG and the data position
  exactly. Both kills for `LETSTrainer` on tests.heads' BERT classification head with a learned ρ, (a) on its GPT-2
  (a causal LM), and (b) for
  examples/accelerate_loop.py (LETS-SAM on a float64 dropout-free BERT), whose own code stages its checkpoints. The
  restarted group also meets in a new store (see docs/many-gpus.md): the guard against the connectFullMesh failure,
  which is a race the restart does not always lose.
- SIGTERM to torchrun: it forwards the signal to every worker; `lets-hf` saves one complete checkpoint at the same
  step on every rank and each worker exits 75, but torchrun itself exits 1, so `lets-hf` also leaves
  `<output_dir>/preempted` for the job script; the requeued command resumes and ends as an uninterrupted run.

The kills and the wait for SIGTERM are hooks of tests/distributed/interrupted_run.py, armed on the first attempt only
(TORCHELASTIC_RESTART_COUNT=0), which also records what every attempt of every rank loads.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lets_hf import cli
from tests.distributed.test_accelerate_loop_distributed import float64_model  # noqa: F401 (a fixture)
from tests.integration.test_glue_cli import SHIPPED_GLUE

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "interrupted_run.py"
#: The documented command (docs/many-gpus.md). Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, torchrun's agent hosts the
#: workers' store for all attempts, and the restarted group reads the killed group's gloo addresses from it
#: ("Gloo connectFullMesh failed ... Connection refused", or a hang).
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"]
ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"}
STEPS = 6  # a checkpoint every 2 steps, in every program here
#: examples/accelerate_loop.py: LETS-SAM on 64 SST-2 rows (16 held out for ρ), 4 per process.
LOOP_FLAGS = ["--task", "sst2", "--data_dir", str(SHIPPED_GLUE), "--method", "lets-sam", "--max_train_samples", "64",
              "--rho_val_fraction", "0.25", "--max_eval_samples", "16", "--max_seq_length", "32",
              "--per_device_train_batch_size", "4", "--rho_batch_size", "4", "--learning_rate", "1e-3",
              "--max_train_steps", str(STEPS), "--logging_steps", "1", "--checkpointing_steps", "2"]
#: lets-hf glue: LETS-SAM on 64 SST-2 rows, 4 per process (on CPUs, torchrun needs --use_cpu to make one DDP group).
CLI_FLAGS = ["--task", "sst2", "--data_dir", str(SHIPPED_GLUE), "--report_to", "none", "--disable_tqdm", "true",
             "--use_cpu", "true", "--method", "lets-sam", "--max_train_samples", "64", "--rho_val_fraction", "0.25",
             "--max_eval_samples", "16", "--max_seq_length", "32", "--per_device_train_batch_size", "4",
             "--logging_steps", "1", "--max_steps", str(STEPS), "--save_strategy", "steps", "--save_steps", "2"]
TIMEOUT = 300

pytestmark = pytest.mark.distributed


def command(program: str, out: Path, *hook: str, flags: list[str] = ()) -> list[str]:
    """`program` is `trainer` (BERT classification), `trainer-gpt2` (the causal LM), `loop` or `lets-hf`."""
    base, gpt2, _ = program.partition("-gpt2")
    head = ["--head", "gpt2"] if gpt2 else []
    return [*TORCHRUN, str(SCRIPT), "--program", base, "--out", str(out), *head, *hook, "--", *flags]


def start(args: list[str], out: Path) -> subprocess.Popen:
    """torchrun in a session of its own (a test that fails ends every process it started), its output in a log."""
    out.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENV},
                            start_new_session=True)


def finish(process: subprocess.Popen, out: Path) -> int:
    try:
        return process.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"torchrun still ran after {TIMEOUT} s: {log_tail(out)}")


def log_tail(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()[-3000:]


def run(args: list[str], out: Path) -> None:
    code = finish(start(args, out), out)
    assert code == 0, log_tail(out)


def events(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"events_rank{rank}.jsonl").read_text().splitlines()]


def only(out: Path, rank: int, event: str, attempt: int | None = None) -> list[dict]:
    return [e for e in events(out, rank) if e["event"] == event and attempt in (None, e["attempt"])]


def final_theta_and_rho(program: str, out: Path) -> list[tuple[dict, float]]:
    """Each rank's final θ and ρ (the loop saves them once: its model and eval_results.json)."""
    if program.startswith("trainer"):
        finals = [torch.load(out / f"final_rank{rank}.pt") for rank in range(2)]
        assert all(final["world"] == 2 for final in finals)  # one group of 2, not 2 runs of 1
        return [({"theta": final["theta"]}, final["rho"]) for final in finals]
    return [(load_file(out / "model.safetensors"), json.loads((out / "eval_results.json").read_text())["rho"])]


def assert_same_theta_and_rho(program: str, out: Path, reference: Path) -> None:
    for (theta, rho), (expected_theta, expected_rho) in zip(final_theta_and_rho(program, out),
                                                            final_theta_and_rho(program, reference), strict=True):
        assert rho == expected_rho and rho != 0.05  # ρ was learned
        assert theta.keys() == expected_theta.keys()
        assert all(torch.equal(theta[name], expected_theta[name]) for name in theta)


def program_flags(program: str, model: Path) -> list[str]:
    return [*LOOP_FLAGS, "--model_name_or_path", str(model)] if program == "loop" else []


@pytest.fixture(scope="module")
def uninterrupted(float64_model, tmp_path_factory):
    """Each program's run by the same command without a kill, made when first asked for."""
    runs = {}

    def get(program: str) -> Path:
        if program not in runs:
            out = tmp_path_factory.mktemp("uninterrupted") / program
            run(command(program, out, flags=program_flags(program, float64_model)), out)
            runs[program] = out
        return runs[program]

    return get


#: (program, kill, step, rank, the checkpoint the restarted group must resume from). The second pass of step 5 is lost
#: with its rank, and checkpoint-4 holds steps 1-4; checkpoint-4 killed while written leaves checkpoint-2 the newest
#: complete one. LETSTrainer writes model and optimizer from rank 0 only, so rank 0 is killed with them staged; the
#: loop's rank 1 is killed after accelerate staged its part. The loop's second pass is the engine's, as LETSTrainer's:
#: a kill there would add 30 s of CI and no code path.
KILLS = {
    "trainer-second-pass": ("trainer", "second-pass", 5, 1, "checkpoint-4"),
    "trainer-checkpoint-write": ("trainer", "checkpoint-write", 4, 0, "checkpoint-2"),
    "trainer-gpt2-second-pass": ("trainer-gpt2", "second-pass", 5, 1, "checkpoint-4"),
    "loop-checkpoint-write": ("loop", "checkpoint-write", 4, 1, "checkpoint-2"),
}
#: A file the killed rank itself had staged before the kill.
STAGED_BY_THE_KILLED_RANK = {"trainer": "optimizer.pt", "loop": "random_states_{rank}.pkl"}


@pytest.mark.parametrize("case", KILLS)
def test_a_killed_rank_restarts_from_the_last_complete_checkpoint_and_ends_as_the_uninterrupted_run(
    case, uninterrupted, float64_model, tmp_path
):
    program, kill, step, rank, checkpoint = KILLS[case]
    out = tmp_path / "out"
    run(command(program, out, "--kill", kill, "--step", str(step), "--rank", str(rank),
                flags=program_flags(program, float64_model)), out)

    (killed,) = only(out, rank, "killed")
    assert killed["attempt"] == 0 and killed["step"] == step
    for r in range(2):  # torchrun restarted the group once, which met in a new store: not the killed group's
        starts = only(out, r, "start")
        assert [e["attempt"] for e in starts] == [0, 1] and starts[0]["store"] != starts[1]["store"], starts
    (found,) = only(out, 0, "found", attempt=1)
    assert found["checkpoints"] == [f"checkpoint-{n}" for n in range(2, int(checkpoint.split("-")[1]) + 1, 2)]
    if kill == "checkpoint-write":  # the half-written checkpoint was there, staged, when the group restarted
        assert found["staged"].keys() == {f"checkpoint-{step}"}
        assert STAGED_BY_THE_KILLED_RANK[program].format(rank=rank) in found["staged"][f"checkpoint-{step}"]
    else:
        assert found["staged"] == {}
    for r in range(2):  # the restarted group loaded the last complete checkpoint, and only from it
        assert [e["checkpoint"] for e in only(out, r, "resumed")] == [str(out / checkpoint)]
        loaded = [e["path"] for e in only(out, r, "torch.load", attempt=1)]
        assert loaded and all(Path(path).parent == out / checkpoint for path in loaded), loaded
        assert not any("/.staging/" in e["path"] for e in only(out, r, "torch.load"))
    assert not (out / ".staging").exists()
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert_same_theta_and_rho(program, out, uninterrupted(program))


def test_sigterm_to_torchrun_saves_one_checkpoint_on_every_rank_and_the_requeued_command_resumes_exactly(
    tiny_model, tmp_path
):
    flags = [*CLI_FLAGS, "--model_name_or_path", str(tiny_model)]
    reference = tmp_path / "uninterrupted"
    run(command("lets-hf", reference, flags=flags), reference)

    out = tmp_path / "out"
    torchrun = start(command("lets-hf", out, "--kill", "sigterm", "--step", "3", "--rank", "0", flags=flags), out)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "sigterm-wanted").exists() and torchrun.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    torchrun.send_signal(signal.SIGTERM)  # as SLURM signals the launcher
    code = finish(torchrun, out)

    # torchrun forwarded SIGTERM to both workers, which saved checkpoint-3 together and exited 75; torchrun exited 1
    # (its own SignalException) and did not restart them.
    assert code == 1, log_tail(out)
    assert only(out, 0, "sigterm") == [{"attempt": 0, "event": "sigterm", "step": 3, "received": True}]
    for rank in range(2):
        assert [(e["attempt"], e["code"]) for e in only(out, rank, "exit")] == [(0, cli.PREEMPTED_EXIT)]
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not (out / ".staging").exists() and not (out / "model.safetensors").exists()  # stopped, not finished
    saved = out / "checkpoint-3"
    assert json.loads((saved / "trainer_state.json").read_text())["global_step"] == 3
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(saved))  # each rank's part, at the same step
    marker = (out / cli.PREEMPTED_MARKER).read_text().splitlines()
    assert marker[0] == str(saved) and "--resume_from_checkpoint auto" in marker[1]

    run(command("lets-hf", out, flags=flags), out)  # the requeued job: the same command
    for rank in range(2):
        assert [e["checkpoint"] for e in only(out, rank, "resumed")] == [str(saved)]
    assert not (out / cli.PREEMPTED_MARKER).exists()
    expected, resumed = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[name], expected[name]) for name in expected)
    logs = [json.loads((folder / "trainer_state.json").read_text())["log_history"] for folder in (reference, out)]
    assert [e for e in logs[1] if "loss" in e] == [e for e in logs[0] if "loss" in e]  # losses and ρ, step by step
