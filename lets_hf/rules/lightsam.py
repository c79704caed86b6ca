"""LightSAM (Cheng et al., arXiv 2505.24399; no official code): the ascent side.

LightSAM makes SAM parameter-agnostic by scaling the perturbation with accumulated
first-pass gradient statistics u_t (here) and the descent step with statistics v_t of
the descent gradient (`lets_hf.optim`, picked by `lightsam_optimizer_cls_and_kwargs`):

    lightsam-adagrad-norm   u_t = u_{t−1} + ‖g_t‖²  (one scalar)          d_t = g_t/√u_t
    lightsam-adagrad        u_t = u_{t−1} + g_t²    (per coordinate)      d_t = g_t/√u_t
    lightsam-adam           u_t = β2·u_{t−1} + (1−β2)·g_t², û_t = u_t/(1−β2^t),
                            d_t = g_t/√(û_t + ε²)

with ε² = u_0 = 1e-8, and ε = ρ·d_t. With a learned ρ, ρ is the base radius and d_t
(including 1/√u_t) is held constant in the hypergradient. Each call of `direction_`
is one t: every optimizer step in the global scope, every micro-batch in the local one.

Default radii: ‖d_1‖ ≈ 1 for AdaGrad-Norm, so its ρ means what SAM's does (0.05, then
shrinking as u_t grows). The per-coordinate rules give |d_1,i| ≈ 1 for every coordinate,
so their ρ is a per-coordinate size like an Adam learning rate: 1e-5, i.e. ‖ε_1‖ =
ρ·√(number of parameters), about SAM's 0.05 for a 25M-parameter model.
"""

from __future__ import annotations

import torch

from ..tensor_lists import global_norm
from .base import PerturbationRule, register_rule

#: u_0 = ε² (and the descent's v_0): keeps 1/√u finite when the first gradients vanish.
INITIAL_ACCUMULATOR = 1e-8


@register_rule("lightsam-adagrad-norm")
class LightSAMAdaGradNorm(PerturbationRule):
    default_rho = 0.05

    def __init__(self):
        self.u: torch.Tensor | None = None  # Σ‖g‖², a 0-dim tensor on the gradients' device

    def direction_(self, names, params, grads):
        grad_norm = global_norm(grads)
        if self.u is None:
            dtype = torch.promote_types(grad_norm.dtype, torch.float32)
            self.u = torch.full((), INITIAL_ACCUMULATOR, dtype=dtype, device=grad_norm.device)
        self.u.add_(grad_norm.square())
        torch._foreach_div_(grads, self.u.sqrt())
        return grad_norm

    def state_dict(self) -> dict:
        return {"u": self.u}

    def load_state_dict(self, state: dict) -> None:
        self.u = state["u"]


class _PerCoordinate(PerturbationRule):
    """Rules with a parameter-sized u, kept by parameter name so checkpoints map back."""

    default_rho = 1e-5
    initial_u = INITIAL_ACCUMULATOR

    def __init__(self):
        self.u: dict[str, torch.Tensor] = {}

    def _u_for(self, names, grads) -> list[torch.Tensor]:
        for name, grad in zip(names, grads):
            if name not in self.u:  # allocated once per parameter
                self.u[name] = torch.full_like(grad, self.initial_u)
        return [self.u[name] for name in names]

    def state_dict(self) -> dict:
        return {"u": self.u}

    def load_state_dict(self, state: dict) -> None:
        self.u = dict(state["u"])


@register_rule("lightsam-adagrad")
class LightSAMAdaGrad(_PerCoordinate):
    def direction_(self, names, params, grads):
        grad_norm = global_norm(grads)
        u = self._u_for(names, grads)
        torch._foreach_addcmul_(u, grads, grads)
        torch._foreach_div_(grads, torch._foreach_sqrt(u))
        return grad_norm


@register_rule("lightsam-adam")
class LightSAMAdam(_PerCoordinate):
    initial_u = 0.0  # an EMA: bias correction replaces the initial value

    def __init__(self, beta2: float = 0.999):
        super().__init__()
        self.beta2 = beta2
        self.step = 0  # t of the bias correction

    @classmethod
    def from_args(cls, args):
        return cls(beta2=getattr(args, "adam_beta2", 0.999))  # a bare LETSArguments (plain loop): AdamW's default

    def state_dict(self) -> dict:
        return {**super().state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.step = state["step"]

    def direction_(self, names, params, grads):
        grad_norm = global_norm(grads)
        u = self._u_for(names, grads)
        self.step += 1
        torch._foreach_mul_(u, self.beta2)
        torch._foreach_addcmul_(u, grads, grads, value=1 - self.beta2)
        denominator = torch._foreach_div(u, 1 - self.beta2**self.step)  # û_t
        torch._foreach_add_(denominator, INITIAL_ACCUMULATOR)
        torch._foreach_sqrt_(denominator)
        torch._foreach_div_(grads, denominator)
        return grad_norm
