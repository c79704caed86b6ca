"""Launched by tests/distributed/test_killed_rank.py under torchrun: a training program with a hook that, on
torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT=0), SIGKILLs one rank at a chosen point, or waits there
for the SIGTERM that the test sends to torchrun.

    python -m torch.distributed.run ... tests/distributed/interrupted_run.py --program P --out DIR \
        [--kill second-pass|checkpoint-write|sigterm --step K --rank R] [-- the program's flags]

Programs (`--out` is their output folder; every one resumes with `auto`, so one command serves every start):
- `trainer`: `LETSTrainer` on a `tests.heads` head (`--head`: BERT classification, or GPT-2, a causal LM; float64, no
  dropout) with a learned ρ,
  `resume_from_checkpoint="auto"`, a checkpoint every 2 steps; each rank saves its final θ and ρ (`final_rank<r>.pt`);
- `loop`: `examples/accelerate_loop.py` (its flags after `--`);
- `lets-hf`: `lets-hf glue` (its flags after `--`).

Kill points (rank `R`, optimizer step `K`, counted from 1):
- `second-pass`: after the forward of step K's second (SAM) pass, at the perturbed θ, before its backward;
- `checkpoint-write`: while `checkpoint-K` is written: `LETSTrainer` after the model and optimizer are staged, before
  the RNG states (as Ctrl-C in tests/integration/test_cli_resume.py); the loop after `Accelerator.save_state`, before
  the engine's state and the loop's; in both, before the rename that publishes it;
- `sigterm`: in step K, writes `<out>/sigterm-wanted` and waits until this process has got SIGTERM (the test sends it
  to torchrun, which forwards it).

Every rank appends what it does to `<out>/events_rank<r>.jsonl`, one JSON object a line with the attempt: `start` (with
the port of the store its process group meets in, and whether torchrun's agent hosts it), `found` (what
a restarted group found in the output folder before starting: complete checkpoints and what is staged), `resumed`
(the checkpoint the program loads), `torch.load` (every file loaded with it), `killed`, `exit` (lets-hf's exit code).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lets_hf import LETSEngine, LETSTrainer, checkpoints  # noqa: E402
from lets_hf.preemption import SaveOnSigterm  # noqa: E402
from tests.distributed.launch import leave_together  # noqa: E402
from tests.heads import GLOBAL_BATCH, train  # noqa: E402

ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
RANK = int(os.environ.get("RANK", "0"))
#: The trainer program's run: 6 steps (2 epochs of tests.heads' 24 rows), a checkpoint every 2.
TRAINER_STEPS, TRAINER_SAVE_STEPS = 6, 2
#: The SIGTERMs lets-hf's handler got (`--kill sigterm`).
SIGTERMS: list[int] = []


class Events:
    def __init__(self, out: Path):
        self.path = out / f"events_rank{RANK}.jsonl"

    def record(self, event: str, **fields) -> None:
        """Appended and flushed to disk at once: a SIGKILL may follow."""
        with open(self.path, "a") as file:
            file.write(json.dumps({"attempt": ATTEMPT, "event": event, **fields}) + "\n")
            file.flush()
            os.fsync(file.fileno())


def die(events: Events, where: str, **fields) -> None:
    events.record("killed", where=where, **fields)
    os.kill(os.getpid(), signal.SIGKILL)


def record_loads(events: Events, program: str) -> None:
    """What each attempt loads: the checkpoint the program resumes from, and every file torch.load reads."""
    original_load = torch.load

    def load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            events.record("torch.load", path=str(f))
        return original_load(f, *args, **kwargs)

    torch.load = load
    if program in ("trainer", "lets-hf"):
        original = LETSTrainer._load_from_checkpoint

        def load_from_checkpoint(self, resume_from_checkpoint, model=None):
            events.record("resumed", checkpoint=str(resume_from_checkpoint))
            return original(self, resume_from_checkpoint, model)

        LETSTrainer._load_from_checkpoint = load_from_checkpoint


def arm(events: Events, kill: str, step: int, rank: int, program: str, out: Path) -> None:
    """Install the kill (or the wait for SIGTERM) on this rank; other ranks and restarted attempts run unhooked."""
    if kill == "none" or ATTEMPT != 0 or RANK != rank:
        return
    if kill == "sigterm":
        on_sigterm = SaveOnSigterm._on_sigterm  # the handler lets-hf installs while it trains; it only sets a flag

        def recorded_on_sigterm(self, signum, frame):
            SIGTERMS.append(signum)
            on_sigterm(self, signum, frame)

        SaveOnSigterm._on_sigterm = recorded_on_sigterm
    if kill in ("second-pass", "sigterm"):
        second_passes = LETSEngine.second_passes

        def hooked(self, model, cached):
            if self.global_step + 1 != step:
                return second_passes(self, model, cached)
            if kill == "second-pass":
                handle = model.register_forward_hook(lambda *_: die(events, "second pass", step=step))
                try:
                    return second_passes(self, model, cached)
                finally:
                    handle.remove()
            wait_for_sigterm(events, out, step)
            return second_passes(self, model, cached)

        LETSEngine.second_passes = hooked
    elif program == "loop":
        import accelerate

        save_state = accelerate.Accelerator.save_state

        def hooked_save_state(self, output_dir=None, **kwargs):
            result = save_state(self, output_dir, **kwargs)
            if os.path.basename(os.path.normpath(output_dir)) == f"checkpoint-{step}":
                die(events, "checkpoint write", step=step, staged=sorted(os.listdir(output_dir)))
            return result

        accelerate.Accelerator.save_state = hooked_save_state
    else:
        save_rng_state = LETSTrainer._save_rng_state

        def hooked_save_rng_state(self, output_dir):
            if self.state.global_step == step:
                die(events, "checkpoint write", step=step, staged=sorted(os.listdir(output_dir)))
            return save_rng_state(self, output_dir)

        LETSTrainer._save_rng_state = hooked_save_rng_state


def wait_for_sigterm(events: Events, out: Path, step: int) -> None:
    """Ask the test for SIGTERM (to torchrun), and wait until torchrun has forwarded it to this process."""
    (out / "sigterm-wanted").touch()
    deadline = time.monotonic() + 120
    while not SIGTERMS and time.monotonic() < deadline:
        time.sleep(0.05)
    events.record("sigterm", step=step, received=bool(SIGTERMS))


def record_what_a_restart_finds(events: Events, out: Path) -> None:
    if ATTEMPT == 0 or RANK != 0:
        return
    staging = Path(checkpoints.staging_dir(str(out)))
    staged = {path.name: sorted(os.listdir(path)) for path in staging.iterdir()} if staging.is_dir() else {}
    events.record("found", checkpoints=sorted(path.name for path in out.glob("checkpoint-*")), staged=staged)


def run_trainer(out: Path, head: str) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", 1))
    run = train(head, "lets-sam", str(out), batch=GLOBAL_BATCH // world, resume="auto",
                max_steps=TRAINER_STEPS, save_strategy="steps", save_steps=TRAINER_SAVE_STEPS)
    torch.save({"theta": run["theta"], "rho": run["rho"], "world": run["world"]}, out / f"final_rank{RANK}.pt")
    leave_together()


def run_loop(out: Path, flags: list[str], events: Events) -> None:
    spec = importlib.util.spec_from_file_location("accelerate_loop", REPO / "examples" / "accelerate_loop.py")
    loop = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look themselves up there
    spec.loader.exec_module(loop)
    load_checkpoint = loop.load_checkpoint

    def recorded_load_checkpoint(accelerator, engine, config, checkpoint):
        events.record("resumed", checkpoint=str(checkpoint))
        return load_checkpoint(accelerator, engine, config, checkpoint)

    loop.load_checkpoint = recorded_load_checkpoint
    loop.main([*flags, "--output_dir", str(out), "--resume_from_checkpoint", "auto"])


def run_lets_hf(out: Path, flags: list[str], events: Events) -> None:
    from lets_hf import cli

    try:
        cli.main(["glue", *flags, "--output_dir", str(out), "--resume_from_checkpoint", "auto"])
    except SystemExit as exited:
        events.record("exit", code=exited.code)
        raise
    events.record("exit", code=0)


def main() -> None:
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser()
    parser.add_argument("--program", choices=["trainer", "loop", "lets-hf"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kill", choices=["none", "second-pass", "checkpoint-write", "sigterm"], default="none")
    parser.add_argument("--step", type=int, default=0)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--head", default="bert-classification", help="the trainer program's head (tests.heads)")
    args = parser.parse_args(own)
    args.out.mkdir(parents=True, exist_ok=True)
    events = Events(args.out)
    events.record("start", pid=os.getpid(), store=os.environ.get("MASTER_PORT"),
                  agent_store=os.environ.get("TORCHELASTIC_USE_AGENT_STORE"))
    record_what_a_restart_finds(events, args.out)
    record_loads(events, args.program)
    arm(events, args.kill, args.step, args.rank, args.program, args.out)
    if args.program == "trainer":
        run_trainer(args.out, args.head)
    elif args.program == "loop":
        run_loop(args.out, flags, events)
    else:
        run_lets_hf(args.out, flags, events)


if __name__ == "__main__":
    main()
