"""Assertions shared by the trainer tests."""

from __future__ import annotations

import pytest
import torch


def assert_resume_is_exact(run, tmp_path, initial_rho: float, rtol: float = 1e-12, atol: float = 1e-14) -> None:
    """`run(output_dir, resume=None)` trains 4 steps and saves at step 2: resuming from that checkpoint in a
    new trainer ends where the uninterrupted run ends (θ, and a ρ that has moved)."""
    straight = run(tmp_path / "straight")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-2"))
    assert straight.rho != initial_rho and resumed.rho == pytest.approx(straight.rho, rel=1e-12)
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)
