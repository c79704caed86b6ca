"""Launched by tests/distributed/test_ddp_real_heads.py with 2 processes: trains every real head in
every case of `tests.heads`, with `average_tokens_across_devices` on and off (and the new estimators and the SAM
policies on one head), and saves each rank's results in one file."""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.launch import leave_together  # noqa: E402
from tests.heads import CASES, ESTIMATORS, GLOBAL_BATCH, HEADS, POLICIES, train  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--heads", default=",".join(HEADS))
    cli = parser.parse_args()
    torch.set_num_threads(1)
    world = int(__import__("os").environ.get("WORLD_SIZE", 1))
    results = {}
    for head in cli.heads.split(","):
        for case in CASES:
            for average_tokens in (True, False):
                key = f"{head}/{case}/{'on' if average_tokens else 'off'}"
                run = train(
                    head, case, str(Path(cli.out) / key), batch=GLOBAL_BATCH // world,
                    average_tokens=average_tokens, balanced=not average_tokens,
                )
                run["normalization"] = run["normalization"].kind
                del run["model"]
                results[key] = run
    for name, fields in {**ESTIMATORS, **POLICIES}.items():  # the new estimators and the policies on one head
        run = train("bert-classification", "lets-sam", str(Path(cli.out) / name), batch=GLOBAL_BATCH // world, **fields)
        run["normalization"] = run["normalization"].kind
        del run["model"]
        results[f"bert-classification/{name}"] = run
    torch.save(results, Path(cli.out) / f"rank{dist.get_rank() if dist.is_initialized() else 0}.pt")
    leave_together()


if __name__ == "__main__":
    main()
