"""What a perturbation rule is, and the registry that maps `sam_variant` names to rules.

A rule turns the first-pass gradient g into a direction d, in place, so that the
perturbation is ε = ρ·d (linear in ρ, which is what the LETS hypergradient needs).
Rules know nothing about Trainer, devices or ranks: they see lists of tensors (whole, or FSDP2's
shards) and take norms with `lets_hf.tensor_lists`.
"""

from __future__ import annotations

from typing import Callable

import torch

_REGISTRY: dict[str, Callable[..., "PerturbationRule"]] = {}

#: Added to norms before dividing, so that a zero gradient gives ε = 0 instead of NaN.
NORM_EPS = 1e-12


def register_rule(name: str):
    """Class decorator: make a rule available as `sam_variant=name`."""

    def decorator(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return decorator


def available_rules() -> list[str]:
    return sorted(_REGISTRY)


def get_rule(name: str, args) -> "PerturbationRule":
    """Build the rule registered as `name` from a `LETSConfig`."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown sam_variant {name!r}; choose one of {['none', *available_rules()]}.")
    return _REGISTRY[name].from_args(args)


def initial_rho(args) -> float:
    """ρ₀ of a run: `args.rho`, or its rule's default when unset (for the engine, and for plots made after training,
    when ρ has moved)."""
    return args.rho if args.rho is not None else _REGISTRY[args.sam_variant].default_rho


class PerturbationRule:
    """Base class: subclasses implement `direction_`.

    `default_rho` is the radius used when the user leaves `rho` unset. Rules with
    state that lives across steps (adaptive radii) keep it in `state_dict()`, so
    checkpointing the rule is one call.
    """

    name: str = ""
    default_rho: float = 0.05
    #: A surrogate `first_pass_loss(logits, labels)` replaces the training loss in the
    #: first pass (BiSAM); `None` means the first pass uses the model's own loss.
    first_pass_loss = None

    @classmethod
    def from_args(cls, args) -> "PerturbationRule":
        return cls()

    def direction_(
        self, names: list[str], params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> torch.Tensor:
        """Overwrite `grads` (the first-pass gradient g) with the direction d; return ‖g‖."""
        raise NotImplementedError

    #: Bilateral rules (BSAM) add a pass at θ − r·d: they implement `min_side_radius(lr_ratio)`,
    #: `keep_ascent_gradient_`, `min_side_perturbation` and `combine_` (see the trainer).
    bilateral = False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
