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
`LossNormalizationHooks` are the Trainer methods that probe once and apply the verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.trainer_utils import unwrap_peft_model
from transformers.utils import logging

from .distributed import same_on_all_ranks

logger = logging.get_logger(__name__)

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


class LossNormalizationHooks:
    """Trainer's hooks that settle and apply the loss normalization (a base of `LETSMixin`, before `Trainer`):
    the probe runs where Trainer counts `num_items_in_batch`, and `compute_loss` recomputes a token mean
    for heads that drop the count."""

    @property
    def model_accepts_loss_kwargs(self) -> bool:
        """Trainer infers it in `__init__` from `forward`'s signature; LETSTrainer corrects it by a probe
        (`probe`). A value assigned after `__init__` is the user's and wins."""
        return self._model_accepts_loss_kwargs

    @model_accepts_loss_kwargs.setter
    def model_accepts_loss_kwargs(self, value: bool) -> None:
        self._model_accepts_loss_kwargs = value
        if "loss_normalization" in self.__dict__:  # set after __init__: the user's explicit choice
            self.loss_normalization = LossNormalization(USER, reason="model_accepts_loss_kwargs")

    def _configured_loss_normalization(self) -> LossNormalization | None:
        """The normalization known without a probe, or `None` (probe the first batch that has labels)."""
        if self.compute_loss_func is not None:
            return LossNormalization(USER, reason="compute_loss_func")
        if self.loss_is_scaled_for_ga is not None:
            return LossNormalization(USER, reason="loss_is_scaled_for_ga")
        if hasattr(unwrap_peft_model(self.accelerator.unwrap_model(self.model)), "accepts_loss_kwargs"):
            return LossNormalization(USER, reason="the model's accepts_loss_kwargs")
        if self.label_smoother is not None:  # Trainer computes the loss from the logits with num_items_in_batch
            return LossNormalization(BY_NUM_ITEMS, reason="label smoothing")
        if not self.model_accepts_loss_kwargs:
            return LossNormalization(MICRO_BATCH_MEAN, reason="its forward takes no **kwargs")
        return None

    def _settle_loss_normalization(self, inputs) -> None:
        """Probe once, on the first batch with labels (every rank agrees), and set Trainer's switches to match."""
        if self.loss_normalization is not None or "labels" not in inputs:
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        verdict = probe(unwrapped, inputs)
        code = 0 if verdict is None else VERDICTS.index(verdict) + 1
        lowest, highest = same_on_all_ranks(code, self.args.device)
        if lowest == 0:  # this batch cannot tell on some rank: probe the next one
            return
        if lowest != highest:
            raise RuntimeError(
                "The loss normalization probe gave different verdicts on different ranks "
                f"({VERDICTS[lowest - 1]} and {VERDICTS[highest - 1]})."
            )
        split_batches = self.args.gradient_accumulation_steps > 1 or self.args.world_size > 1
        corrected = verdict.kind != BY_NUM_ITEMS and split_batches  # else Trainer agrees
        if verdict.kind == MICRO_BATCH_MEAN:
            self._model_accepts_loss_kwargs = False  # Trainer then divides by the accumulation steps, not by processes
        if verdict.shift_labels is not None:
            corrected |= verdict.shift_labels != getattr(self, "_loss_shifts_labels", False)
            self._loss_shifts_labels = verdict.shift_labels  # how Trainer counts num_items_in_batch
        self.loss_normalization = verdict
        if self.args.should_log:  # main process; a warning, as the default log level hides info and this scales the loss
            logger.warning(verdict.describe(unwrap_peft_model(unwrapped)._get_name(), corrects_trainer=corrected))

    def _get_num_items_in_batch(self, batch_samples, device):
        """Where Trainer counts `num_items_in_batch` (training and evaluation): settle the normalization first."""
        if self.loss_normalization is None and batch_samples:
            self._settle_loss_normalization(self._prepare_inputs(batch_samples[0]))
        return super()._get_num_items_in_batch(batch_samples, device)

    def _processes_factor(self, num_items_in_batch) -> int:
        """Trainer's factor for a loss divided by the all-rank count: DDP averages the gradients over ranks."""
        counted_across = self.args.average_tokens_across_devices and num_items_in_batch is not None
        return self.accelerator.num_processes if counted_across else 1


    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss, with the token mean recomputed for heads that drop `num_items_in_batch`."""
        verdict = self.loss_normalization
        if "labels" not in inputs or verdict is None or verdict.kind != TOKEN_MEAN:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]  # Trainer pops them when it smooths labels
        _, outputs = super().compute_loss(model, dict(inputs), True, num_items_in_batch)
        token_mean = verdict.token_loss(logits_of(outputs), labels, num_items_in_batch)
        loss = token_mean * self._processes_factor(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss
