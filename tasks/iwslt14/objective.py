"""fairseq's training objective where Trainer's differs: the label-smoothed loss and weight decay.

- fairseq's `label_smoothed_cross_entropy` puts 1 − ε on the target and ε/(V−1) on every
  other token, and divides the summed loss by the number of target tokens of the whole
  (accumulated) batch. Trainer's `LabelSmoother` spreads ε/V over all V tokens.
- fairseq's Adam decays every parameter; Trainer exempts biases and LayerNorm weights.
"""

from __future__ import annotations

import torch

from lets_hf import LETSTrainer

from .data import LABEL_PAD


class LabelSmoothedCrossEntropy:
    """A Trainer `compute_loss_func`: fairseq's label-smoothed cross-entropy with smoothing `epsilon`."""

    def __init__(self, epsilon: float):
        self.epsilon = epsilon

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        logits = outputs["logits"]
        log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        keep = labels != LABEL_PAD
        nll = -log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        smooth = -log_probs.sum(-1)
        eps_i = self.epsilon / (log_probs.size(-1) - 1)
        per_token = (1.0 - self.epsilon - eps_i) * nll + eps_i * smooth
        tokens = num_items_in_batch if num_items_in_batch is not None else keep.sum()
        return per_token.masked_fill(~keep, 0.0).sum() / tokens


class FairseqRecipeTrainer(LETSTrainer):
    """`LETSTrainer` with fairseq's objective: its label smoothing, and weight decay on every parameter."""

    def __init__(self, model=None, args=None, **kwargs):
        if args is not None and args.label_smoothing_factor > 0 and kwargs.get("compute_loss_func") is None:
            # Trainer prefers compute_loss_func over its LabelSmoother
            kwargs["compute_loss_func"] = LabelSmoothedCrossEntropy(args.label_smoothing_factor)
        super().__init__(model=model, args=args, **kwargs)

    def get_decay_parameter_names(self, model) -> list[str]:
        return [name for name, _ in model.named_parameters()]
