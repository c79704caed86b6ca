"""LETS beyond `LETSTrainer`: Seq2SeqTrainer with generation, a user's own Trainer subclass,
torch.compile, gradient checkpointing and models that return tuples."""

from dataclasses import dataclass

import pytest
import torch
from transformers import Seq2SeqTrainingArguments, Trainer

from lets_hf import (
    LETSArguments, LETSConfig, LETSMixin, LETSSeq2SeqConfig, LETSSeq2SeqTrainer, LETSTrainer, RhoBatches,
    available_rules,
)
from lets_hf.errors import UsageError
from tests.checks import assert_resume_is_exact
from tests.heads import GLOBAL_BATCH, RHO_LR, STEPS, build_dataset, build_model, train_rows, validation_rows
from tests.toy import TinyClassifier, ToyDataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _seq2seq_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path), sam_variant="sam", rho=0.05, learn_rho=True, rho_batch_size=8, rho_optimizer="sgd",
        rho_lr=10000.0, per_device_train_batch_size=8, per_device_eval_batch_size=4, optim="sgd", learning_rate=0.1,
        lr_scheduler_type="constant", max_grad_norm=0.0, max_steps=3, report_to="none", use_cpu=True,
        disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0, train_sampling_strategy="sequential",
        predict_with_generate=True, generation_max_length=5, generation_num_beams=2,
    )
    return LETSSeq2SeqConfig(**{**settings, **overrides})


def _seq2seq_trainer(tmp_path, **overrides):
    model = build_model("bart")
    model.generation_config.forced_bos_token_id = None
    return LETSSeq2SeqTrainer(
        model=model, args=_seq2seq_args(tmp_path, **overrides), train_dataset=train_rows("bart"),
        eval_dataset=validation_rows("bart"), rho_dataset=validation_rows("bart"),
        compute_metrics=lambda prediction: {"generated_length": float(prediction.predictions.shape[-1])},
    )


def test_seq2seq_generates_in_evaluate_and_predict_with_learned_rho(tmp_path):
    trainer = _seq2seq_trainer(tmp_path)
    calls = []
    generate = trainer.model.generate

    def recording_generate(*args, **kwargs):
        generated = generate(*args, **kwargs)
        calls.append((kwargs.get("max_length"), kwargs.get("num_beams"), generated.shape[-1]))
        return generated

    trainer.model.generate = recording_generate
    trainer.train()
    assert trainer.rho != 0.05 and any("gen_gap" in entry for entry in trainer.state.log_history)
    assert calls == []  # training never generates
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and "eval_generated_length" in metrics  # compute_metrics saw generated tokens
    assert calls and all(call[:2] == (5, 2) and call[2] <= 5 for call in calls)
    calls.clear()
    trainer.predict(validation_rows("bart"), max_length=4, num_beams=1)
    assert calls and all(call[:2] == (4, 1) and call[2] <= 4 for call in calls)


