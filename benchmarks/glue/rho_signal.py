"""Where the noise of ρ's signal comes from: both factors of dF/dρ over many batches at one point of a run.

    python benchmarks/glue/rho_signal.py --task mrpc --method "lets-sam@0.05+frozen" --seed 0 --step 50
    python benchmarks/glue/rho_signal.py --task mrpc --method "lets-sam@0.05+frozen" --seed 2 --step 125 \\
        --resume benchmarks/results/glue-rho-study/runs/mrpc/lets-sam@0.05+frozen/seed2.checkpoints/checkpoint-122

Trains the study's run (`run.py --profile study`) up to `--step`, a step after which the engine holds
u = ∂θ_{t+1}/∂ρ for the next ρ update (a multiple of `rho_update_interval`), and stops there. At that θ and u it
takes, in train mode and seeded, the loss and ⟨∇L, u⟩ of every held-out ρ batch and of `--train_batches` training
batches. An update pairs one of each: gap = L_val − L_train, inner = ⟨∇L_val − ∇L_train, u⟩, dF/dρ = gap·inner.
Their means over all the batches are what the update estimates; the spread between batches is its noise. Saves
`<out_dir>/<task>-<method>-seed<k>-step<t>.json` and rewrites `<out_dir>/signal.md` and `signal.png` (each batch's
loss against its ⟨∇L, u⟩) from every saved snapshot:

- each factor's mean ± standard error, and its per-update signal-to-noise |mean|/std;
- how much of the inner product's variance comes from the validation batch (the part a larger `rho_batch_size`
  shrinks) and how much from the training batch;
- the correlation, batch to batch, of a batch's loss with its ⟨∇L, u⟩;
- dF/dρ's mean over all (validation, training) pairs (t: over the standard error of a mean over pairs, from its row
  and column means) and the share of it that is the covariance of its two
  factors (they come from the same batches: E[gap·inner] ≠ E[gap]·E[inner]), a bias rather than a signal;
- dF/dρ's per-update SNR over those pairs, and the updates a 2σ sign of it would take;
- the same for the `val-loss` objective, whose dF/dρ is ⟨∇L_val, u⟩ alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from markdown_table import table_header, table_row  # noqa: E402
from report import TASK_TITLES  # noqa: E402
from run import DEFAULT_DATA_DIR, PROFILES, make_trainer, prepare_task  # noqa: E402

from lets_hf.tensor_lists import global_dot, trainable  # noqa: E402

DEFAULT_OUT_DIR = Path(__file__).resolve().parents[1] / "results" / "glue-rho-study" / "signal"


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def loss_and_inner(trainer, batch, params, u, seed: int) -> tuple[float, float]:
    """L and ⟨∇L, u⟩ (in float64) of one collated batch, through the trainer's own loss (scaled as a train batch)."""
    torch.manual_seed(seed)
    loss = trainer.engine.passes.validation_loss(trainer.model, batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads, directions = zip(*[(g.double(), v) for g, v in zip(grads, u) if g is not None])
    return float(loss.detach()), float(global_dot(list(grads), list(directions)))


def snapshot(task_name: str, method: str, seed: int, step: int, train_batches: int, resume: str | None,
             data_dir: str, work_dir: Path, profile_name: str = "study") -> dict:
    profile = PROFILES[profile_name]
    task, model_path, tokenizer, encoded = prepare_task(task_name, profile, data_dir)
    trainer = make_trainer(task, model_path, tokenizer, encoded, profile, method, seed, work_dir, [_StopAt(step)])
    interval = trainer.args.rho_update_interval
    if step % interval or trainer.args.rho_estimator != "one-step":
        raise SystemExit(f"--step must be a multiple of rho_update_interval ({interval}), with the one-step estimator.")
    trainer.train(resume_from_checkpoint=resume)
    model = trainer.model
    model.train()
    params = trainable(model)[1]
    u = trainer.engine.u_for(params)
    rho_batches = trainer.get_rho_batches()
    val = [loss_and_inner(trainer, next(rho_batches), params, u, seed=i) for i in range(rho_batches.batches_per_epoch)]
    loader = iter(trainer.get_train_dataloader())
    train = [loss_and_inner(trainer, next(loader), params, u, seed=10_000 + i) for i in range(train_batches)]
    return {"task": task_name, "method": method, "seed": seed, "step": step, "epoch": trainer.state.epoch,
            "rho": trainer.rho, "batch_size": trainer.args.per_device_train_batch_size,
            "validation": val, "train": train}


def summarize(record: dict) -> dict:
    """Per-update statistics of a snapshot (see the module docstring)."""
    val, train = np.array(record["validation"]), np.array(record["train"])
    (val_loss, val_inner), (train_loss, train_inner) = val.T, train.T
    gaps = val_loss[:, None] - train_loss[None, :]  # every (validation, training) pair is a possible update
    inners = val_inner[:, None] - train_inner[None, :]
    grads = gaps * inners  # dF/dρ of each pair; their mean has the variance of its row and column means (Hoeffding)
    grad_mean, grad_std = grads.mean(), grads.std(ddof=1)
    grad_se = np.sqrt(grads.mean(axis=1).var(ddof=1) / len(val) + grads.mean(axis=0).var(ddof=1) / len(train))

    def mean_se(a, b):
        return a.mean() - b.mean(), np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)

    gap, gap_se = mean_se(val_loss, train_loss)
    inner, inner_se = mean_se(val_inner, train_inner)
    inner_var_val, inner_var_train = val_inner.var(ddof=1), train_inner.var(ddof=1)
    return {
        "gap": gap, "gap_t": gap / gap_se, "gap_snr": abs(gap) / np.sqrt(val_loss.var(ddof=1) + train_loss.var(ddof=1)),
        "inner": inner, "inner_t": inner / inner_se,
        "inner_snr": abs(inner) / np.sqrt(inner_var_val + inner_var_train),
        "inner_var_from_validation": inner_var_val / (inner_var_val + inner_var_train),
        "inner_snr_validation_x8": abs(inner) / np.sqrt(inner_var_val / 8 + inner_var_train),
        "loss_inner_correlation": (np.corrcoef(val_loss, val_inner)[0, 1], np.corrcoef(train_loss, train_inner)[0, 1]),
        "grad_mean": grad_mean, "grad_t": grad_mean / grad_se, "grad_from_covariance": 1 - gap * inner / grad_mean,
        "grad_snr": abs(grad_mean) / grad_std, "updates_for_2sigma": (grad_std / grad_mean * 2) ** 2,
        "val_loss_grad_t": val_inner.mean() / np.sqrt(inner_var_val / val_inner.size),
        "val_loss_grad_snr": abs(val_inner.mean()) / np.sqrt(inner_var_val),
    }


