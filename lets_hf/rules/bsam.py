"""BSAM, bilateral SAM (arXiv 2409.13173; official code ajiaaa/BSAM).

SAM only looks uphill. BSAM also steps downhill along the same direction and uses the
gradient there to correct the descent:

    g = ∇L(θ),  g_max = ∇L(θ + ρ·g/‖g‖),  g_min = ∇L(θ − ρ_min,t·g/‖g‖)
    descent gradient = g_max + g − (‖g_max‖/‖g_min‖)·g_min

ρ (learned or not) is the max-side radius; ρ_min,t = `bsam_rho_min`·lr_t/lr_peak follows
the learning-rate schedule, as the official ProportionScheduler does. The trainer runs
the third pass through the bilateral hooks below (global scope only). With a learned ρ
the hypergradient differentiates g_max only: g, g_min and the ratio are held constant.
"""

from __future__ import annotations

import torch

from ..tensor_lists import copy_, global_norm
from .base import NORM_EPS, register_rule
from .sam import SAM


@register_rule("bsam")
class BSAM(SAM):
    default_rho = 0.05  # the official code's max-side radius
    bilateral = True

    def __init__(self, rho_min: float = 0.05):
        self.rho_min = rho_min
        self.first: list[torch.Tensor] | None = None  # g, unscaled (allocated once)
        self.ascent: list[torch.Tensor] | None = None  # g_max, at the descent's grad scale
        self.first_norm: torch.Tensor | None = None

    @classmethod
    def from_args(cls, args):
        return cls(rho_min=args.bsam_rho_min)

    def direction_(self, names, params, grads):
        if self.first is None or len(self.first) != len(grads):
            self.first = [torch.empty_like(g) for g in grads]
            self.ascent = [torch.empty_like(g) for g in grads]
        copy_(self.first, grads)
        self.first_norm = super().direction_(names, params, grads)
        return self.first_norm

    def min_side_radius(self, lr_ratio: float) -> float:
        return self.rho_min * lr_ratio

    def keep_ascent_gradient_(self, descent: list[torch.Tensor]) -> None:
        """Save g_max before the trainer reuses `.grad` for the min-side pass."""
        copy_(self.ascent, descent)

    def min_side_perturbation(self, radius: float) -> list[torch.Tensor]:
        """−ρ_min,t·g/‖g‖ (a temporary: it lives only while the trainer adds it to θ)."""
        return torch._foreach_mul(self.first, -radius / (self.first_norm + NORM_EPS))

    def combine_(self, descent: list[torch.Tensor], grad_scale: float) -> None:
        """`descent` (g_min) ← g_max + g − (‖g_max‖/‖g_min‖)·g_min, at `descent`'s grad scale.

        g_max and g_min carry the same fp16 scale, so their norm ratio needs no unscaling;
        the stored g is unscaled and gets `grad_scale`.
        """
        ratio = global_norm(self.ascent) / (global_norm(descent) + NORM_EPS)
        torch._foreach_mul_(descent, -ratio)
        torch._foreach_add_(descent, self.ascent)
        torch._foreach_add_(descent, self.first, alpha=grad_scale)
