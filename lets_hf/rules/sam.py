"""SAM (Foret et al., 2021): ε = ρ·g/‖g‖."""

import torch

from ..tensor_lists import global_norm
from .base import NORM_EPS, PerturbationRule, register_rule


@register_rule("sam")
class SAM(PerturbationRule):
    default_rho = 0.05

    def direction_(self, names, params, grads):
        grad_norm = global_norm(grads)
        torch._foreach_mul_(grads, 1.0 / (grad_norm + NORM_EPS))
        return grad_norm
