"""Step time and peak memory of AdamW, SAM, ASAM, LETS-SAM and SAM under each `sam_policy` on the same model and
batches.

    python benchmarks/step_cost.py                       # CPU: BERT of MiniLM shape, batch 32, length 128
    python benchmarks/step_cost.py --model bert-base --precision bf16   # on a GPU
    python benchmarks/step_cost.py --sharding ddp fsdp2 --batch 8       # DDP against FSDP2, per rank
    python benchmarks/step_cost.py --sharding ddp fsdp2 --precision bf16 --model bert-base   # the GPU check

A method `<name> loop` runs the same step in a plain PyTorch loop (`LETSEngine`, no Trainer; fused AdamW,
linear schedule and clipping at 1.0, as Trainer's defaults), so its ratios show what Trainer adds.
`--threads 1 --rounds 3` runs every method 3 times in interleaved rounds, one thread each, and ratios
then use the median over rounds of each method's CPU time per step (one-thread CPU time holds to ~2% on
a shared machine; wall time swings ±30%).

Each method runs in its own subprocess so that its peak memory is its own. Peak memory
is the peak of live tensor bytes, comparable across devices: on CUDA
`max_memory_allocated`; on CPU the allocator's own allocation/free stream, replayed from
a `torch.profiler` trace of a separate run up to the method's first ρ update (3 steps at least;
RSS would include glibc's caching).
Step times come from a Trainer callback, in a run without the profiler. The measured
window is 10 steps, so LETS with `rho_update_interval` 10 pays exactly one validation pass
in it: the *mean* is the amortized cost, the *median* the cost of a step without ρ update. Ratios are to AdamW and to SAM, measured in one run.
A `sam <policy>` row (`sam_policy`) takes SAM on some steps only, so its cost varies by step: its mean is over the
whole measured window, whose share of SAM steps the table gives, and AE-SAM's threshold schedule runs its whole course
over the run. `--measured 30` measures 30 steps instead of 10, enough for AE-SAM's running statistics (rate 0.9) to
forget their start at zero.

`--sharding ddp fsdp2` runs each method under torchrun on `--num_processes` processes
(default: the GPUs found, or 2 CPU processes over gloo) with DDP and with FSDP2, and reports the
largest peak over ranks. FSDP2 on CPU goes through the test harness `tests/distributed/fsdp_on_cpu.py`
(accelerate maps FSDP only on GPUs); one GPU is enough to exercise FSDP2's code path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch._C._profiler import _EventType
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, default_collate
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback, get_linear_schedule_with_warmup

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this tree's lets_hf (`--before` runs a copy of this script in another tree)

from lets_hf import LETSConfig, LETSTrainer  # noqa: E402
from tests.distributed.launch import leave_together  # noqa: E402

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
    "lets-sam k=10 trace": dict(sam_variant="sam", learn_rho=True, rho_update_interval=10, rho_estimator="trace"),
    "lets-sam k=10 antithetic": dict(
        sam_variant="sam", learn_rho=True, rho_update_interval=10, rho_estimator="antithetic", rho_update_space="log"
    ),
    "sam ae-sam": dict(sam_variant="sam", sam_policy="ae-sam"),
    "sam looksam": dict(sam_variant="sam", sam_policy="looksam"),
    "sam random": dict(sam_variant="sam", sam_policy="random"),
}
LOOP = " loop"
#: The same step in a plain loop (`_train_loop`): what Trainer adds shows against the rows above.
LOOP_METHODS = ("adamw loop", "sam loop", "lets-sam k=10 diagonal loop")
WARMUP, MEASURED = 2, 10
MEMORY_STEPS = 3  # the profiled run: Adam state and SAM's backup exist from step 2 on


def memory_steps(methods: list[str]) -> int:
    """Steps of a profiled run: up to the first ρ update of `methods` (u_t exists from step k), 3 at least.
    `--sharding` gives every method the same, because under FSDP2 on CPU the peak grows with the run."""
    intervals = (METHODS[method.removesuffix(LOOP)].get("rho_update_interval", 0) for method in methods)
    return max(MEMORY_STEPS, *(k + 1 for k in intervals))


class _StepTimer(TrainerCallback):
    """Wall and CPU (this process) seconds of each optimizer step, and whether it took SAM (`engine`, once set)."""

    def __init__(self, cuda: bool):
        self.cuda, self.times, self.cpu_times, self._start, self._cpu_start = cuda, [], [], 0.0, 0.0
        self.engine, self.sam_steps = None, []

    def on_step_begin(self, args=None, state=None, control=None, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_step_end(self, args=None, state=None, control=None, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)
        sam_step = getattr(self.engine, "_sam_step", True)  # an engine before sam_policy: always SAM
        self.sam_steps.append(1.0 if sam_step is None else float(bool(sam_step)))


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


def _local_mb(tensors) -> float:
    """MB this rank holds of `tensors` (for FSDP2's DTensors, the local shard)."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in local) / 2**20


def state_per_rank(trainer) -> dict:
    """What this rank holds across steps, counted from the tensors themselves: parameters, optimizer
    state, and LETS's buffers (θ backup, u = ∂θ/∂ρ, the rule's state). Deterministic, unlike a peak."""
    optimizer_state = [t for state in trainer.optimizer.state.values() for t in state.values()]
    lets = []
    if trainer.rule is not None:
        engine = getattr(trainer, "engine", trainer)  # `--before` a commit where the trainer held the backup
        lets = [*engine._backup.values(), *(trainer.radius.u or []), *_tensors_in(trainer.rule.state_dict())]
        if hasattr(engine, "policy"):  # LookSAM's g_v
            lets += _tensors_in(engine.policy.state_dict())
    return {
        "params_mb": _local_mb(trainer.model.parameters()),
        "optimizer_mb": _local_mb(optimizer_state),
        "lets_buffers_mb": _local_mb(lets),
    }


def _tensors_in(tree) -> list:
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in _tensors_in(value)]
    if isinstance(tree, (list, tuple)):
        return [t for value in tree for t in _tensors_in(value)]
    return [tree] if torch.is_tensor(tree) else []


