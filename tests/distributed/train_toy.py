"""Launched by tests/distributed/test_ddp.py with 1 or 2 processes: trains the toy model, saves each rank's result.

Counts collective calls too: DDP's gradient buckets through a comm hook, our own
reductions by wrapping `torch.distributed.all_reduce`.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lets_hf import LETSConfig, LETSTrainer  # noqa: E402
from tests.distributed.launch import leave_together  # noqa: E402
from tests.toy import TinyClassifier, ToyDataset  # noqa: E402

COUNTS = {"ddp_buckets": 0, "lets_hf": 0}


def _count_explicit(all_reduce):
    """Counts the all-reduces that lets_hf itself issues (not Trainer's logging gathers)."""

    def counted(*args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        COUNTS["lets_hf"] += "lets_hf" in caller
        return all_reduce(*args, **kwargs)

    return counted


class CountingTrainer(LETSTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not getattr(model, "_counting", False):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def hook(state, bucket):
                COUNTS["ddp_buckets"] += 1
                return allreduce_hook(state, bucket)

            model.register_comm_hook(None, hook)
            model._counting = True
        return super().training_step(model, inputs, num_items_in_batch)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, required=True, help="per-device batch")
    parser.add_argument("--scope", default="global")
    parser.add_argument("--variant", default="sam")
    parser.add_argument("--learn_rho", action="store_true")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save_steps", type=int, default=0, help="checkpoint every N steps (0: never)")
    parser.add_argument("--resume_from", help="a checkpoint folder to resume from")
    cli = parser.parse_args()
    dist.all_reduce = _count_explicit(dist.all_reduce)
    world = int(__import__("os").environ.get("WORLD_SIZE", 1))
    args = LETSConfig(
        output_dir=cli.out, per_device_train_batch_size=cli.batch, gradient_accumulation_steps=cli.accumulation,
        sam_variant=cli.variant, sam_scope=cli.scope, rho=0.1, learn_rho=cli.learn_rho, rho_lr=0.01,
        rho_batch_size=16 // world, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        max_steps=cli.steps, report_to="none", disable_tqdm=True, seed=0, logging_steps=1,
        save_strategy="steps" if cli.save_steps else "no", save_steps=cli.save_steps or 500,  # 500: unused
        ddp_backend="gloo" if world > 1 else None, use_cpu=True,
    )
    trainer = CountingTrainer(
        model=TinyClassifier(dtype=torch.float64), args=args, train_dataset=ToyDataset(64, dtype=torch.float64),
        rho_dataset=ToyDataset(32, seed=1, dtype=torch.float64),
    )
    trainer.train(resume_from_checkpoint=cli.resume_from)
    rank = args.process_index
    result = {
        "params": [p.detach().clone() for p in trainer.model.parameters()],
        "rho": trainer.rho,
        "world": args.world_size,
        "counts": dict(COUNTS),
    }
    torch.save(result, Path(cli.out) / f"rank{rank}.pt")
    leave_together()


if __name__ == "__main__":
    main()
