"""`--method` presets of the command line: names users compare in papers, mapped to config fields."""

from __future__ import annotations

import dataclasses

from .errors import UsageError

_RULES = ("sam", "asam", "bisam", "bsam", "lightsam-adagrad-norm", "lightsam-adagrad", "lightsam-adam")

#: method name -> (sam_variant, learn_rho). Each rule `r` comes as `r` and `lets-r` (learned ρ).
#: LightSAM also changes the descent optimizer: LETSTrainer picks it from `sam_variant`
#: (`lets_hf.optim.lightsam_optimizer_cls_and_kwargs`), so a preset needs no more fields.
METHOD_PRESETS: dict[str, tuple[str, bool]] = {
    "adamw": ("none", False),
    **{rule: (rule, False) for rule in _RULES},
    **{f"lets-{rule}": (rule, True) for rule in _RULES},
}
METHODS = tuple(METHOD_PRESETS)


#: The config fields a preset sets.
PRESET_FIELDS = ("sam_variant", "learn_rho")


def apply_method(config, method: str, keep=()):
    """A copy of `config` (a LETSConfig) with the preset's perturbation rule and learned-ρ switch,
    except the fields in `keep` (set explicitly by the user, who wins over the preset)."""
    if method not in METHOD_PRESETS:
        raise UsageError(f"Unknown --method {method!r}: choose one of {list(METHODS)}.")
    preset = dict(zip(PRESET_FIELDS, METHOD_PRESETS[method]))
    return dataclasses.replace(config, **{name: value for name, value in preset.items() if name not in keep})
