"""The trainers users run, each `LETSMixin` + a 🤗 trainer (TRL's are in `lets_hf.trl`)."""

from __future__ import annotations

from transformers import Seq2SeqTrainer, Trainer

from .config import LETSConfig, LETSSeq2SeqConfig
from .mixin import LETSMixin


class LETSTrainer(LETSMixin, Trainer):
    """`transformers.Trainer` with SAM-family perturbations and, with `learn_rho`, a learned ρ."""

    def __init__(self, model=None, args: LETSConfig | None = None, *more, **kwargs):
        super().__init__(model, args if args is not None else LETSConfig(output_dir="tmp_trainer"), *more, **kwargs)


class LETSSeq2SeqTrainer(LETSMixin, Seq2SeqTrainer):
    """`Seq2SeqTrainer` (`predict_with_generate`, `generation_max_length`, `generation_num_beams` in
    `evaluate` and `predict`) with LETS; its args are a `LETSSeq2SeqConfig`."""

    def __init__(self, model=None, args: LETSSeq2SeqConfig | None = None, *more, **kwargs):
        args = args if args is not None else LETSSeq2SeqConfig(output_dir="tmp_trainer")
        super().__init__(model, args, *more, **kwargs)
