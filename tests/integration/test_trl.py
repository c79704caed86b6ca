"""LETS in TRL's SFTTrainer (`lets_hf.trl`), on a tiny Llama and real SST-2 sentences."""

import pytest
import torch

pytest.importorskip("trl", reason="the TRL tests need trl: pip install 'lets-hf[trl]' (the dev extra has it)")

from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from lets_hf.errors import UsageError  # noqa: E402
from lets_hf.trl import LETSSFTConfig, LETSSFTTrainer  # noqa: E402
from tests.checks import assert_resume_is_exact  # noqa: E402
from tests.lm import sentences, tiny_llama, word_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def text_data(count=40, start=0):
    return Dataset.from_dict({"text": sentences(count, start)})


def data(kind: str, count=40, start=0) -> Dataset:
    lines = sentences(count, start)
    halves = [(" ".join(s.split()[: len(s.split()) // 2]), " ".join(s.split()[len(s.split()) // 2 :])) for s in lines]
    if kind == "messages":
        return Dataset.from_dict({"messages": [
            [{"role": "user", "content": a}, {"role": "assistant", "content": b}] for a, b in halves
        ]})
    if kind == "prompt-completion":
        return Dataset.from_dict({"prompt": [a for a, _ in halves], "completion": [" " + b for _, b in halves]})
    return Dataset.from_dict({"text": lines})


def sft_args(tmp_path, config_cls=LETSSFTConfig, **overrides):
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=0.1, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, report_to="none", use_cpu=True,
        bf16=False, save_strategy="no", disable_tqdm=True, max_length=32, seed=0, gradient_checkpointing=False,
        train_sampling_strategy="sequential", dataset_num_proc=None,
    )
    if config_cls is not SFTConfig:
        settings.update(sam_variant="sam", rho=0.05)
    return config_cls(**{**settings, **overrides})


@pytest.mark.parametrize("kind,packing", [("text", False), ("messages", False), ("prompt-completion", False), ("text", True)])
def test_learned_rho_with_the_automatic_split_of_the_prepared_data(tmp_path, tokenizer, kind, packing):
    args = sft_args(tmp_path, learn_rho=True, rho_batch_size=2, packing=packing, rho_val_fraction=0.2,
                    **({"assistant_only_loss": True} if kind == "messages" else {}))
    trainer = LETSSFTTrainer(tiny_llama(tokenizer), args=args, train_dataset=data(kind), processing_class=tokenizer)
    assert "input_ids" in trainer.rho_dataset.column_names  # split after TRL tokenized (and packed)
    assert len(trainer.rho_dataset) + len(trainer.train_dataset) == len(
        SFTTrainer(tiny_llama(tokenizer), args=sft_args(tmp_path, SFTConfig, packing=packing,
                   **({"assistant_only_loss": True} if kind == "messages" else {})),
                   train_dataset=data(kind), processing_class=tokenizer).train_dataset
    )
    trainer.train()
    gaps = [entry["gen_gap"] for entry in trainer.state.log_history if "gen_gap" in entry]
    assert len(gaps) == 2 and all(abs(gap) < 10 for gap in gaps) and trainer.rho != 0.05


def test_a_given_rho_dataset_is_prepared_like_the_train_set(tmp_path, tokenizer):
    args = sft_args(tmp_path, learn_rho=True, rho_batch_size=2)
    trainer = LETSSFTTrainer(tiny_llama(tokenizer), args=args, train_dataset=data("messages"),
                             rho_dataset=data("messages", 8, start=100), processing_class=tokenizer)
    assert "input_ids" in trainer.rho_dataset.column_names and len(trainer.rho_dataset) == 8
    trainer.train()
    assert len([entry for entry in trainer.state.log_history if "gen_gap" in entry]) == 2


def test_trl_metrics_count_each_training_token_once(tmp_path, tokenizer):
    """num_tokens and the first step's token accuracy equal plain SFTTrainer's, despite the extra passes."""
    plain = SFTTrainer(tiny_llama(tokenizer), args=sft_args(tmp_path / "plain", SFTConfig), train_dataset=text_data(),
                       processing_class=tokenizer)
    plain.train()
    lets = LETSSFTTrainer(tiny_llama(tokenizer), args=sft_args(tmp_path / "lets", learn_rho=True, rho_batch_size=2),
                          train_dataset=text_data(), rho_dataset=text_data(8, start=100), processing_class=tokenizer)
    lets.train()
    plain_logs = [entry for entry in plain.state.log_history if "loss" in entry]
    lets_logs = [entry for entry in lets.state.log_history if "loss" in entry]
    assert [entry["num_tokens"] for entry in lets_logs] == [entry["num_tokens"] for entry in plain_logs]
    for key in ("mean_token_accuracy", "entropy", "loss"):  # step 1: same θ, same batch, the first pass only
        assert lets_logs[0][key] == pytest.approx(plain_logs[0][key], rel=1e-6)


def test_lora_perturbs_only_the_adapters(tmp_path, tokenizer):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    trainer = LETSSFTTrainer(tiny_llama(tokenizer), args=sft_args(tmp_path, learn_rho=True, rho_batch_size=2),
                             train_dataset=text_data(), peft_config=lora, processing_class=tokenizer)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    adapters = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert adapters and all("lora_" in n for n in adapters) and len(trainer.engine._backup) == len(adapters)
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if n in frozen)


def test_accumulation_equals_one_big_batch(tmp_path, tokenizer):
    def run(batch, accumulation):
        args = sft_args(tmp_path / f"{batch}x{accumulation}", learn_rho=True, rho_batch_size=4, rho_optimizer="sgd",
                        rho_lr=1.0, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        trainer = LETSSFTTrainer(tiny_llama(tokenizer).double(), args=args, train_dataset=text_data(),
                                 rho_dataset=text_data(8, start=100), processing_class=tokenizer)
        trainer.train()
        return trainer

    one, accumulated = run(4, 1), run(2, 2)
    assert accumulated.rho == pytest.approx(one.rho, rel=1e-6, abs=1e-7) and one.rho != 0.05
    for p, q in zip(one.model.parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    losses = [[entry["loss"] for entry in t.state.log_history if "loss" in entry] for t in (one, accumulated)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_resume_is_exact(tmp_path, tokenizer):
    def run(output_dir, resume=None):
        args = sft_args(output_dir, learn_rho=True, rho_batch_size=2, max_steps=4, save_strategy="steps", save_steps=2)
        trainer = LETSSFTTrainer(tiny_llama(tokenizer), args=args, train_dataset=text_data(),
                                 rho_dataset=text_data(8, start=100), processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    assert_resume_is_exact(run, tmp_path, initial_rho=0.05, rtol=1e-6, atol=1e-8)


def test_trl_defaults_survive_in_either_base_order_and_lets_fields_are_checked(tmp_path):
    from dataclasses import dataclass

    from lets_hf import LETSArguments

    @dataclass
    class SFTFirst(SFTConfig, LETSArguments):
        pass

    plain = SFTConfig(output_dir=str(tmp_path), use_cpu=True)
    for config in (LETSSFTConfig(output_dir=str(tmp_path), use_cpu=True), SFTFirst(output_dir=str(tmp_path), use_cpu=True)):
        assert (config.learning_rate, config.logging_steps, config.gradient_checkpointing) == (
            plain.learning_rate, plain.logging_steps, plain.gradient_checkpointing
        )
        assert config.sam_variant == "sam"
    unchecked = SFTFirst(output_dir=str(tmp_path), use_cpu=True, rho=float("nan"))  # SFTConfig's __post_init__ ran alone
    with pytest.raises(UsageError, match="rho must be a finite number"):
        LETSSFTTrainer(tiny_llama(word_tokenizer()), args=unchecked, train_dataset=text_data(), processing_class=word_tokenizer())


def test_bisam_is_refused_with_a_reason(tmp_path, tokenizer):
    with pytest.raises(UsageError, match="fused LM head"):
        LETSSFTTrainer(tiny_llama(tokenizer), args=sft_args(tmp_path, sam_variant="bisam"), train_dataset=text_data(),
                       processing_class=tokenizer)


def test_the_lora_example_runs_offline(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "sft_lora.py"), "--max_steps", "2", "--output_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final rho = " in done.stdout
