"""How a model normalizes its loss, found from what the model does, not from its signature.

Trainer assumes that a model whose `forward` takes `**kwargs` divides its loss by
`num_items_in_batch` (the example or token count of the whole accumulated, all-rank batch):
it then skips the division by the accumulation steps and, with
`average_tokens_across_devices`, multiplies the loss by the number of processes. Many heads
take `**kwargs` but drop `num_items_in_batch` (BERT's sequence and token classification,
BART, Marian, T5): their loss is a micro-batch mean, so Trainer's step, its logged loss and
LETS's gap grow with the accumulation steps and the processes (an open upstream bug).
Trainer also decides from `model.loss_type` whether a causal LM's count skips position 0;
GPT-2 has no `loss_type`, so its count includes targets the model never predicts.

`probe` runs the model on one batch with two counts, and once without, and reads the answer
off the losses. `LossNormalization` is the verdict; for token heads that drop the count it
recomputes the loss from the logits as a token cross-entropy that honours it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: The model divides its loss by `num_items_in_batch`: Trainer's scaling is exact.
BY_NUM_ITEMS = "num_items_in_batch"
#: The loss is a mean over each micro-batch: divide by the accumulation steps, do not scale by processes.
MICRO_BATCH_MEAN = "micro-batch mean"
#: A token loss that drops the count: recompute it from the logits as Σ token losses / num_items_in_batch.
TOKEN_MEAN = "token mean"
#: The user said how the loss is scaled (`compute_loss_func`, `loss_is_scaled_for_ga`, `model_accepts_loss_kwargs`).
USER = "as configured"

IGNORE_INDEX = -100
_SAME = 1e-3  # relative tolerance of "the two losses are equal" / "one is twice the other"
_REPRODUCED = 1e-4  # relative tolerance of "the recomputed loss is the model's own"


@dataclass(frozen=True)
class LossNormalization:
    kind: str
    #: BY_NUM_ITEMS and TOKEN_MEAN: the loss pairs logit t with label t+1, so `num_items_in_batch`
    #: counts `labels[..., 1:]`. `None`: not measured (keep Trainer's count).
    shift_labels: bool | None = None
    reason: str = ""

    def token_loss(self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """Σ token cross-entropies / `num_items_in_batch` (the micro-batch token mean when it is `None`).

        Half-precision logits are upcast to float32, as transformers' loss functions do; float64 logits stay
        float64 (those functions would round them to float32), so a float64 model's loss is the model's own."""
        if self.shift_labels:  # logit t predicts label t+1
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                               ignore_index=IGNORE_INDEX, reduction=reduction)
        return loss if num_items_in_batch is None else loss / torch.as_tensor(num_items_in_batch).to(loss.device)

    def describe(self, model_name: str, corrects_trainer: bool = False) -> str:
        what = {
            BY_NUM_ITEMS: "divides its loss by num_items_in_batch; Trainer's loss scaling is kept",
            MICRO_BATCH_MEAN: "ignores num_items_in_batch; its loss is a micro-batch mean, so it is divided by the "
            "gradient accumulation steps and not multiplied by the number of processes",
            TOKEN_MEAN: "ignores num_items_in_batch; its token loss is recomputed from the logits as the token mean "
            "of the whole accumulated batch",
            USER: "loss scaling as configured, no probe",
        }[self.kind]
        if self.shift_labels is not None and self.kind in (BY_NUM_ITEMS, TOKEN_MEAN):
            what += f", counting {'labels[..., 1:]' if self.shift_labels else 'every label'} as its loss does"
        message = f"{model_name} {what}{f' ({self.reason})' if self.reason else ''}."
        if corrects_trainer:
            message += (
                " Trainer alone would scale it otherwise: it infers the normalization from forward's signature "
                "and the model's loss_type (an open upstream issue)."
            )
        return message


def logits_of(outputs, has_loss: bool = True) -> torch.Tensor:
    """The logits of a model output, a dict or a tuple (after the loss when one is returned, as Trainer reads them)."""
    if isinstance(outputs, dict):
        return outputs["logits"]
    return outputs[1] if has_loss else outputs[0]


def _loss_of(outputs) -> float:
    return float(outputs["loss"] if isinstance(outputs, dict) else outputs[0])


_ODD_DEPENDENCE = "its loss changes with num_items_in_batch, but not as 1/num_items_in_batch"
_NOT_REPRODUCED = (
    "a token loss that plain cross-entropy on the logits does not reproduce: each micro-batch's token mean "
    "counts equally"
)
#: Every verdict `probe` can return, in a fixed order (ranks compare their verdicts by index).
VERDICTS = (
    LossNormalization(BY_NUM_ITEMS, shift_labels=False),
    LossNormalization(BY_NUM_ITEMS, shift_labels=True),
    LossNormalization(BY_NUM_ITEMS),
    LossNormalization(BY_NUM_ITEMS, reason=_ODD_DEPENDENCE),
    LossNormalization(MICRO_BATCH_MEAN),
    LossNormalization(TOKEN_MEAN, shift_labels=False),
    LossNormalization(TOKEN_MEAN, shift_labels=True),
    LossNormalization(MICRO_BATCH_MEAN, reason=_NOT_REPRODUCED),
)
(_COUNTS_ALL, _COUNTS_SHIFTED, _COUNT_UNKNOWN, _ODD, _MICRO_BATCH_MEAN, _TOKENS, _SHIFTED_TOKENS, _UNREPRODUCED) = (
    VERDICTS
)


def probe(model: torch.nn.Module, inputs: dict) -> LossNormalization | None:
    """Which normalization `model`'s loss needs, from forwards on `inputs` (which hold `labels`).

    Eval mode and no grad: no dropout draws, so the run's random stream is untouched.
    Returns one of `VERDICTS`, or `None` when this batch cannot tell (no labels to count, a
    zero or non-finite loss): probe the next one.
    """
    labels = inputs["labels"]
    count = labels.ne(IGNORE_INDEX).sum()
    if count == 0:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(**inputs, num_items_in_batch=count)
            loss, loss_doubled = _loss_of(outputs), _loss_of(model(**inputs, num_items_in_batch=2 * count))
            own_mean = _loss_of(model(**inputs)) if math.isclose(loss, 2 * loss_doubled, rel_tol=_SAME) else None
    finally:
        model.train(was_training)
    if not (math.isfinite(loss) and math.isfinite(loss_doubled)) or loss == 0:
        return None
    if own_mean is not None:
        return _counting(loss * float(count) / own_mean, labels) if own_mean else _COUNT_UNKNOWN
    if not math.isclose(loss, loss_doubled, rel_tol=_SAME):
        return _ODD
    logits = logits_of(outputs)
    if labels.dim() < 2 or logits.dim() != labels.dim() + 1:  # classification, regression, multiple choice
        return _MICRO_BATCH_MEAN
    for candidate in (_TOKENS, _SHIFTED_TOKENS):
        if math.isclose(float(candidate.token_loss(logits, labels)), loss, rel_tol=_REPRODUCED):
            return candidate
    return _UNREPRODUCED


def _counting(items_in_own_mean: float, labels: torch.Tensor) -> LossNormalization:
    """Which labels the model's own mean divides by: all of them, or `labels[..., 1:]` (a causal LM)."""
    every = int(labels.ne(IGNORE_INDEX).sum())
    shifted = int(labels[..., 1:].ne(IGNORE_INDEX).sum()) if labels.dim() >= 2 else every
    if shifted != every and abs(items_in_own_mean - shifted) < 0.5:
        return _COUNTS_SHIFTED
    if abs(items_in_own_mean - every) < 0.5:
        return _COUNTS_ALL
    return _COUNT_UNKNOWN