def plot_batches(records: list[dict], path: Path) -> None:
    """One panel per snapshot: each batch's loss against its ⟨∇L, u⟩, held-out and training batches apart. A
    slope is the covariance that dominates dF/dρ's mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(records), figsize=(3.2 * len(records), 3), squeeze=False)
    for axis, record in zip(axes[0], records):
        for side, color in (("validation", "C1"), ("train", "C0")):
            loss, inner = np.array(record[side]).T
            axis.scatter(inner, loss, s=10, color=color, label="held-out (ρ) batch" if side == "validation" else "training batch")
        axis.set_title(f"{TASK_TITLES.get(record['task'], record['task'])}, seed {record['seed']}, step {record['step']}",
                       fontsize=9)
        axis.set_xlabel("⟨∇L, u⟩", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.xaxis.get_offset_text().set_fontsize(7)
    axes[0, 0].set_ylabel("batch loss", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_table(out_dir: Path) -> str:
    header = ["task", "method", "seed", "step (epoch)", "batches val / train", "gap (t)", "gap SNR/update",
              "inner t", "inner SNR/update", "inner variance from the validation batch", "inner SNR, 8x validation batch",
              "corr(L, ⟨∇L, u⟩) val / train", "dF/dρ mean (t)", "its share from cov(gap, inner)", "dF/dρ SNR/update", "updates for a 2σ sign", "val-loss dF/dρ t (SNR/update)"]
    lines = table_header(header)
    records = sorted((json.loads(path.read_text()) for path in out_dir.glob("*.json")),
                     key=lambda r: (r["task"], r["method"], r["seed"], r["step"]))
    for record in records:
        s = summarize(record)
        lines.append(table_row([
            TASK_TITLES.get(record["task"], record["task"]), record["method"], str(record["seed"]),
            f"{record['step']} ({record['epoch']:.2f})", f"{len(record['validation'])} / {len(record['train'])}",
            f"{s['gap']:+.3f} ({s['gap_t']:+.1f})", f"{s['gap_snr']:.2f}", f"{s['inner_t']:+.1f}",
            f"{s['inner_snr']:.3f}", f"{s['inner_var_from_validation']:.0%}", f"{s['inner_snr_validation_x8']:.3f}",
            "{:+.2f} / {:+.2f}".format(*s["loss_inner_correlation"]), f"{s['grad_mean']:+.2e} ({s['grad_t']:+.1f})",
            f"{s['grad_from_covariance']:.0%}", f"{s['grad_snr']:.3f}",
            f"{s['updates_for_2sigma']:,.0f}", f"{s['val_loss_grad_t']:+.1f} ({s['val_loss_grad_snr']:.2f})",
        ]))
    text = "\n".join([
        "# ρ's signal at fixed points of study runs (`benchmarks/glue/rho_signal.py`)", "",
        "Each row: one θ and u = ∂θ/∂ρ of a study run, every held-out ρ batch and a sample of training batches of the "
        "run's batch size, in train mode. gap and inner: mean over the batches (t: over its standard error). "
        "SNR/update: |mean| / std of one update's value (one validation and one training batch). The 8x column "
        "divides the validation batch's share of the variance by 8 (`rho_batch_size` 8x the train batch). dF/dρ: "
        "over every (validation, training) pair; its share from the covariance is 1 − E[gap]·E[inner] / E[gap·inner]. "
        "val-loss: dF/dρ = ⟨∇L_val, u⟩ over the held-out batches.",
        "",
        *lines, "",
    ])
    (out_dir / "signal.md").write_text(text)
    plot_batches(records, out_dir / "signal.png")
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="study", choices=sorted(PROFILES), help="run.py's profile of the run")
    parser.add_argument("--task", required=True, choices=sorted(PROFILES["study"].tasks))
    parser.add_argument("--method", default="lets-sam@0.05+frozen")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, required=True, help="a multiple of the run's rho_update_interval")
    parser.add_argument("--train_batches", type=int, default=40)
    parser.add_argument("--resume", default=None, help="a checkpoint of the same run to start from")
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR), help="GLUE folder in the original tsv layout")
    parser.add_argument("--out_dir", default=str(DEFAULT_OUT_DIR))
    cli = parser.parse_args(argv)
    out_dir = Path(cli.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work_dir:  # the trainer's output_dir: it saves nothing
        record = snapshot(cli.task, cli.method, cli.seed, cli.step, cli.train_batches, cli.resume, cli.data_dir,
                          Path(work_dir), cli.profile)
    name = f"{cli.task}-{cli.method}-seed{cli.seed}-step{cli.step}.json"
    (out_dir / name).write_text(json.dumps(record))
    print(write_table(out_dir))


if __name__ == "__main__":
    main()
