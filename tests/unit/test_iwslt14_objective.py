"""fairseq's objective: label smoothing ε/(V−1) normalized by target tokens, and decay on every parameter."""

import pytest
import torch
from torch.nn import functional as F

from lets_hf import LETSConfig
from lets_hf.tasks.iwslt14.model import build_model
from lets_hf.tasks.iwslt14.objective import FairseqRecipeTrainer, LabelSmoothedCrossEntropy
from tests.unit.test_iwslt14_model import dictionaries

EPSILON = 0.1


def _logits_and_labels(vocab=7):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (2, 5), generator=generator)
    labels[0, 3:] = -100  # padding
    return logits, labels


def _reference(logits, labels):
    """−Σ q·log p with fairseq's soft target q (1 − ε on the label, ε/(V−1) on each other token)."""
    vocab = logits.size(-1)
    keep = labels != -100
    q = torch.full((int(keep.sum()), vocab), EPSILON / (vocab - 1), dtype=logits.dtype)
    q[torch.arange(len(q)), labels[keep]] = 1 - EPSILON
    return F.cross_entropy(logits[keep], q, reduction="sum")


def test_label_smoothing_is_fairseqs_and_averages_over_target_tokens():
    logits, labels = _logits_and_labels()
    loss = LabelSmoothedCrossEntropy(EPSILON)({"logits": logits}, labels)
    torch.testing.assert_close(loss, _reference(logits, labels) / 8)  # 8 non-pad target tokens
    hf_style = F.cross_entropy(logits[labels != -100], labels[labels != -100], label_smoothing=EPSILON)
    assert not torch.isclose(loss, hf_style)  # ε/V (Trainer's LabelSmoother, torch) differs from ε/(V−1)


def test_accumulated_batches_divide_by_the_tokens_of_the_whole_batch():
    logits, labels = _logits_and_labels()
    loss = LabelSmoothedCrossEntropy(EPSILON)({"logits": logits}, labels, num_items_in_batch=20)
    torch.testing.assert_close(loss, _reference(logits, labels) / 20)


@pytest.mark.parametrize("smoothing", [0.0, EPSILON])
def test_trainer_decays_every_parameter_and_uses_the_fairseq_loss(tmp_path, smoothing):
    args = LETSConfig(output_dir=str(tmp_path), weight_decay=1e-4, label_smoothing_factor=smoothing, use_cpu=True,
                      report_to="none", sam_variant="sam")
    model = build_model("transformer_tiny", dictionaries(40, 30), num_beams=1, max_new_tokens=5)
    trainer = FairseqRecipeTrainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 1e-4 for p in group["params"]}
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}  # Marian's sinusoids are frozen
    assert decayed == trainable  # biases and LayerNorm included, unlike Trainer's default
    assert isinstance(trainer.compute_loss_func, LabelSmoothedCrossEntropy) == (smoothing > 0)
