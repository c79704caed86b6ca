"""SAM policies: on which optimizer steps a SAM step is taken, and what a step without one descends on.

A policy only decides; the rule (`lets_hf.rules`) perturbs and the engine runs the passes. A step the policy
turns down is a plain step: the first pass's gradient g (averaged over ranks and micro-batches, as SAM's) is the
descent gradient, one pass instead of SAM's two (BSAM's three).

    every    SAM on every step (the default)
    ae-sam   SAM where ‖g_t‖² ≥ μ_t + c_t·σ_t: μ_t and σ²_t are EMAs (rate δ) of the mean and variance of ‖g‖²,
             c_t goes linearly from `ae_sam_c_start` to `ae_sam_c_end` over the run (Jiang et al., ICLR 2023,
             arXiv 2304.14647): SAM where the gradient is large for this stage of training, i.e. sharp
    looksam  SAM on every k-th step, which keeps g_v, the SAM gradient's component orthogonal to g; the steps
             between descend on g + α·(‖g‖/‖g_v‖)·g_v (Liu et al., CVPR 2022, arXiv 2203.02714)
    random   SAM with probability p, a draw per step (SS-SAM, Zhao et al. 2022)

Every rank takes the same branch: AE-SAM's ‖g‖ is the global gradient's (after the average over ranks), the
random draw is a function of (`random_sam_seed`, step) alone, and LookSAM counts optimizer steps. The state
(AE-SAM's μ and σ², LookSAM's g_v) is in `state_dict`; g_v is parameter-shaped (FSDP2: `DTensor` shards).
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import UsageError, setting
from .rules.base import NORM_EPS
from .tensor_lists import global_dot, global_norm, local_shards

SAM_POLICIES = ("every", "ae-sam", "looksam", "random")


class SAMPolicy:
    """Base: `every`. `before_step(step)` is the decision when it is known before the first pass (`None`: it
    needs the step's gradient, `decide`); LookSAM's hooks do nothing here."""

    name = "every"
    #: The decision reads the whole step's gradient (`decide`), so it comes after the last first pass.
    decides_from_gradient = False

    def before_step(self, step: int) -> bool | None:
        return True

    def decide(self, step: int, grad_norm: torch.Tensor, max_steps: int | None) -> bool:
        raise NotImplementedError

    def keep_first_gradient_(self, names: list[str], grads: list[torch.Tensor]) -> None:
        """A SAM step, before the rule turns g into ε."""

    def after_sam_step_(self, names: list[str], descent: list[torch.Tensor]) -> None:
        """A SAM step, once the descent gradient is in `.grad`."""

    def plain_step_(self, names: list[str], grads: list[torch.Tensor], grad_norm: torch.Tensor) -> None:
        """A plain step: may change the descent gradient in `.grad` (`grads`) in place."""

    def skip_step(self, sam_step: bool) -> None:
        """The optimizer skipped this step (non-finite, fp16 overflow)."""

    def state_dict(self) -> dict:
        return {"name": self.name, **self._state()}

    def load_state_dict(self, state: dict) -> None:
        """A state written under another policy (a run resumed with another `sam_policy`) is not this one's: it
        starts afresh, as at step 0."""
        if state.get("name") == self.name:
            self._load(state)

    def _state(self) -> dict:
        return {}

    def _load(self, state: dict) -> None:
        pass


class AESAM(SAMPolicy):
    name = "ae-sam"
    decides_from_gradient = True

    def __init__(self, decay: float, c_start: float, c_end: float, device):
        self.decay, self.c_start, self.c_end = decay, c_start, c_end
        self.mean = torch.zeros((), dtype=torch.float64, device=device)  # μ of ‖g‖², from μ_{−1} = 0
        self.var = torch.zeros((), dtype=torch.float64, device=device)  # σ² of ‖g‖², from σ²_{−1} = 0

    def before_step(self, step):
        return None

    def threshold_coefficient(self, step: int, max_steps: int | None) -> float:
        """c_t, linear in t/T from `ae_sam_c_start` (t = 0) to `ae_sam_c_end` (t = T)."""
        if not max_steps or max_steps < 1:
            raise UsageError(
                f"{setting('sam_policy', 'ae-sam')} follows a threshold schedule over the whole run and needs its "
                "length: pass max_steps= (the number of optimizer steps) to LETSEngine."
            )
        return self.c_start + (self.c_end - self.c_start) * min(step / max_steps, 1.0)

    def decide(self, step, grad_norm, max_steps):
        """μ_t ← δ·μ + (1 − δ)·‖g‖², σ²_t ← δ·σ² + (1 − δ)·(‖g‖² − μ_t)², then SAM iff ‖g‖² ≥ μ_t + c_t·σ_t. A
        non-finite ‖g‖ (a step that will be skipped) leaves μ and σ² as they were and takes no SAM step."""
        c = self.threshold_coefficient(step, max_steps)
        squared = grad_norm.detach().double().square()
        finite = torch.isfinite(squared)
        mean = self.decay * self.mean + (1 - self.decay) * squared
        var = self.decay * self.var + (1 - self.decay) * (squared - mean).square()
        self.mean.copy_(torch.where(finite, mean, self.mean))
        self.var.copy_(torch.where(finite, var, self.var))
        return bool(finite & (squared >= self.mean + c * self.var.sqrt()))  # the one host read of its decision

    def _state(self):
        return {"mean": self.mean, "var": self.var}

    def _load(self, state):
        self.mean.copy_(state["mean"])
        self.var.copy_(state["var"])


class LookSAM(SAMPolicy):
    """One parameter-sized buffer, g_v, by parameter name; on a SAM step it first holds g, then g_v."""

    name = "looksam"

    def __init__(self, k: int, alpha: float):
        self.k, self.alpha = k, alpha
        self.g_v: dict[str, torch.Tensor] = {}
        self.valid = False  # a g_v to reuse: after a SAM step that the optimizer took

    def before_step(self, step):
        """Every k-th step, and any step that has no g_v to reuse (the first; after a skipped SAM step)."""
        return step % self.k == 0 or not self.valid

    def _buffers(self, names, like) -> list[torch.Tensor]:
        for name, tensor in zip(names, like):
            if name not in self.g_v:  # allocated once per parameter
                self.g_v[name] = torch.empty_like(tensor)
        return [self.g_v[name] for name in names]

    def keep_first_gradient_(self, names, grads):
        kept = set(names)
        for name in [name for name in self.g_v if name not in kept]:
            del self.g_v[name]  # no gradient this step: no component to keep
        buffers = self._buffers(names, grads)
        torch._foreach_copy_(local_shards(buffers)[0], local_shards(grads)[0])

    def after_sam_step_(self, names, descent):
        """g_v = g_s − (⟨g, g_s⟩/‖g‖²)·g, in the buffer that holds g (g_s: the SAM gradient, at the loop's grad
        scale; only g_v's direction is reused, so its scale does not matter)."""
        present = [i for i, name in enumerate(names) if name in self.g_v and descent[i] is not None]
        first = [self.g_v[names[i]] for i in present]
        g_s = [descent[i] for i in present]
        norm = global_norm(first)
        coefficient = global_dot(first, g_s) / (norm.square() + NORM_EPS)
        local_first, local_g_s = local_shards(first)[0], local_shards(g_s)[0]
        torch._foreach_mul_(local_first, -coefficient)
        torch._foreach_add_(local_first, local_g_s)
        self.valid = True

    def plain_step_(self, names, grads, grad_norm):
        """g ← g + α·(‖g‖/‖g_v‖)·g_v, in place (at `.grad`'s scale, as `grad_norm`)."""
        present = [i for i, name in enumerate(names) if name in self.g_v]
        if not present:
            return
        g_v = [self.g_v[names[i]] for i in present]
        scale = self.alpha * grad_norm / (global_norm(list(self.g_v.values())) + NORM_EPS)
        local_g, local_g_v = local_shards([grads[i] for i in present])[0], local_shards(g_v)[0]
        torch._foreach_addcmul_(local_g, local_g_v, [scale.to(g.dtype) for g in local_g])

    def skip_step(self, sam_step):
        if sam_step:  # its g_v came from a step the optimizer refused: take SAM again next step
            self.valid = False

    def _state(self):
        return {"g_v": dict(self.g_v), "valid": self.valid}

    def _load(self, state):
        self.g_v, self.valid = dict(state["g_v"]), bool(state["valid"])


class RandomSAM(SAMPolicy):
    name = "random"

    def __init__(self, probability: float, seed: int):
        self.probability, self.seed = probability, seed

    def before_step(self, step):
        """A uniform draw from a generator seeded with (seed, step): the same on every rank and after a resume,
        with no state to keep."""
        return bool(np.random.default_rng([self.seed, step]).random() < self.probability)


def get_policy(args, device) -> SAMPolicy:
    """The `sam_policy` of a `LETSArguments`, with its fields."""
    if args.sam_policy == "ae-sam":
        return AESAM(args.ae_sam_decay, args.ae_sam_c_start, args.ae_sam_c_end, device)
    if args.sam_policy == "looksam":
        return LookSAM(args.looksam_k, args.looksam_alpha)
    if args.sam_policy == "random":
        return RandomSAM(args.random_sam_p, args.random_sam_seed)
    return SAMPolicy()
