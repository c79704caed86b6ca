"""lets-hf: sharpness-aware minimization with a learned perturbation radius for 🤗 Trainer."""

from .config import LETSArguments, LETSConfig, LETSSeq2SeqConfig
from .engine import LETSEngine
from .mixin import LETSMixin
from .rules import PerturbationRule, available_rules, get_rule, register_rule
from .trainers import LETSSeq2SeqTrainer, LETSTrainer
from .validation import RhoBatches

__all__ = [
    "LETSArguments",
    "LETSConfig",
    "LETSEngine",
    "LETSMixin",
    "LETSSeq2SeqConfig",
    "LETSSeq2SeqTrainer",
    "LETSTrainer",
    "PerturbationRule",
    "RhoBatches",
    "available_rules",
    "get_rule",
    "register_rule",
]
__version__ = "0.1.0"
