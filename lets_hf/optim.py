"""Optimizers the package adds: LightSAM's descent side (the ascent side is `rules/lightsam.py`).

LightSAM divides the descent gradient g̃_t by the root of accumulated statistics v_t:

    lightsam-adagrad-norm   `AdaGradNorm`: v_t = v_{t−1} + ‖g̃_t‖² (one scalar for the model)
    lightsam-adagrad        `AdaGrad`:     v_t = v_{t−1} + g̃_t²   (per coordinate)
    lightsam-adam           `torch.optim.AdamW`: Adam is LightSAM's descent as it stands

    θ ← θ − η·g̃_t/√v_t,  v_0 = 1e-8

They are ordinary `torch.optim.Optimizer`s, so Trainer's clipping, schedulers, fp16 grad
scaling and checkpoints work unchanged. Weight decay is decoupled (θ ← θ·(1 − η·λ)), as
in AdamW, so that it never enters v_t. Use them with a `LETSTrainer`:

    LETSTrainer(model, args, ..., optimizer_cls_and_kwargs=lightsam_optimizer_cls_and_kwargs(args))
    LETSTrainer(model, args, ..., optimizers=(create_lightsam_optimizer(model, args), None))

`descent_jacobian_` gives the learned radius J_P = diag(1/√v_t) with v_t held constant
(the trainer multiplies by −η and the clipping factor itself).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.trainer_pt_utils import get_parameter_names

from .rules.lightsam import INITIAL_ACCUMULATOR
from .tensor_lists import global_norm

#: Trainer's rule for parameters without weight decay: LayerNorm layers, biases, norms.
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


class _AdaptiveDescent(torch.optim.Optimizer):
    """θ ← θ·(1 − η·λ) − η·g/√v; subclasses keep v (`_accumulate_`) and divide by √v (`_precondition_`)."""

    def __init__(self, params, lr: float = 1e-2, weight_decay: float = 0.0):
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr and weight_decay must be >= 0, got lr={lr}, weight_decay={weight_decay}.")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        self._accumulate_([p for _, params in groups for p in params])
        for group, params in groups:
            if not params:
                continue
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            update = torch._foreach_mul([p.grad for p in params], -group["lr"])
            self._precondition_(params, update)
            torch._foreach_add_(params, update)
        return loss

    def descent_jacobian_(self, group: dict, params: list[torch.Tensor], tangents: list[torch.Tensor]) -> None:
        self._precondition_(params, tangents)

    def _accumulate_(self, params: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _precondition_(self, params: list[torch.Tensor], tensors: list[torch.Tensor]) -> None:
        raise NotImplementedError


class AdaGradNorm(_AdaptiveDescent):
    """AdaGrad-Norm: one step size η/√v_t for the whole model, v_t = v_{t−1} + ‖g̃_t‖² over all groups."""

    def __init__(self, params, lr: float = 1e-2, weight_decay: float = 0.0):
        super().__init__(params, lr, weight_decay)
        self.v: torch.Tensor | None = None  # 0-dim, created at the first step on the gradients' device

    def _accumulate_(self, params):
        grad_norm = global_norm([p.grad for p in params])
        if self.v is None:
            dtype = torch.promote_types(grad_norm.dtype, torch.float32)
            self.v = torch.full((), INITIAL_ACCUMULATOR, dtype=dtype, device=grad_norm.device)
        self.v.add_(grad_norm.square())

    def _precondition_(self, params, tensors):
        torch._foreach_div_(tensors, self.v.sqrt())

    def state_dict(self) -> dict:
        return {**super().state_dict(), "v": self.v}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        v = state_dict.pop("v")
        super().load_state_dict(state_dict)
        self.v = v.to(self.param_groups[0]["params"][0].device) if v is not None else None


class AdaGrad(_AdaptiveDescent):
    """AdaGrad: per-coordinate step sizes η/√v_t, v_t = v_{t−1} + g̃_t² (state "sum", like torch's Adagrad)."""

    def _sums(self, params) -> list[torch.Tensor]:
        for p in params:
            if "sum" not in self.state[p]:
                self.state[p]["sum"] = torch.full_like(p, INITIAL_ACCUMULATOR, memory_format=torch.preserve_format)
        return [self.state[p]["sum"] for p in params]

    def _accumulate_(self, params):
        grads = [p.grad for p in params]
        torch._foreach_addcmul_(self._sums(params), grads, grads)

    def _precondition_(self, params, tensors):
        torch._foreach_div_(tensors, torch._foreach_sqrt(self._sums(params)))


def lightsam_optimizer_cls_and_kwargs(args) -> tuple[type[torch.optim.Optimizer], dict]:
    """LightSAM's descent optimizer for `args.sam_variant`, as Trainer's `optimizer_cls_and_kwargs`."""
    if args.sam_variant == "lightsam-adagrad-norm":
        return AdaGradNorm, {"lr": args.learning_rate}
    if args.sam_variant == "lightsam-adagrad":
        return AdaGrad, {"lr": args.learning_rate}
    if args.sam_variant == "lightsam-adam":
        return torch.optim.AdamW, {
            "lr": args.learning_rate,
            "betas": (args.adam_beta1, args.adam_beta2),
            "eps": args.adam_epsilon,
        }
    raise ValueError(f"sam_variant={args.sam_variant!r} is not a LightSAM variant (lightsam-adagrad-norm, -adagrad, -adam).")


def create_lightsam_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """The descent optimizer with Trainer's parameter groups (`args.weight_decay`, none on biases and norms)."""
    optimizer_cls, kwargs = lightsam_optimizer_cls_and_kwargs(args)
    decay = set(get_parameter_names(model, [nn.LayerNorm], NO_DECAY_PATTERNS))
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in trainable if name in decay], "weight_decay": args.weight_decay},
        {"params": [p for name, p in trainable if name not in decay], "weight_decay": 0.0},
    ]
    return optimizer_cls([group for group in groups if group["params"]], **kwargs)
