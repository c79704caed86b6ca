"""Launched by tests/distributed/test_fsdp2.py with 2 processes: trains real heads under DDP or FSDP2
(`--mode`, FSDP2 through the CPU harness `fsdp_on_cpu`), accumulation 2, and saves each rank's results.

Default: runs of every rule (SAM, ASAM, BSAM, BiSAM, LightSAM; ρ fixed and learned), LETS-SAM under each SAM
policy and LETS-SAM in bf16, to compare the two modes. `--resume`: LETS-SAM with AdamW saved
at step 2 and resumed, in both of Trainer's FSDP checkpoint formats. `--mode accelerate_config`: FSDP
comes from `accelerate launch --config_file` (environment variables), not from `TrainingArguments`;
with `--refused`, building the trainer must fail with that message.
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
from tests.heads import ESTIMATORS, GLOBAL_BATCH, POLICIES, flat_parameters, lora_llama, train  # noqa: E402

ACCUMULATION = 2
#: name -> (head, case of tests.heads, overrides)
RUNS = {
    "bert-classification/sam": ("bert-classification", "sam", {}),
    "bert-classification/asam": ("bert-classification", "sam", {"sam_variant": "asam", "rho": 0.5}),
    "bert-classification/lets-sam": ("bert-classification", "lets-sam", {}),
    **{f"bert-classification/lets-sam-{name}": ("bert-classification", "lets-sam", fields) for name, fields in ESTIMATORS.items()},
    **{f"bert-classification/policy-{name}": ("bert-classification", "lets-sam", fields) for name, fields in POLICIES.items()},
    "gpt2/lets-sam": ("gpt2", "lets-sam", {}),
    "bert-regression/lets-sam": ("bert-regression", "lets-sam", {}),
    "bert-classification/lets-bisam": ("bert-classification", "lets-sam", {"sam_variant": "bisam"}),
    "bert-classification/bsam": ("bert-classification", "sam", {"sam_variant": "bsam"}),
    "bert-classification/lets-lightsam-adagrad": ("bert-classification", "lets-sam", {"sam_variant": "lightsam-adagrad", "rho_lr": 1.0}),
    "bert-classification/lightsam-adagrad-norm": ("bert-classification", "sam", {"sam_variant": "lightsam-adagrad-norm"}),
    # LoRA adapters on a Llama (causal-LM rows of tests.heads' "gpt2"): only the adapters are sharded and perturbed
    "llama-lora/lets-sam": ("gpt2", "lets-sam", {"model": "lora", "rho_lr": 30000.0}),
    # float32 weights: bf16 compute (autocast under DDP, FSDP2's MixedPrecisionPolicy) differs by rounding only
    "bert-classification/lets-sam-bf16": ("bert-classification", "lets-sam", {"bf16": True, "dtype": torch.float32}),
}
#: FSDP2 units: each transformer layer (accelerate then gives the embeddings and the head units of their own).
LAYERS = {
    "bert-classification": "BertLayer", "bert-regression": "BertLayer", "gpt2": "GPT2Block", "llama-lora": "LlamaDecoderLayer", "llama-sft": "LlamaDecoderLayer",
}
#: TRL's SFTTrainer with LETS-SAM on a float32 tiny Llama and SST-2 sentences (tests.lm), compared with its own tolerance.
SFT_RUN = "llama-sft/lets-sam"
RESUMED = "bert-classification"


def fsdp2(head: str, state_dict_type: str = "FULL_STATE_DICT") -> dict:
    config = {"version": 2, "transformer_layer_cls_to_wrap": [LAYERS[head]], "state_dict_type": state_dict_type}
    return {"fsdp": True, "fsdp_config": config}


class ReduceScatterCounter:
    """Counts FSDP2's gradient reduce-scatters (one per FSDP unit and synced backward)."""

    def __init__(self):
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group

        self.module, self.original, self.count = _fsdp_param_group, _fsdp_param_group.foreach_reduce, 0

        def counting(*args, **kwargs):
            self.count += 1
            return self.original(*args, **kwargs)

        _fsdp_param_group.foreach_reduce = counting

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def fsdp_units(model) -> int:
    """FSDP2's parameter groups with trainable parameters, the ones that reduce-scatter gradients (accelerate
    shards a tied embedding and the head as one group of several modules)."""
    from torch.distributed.fsdp import FSDPModule

    groups = {m._get_fsdp_state()._fsdp_param_group for m in model.modules() if isinstance(m, FSDPModule)}
    return sum(1 for g in groups if g is not None and any(p.sharded_param.requires_grad for p in g.fsdp_params))


def equality_runs(cli, world: int) -> dict:
    results = {}
    counter = ReduceScatterCounter() if cli.mode == "fsdp2" else None
    for name in cli.runs.split(","):
        if name == SFT_RUN:
            results[name] = sft_run(cli, world)
            if counter is not None:
                counter.take()
            continue
        head, case, overrides = RUNS[name]
        model = name.split("/")[0]
        overrides = {**overrides, **(fsdp2(model) if cli.mode == "fsdp2" else {})}  # else DDP or the launcher's FSDP
        if overrides.get("model") == "lora":
            overrides["model"] = lora_llama()
        run = train(
            head, case, str(Path(cli.out) / name), batch=GLOBAL_BATCH // world // ACCUMULATION,
            accumulation=ACCUMULATION, **overrides,
        )
        run["normalization"] = run["normalization"].kind
        model = run.pop("model")
        run["parameter_type"] = type(next(model.parameters())).__name__
        if counter is not None:
            run["reduce_scatters"], run["fsdp_units"] = counter.take(), fsdp_units(model)
        results[name] = run
    return results


def sft_run(cli, world: int) -> dict:
    from datasets import Dataset

    from lets_hf.trl import LETSSFTConfig, LETSSFTTrainer
    from tests.lm import sentences, tiny_llama, word_tokenizer

    tokenizer = word_tokenizer()
    args = LETSSFTConfig(
        output_dir=str(Path(cli.out) / SFT_RUN), per_device_train_batch_size=GLOBAL_BATCH // world // ACCUMULATION,
        gradient_accumulation_steps=ACCUMULATION, max_steps=3, learning_rate=0.1, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, max_length=32, seed=0, train_sampling_strategy="sequential",
        bf16=False, gradient_checkpointing=False,  # TRL turns both on by default
        dataset_num_proc=None, sam_variant="sam", rho=0.05, learn_rho=True, rho_batch_size=4 // world,
        ddp_backend="gloo", **(fsdp2("llama-sft") if cli.mode == "fsdp2" else {}),
    )
    trainer = LETSSFTTrainer(
        tiny_llama(tokenizer), args=args, train_dataset=Dataset.from_dict({"text": sentences(40)}),
        processing_class=tokenizer,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "theta": flat_parameters(trainer.model), "rho": trainer.rho, "world": args.world_size,
        "parameter_type": type(next(trainer.model.parameters())).__name__,
        "gen_gap": [entry["gen_gap"] for entry in logs if "gen_gap" in entry],
        "num_tokens": [entry["num_tokens"] for entry in logs],
    }


def resume_runs(cli, world: int) -> dict:
    """4 AdamW steps straight through, and resumed from the checkpoint at step 2 (optimizer state, each rank's
    shard of u), for Trainer's two FSDP checkpoint formats, for the trace estimator (each rank's shard of h), and for
    LookSAM (k = 3: step 2, after the checkpoint, reuses the g_v of step 0, each rank's shard of it)."""
    results = {}
    cases = {"FULL_STATE_DICT": {}, "SHARDED_STATE_DICT": {}, "trace": ESTIMATORS["trace"],
             "looksam": {**POLICIES["looksam"], "looksam_k": 3}}
    for name, estimator in cases.items():
        settings = dict(
            batch=GLOBAL_BATCH // world // ACCUMULATION, accumulation=ACCUMULATION, optim="adamw_torch",
            learning_rate=1e-3, rho_optimizer="adam", rho_lr=0.01, max_steps=4, save_strategy="steps", save_steps=2,
            **fsdp2(RESUMED, name if name.endswith("STATE_DICT") else "SHARDED_STATE_DICT"),
        ) | estimator
        out = Path(cli.out) / name
        straight = train(RESUMED, "lets-sam", str(out / "straight"), **settings)
        resumed = train(RESUMED, "lets-sam", str(out / "resumed"), resume=str(out / "straight" / "checkpoint-2"), **settings)
        results[name] = {
            "straight": {"theta": straight["theta"], "rho": straight["rho"]},
            "resumed": {"theta": resumed["theta"], "rho": resumed["rho"]},
            "files": sorted(os.listdir(out / "straight" / "checkpoint-2")),
        }
    return results


def refusal(cli, world: int) -> dict:
    key, value = cli.override.split("=") if cli.override else (None, None)
    try:
        train(RESUMED, "lets-sam", str(Path(cli.out) / "refused"), batch=GLOBAL_BATCH // world, **({key: value} if key else {}))
    except UsageError as error:
        assert cli.refused in str(error), error
        return {"refused": str(error)}
    raise AssertionError(f"LETSTrainer was built; expected a refusal naming {cli.refused!r}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["ddp", "fsdp2", "accelerate_config"], required=True)
    parser.add_argument("--runs", default=",".join([*RUNS, SFT_RUN]))
    parser.add_argument("--resume", action="store_true", help="the resume runs instead (FSDP2 only)")
    parser.add_argument("--refused", help="with a LETS override KEY=VALUE: the trainer must refuse, naming this")
    parser.add_argument("--override", default="", help="KEY=VALUE of LETSConfig for --refused")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    if cli.mode != "ddp":
        fsdp_on_cpu.enable()
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cli.refused:
        results = refusal(cli, world)
    else:
        results = resume_runs(cli, world) if cli.resume else equality_runs(cli, world)
    torch.save(results, Path(cli.out) / f"rank{dist.get_rank() if dist.is_initialized() else 0}.pt")
    leave_together()


if __name__ == "__main__":
    main()
