"""Perturbation rules: one file per rule, registered by name for `LETSConfig.sam_variant`."""

from .base import PerturbationRule, available_rules, get_rule, initial_rho, register_rule
from . import asam, bisam, bsam, lightsam, sam  # noqa: F401  (import registers the rules)

__all__ = ["PerturbationRule", "available_rules", "get_rule", "initial_rho", "register_rule"]
