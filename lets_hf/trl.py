"""LETS for TRL's `SFTTrainer`: `pip install "lets-hf[trl]"`. lets-hf itself never imports this module.

    from lets_hf.trl import LETSSFTConfig, LETSSFTTrainer
    trainer = LETSSFTTrainer(model=model, args=LETSSFTConfig(output_dir="out", learn_rho=True),
                             train_dataset=dataset, peft_config=LoraConfig(...))

What TRL needs beyond the mixin:
- its datasets are prepared (tokenized, templated, packed) in `__init__`, so the automatic ρ split
  is taken from the prepared train set, and a given `rho_dataset` is prepared the same way;
- its `compute_loss` records metrics (`num_tokens`, `mean_token_accuracy`, `entropy`) on every call;
  LETS's extra passes leave them as the first pass wrote them, so each token counts once;
- it computes its token loss itself, divided by `num_items_in_batch` (Trainer's count, with
  labels shifted as in a causal LM), so no probe of the model is needed;
- its fused LM head returns log-probabilities, not logits: BiSAM, whose surrogate needs the
  logits, is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from .config import LETSArguments
from .errors import UsageError
from .loss_normalization import BY_NUM_ITEMS, LossNormalization
from .mixin import LETSMixin


@dataclass
class LETSSFTConfig(LETSArguments, SFTConfig):
    """`SFTConfig` (with TRL's defaults) plus the LETS fields."""


class LETSSFTTrainer(LETSMixin, SFTTrainer):
    """TRL's `SFTTrainer` with SAM-family perturbations and, with `learn_rho`, a learned ρ."""

    def __init__(self, model, args: LETSSFTConfig | None = None, *more, **kwargs):
        if args is None:  # as SFTTrainer names its default output folder
            name = model if isinstance(model, str) else model.config._name_or_path
            args = LETSSFTConfig(f"{name.split('/')[-1]}-SFT")
        if getattr(args, "sam_variant", None) == "bisam":
            raise UsageError(
                "sam_variant='bisam' needs the model's logits, and SFTTrainer's fused LM head returns "
                "log-probabilities only. Choose another rule (sam, asam, ...)."
            )
        super().__init__(model, args, *more, **kwargs)

    def _configured_loss_normalization(self) -> LossNormalization:
        self._loss_shifts_labels = True  # TRL's per-token loss pairs logit t with label t+1
        return LossNormalization(
            BY_NUM_ITEMS, shift_labels=True, reason="SFTTrainer divides its token loss by num_items_in_batch itself"
        )

    def _prepare_rho_dataset(self, rho_dataset):
        return self._prepare_dataset(
            rho_dataset, self.processing_class, self.args, self.args.packing, self._formatting_func, "rho"
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._in_extra_pass:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        total_tokens, lengths = self._total_train_tokens, {k: len(v) for k, v in self._metrics[mode].items()}
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._total_train_tokens = total_tokens  # this pass's tokens were counted by the first pass already
        for key, values in self._metrics[mode].items():
            del values[lengths.get(key, 0) :]
        self._metrics[mode]["num_tokens"] = [total_tokens]
        return result
