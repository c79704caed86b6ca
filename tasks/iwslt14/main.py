"""`lets-hf iwslt14`: fairseq's IWSLT'14 De-En transformer recipe, trained with LETSTrainer, scored in BLEU.

    lets-hf iwslt14 --data_dir D --arch transformer_iwslt_de_en --method lets-sam --output_dir out

D is the tokenized layout `{train,valid[,test]}.{de,en}` (the output of fairseq's
prepare-iwslt14.sh before BPE) or the raw IWSLT'14 release, which is then prepared into
`<output_dir>/prepared/`. Every TrainingArguments / LETSConfig flag works; the defaults are
the recipe's (Adam betas 0.9/0.98, lr 5e-4, inverse-sqrt schedule with 4000 warmup steps,
weight decay 1e-4 on every parameter, no gradient clipping, label smoothing 0.1 as fairseq
computes it (objective.py), 4096-token batches) except the
length of training: fairseq trains until stopped, the references (about 34.5-35 BLEU on test)
run roughly 50 epochs; set --num_train_epochs or --max_steps. A batch is `--max_tokens`
tokens, so `--per_device_{train,eval}_batch_size` count such batches (default 1; see data.py).
Valid loss is evaluated each epoch; at the end valid (and test, when D has it) are translated
with beam 5 and `eval_results.json` / `test_results.json` get `eval_bleu` / `test_bleu`
(fairseq's tokenized BLEU) and the detokenized sacreBLEU with its signature; the translations
go to `eval_hypotheses.txt` / `test_hypotheses.txt`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import set_seed

from lets_hf import LETSConfig
from lets_hf.cli import checkpoint_to_resume, flags_given, parse_command_line
from lets_hf.errors import UsageError, user_inputs
from lets_hf.methods import METHODS
from lets_hf.rho_curve import report_outputs

from .bleu import bleu_metrics
from .bpe import IwsltBpeTokenizer, train_tokenizer
from .data import TranslationCollator, batch_dataset, encode, read_splits, resolve_tokenized_dir
from .model import ARCHITECTURES, build_model
from .objective import FairseqRecipeTrainer
from .prepare import TARGET_LANG, write_lines
from .translate import translate

logger = logging.getLogger(__name__)

#: fairseq's examples/translation IWSLT'14 command line, in TrainingArguments terms.
RECIPE_DEFAULTS = {
    "learning_rate": 5e-4,
    "adam_beta1": 0.9,
    "adam_beta2": 0.98,
    "weight_decay": 1e-4,
    "lr_scheduler_type": "inverse_sqrt",
    "warmup_steps": 4000,
    "max_grad_norm": 0.0,
    "label_smoothing_factor": 0.1,
    # One dataset row is one batch of --max_tokens tokens (see data.py).
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "eval_strategy": "epoch",
}


@dataclass
class IwsltArguments:
    """The task's own flags (the rest are LETSConfig's)."""

    _argument_group_name = "IWSLT'14 task, data and model"  # the heading of these flags in --help

    data_dir: str = field(
        metadata={"help": "Tokenized {train,valid[,test]}.{de,en} or the raw IWSLT'14 de-en release (folder or .tgz)."}
    )
    arch: str = field(
        default="transformer_iwslt_de_en",
        metadata={"help": "Model shape.", "choices": list(ARCHITECTURES)},
    )
    method: str | None = field(
        default=None,
        metadata={
            "help": "Preset of sam_variant and learn_rho; an explicit --sam_variant or --learn_rho overrides it "
            "(default: keep those flags as given).",
            "choices": list(METHODS),
        },
    )
    bpe_merges: int = field(default=10000, metadata={"help": "Joint BPE merge operations learned on train."})
    max_tokens: int = field(default=4096, metadata={"help": "Token budget of one batch (fairseq's --max-tokens)."})
    num_beams: int = field(default=5, metadata={"help": "Beam size of the final translation."})
    max_new_tokens: int = field(default=200, metadata={"help": "Longest translation (fairseq's max_len_b)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N pairs only."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N valid/test pairs only."}
    )


def parse_args(argv: list[str] | None = None) -> tuple[IwsltArguments, LETSConfig]:
    """The command line, checked before any data is read: batches are token budgets, so a batch-size flag
    above 1 multiplies the tokens per step and must come with an explicit --max_tokens."""
    task_args, config = parse_command_line(IwsltArguments, argv, defaults=RECIPE_DEFAULTS)
    if task_args.max_tokens <= 0:
        raise UsageError(f"--max_tokens must be > 0, got {task_args.max_tokens}.")
    batches = config.per_device_train_batch_size
    if batches > 1 and "max_tokens" not in flags_given(argv or sys.argv[1:], ["max_tokens"]):
        raise UsageError(
            f"--per_device_train_batch_size {batches} counts batches of --max_tokens {task_args.max_tokens} tokens "
            f"here, so each device would take {batches * task_args.max_tokens:,} tokens per step. To mean that, "
            "also give --max_tokens explicitly; for a larger batch, raise --max_tokens and keep the batch size at 1."
        )
    return task_args, config


def load_text_and_tokenizer(task_args: IwsltArguments, config: LETSConfig):
    """Split texts and the BPE tokenizer; the first process of each machine prepares and writes, the others read."""
    cache_dir = Path(config.output_dir) / "prepared"
    with config.main_process_first(desc="IWSLT'14 preprocessing and BPE"):
        first = config.local_process_index == 0
        with user_inputs():
            splits = read_splits(resolve_tokenized_dir(Path(task_args.data_dir), cache_dir, prepare=first))
        for name, (source, target) in splits.items():
            if not source:
                raise UsageError(
                    f"The {name} split in {task_args.data_dir} is empty ({name}.de / {name}.en have no lines)."
                )
            limit = task_args.max_train_samples if name == "train" else task_args.max_eval_samples
            splits[name] = (source[:limit], target[:limit])
        if first:
            tokenizer = train_tokenizer(*splits["train"], task_args.bpe_merges, cache_dir / "bpe")
        else:
            tokenizer = IwsltBpeTokenizer.from_pretrained(cache_dir / "bpe")
    return splits, tokenizer


def evaluate_split(trainer, tokenizer, collator, batches, references: list[str], prefix: str) -> dict:
    """Trainer's loss metrics plus BLEU of the beam-search translation, saved as `<prefix>_results.json`."""
    metrics = trainer.evaluate(batches, metric_key_prefix=prefix)
    if trainer.is_world_process_zero():
        hypotheses = translate(trainer.model, tokenizer, batches, collator, desc=f"translate {prefix}")
        metrics.update(bleu_metrics(hypotheses, references, TARGET_LANG, prefix))
        write_lines(Path(trainer.args.output_dir) / f"{prefix}_hypotheses.txt", hypotheses)
    trainer.log_metrics(prefix, metrics)
    trainer.save_metrics(prefix, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    task_args, config = parse_args(argv)
    checkpoint = checkpoint_to_resume(config)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=config.get_process_log_level())
    splits, tokenizer = load_text_and_tokenizer(task_args, config)
    logger.info("Pairs: %s", {name: len(source) for name, (source, _) in splits.items()})

    set_seed(config.seed)
    model = build_model(task_args.arch, tokenizer, task_args.num_beams, task_args.max_new_tokens)
    collator = TranslationCollator(tokenizer.pad_token_id, model.config.decoder_start_token_id)
    batches = {
        name: batch_dataset(
            encode(tokenizer, source, target, desc=f"BPE-encode {name}"),
            task_args.max_tokens,
            seed=config.seed if name == "train" else None,
        )
        for name, (source, target) in splits.items()
    }

    trainer = FairseqRecipeTrainer(
        model=model,
        args=config,
        data_collator=collator,
        train_dataset=batches["train"],
        eval_dataset=batches["valid"],
        processing_class=tokenizer,
    )
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()

    evaluate_split(trainer, tokenizer, collator, batches["valid"], splits["valid"][1], "eval")
    if "test" in batches:
        evaluate_split(trainer, tokenizer, collator, batches["test"], splits["test"][1], "test")
    if trainer.is_world_process_zero():
        print(report_outputs(trainer, [f"{split}_results.json" for split in ("eval", "test") if split in batches],
                             task="IWSLT'14 De-En"))


if __name__ == "__main__":
    main()
