"""`rho_step_rule="evidence"`: ρ moves only when the hypergradients since its last move agree on a direction.

A single ρ update is mostly noise on real runs (the signal study: hundreds to thousands of updates for a 2σ sign),
so a ρ optimizer that steps on every update random-walks away from ρ₀. Here the hypergradients (of ρ or log ρ:
only their sign and spread matter) accumulate since the last move; once there are at least `min_updates` of them
and the t-statistic of their mean, t = mean / (std / √n), reaches `threshold`, ρ is divided (mean > 0: the
objective falls as ρ shrinks) or multiplied by `factor`, and the count starts again: evidence gathered at the old ρ
says nothing of the new one.

The false-move rate is the sequential test's: on a zero-mean stream of 1,000 updates, normal or Student-t(3), the
defaults (3.0, 100, 2) move ρ on 5 and 3 of 100 seeds; a stream whose mean is 0.2 of its std moves ρ by the factor
within 300 updates on 84 and 83 of 100 seeds (tests/unit/test_evidence.py). The two cannot both reach 95%: after
300 updates such a bias is 3.5 standard errors from zero, and a test that looks after every update must ask for
about 3 of them to stay quiet for 1,000.

Everything stays on the device (no host sync), and the sums are checkpointed with ρ.
"""

from __future__ import annotations

import torch


class EvidenceGate:
    """The hypergradients' count, sum and sum of squares since ρ last moved, and the move they call for."""

    def __init__(self, threshold: float, min_updates: int, factor: float, device: torch.device, shape=()):
        """`shape`: independent streams side by side, each with its own ρ (one for a run; a test runs 100 seeds)."""
        self.threshold, self.min_updates, self.factor = threshold, min_updates, factor
        self.count, self.total, self.total_sq = (torch.zeros(shape, dtype=torch.float64, device=device) for _ in range(3))
        self.last_t = torch.zeros(shape, dtype=torch.float64, device=device)

    def step_(self, value: torch.Tensor, grad: torch.Tensor) -> None:
        """Add `grad` to the evidence; move ρ (`value`, in place) by the factor if it is significant, and reset."""
        self.count += 1
        self.total += grad
        self.total_sq += grad * grad
        mean = self.total / self.count
        variance = (self.total_sq - self.count * mean * mean).clamp_min(0) / (self.count - 1).clamp_min(1)
        self.last_t = mean / (variance / self.count).sqrt()  # ±inf when every value agrees exactly; nan for 0/0
        move = (self.count >= self.min_updates) & (self.last_t.abs() >= self.threshold)
        value.mul_(torch.pow(self.factor, -torch.sign(mean) * move))
        for tensor in (self.count, self.total, self.total_sq):
            tensor.mul_(~move)

    def tensors(self) -> list[torch.Tensor]:
        """Its state, as `Radius` restores it on a skipped step and saves it in checkpoints."""
        return [self.count, self.total, self.total_sq]
