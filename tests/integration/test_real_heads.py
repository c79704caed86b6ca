"""Loss scale on real 🤗 heads: gradient accumulation changes nothing, and every logged loss and
gap is the per-example or per-token mean, checked against losses computed by hand from logits.

Trainer scales the loss from `forward`'s signature; BERT's classification head and BART drop
`num_items_in_batch`, and GPT-2's count includes position 0 (lets_hf/loss_normalization.py).
The same cases on 2 processes: tests/distributed/test_ddp_real_heads.py.
"""

import logging

import pytest
import torch
import torch.nn.functional as F

from lets_hf import LETSConfig, LETSTrainer
from lets_hf import loss_normalization as norms
from tests.heads import CASES, EXPECTED_NORMALIZATION, GLOBAL_BATCH, HEADS, build_model, train, train_rows, validation_rows
#: Logged losses are float32-level: Trainer sums them in a float32 tensor, and GPT-2's loss function casts to float32.
LOSS_TOL = dict(rtol=1e-6, atol=2e-6)


def hand_loss(head: str, model, rows: list[dict]) -> float:
    """The mean loss of `rows` in one batch, from the logits with plain torch: per example, or per real target token."""
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, **({"labels": labels} if head == "bart" else {})).logits.double()
    if head == "bert-classification":
        return float(F.cross_entropy(logits, labels))
    if head == "bert-regression":
        return float(F.mse_loss(logits.squeeze(-1), labels))
    if head == "gpt2":  # logit t predicts token t+1
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    return float(F.cross_entropy(logits[keep], labels[keep]))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("head", HEADS)
def test_accumulation_equals_one_big_batch(tmp_path, one_thread, head, case):
    one = train(head, case, str(tmp_path / "one"), batch=GLOBAL_BATCH)
    accumulated = train(head, case, str(tmp_path / "acc"), batch=2, accumulation=4)
    torch.testing.assert_close(accumulated["theta"], one["theta"], rtol=1e-6, atol=1e-7)
    assert accumulated["rho"] == pytest.approx(one["rho"], rel=1e-6, abs=1e-6)
    assert accumulated["loss"] == pytest.approx(one["loss"], **{"rel": LOSS_TOL["rtol"], "abs": LOSS_TOL["atol"]})
    assert accumulated["gen_gap"] == pytest.approx(one["gen_gap"], rel=1e-6, abs=2e-6)
    assert (accumulated["normalization"].kind, accumulated["normalization"].shift_labels) == EXPECTED_NORMALIZATION[head]
    if case == "lets-sam":
        assert len(one["gen_gap"]) == 2  # ρ updates at steps 2 and 3
        assert abs(one["rho"] - 0.05) > 1e-3  # ρ moved, so the comparison can fail


@pytest.mark.parametrize("head", HEADS)
def test_logged_loss_and_gap_are_means_computed_by_hand(tmp_path, one_thread, head):
    """Under accumulation (2 × 4): loss at θ_0 and θ_1, and gap = L_val(θ_1) − L_train(θ_1), from the logits."""
    run = train(head, "lets-sam", str(tmp_path / "run"), batch=2, accumulation=4)
    after_one_step = train(head, "lets-sam", str(tmp_path / "step1"), batch=2, accumulation=4, max_steps=1)["model"]
    rows = train_rows(head)
    train_at_0 = hand_loss(head, build_model(head), rows[:GLOBAL_BATCH])
    train_at_1 = hand_loss(head, after_one_step, rows[GLOBAL_BATCH : 2 * GLOBAL_BATCH])
    val_at_1 = hand_loss(head, after_one_step, validation_rows(head))
    torch.testing.assert_close(run["loss"][:2], [train_at_0, train_at_1], **LOSS_TOL)
    torch.testing.assert_close(run["gen_gap"][0], val_at_1 - train_at_1, **LOSS_TOL)


@pytest.mark.parametrize("head", HEADS)
def test_evaluation_before_training_reports_the_mean(tmp_path, one_thread, head):
    """The probe also runs when `evaluate` comes first (Trainer's eval loss has the same scaling)."""
    args = LETSConfig(
        output_dir=str(tmp_path), sam_variant="sam", per_device_eval_batch_size=GLOBAL_BATCH, report_to="none",
        use_cpu=True, disable_tqdm=True,
    )
    model = build_model(head)
    rows = train_rows(head)[:GLOBAL_BATCH]
    metrics = LETSTrainer(model=model, args=args).evaluate(eval_dataset=rows)
    assert metrics["eval_loss"] == pytest.approx(hand_loss(head, model, rows), rel=1e-6, abs=2e-6)


def _bert_trainer(tmp_path, trainer_cls=LETSTrainer, **kwargs):
    args = LETSConfig(
        output_dir=str(tmp_path), sam_variant="none", per_device_train_batch_size=2, gradient_accumulation_steps=4,
        max_steps=1, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=0.0,
        train_sampling_strategy="sequential", report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=1,
        save_strategy="no",
    )
    return trainer_cls(model=build_model("bert-classification"), args=args, train_dataset=train_rows("bert-classification"), **kwargs)


