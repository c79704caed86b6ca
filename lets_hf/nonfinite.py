"""Steps that go non-finite (NaN/inf): flagged on the device, skipped, and stopped when they keep coming.

The flag of a step ANDs the finiteness of its losses and of its first-pass gradient norm,
on the device. It is read once per optimizer step, right before the optimizer steps: by
then Trainer's own per-step loss check (`logging_nan_inf_filter`, on by default) has
synchronized with the device, so the read adds no stall.
"""

from __future__ import annotations

from typing import Callable

import torch


class NonFiniteTrainingError(RuntimeError):
    """Training kept producing NaN/inf losses or gradients (`nonfinite_patience` steps in a row)."""


class NonFiniteGuard:
    def __init__(self, patience: int):
        self.patience = patience
        self.skipped_steps = 0
        self._streak, self._streak_start = 0, None
        self._finite: torch.Tensor | None = None  # this step's flag, on the device
        self._loss: torch.Tensor | None = None  # this step's summed training loss, on the device
        self._last_finite: tuple[int, torch.Tensor | None] | None = None

    def observe(self, value: torch.Tensor) -> None:
        finite = torch.isfinite(value.detach()).all()
        self._finite = finite if self._finite is None else self._finite & finite

    def observe_loss(self, loss: torch.Tensor) -> None:
        self.observe(loss)
        self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()

    def end_step(self, step: int, likely_causes: Callable[[], str]) -> bool:
        """Whether optimizer step `step` (1-based) is finite; raises after `patience` non-finite steps in a row."""
        finite = self._finite is None or bool(self._finite)
        loss, self._finite, self._loss = self._loss, None, None
        if finite:
            self._streak, self._last_finite = 0, (step, loss)
            return True
        self.skipped_steps += 1
        self._streak += 1
        self._streak_start = step if self._streak == 1 else self._streak_start
        if self.patience and self._streak >= self.patience:
            raise NonFiniteTrainingError(self._message(step, likely_causes()))
        return False

    def _message(self, step: int, likely_causes: str) -> str:
        if self._last_finite is None:
            last = "No step had a finite loss."
        else:
            last_step, last_loss = self._last_finite
            value = "unknown" if last_loss is None else f"{float(last_loss):.6g}"
            last = f"The last finite training loss was {value}, at step {last_step}."
        return (
            f"Training stopped at step {step}: the loss or the gradient has been NaN/inf for {self._streak} optimizer "
            f"steps in a row, since step {self._streak_start} (each was skipped for the weights and ρ). {last} "
            f"Likely causes: {likely_causes}. Set nonfinite_patience=0 to keep skipping such steps instead."
        )