def test_seq2seq_accumulation_equals_one_big_batch(tmp_path):
    one = _seq2seq_trainer(tmp_path / "one")
    one.train()
    accumulated = _seq2seq_trainer(tmp_path / "acc", per_device_train_batch_size=2, gradient_accumulation_steps=4)
    accumulated.train()
    assert accumulated.rho == pytest.approx(one.rho, rel=1e-6, abs=1e-6) and one.rho != 0.05
    for p, q in zip(one.model.parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_seq2seq_resume_is_exact(tmp_path):
    def run(output_dir, resume=None):
        trainer = _seq2seq_trainer(output_dir, max_steps=4, save_strategy="steps", save_steps=2)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    assert_resume_is_exact(run, tmp_path, initial_rho=0.05)


def test_seq2seq_config_in_either_base_order_keeps_defaults_and_is_checked(tmp_path):
    @dataclass
    class Seq2SeqFirst(Seq2SeqTrainingArguments, LETSArguments):
        pass

    for config in (LETSSeq2SeqConfig(output_dir=str(tmp_path), use_cpu=True), Seq2SeqFirst(output_dir=str(tmp_path), use_cpu=True)):
        assert (config.predict_with_generate, config.generation_num_beams, config.sam_variant) == (False, None, "sam")
    unchecked = Seq2SeqFirst(output_dir=str(tmp_path), use_cpu=True, rho=-1.0)
    with pytest.raises(UsageError, match="rho must be > 0"):
        LETSSeq2SeqTrainer(model=build_model("bart"), args=unchecked)


class _ScaledLossTrainer(Trainer):
    """A user's own Trainer subclass: it doubles the loss in `compute_loss`."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        return (2 * loss, outputs) if return_outputs else 2 * loss


class _LETSScaledLossTrainer(LETSMixin, _ScaledLossTrainer):  # the two-line recipe of the README
    pass


def test_the_mixin_on_a_users_own_trainer_runs_its_compute_loss(make_args):
    """Doubling the loss doubles SGD's steps: equal to LETSTrainer at twice the learning rate and ρ-independent SAM."""
    args = dict(sam_variant="sam", rho=0.1, max_steps=3, per_device_train_batch_size=8)
    own = _LETSScaledLossTrainer(model=TinyClassifier(dtype=torch.float64), args=make_args(**args),
                                 train_dataset=ToyDataset(64, dtype=torch.float64))
    own.train()
    reference = LETSTrainer(model=TinyClassifier(dtype=torch.float64), args=make_args(**args, learning_rate=0.2),
                            train_dataset=ToyDataset(64, dtype=torch.float64))
    reference.train()
    for p, q in zip(own.model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_a_subclass_draws_rho_batches_from_its_own_get_rho_batches(make_args):
    """`get_rho_batches` is to ρ's validation data what `get_train_dataloader` is to training's: a subclass that
    draws them from other data trains exactly as a trainer given that data as `rho_dataset` (a BERT head)."""
    head = "bert-classification"
    held_out, other_data = validation_rows(head), build_dataset(head, GLOBAL_BATCH, seed=3)

    class OwnRhoBatches(LETSTrainer):
        def get_rho_batches(self):
            return RhoBatches(held_out, self.data_collator, batch_size=self.args.per_device_train_batch_size,
                              world_size=self.args.world_size, rank=self.args.process_index, seed=self.args.rho_seed)

    def trained(trainer_class, rho_dataset):
        args = make_args(sam_variant="sam", rho=0.05, learn_rho=True, rho_optimizer="sgd", rho_lr=RHO_LR[head],
                         per_device_train_batch_size=GLOBAL_BATCH, max_steps=STEPS)
        trainer = trainer_class(model=build_model(head), args=args, train_dataset=train_rows(head),
                                rho_dataset=rho_dataset)
        trainer.train()
        return trainer

    own = trained(OwnRhoBatches, other_data)
    given, other = trained(LETSTrainer, held_out), trained(LETSTrainer, other_data)
    assert own.rho == given.rho != other.rho != 0.05
    for p, q in zip(own.model.parameters(), given.model.parameters()):
        assert torch.equal(p, q)


def test_the_mixin_refuses_arguments_without_the_lets_fields(tmp_path):
    with pytest.raises(TypeError, match="needs args with the LETS fields"):
        _LETSScaledLossTrainer(model=TinyClassifier(), args=Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True))


@pytest.mark.parametrize("variant", available_rules())
def test_torch_compile_with_every_rule_and_learned_rho(tmp_path, variant):
    """Compiled (dynamo, aot_eager backend) and eager runs of a real BERT head agree."""

    def run(compiled):
        args = LETSConfig(
            output_dir=str(tmp_path / str(compiled)), sam_variant=variant, learn_rho=True, rho_batch_size=8,
            per_device_train_batch_size=8, optim="sgd", learning_rate=0.1, max_grad_norm=0.0, max_steps=3,
            report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
            torch_compile=compiled, torch_compile_backend="aot_eager" if compiled else None,
        )
        trainer = LETSTrainer(model=build_model("bert-classification"), args=args,
                              train_dataset=train_rows("bert-classification"), rho_dataset=validation_rows("bert-classification"))
        trainer.train()
        return trainer

    compiled, eager = run(True), run(False)
    assert compiled.rho == pytest.approx(eager.rho, rel=1e-9)
    for p, q in zip(compiled.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}])
def test_gradient_checkpointing_with_learned_rho_equals_the_plain_run(tmp_path, kwargs):
    def run(checkpointing):
        args = LETSConfig(
            output_dir=str(tmp_path / str(checkpointing)), sam_variant="sam", learn_rho=True, rho_batch_size=8,
            rho_optimizer="sgd", rho_lr=1000.0, per_device_train_batch_size=8, optim="sgd", learning_rate=0.1,
            max_grad_norm=0.0, max_steps=3, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
            seed=0, gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=kwargs,
        )
        trainer = LETSTrainer(model=build_model("bert-classification"), args=args,
                              train_dataset=train_rows("bert-classification"), rho_dataset=validation_rows("bert-classification"))
        trainer.train()
        return trainer

    checkpointed, plain = run(True), run(False)
    assert checkpointed.model.is_gradient_checkpointing and checkpointed.args.gradient_checkpointing_kwargs == {
        "use_reentrant": False
    }
    assert checkpointed.rho == pytest.approx(plain.rho, rel=1e-9) and plain.rho != 0.05
    for p, q in zip(checkpointed.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_reentrant_checkpointing_with_learned_rho_is_refused(tmp_path):
    args = LETSConfig(output_dir=str(tmp_path), learn_rho=True, use_cpu=True, report_to="none",
                      gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(UsageError, match=r"gradient_checkpointing_kwargs=\{'use_reentrant': False\}"):
        LETSTrainer(model=build_model("bert-classification"), args=args, train_dataset=train_rows("bert-classification"))


class _TupleClassifier(TinyClassifier):
    """Returns (loss, logits) like a 🤗 model called with return_dict=False."""

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        return (out["loss"], out["logits"]) if labels is not None else (out["logits"],)


def test_bisam_on_a_model_that_returns_tuples(make_args):
    def run(model_cls):
        args = make_args(sam_variant="bisam", learn_rho=True, rho_batch_size=4, max_steps=3)
        trainer = LETSTrainer(model=model_cls(dtype=torch.float64), args=args, train_dataset=ToyDataset(64, dtype=torch.float64))
        trainer.train()
        return trainer

    tuples, dicts = run(_TupleClassifier), run(TinyClassifier)
    assert tuples.rho == dicts.rho
    for p, q in zip(tuples.model.parameters(), dicts.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
