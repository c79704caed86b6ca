"""Launched by tests/distributed/test_world_sizes.py on 1, 2 or 4 processes (torchrun, gloo): LETSTrainer runs that
save at step 2 of 4, and runs that resume from another world size's checkpoint, under DDP and then under FSDP2 (the
CPU harness `fsdp_on_cpu`, Trainer's sharded checkpoint format), each with a global batch of 8.

`--straight`: the uninterrupted runs, saving `checkpoint-2`. `--resume-from DIR`: the same runs resumed from DIR's
`checkpoint-2` (written on another number of processes); `--refusals`, the resumes that must be refused. Each rank
saves its results (θ gathered, ρ, the refusals' messages) to `rank<r>.pt` in `--out`.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lets_hf.errors import UsageError  # noqa: E402
from tests.distributed import fsdp_on_cpu  # noqa: E402
from tests.distributed.launch import leave_together  # noqa: E402
from tests.distributed.train_fsdp2 import fsdp2  # noqa: E402
from tests.heads import ESTIMATORS, GLOBAL_BATCH, train  # noqa: E402

#: processes -> (per-device batch, accumulation): 8 examples per step on every world size.
SPLITS = {1: (4, 2), 2: (2, 2), 4: (2, 1)}
#: The state to carry: AdamW's moments and a warmup schedule; ρ's Adam; per case the estimator's or rule's state.
SETTINGS = dict(
    optim="adamw_torch", learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=1, rho_optimizer="adam",
    rho_lr=0.01, max_steps=4, save_strategy="steps", save_steps=2,
)
#: name -> (head, overrides): on BERT classification the paper's estimator (∂θ/∂ρ), the trace, the antithetic window
#: and LightSAM's statistics; on a causal LM (GPT-2, a token-mean loss over the global token count) the paper's.
CASES = {
    "paper": ("bert-classification", {}),
    "trace": ("bert-classification", ESTIMATORS["trace"]),
    "antithetic": ("bert-classification", ESTIMATORS["antithetic"]),
    "lightsam": ("bert-classification",
                 {"sam_variant": "lightsam-adagrad", "optim": "sgd", "learning_rate": 0.1, "rho_lr": 0.1}),
    "gpt2": ("gpt2", {}),
}
MODES = ("ddp", "fsdp2")


def run(out: Path, mode: str, world: int, case: str, resume: Path | None = None, **changes) -> dict:
    batch, accumulation = SPLITS[world]
    head, overrides = CASES[case]
    settings = {**SETTINGS, **overrides, **(fsdp2(head, "SHARDED_STATE_DICT") if mode == "fsdp2" else {}), **changes}
    done = train(head, "lets-sam", str(out), batch=batch, accumulation=accumulation,
                 resume=str(resume / "checkpoint-2") if resume else None, **settings)
    return {"theta": done["theta"], "rho": done["rho"], "world": done["world"],
            "parameter_type": type(next(done["model"].parameters())).__name__,
            "files": sorted(os.listdir(out / "checkpoint-2")) if (out / "checkpoint-2").is_dir() else []}


def refusal(out: Path, mode: str, world: int, case: str, resume: Path, **changes) -> str:
    try:
        run(out, mode, world, case, resume, **changes)
    except UsageError as error:
        return str(error)
    raise AssertionError(f"resuming {resume} on {world} process(es) with {changes} was not refused")


def refusals(out: Path, world: int, source: Path) -> dict[str, str]:
    """DDP resumes from `source` that cannot continue it; FSDP2 last (the harness keeps a process's first setup)."""
    _, accumulation = SPLITS[world]
    return {
        "global batch": refusal(out / "batch", "ddp", world, "paper", source / "paper",
                                gradient_accumulation_steps=accumulation * 2),
        "rho batch": refusal(out / "rho", "ddp", world, "paper", source / "paper",
                             rho_batch_size=GLOBAL_BATCH // world // 2),
        "local": refusal(out / "local", "ddp", world, "paper", source / "local", sam_scope="local"),
        "fsdp2": refusal(out / "fsdp2", "fsdp2", world, "paper", source / "paper"),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--straight", action="store_true", help="the uninterrupted runs, saving checkpoint-2")
    parser.add_argument("--resume-from", type=Path, help="a --straight launch's --out, on another world size")
    parser.add_argument("--refusals", action="store_true", help="with --resume-from: the resumes to refuse")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    fsdp_on_cpu.enable()
    world = int(os.environ.get("WORLD_SIZE", 1))
    results = {}
    for mode in MODES:  # DDP first: the harness keeps FSDP2 once a run has used it
        out, source = cli.out / mode, cli.resume_from / mode if cli.resume_from else None
        for case in CASES:
            if cli.straight:
                results[f"{mode}/straight/{case}"] = run(out / "straight" / case, mode, world, case)
            if source:
                results[f"{mode}/resumed/{case}"] = run(out / "resumed" / case, mode, world, case,
                                                        source / "straight" / case)
        if cli.straight and mode == "ddp" and world > 1:  # its state is each rank's own: refused on another world
            results["ddp/straight/local"] = run(out / "straight" / "local", mode, world, "paper", sam_scope="local")
        if cli.refusals and mode == "ddp":
            results["refused"] = refusals(out / "refused", world, source / "straight")
    torch.save(results, cli.out / f"rank{dist.get_rank() if dist.is_initialized() else 0}.pt")
    leave_together()


if __name__ == "__main__":
    main()