@pytest.mark.parametrize("accumulation", [4, 1])  # where Trainer alone would err, and where it would not
def test_the_choice_is_logged_once_with_the_model_class_at_the_default_level(tmp_path, one_thread, caplog, accumulation):
    trainer = _bert_trainer(tmp_path)
    trainer.args.max_steps, trainer.args.gradient_accumulation_steps = 3, accumulation
    with caplog.at_level(logging.WARNING, logger="lets_hf"):  # Python's default, and transformers'
        trainer.train()
    records = [r for r in caplog.records if r.name.startswith("lets_hf")]
    assert len(records) == 1 and records[0].levelname == "WARNING"
    message = records[0].getMessage()
    assert message.startswith("BertForSequenceClassification ignores num_items_in_batch")
    assert "divided by the gradient accumulation steps" in message
    assert ("Trainer alone would scale it otherwise" in message) == (accumulation > 1)


def _first_loss(trainer) -> float:
    trainer.train()
    return trainer.state.log_history[0]["loss"]


def test_explicit_user_choices_win_over_the_probe(tmp_path, one_thread):
    """Each of Trainer's own switches, set by the user, is obeyed as plain Trainer obeys it."""
    rows = train_rows("bert-classification")[:GLOBAL_BATCH]
    mean = hand_loss("bert-classification", build_model("bert-classification"), rows)

    probed = _bert_trainer(tmp_path / "probed")
    assert _first_loss(probed) == pytest.approx(mean, rel=1e-6)

    forced = _bert_trainer(tmp_path / "forced")
    forced.model_accepts_loss_kwargs = True  # the user insists: Trainer then skips the 1/4 of accumulation
    assert _first_loss(forced) == pytest.approx(4 * mean, rel=1e-6)
    assert forced.loss_normalization.kind == norms.USER

    class ScaledTrainer(LETSTrainer):
        loss_is_scaled_for_ga = True

    scaled = _bert_trainer(tmp_path / "scaled", ScaledTrainer)
    assert _first_loss(scaled) == pytest.approx(4 * mean, rel=1e-6)
    assert scaled.loss_normalization.reason == "loss_is_scaled_for_ga"

    def summed(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs["logits"], labels, reduction="sum") / num_items_in_batch

    custom = _bert_trainer(tmp_path / "custom", compute_loss_func=summed)
    assert _first_loss(custom) == pytest.approx(mean, rel=1e-6)
    assert custom.loss_normalization.reason == "compute_loss_func"


@pytest.mark.parametrize(("head", "shift_labels"), [("bart", False), ("gpt2", True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_recomputed_token_mean_keeps_the_models_precision(one_thread, head, shift_labels, dtype):
    """LETS's token-mean recomputation against plain cross-entropy on the real targets: float64 logits keep
    float64 (transformers' loss functions would round them to float32), bf16 ones are upcast to float32."""
    model = build_model(head).to(dtype)
    rows = train_rows(head)[:GLOBAL_BATCH]
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    with torch.no_grad():
        logits = model(**batch).logits
    recompute = norms.LossNormalization(norms.TOKEN_MEAN, shift_labels=shift_labels)
    mean = recompute.token_loss(logits, batch["labels"])
    assert mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    by_hand = hand_loss(head, model, rows)
    assert float(mean) == pytest.approx(by_hand, rel=1e-12 if dtype == torch.float64 else 1e-6)
    count = batch["labels"][..., int(shift_labels):].ne(-100).sum()
    assert float(recompute.token_loss(logits, batch["labels"], 2 * count)) == pytest.approx(by_hand / 2, rel=1e-6)


def test_probe_verdicts_on_more_heads(one_thread):
    """Heads beyond the four trained above: token classification and T5 drop the count, Llama honours it."""
    import transformers as tf

    torch.manual_seed(0)
    ids = torch.randint(3, 64, (4, 6))
    token_labels = ids.masked_fill(torch.arange(6) >= torch.tensor([[2], [6], [3], [5]]), -100)
    small = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    cases = [
        (tf.BertForTokenClassification(tf.BertConfig(num_labels=3, **small)), token_labels % 3, (norms.TOKEN_MEAN, False)),
        (
            tf.T5ForConditionalGeneration(
                tf.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=37, num_layers=1, num_heads=2, decoder_start_token_id=0)
            ),
            token_labels,
            (norms.TOKEN_MEAN, False),
        ),
        (tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **small)), token_labels, (norms.BY_NUM_ITEMS, True)),
    ]
    for model, labels, expected in cases:
        labels = labels.masked_fill(token_labels == -100, -100)
        verdict = norms.probe(model, {"input_ids": ids, "labels": labels})
        assert (verdict.kind, verdict.shift_labels) == expected, type(model).__name__
