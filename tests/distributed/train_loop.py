"""Launched by tests/distributed/test_loop.py with 2 processes: each run of `RUNS` trained by the README's
plain loop (`tests.loop`, an `Accelerator` from the launch) and by `LETSTrainer`, under DDP or FSDP2
(`--mode`; FSDP2 through the CPU harness `fsdp_on_cpu`), accumulation 2; saves each rank's results."""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate import Accelerator, FullyShardedDataParallelPlugin  # noqa: E402

from tests.distributed import fsdp_on_cpu  # noqa: E402
from tests.distributed.launch import leave_together  # noqa: E402
from tests.distributed.train_fsdp2 import LAYERS, fsdp2  # noqa: E402
from tests.heads import GLOBAL_BATCH, train  # noqa: E402
from tests.loop import plain_loop  # noqa: E402

ACCUMULATION = 2
#: name -> (head, case of tests.heads, fields shared by the loop and the trainer)
RUNS = {
    "bert-classification/sam": ("bert-classification", "sam", {}),
    "bert-classification/bsam": ("bert-classification", "sam", {"sam_variant": "bsam"}),
    "bert-classification/lets-sam": ("bert-classification", "lets-sam", {}),
    "bert-classification/lets-asam-adamw": (
        "bert-classification", "lets-sam",
        {"sam_variant": "asam", "optim": "adamw_torch", "learning_rate": 1e-3, "rho_optimizer": "adam", "rho_lr": 0.01},
    ),
    "bert-regression/lets-sam": ("bert-regression", "lets-sam", {}),
    "bert-classification/lets-sam-exact": ("bert-classification", "lets-sam", {"rho_hessian": "exact"}),
}
#: The exact Hessian-vector product is refused under FSDP2 (README, "Limits"): DDP only.
DDP_ONLY = ("bert-classification/lets-sam-exact",)
# GPT-2 and BART are compared in one process (tests/integration/test_engine_loop.py): on several processes a loop's
# per-rank token mean differs from Trainer's mean over the global token count unless every rank holds as many tokens.


def loop_accelerator(mode: str, head: str) -> Accelerator:
    plugin = None
    if mode == "fsdp2":
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=[LAYERS[head]],
        )
    return Accelerator(gradient_accumulation_steps=ACCUMULATION, fsdp_plugin=plugin)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["ddp", "fsdp2"], required=True)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    if cli.mode == "fsdp2":
        fsdp_on_cpu.enable()
    world = int(os.environ.get("WORLD_SIZE", 1))
    batch = GLOBAL_BATCH // world // ACCUMULATION
    results = {}
    for name, (head, case, fields) in RUNS.items():
        if cli.mode == "fsdp2" and name in DDP_ONLY:
            continue
        sharding = fsdp2(head) if cli.mode == "fsdp2" else {}
        trainer = train(head, case, str(Path(cli.out) / name), batch=batch, accumulation=ACCUMULATION,
                        **({"weight_decay": 0.0} if "optim" in fields else {}), **fields, **sharding)
        loop = plain_loop(head, case, batch, ACCUMULATION, accelerator=loop_accelerator(cli.mode, head), **fields)
        keys = ("theta", "rho", "optimizer_state", "world")
        results[name] = {
            "trainer": {key: trainer[key] for key in keys},
            "loop": {key: loop[key] for key in keys},
            "parameter_type": type(next(loop["engine"].model.parameters())).__name__,
        }
    torch.save(results, Path(cli.out) / f"rank{dist.get_rank() if dist.is_initialized() else 0}.pt")
    leave_together()


if __name__ == "__main__":
    main()