def _sharding_args(sharding: str | None) -> dict:
    """TrainingArguments of a launched run: FSDP2 with one unit per BERT layer, or DDP."""
    if sharding is None:
        return {}
    world = int(os.environ.get("WORLD_SIZE", 1))
    backend = {"ddp_backend": "gloo"} if not torch.cuda.is_available() and world > 1 else {}
    if sharding == "ddp":
        return backend
    if not torch.cuda.is_available():
        from tests.distributed import fsdp_on_cpu

        fsdp_on_cpu.enable()
    return {**backend, "fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}}


def _model_and_data(shape: str, batch: int, length: int, steps: int):
    """A fresh seeded BERT of `shape`, `steps` batches of fixed random tokens, and 2 batches for ρ's validation."""
    torch.manual_seed(0)
    config = BertConfig(**SHAPES[shape], num_labels=2, attn_implementation="sdpa")
    model = BertForSequenceClassification(config)
    return model, _RandomTokens(batch * steps, length, config.vocab_size, 0), _RandomTokens(batch * 2, length, config.vocab_size, 1)


def _train(method: str, shape: str, precision: str, batch: int, length: int, steps: int, output_dir: str, callbacks=(),
           sharding: str | None = None):
    """A fresh model trained `steps` steps on fixed random tokens; returns the trainer."""
    cuda = torch.cuda.is_available()
    model, train_set, rho_set = _model_and_data(shape, batch, length, steps)
    args = LETSConfig(
        output_dir=output_dir, per_device_train_batch_size=batch, max_steps=steps,
        learning_rate=2e-5, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=10_000,
        bf16=precision == "bf16", use_cpu=not cuda, dataloader_drop_last=True, seed=0, **METHODS[method],
        **_sharding_args(sharding),
    )
    trainer = LETSTrainer(
        model=model, args=args, train_dataset=train_set, rho_dataset=rho_set if args.learn_rho else None,
        callbacks=list(callbacks),
    )
    for callback in callbacks:
        callback.engine = getattr(trainer, "engine", None)
    trainer.train()
    return trainer


def _train_loop(method: str, shape: str, precision: str, batch: int, length: int, steps: int, timer=None):
    """`_train` as a plain loop: the same model, data and defaults, driven by `LETSEngine` without Trainer.
    Returns a stand-in with the attributes `measure_one` reads."""
    from lets_hf import LETSArguments, LETSEngine, RhoBatches  # here: `--before` runs this script on older trees

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if precision == "bf16" else "no")
    model, train_set, rho_set = _model_and_data(shape, batch, length, steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps)
    loader = DataLoader(train_set, batch_size=batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    args = LETSArguments(**METHODS[method.removesuffix(LOOP)])
    rho_batches = RhoBatches(rho_set, default_collate, batch, 1, 0, 0)
    engine = LETSEngine(model, optimizer, args, loss_fn=lambda model, inputs: model(**inputs).loss, accelerator=accelerator,
                        rho_batches=rho_batches if args.learn_rho else None, max_grad_norm=1.0,
                        **({"max_steps": steps} if getattr(args, "sam_policy", "every") != "every" else {}))
    if timer is not None:
        timer.engine = engine
    model.train()
    for inputs in loader:
        if timer is not None:
            timer.on_step_begin()
        engine.backward(inputs)
        engine.step()
        scheduler.step()
        if timer is not None:
            timer.on_step_end()
    return SimpleNamespace(model=model, optimizer=optimizer, engine=engine, rule=engine.rule,
                           radius=getattr(engine, "radius", None), accelerator=accelerator,
                           args=SimpleNamespace(world_size=accelerator.num_processes))


def measure_one(method: str, shape: str, precision: str, batch: int, length: int, output_dir: str,
                profiled_steps: int, sharding: str | None = None) -> dict:
    """Train WARMUP + MEASURED steps of one method; return its step times and peak memory (this rank's)."""
    cuda = torch.cuda.is_available()
    timer = _StepTimer(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    def run(steps: int, timer=None):
        if method.endswith(LOOP):
            return _train_loop(method, shape, precision, batch, length, steps, timer)
        return _train(method, shape, precision, batch, length, steps, output_dir, [timer] if timer else [], sharding)

    trainer = run(WARMUP + MEASURED, timer)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            run(profiled_steps)
        peak = peak_live_bytes(prof)
    measured, measured_cpu = timer.times[WARMUP:], timer.cpu_times[WARMUP:]
    return {
        "sam_share": statistics.mean(timer.sam_steps[WARMUP:]),
        "median_s": statistics.median(measured),
        "mean_s": statistics.mean(measured),
        "cpu_mean_s": statistics.mean(measured_cpu),
        "peak_mb": peak / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "param_mb": trainer.model.num_parameters() * next(trainer.model.parameters()).element_size() / 2**20,
        "world": trainer.args.world_size,
        "sharded": trainer.accelerator.is_fsdp2,
        **state_per_rank(trainer),
    }


def measure_launched(method: str, cli, output_dir: str) -> dict | None:
    """`measure_one` on every rank of a launched run; rank 0 gets the largest peak and step time over ranks."""
    row = measure_one(method, cli.model, cli.precision, cli.batch, cli.length, output_dir, cli._profiled_steps,
                      cli._sharding)
    rows = gather_object([row])
    leave_together()
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    keys = ("median_s", "mean_s", "cpu_mean_s", "peak_mb", "peak_rss_mb", "params_mb", "optimizer_mb", "lets_buffers_mb")
    worst = {key: max(r[key] for r in rows) for key in keys}
    return {**row, **worst, "peak_mb_per_rank": [r["peak_mb"] for r in rows]}


def run_all(cli) -> list[dict]:
    """Every method (and, with `--before`, the same method on the older tree) once per round, interleaved."""
    trees = {"": REPO, **({" (before)": cli._before_tree} if cli.before else {})}
    rows = []
    for round_index in range(cli.rounds):
        for sharding in cli.sharding or [None]:
            for method in cli.methods:
                for label, tree in trees.items():
                    if method.endswith(LOOP) and label:
                        continue  # the plain loop is new: nothing to compare it with before
                    name = (method if sharding is None else f"{method} {sharding}") + label
                    row = {"method": name, "round": round_index, **_run_one(cli, method, sharding, tree)}
                    print(f"{name:<40} round {round_index}  mean {row['mean_s']:.3f}s  cpu {row['cpu_mean_s']:.3f}s  "
                          f"peak {row['peak_mb']:.0f} MB", flush=True)
                    rows.append(row)
    return rows


def _run_one(cli, method: str, sharding: str | None, tree: Path) -> dict:
    """One method in its own process, with `tree`'s copy of this script (so with `tree`'s lets_hf)."""
    one = [str(tree / "benchmarks" / Path(__file__).name), "--_one", method, "--model", cli.model, "--measured", str(MEASURED),
           "--precision", cli.precision, "--batch", str(cli.batch), "--length", str(cli.length),
           "--_profiled_steps", str(memory_steps(cli.methods if sharding else [method]))]
    if sharding is None:
        command = [sys.executable, *one]
    else:  # torchrun, so that one GPU still runs DDP and FSDP2 (over one rank)
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(cli.num_processes)]
        command = [sys.executable, *launcher, *one, "--_sharding", sharding]
    threads = cli.threads or (1 if sharding and not torch.cuda.is_available() else None)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{method} ({sharding}, {tree}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_over_rounds(rows: list[dict]) -> list[dict]:
    """One row per method: the median over rounds of every number (CPU time per step is what rounds steady)."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    merged = []
    for method, runs in by_method.items():
        numbers = {k: statistics.median(r[k] for r in runs) for k, v in runs[0].items() if isinstance(v, (int, float))}
        merged.append({**runs[0], **numbers, "method": method, "rounds": len(runs)})
    return merged


def to_markdown(rows: list[dict], cli, device: str) -> str:
    """Ratios to AdamW and SAM of the same kind: a `loop` row to the loop's, a `(before)` row to the older tree's."""
    base = {r["method"]: r for r in rows}
    adamw = base["adamw"]
    rounds = f"{cli.rounds} interleaved rounds, medians; " if cli.rounds > 1 else ""
    lines = [
        f"Step cost on {device}: BERT of {cli.model} shape, batch {cli.batch}, length {cli.length}, {cli.precision}; "
        f"{MEASURED} measured steps after {WARMUP} warm-up; {rounds}CPU: this process's CPU time per step. "
        f"Parameters: {adamw['param_mb']:.0f} MB. A `loop` row is the plain loop (LETSEngine, no Trainer), its "
        "ratios to the loop's AdamW and SAM; `cpu / Trainer` compares it with the same method under Trainer.",
        "",
        "| method | SAM steps | mean step (s) | mean / adamw | mean / sam | cpu / adamw | cpu / sam | cpu / Trainer "
        "| peak tensor memory (MB) | peak − adamw (MB) | peak − adamw (parameter buffers) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["method"]
        kind = LOOP if name.endswith(LOOP) else " (before)" if name.endswith(" (before)") else ""
        ref_adamw, ref_sam = base.get(f"adamw{kind}", adamw), base.get(f"sam{kind}", base.get("sam"))
        trainer = base.get(name.removesuffix(LOOP)) if kind == LOOP else None
        ratio = lambda key, ref: f"{r[key] / ref[key]:.2f}x" if ref is not None and key in ref else "–"  # noqa: E731
        share = f"{r['sam_share']:.0%}" if "sam_share" in r and r["method"].split()[0] not in ("adamw",) else "–"
        lines.append(
            f"| {name} | {share} | {r['mean_s']:.3f} | {ratio('mean_s', ref_adamw)} | {ratio('mean_s', ref_sam)} "
            f"| {ratio('cpu_mean_s', ref_adamw)} | {ratio('cpu_mean_s', ref_sam)} | {ratio('cpu_mean_s', trainer)} "
            f"| {r['peak_mb']:.0f} | {r['peak_mb'] - ref_adamw['peak_mb']:+.0f} "
            f"| {(r['peak_mb'] - ref_adamw['peak_mb']) / r['param_mb']:+.2f} |"
        )
    return "\n".join(lines) + "\n"


def sharding_markdown(rows: list[dict], cli, device: str) -> str:
    """DDP against FSDP2 per method: the largest peak over ranks and the step times."""
    by_name = {r["method"]: r for r in rows}
    world = rows[0]["world"]
    lines = [
        f"DDP against FSDP2 on {device}, {world} process(es): BERT of {cli.model} shape, batch {cli.batch} per rank, "
        f"length {cli.length}, {cli.precision}; {MEASURED} measured steps after {WARMUP} warm-up. Parameters: "
        f"{rows[0]['param_mb']:.0f} MB. Held per rank: parameters + optimizer state + LETS's buffers (θ backup, "
        "u, rule state), counted from the tensors (the largest rank). Peak: the largest peak of live tensor memory "
        "over ranks.",
        "",
        "| method | DDP held (MB) | FSDP2 held (MB) | DDP LETS buffers (MB) | FSDP2 LETS buffers (MB) | DDP peak (MB) "
        "| FSDP2 peak (MB) | DDP mean step (s) | FSDP2 mean step (s) | FSDP2 / DDP time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in cli.methods:
        ddp, fsdp2 = by_name[f"{method} ddp"], by_name[f"{method} fsdp2"]
        assert fsdp2["sharded"] and not ddp["sharded"], "a run did not use the sharding it was given"
        held = [r["params_mb"] + r["optimizer_mb"] + r["lets_buffers_mb"] for r in (ddp, fsdp2)]
        lines.append(
            f"| {method} | {held[0]:.0f} | {held[1]:.0f} | {ddp['lets_buffers_mb']:.0f} | {fsdp2['lets_buffers_mb']:.0f} "
            f"| {ddp['peak_mb']:.0f} | {fsdp2['peak_mb']:.0f} "
            f"| {ddp['mean_s']:.3f} | {fsdp2['mean_s']:.3f} | {fsdp2['mean_s'] / ddp['mean_s']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    global MEASURED
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=SHAPES, default="minilm-shape")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, *LOOP_METHODS], default=[*METHODS, *LOOP_METHODS])
    parser.add_argument("--rounds", type=int, default=1, help="run every method this many times, interleaved")
    parser.add_argument("--measured", type=int, default=10,
                        help="measured steps per run, after the warm-up (more: a policy's mean over more of its steps)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run (1: CPU-time ratios hold to ~2%%)")
    parser.add_argument("--before", help="a git ref: run every method on that commit too, interleaved (a worktree)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--sharding", nargs="+", choices=["ddp", "fsdp2"], help="compare these, launched per rank")
    parser.add_argument("--num_processes", type=int, default=torch.cuda.device_count() or 2)
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    parser.add_argument("--_sharding", help=argparse.SUPPRESS)
    parser.add_argument("--_profiled_steps", type=int, help=argparse.SUPPRESS)
    cli = parser.parse_args(argv)
    MEASURED = cli.measured
    if cli._one:
        with tempfile.TemporaryDirectory() as tmp:
            row = measure_launched(cli._one, cli, tmp) if cli._sharding else measure_one(
                cli._one, cli.model, cli.precision, cli.batch, cli.length, tmp, cli._profiled_steps
            )
        if row is not None:
            print(json.dumps(row))
        return
    if not cli.sharding and not {"adamw", "sam"} <= set(cli.methods):
        parser.error("--methods must include adamw and sam: the table's ratios are to them")
    cuda = torch.cuda.is_available()
    threads = cli.threads or torch.get_num_threads()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({threads} thread{'s' if threads > 1 else ''})"
    if cli.sharding:
        device = f"{device} × {cli.num_processes}" if cuda else f"CPU ({cli.num_processes} processes × 1 thread)"
    with _before_tree(cli):
        rows = run_all(cli)
    kind = ("_ddp_vs_fsdp2" if cli.sharding else "") + ("_before_after" if cli.before else "")
    stem = Path(cli.out) / f"step_cost{kind}_{'cuda' if cuda else 'cpu'}_{cli.model}_{cli.precision}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"device": device, "before": cli.before, "rows": rows}, indent=2))
    merged = median_over_rounds(rows)
    table = sharding_markdown(merged, cli, device) if cli.sharding else to_markdown(merged, cli, device)
    print("\n" + table)
    stem.with_suffix(".md").write_text(table)


@contextlib.contextmanager
def _before_tree(cli):
    """`--before REF`: a temporary git worktree at REF holding this copy of the script (`cli._before_tree`)."""
    cli._before_tree = None
    if not cli.before:
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), cli.before], check=True,
                       capture_output=True)
        try:
            shutil.copy(__file__, tree / "benchmarks" / Path(__file__).name)
            cli._before_tree = tree
            yield
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)


if __name__ == "__main__":
    main()
