"""Step time and peak memory of AdamW, SAM, ASAM and LETS-SAM on the same model and batches.

    python benchmarks/step_cost.py                       # CPU: BERT of MiniLM shape, batch 32, length 128
    python benchmarks/step_cost.py --model bert-base --precision bf16   # on a GPU

Each method runs in its own subprocess so that its peak memory is its own. Peak memory
is the peak of live tensor bytes, comparable across devices: on CUDA
`max_memory_allocated`; on CPU the allocator's own allocation/free stream, replayed from
a `torch.profiler` trace of a separate 3-step run (RSS would include glibc's caching).
Step times come from a Trainer callback, in a run without the profiler. The measured
window is 10 steps, so LETS with `rho_update_interval` 10 pays exactly one validation pass
in it: the *mean* is the amortized cost, the *median* the cost of a step without ρ update. Ratios are to AdamW and to SAM, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch._C._profiler import _EventType
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback

from lets_hf import LETSConfig, LETSTrainer

SHAPES = {  # BERT shapes: the MiniLM-L6 shape (all-MiniLM-L6-v2) and bert-base
    "minilm-shape": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
METHODS = {  # name -> LETSConfig overrides
    "adamw": dict(sam_variant="none"),
    "sam": dict(sam_variant="sam"),
    "asam": dict(sam_variant="asam"),
    "lets-sam k=1 diagonal": dict(sam_variant="sam", learn_rho=True, rho_update_interval=1, rho_hessian="diagonal"),
    "lets-sam k=10 diagonal": dict(sam_variant="sam", learn_rho=True, rho_update_interval=10, rho_hessian="diagonal"),
    "lets-sam k=1 exact": dict(sam_variant="sam", learn_rho=True, rho_update_interval=1, rho_hessian="exact"),
    "lets-sam k=10 exact": dict(sam_variant="sam", learn_rho=True, rho_update_interval=10, rho_hessian="exact"),
}
WARMUP, MEASURED = 2, 10
MEMORY_STEPS = 3  # the profiled run: Adam state and every LETS buffer exist from step 2 on


class _StepTimer(TrainerCallback):
    def __init__(self, cuda: bool):
        self.cuda, self.times, self._start = cuda, [], 0.0

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(self._now() - self._start)


class _RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1000, vocab, (n, length), generator=generator)
        self.labels = torch.randint(0, 2, (n,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def peak_live_bytes(prof: torch.profiler.profile) -> int:
    """Peak of live CPU tensor bytes allocated inside the profiled window, replayed in time order.

    Frees of blocks allocated before the window (e.g. an earlier trainer collected by the garbage
    collector mid-run) are ignored: they would lower the count below what the window holds. The
    events are not in the public profiler API; `torch.profiler`'s own memory timeline reads them too.
    """
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu":
            events.append((event.start_time_ns, event.typed[1].ptr, event.typed[1].alloc_size))
    blocks, live, peak = {}, 0, 0
    for _, ptr, size in sorted(events):
        if size > 0:
            blocks[ptr] = size
        elif ptr in blocks:
            size = -blocks.pop(ptr)
        else:
            continue
        live += size
        peak = max(peak, live)
    return peak


def _train(method: str, shape: str, precision: str, batch: int, length: int, steps: int, output_dir: str, callbacks=()):
    """A fresh model trained `steps` steps on fixed random tokens; returns the model."""
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    config = BertConfig(**SHAPES[shape], num_labels=2, attn_implementation="sdpa")
    model = BertForSequenceClassification(config)
    args = LETSConfig(
        output_dir=output_dir, per_device_train_batch_size=batch, max_steps=steps,
        learning_rate=2e-5, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=10_000,
        bf16=precision == "bf16", use_cpu=not cuda, dataloader_drop_last=True, seed=0, **METHODS[method],
    )
    trainer = LETSTrainer(
        model=model, args=args, train_dataset=_RandomTokens(batch * steps, length, config.vocab_size, 0),
        rho_dataset=_RandomTokens(batch * 2, length, config.vocab_size, 1) if args.learn_rho else None,
        callbacks=list(callbacks),
    )
    trainer.train()
    return model


def measure_one(method: str, shape: str, precision: str, batch: int, length: int, output_dir: str) -> dict:
    """Train WARMUP + MEASURED steps of one method; return its step times and peak memory."""
    cuda = torch.cuda.is_available()
    timer = _StepTimer(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = _train(method, shape, precision, batch, length, WARMUP + MEASURED, output_dir, [timer])
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            _train(method, shape, precision, batch, length, MEMORY_STEPS, output_dir)
        peak = peak_live_bytes(prof)
    measured = timer.times[WARMUP:]
    return {
        "median_s": statistics.median(measured),
        "mean_s": statistics.mean(measured),
        "peak_mb": peak / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "param_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
    }


def run_all(cli) -> list[dict]:
    rows = []
    for method in cli.methods:
        command = [sys.executable, __file__, "--_one", method, "--model", cli.model, "--precision", cli.precision,
                   "--batch", str(cli.batch), "--length", str(cli.length)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{method} failed:\n{done.stderr[-4000:]}")
        row = {"method": method, **json.loads(done.stdout.strip().splitlines()[-1])}
        print(f"{method:<24} mean {row['mean_s']:.3f}s  median {row['median_s']:.3f}s  peak {row['peak_mb']:.0f} MB", flush=True)
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], cli, device: str) -> str:
    base = {r["method"]: r for r in rows}
    adamw, sam = base["adamw"], base["sam"]
    lines = [
        f"Step cost on {device}: BERT of {cli.model} shape, batch {cli.batch}, length {cli.length}, {cli.precision}; "
        f"{MEASURED} measured steps after {WARMUP} warm-up. Parameters: {adamw['param_mb']:.0f} MB.",
        "",
        "| method | mean step (s) | mean / adamw | mean / sam | median / adamw | median / sam | peak tensor memory (MB) "
        "| peak − adamw (MB) | peak − adamw (parameter buffers) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['mean_s']:.3f} | {r['mean_s'] / adamw['mean_s']:.2f}x | {r['mean_s'] / sam['mean_s']:.2f}x "
            f"| {r['median_s'] / adamw['median_s']:.2f}x | {r['median_s'] / sam['median_s']:.2f}x "
            f"| {r['peak_mb']:.0f} | {r['peak_mb'] - adamw['peak_mb']:+.0f} "
            f"| {(r['peak_mb'] - adamw['peak_mb']) / r['param_mb']:+.2f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=SHAPES, default="minilm-shape")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    cli = parser.parse_args(argv)
    if cli._one:
        with __import__("tempfile").TemporaryDirectory() as tmp:
            print(json.dumps(measure_one(cli._one, cli.model, cli.precision, cli.batch, cli.length, tmp)))
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    rows = run_all(cli)
    table = to_markdown(rows, cli, device)
    print("\n" + table)
    stem = Path(cli.out) / f"step_cost_{'cuda' if torch.cuda.is_available() else 'cpu'}_{cli.model}_{cli.precision}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(table)
    stem.with_suffix(".json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
