"""ASAM (Kwon et al., 2021), as in the official SamsungLabs/ASAM code.

T = |θ| + η for parameters whose name contains "weight", T = 1 for the others;
ε = ρ·T²g/‖Tg‖. Scale-invariant, so its radii are larger than SAM's (0.5-2).
"""

import torch

from ..tensor_lists import global_norm
from .base import NORM_EPS, PerturbationRule, register_rule


@register_rule("asam")
class ASAM(PerturbationRule):
    default_rho = 0.5

    def __init__(self, eta: float = 0.01):
        self.eta = eta

    @classmethod
    def from_args(cls, args):
        return cls(eta=args.asam_eta)

    def direction_(self, names, params, grads):
        grad_norm = global_norm(grads)
        scaled = [i for i, name in enumerate(names) if "weight" in name]
        scale = [params[i].detach().abs().add_(self.eta) for i in scaled]
        scaled_grads = [grads[i] for i in scaled]
        torch._foreach_mul_(scaled_grads, scale)  # g <- T g
        scaled_norm = global_norm(grads)  # ‖T g‖ (T = 1 elsewhere)
        torch._foreach_mul_(scaled_grads, scale)  # g <- T² g
        torch._foreach_mul_(grads, 1.0 / (scaled_norm + NORM_EPS))
        return grad_norm
