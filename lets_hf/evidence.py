"""`rho_step_rule="evidence"`: ρ moves only when the hypergradients since its last move agree on a direction.

A single ρ update is mostly noise on real runs (the signal study: hundreds to thousands of updates for a 2σ sign),
so a ρ optimizer that steps on every update random-walks away from ρ₀. Here the hypergradients (of ρ or log ρ:
only their sign and spread matter) accumulate since the last move; once there are at least `min_updates` of them
and the t-statistic of their mean, t = mean / (std / √n), reaches `threshold`, ρ is divided (mean > 0: the
objective falls as ρ shrinks) or multiplied by `factor`, and the count starts again: evidence gathered at the old ρ
says nothing of the new one.

The standard error counts correlated hypergradients as fewer: a trace's successive hypergradients share most of
their ∂θ/∂ρ, so the variance of the mean is widened by the lag-1 autocorrelation's (1 + r)/(1 − r) (an AR(1)
stream's integrated autocorrelation time; r ≥ 0, less its small-sample bias). Without it, zero-mean AR(1) streams
with φ = 0.5 and 0.9 moved ρ on 32 and 84 of 100 seeds; with it, on 7 and 9.

The false-move rate is the sequential test's: on a zero-mean stream of 1,000 updates, normal or Student-t(3), the
defaults (3.0, 100, 2) move ρ on 5 and 3 of 100 seeds; a stream whose mean is 0.2 of its std moves ρ by the factor
within 300 updates on 81 of 100 seeds, either noise (tests/unit/test_evidence.py). The two cannot both reach 95%:
after 300 updates such a bias is 3.5 standard errors from zero, and a test that looks after every update must ask
for about 3 of them to stay quiet for 1,000. Streams correlated over hundreds of updates (AR(1) φ = 0.99, as a
trace with μ ≥ 0.99 can be) hold too few independent updates for any test in a run: ρ moved on 45 of 100.

Everything stays on the device (no host sync), and the sums are checkpointed with ρ.
"""

from __future__ import annotations

import torch


class EvidenceGate:
    """The hypergradients' count, sum, sum of squares and lag-1 sum since ρ last moved, and the move they call for."""

    def __init__(self, threshold: float, min_updates: int, factor: float, device: torch.device, shape=()):
        """`shape`: independent streams side by side, each with its own ρ (one for a run; a test runs 100 seeds)."""
        self.threshold, self.min_updates, self.factor = threshold, min_updates, factor
        zeros = (torch.zeros(shape, dtype=torch.float64, device=device) for _ in range(6))
        self.count, self.total, self.total_sq, self.total_lag, self.first, self.last = zeros
        self.last_t = torch.zeros(shape, dtype=torch.float64, device=device)

    def step_(self, value: torch.Tensor, grad: torch.Tensor) -> None:
        """Add `grad` to the evidence; move ρ (`value`, in place) by the factor if it is significant, and reset."""
        started = self.count > 0
        self.first.copy_(torch.where(started, self.first, grad))
        self.total_lag += torch.where(started, grad * self.last, 0.0)
        self.last.copy_(grad)
        self.count += 1
        self.total += grad
        self.total_sq += grad * grad
        self.last_t = self._t()
        move = (self.count >= self.min_updates) & (self.last_t.abs() >= self.threshold)
        value.mul_(torch.pow(self.factor, -torch.sign(self.total) * move))
        for tensor in self.tensors():
            tensor.mul_(~move)

    def _t(self) -> torch.Tensor:
        """mean / its standard error, the variance of the mean s²/n widened by (1 + r)/(1 − r), r ≥ 0 the lag-1
        autocorrelation since the last move (an AR(1) stream's integrated autocorrelation time): a trace's successive
        hypergradients share most of their ∂θ/∂ρ, and counting them as independent would move ρ on noise."""
        mean = self.total / self.count
        centered_sq = (self.total_sq - self.count * mean * mean).clamp_min(0)
        variance = centered_sq / (self.count - 1).clamp_min(1)
        lag = self.total_lag - mean * (2 * self.total - self.first - self.last) + (self.count - 1) * mean * mean
        r = torch.nan_to_num(lag / centered_sq, nan=0.0)
        r = (r + (1 + 3 * r) / self.count).clamp(0.0, 0.99)  # less its small-sample bias, −(1 + 3r)/n (Kendall)
        return mean / (variance * (1 + r) / (1 - r) / self.count).sqrt()  # ±inf when every value agrees exactly

    def tensors(self) -> list[torch.Tensor]:
        """Its state, as `Radius` restores it on a skipped step and saves it in checkpoints."""
        return [self.count, self.total, self.total_sq, self.total_lag, self.first, self.last]
