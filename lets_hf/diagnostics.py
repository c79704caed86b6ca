"""Is ρ's learning signal informative? Running statistics of the last ρ updates, for Trainer's log.

dF/dρ is a product of single-batch quantities (the gap and an inner product) whose sign can be
noise. Over a window of the last W updates this logs, per factor, its mean and std, and for
dF/dρ its signal-to-noise ratio |mean|/std and its sign agreement: the share of updates whose
sign is the mean's (1.0: every update agrees; 0.5: coin flips). An SNR well below
1/√W says the window's mean is indistinguishable from zero.

The window lives on the device (no host sync until a log reads it) and in the checkpoint.
`StepMetrics` averages the per-step values (first-pass gradient norm, gap, hypergradient) between logs;
its sums since the last log are in the checkpoint too.
"""

from __future__ import annotations

import torch

#: The factors of dF/dρ kept per update, in the column order of the window.
FACTORS = ("gen_gap", "rho_inner", "rho_grad")


class StepMetrics:
    """Means of per-step values between two logs, kept on the device: `pop` is the only host sync. What is not yet
    logged, and each metric's last mean, go into the checkpoint, so that a resumed run logs what an uninterrupted
    one logs."""

    def __init__(self):
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def record(self, name: str, value: torch.Tensor) -> None:
        self._sums[name] = self._sums.get(name, 0) + value.detach().double()
        self._counts[name] = self._counts.get(name, 0) + 1

    def pop(self, repeat_last: bool = False) -> dict[str, float]:
        """The means since the last call, then clears them. With `repeat_last`, a metric without a new value repeats
        its last mean (ρ updated every k > logging_steps steps), so that every log carries every curve."""
        means = {name: float(total) / self._counts[name] for name, total in self._sums.items()}
        self._sums, self._counts = {}, {}
        self._last.update(means)
        return dict(self._last) if repeat_last else means

    def state_dict(self) -> dict:
        return {"sums": dict(self._sums), "counts": dict(self._counts), "last": dict(self._last)}

    def load_state_dict(self, state: dict) -> None:
        self._sums, self._counts, self._last = dict(state["sums"]), dict(state["counts"]), dict(state["last"])


class HypergradientMonitor:
    def __init__(self, window: int, device: torch.device):
        self.values = torch.zeros(window, len(FACTORS), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)

    def observe(self, gap: torch.Tensor, inner: torch.Tensor, grad: torch.Tensor) -> None:
        """Append one update (overwriting the oldest once the window is full); non-finite values are kept out."""
        row = torch.stack([gap.double(), inner.double(), grad.double()])
        finite = torch.isfinite(row).all()
        slot = self.count % self.values.shape[0]
        self.values[slot] = torch.where(finite, row, self.values[slot])
        self.count += finite.long()

    def summary(self) -> dict[str, float]:
        """The window's statistics (host floats); empty before two updates."""
        n = min(int(self.count), self.values.shape[0])
        if n < 2:
            return {}
        window = self.values[:n]
        mean, std = window.mean(0), window.std(0)
        stats = {}
        for i, name in enumerate(FACTORS[:2]):
            stats[f"{name}_mean"], stats[f"{name}_std"] = float(mean[i]), float(std[i])
        grads, grad_mean, grad_std = window[:, 2], float(mean[2]), float(std[2])
        stats["rho_grad_snr"] = abs(grad_mean) / grad_std if grad_std > 0 else float("inf")
        stats["rho_grad_sign_agreement"] = float((torch.sign(grads) == (1.0 if grad_mean >= 0 else -1.0)).double().mean())
        return stats

    def state_dict(self) -> dict:
        return {"values": self.values, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint taken with another window size restarts the statistics (they are diagnostics only)."""
        if state["values"].shape == self.values.shape:
            self.values.copy_(state["values"])
            self.count.copy_(state["count"])
