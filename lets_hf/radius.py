"""The ρ learner: hypergradient estimators, Hessian modes, ρ optimizer, state.

See `shared/design/lets-algorithm.md`. With the direction d_t of the rule (ε_t = ρ·d_t) and
A_t = η_t·c_t·J_P·H(θ_t + ε_t):

    one-step (the paper's):  h_{t+1} = u_t = −A_t·d_t                     ∂θ_{t+1}/∂ρ through step t only
    trace (RTHO / MARTHE):   h_{t+1} = μ·(I − A_t)·h_t − A_t·d_t = μ·h_t − A_t·w_t,  w_t = μ·h_t + d_t

and at θ_{t+1}, by `rho_objective`:

    squared-gap (the paper's):  dF/dρ = (L_val − L_train)·⟨∇L_val − g_{t+1}, h_{t+1}⟩
    val-loss:                   dF/dρ = ⟨∇L_val, h_{t+1}⟩

The `antithetic` estimator needs no ∂θ/∂ρ: it compares the validation loss changes of windows run at
ρ·e^{±δ} (`radius_at`, `observe_window`).

The engine fills `u` with w_t (`begin_direction_`, then d_t added; w_t = d_t for one-step), turns
it into H·w_t after the second pass (`apply_hessian_`) and into h_{t+1} after the optimizer step
(`apply_descent_jacobian_`, which adds back the kept μ·h_t). Everything stays on the device: no host
synchronisation outside logging.
"""

from __future__ import annotations

import math

import torch

from .diagnostics import HypergradientMonitor
from .evidence import EvidenceGate
from .errors import UsageError, setting
from .tensor_lists import copy_, global_norm

ADAM_BETAS = (0.9, 0.999)
DEFAULT_LR_FRACTION = 0.02  # rho_lr = 2% of the initial ρ when the user gives none
DEFAULT_LOG_SPACE_LR = 0.02  # in the log space: 2% of ρ per update, whatever ρ₀
ADAM_EPS = 1e-16  # tiny: the scalar hypergradient can be ~1e-9 and Adam must stay scale-free


class Radius:
    """ρ as a float64 device tensor, plus, when learned, its optimizer and the buffer u (∂θ/∂ρ)."""

    def __init__(self, args, initial: float, device: torch.device):
        self.args = args
        self.learn = args.learn_rho
        self.value = torch.tensor(float(initial), dtype=torch.float64, device=device)
        self.log_space = args.rho_update_space == "log"
        default_lr = DEFAULT_LOG_SPACE_LR if self.log_space else DEFAULT_LR_FRACTION * initial
        self.lr = args.rho_lr if args.rho_lr is not None else default_lr
        self.trace_decay = args.rho_trace_decay if args.rho_estimator == "trace" else 0.0
        self.antithetic = args.learn_rho and args.rho_estimator == "antithetic"
        self.u: list[torch.Tensor] | None = None  # ∂θ/∂ρ (h), aligned with the trainable params
        self.probe_decays = tuple(args.rho_signal_probes) if self.learn else ()
        self.probes: list[list[torch.Tensor]] = []  # the signal probes' traces (`rho_signal_probes`), like u
        self._kept: list[list[torch.Tensor] | None] = []  # per direction, μ·h_t while it holds w_t (traces only)
        self._kept_buffers: dict[int, list[torch.Tensor]] = {}  # allocated once per direction
        self.stepped_batch: torch.Tensor | None = None  # `rho_train_batch="last"`: B_t's [L, ⟨∇L, h⟩ per direction]
        self.u_valid = False
        self.clip_coef = torch.ones((), dtype=torch.float64, device=device)
        self.step = torch.zeros((), dtype=torch.float64, device=device)
        self.exp_avg = torch.zeros((), dtype=torch.float64, device=device)
        self.exp_avg_sq = torch.zeros((), dtype=torch.float64, device=device)
        self.last_grad = torch.zeros((), dtype=torch.float64, device=device)
        self.skipped_updates = torch.zeros((), dtype=torch.long, device=device)
        self.last_inner = torch.zeros((), dtype=torch.float64, device=device)
        self.window_start_loss = torch.zeros((), dtype=torch.float64, device=device)  # antithetic only
        self.first_window_change = torch.zeros((), dtype=torch.float64, device=device)
        self.monitor = HypergradientMonitor(args.rho_diagnostics_window, device)
        self.evidence = (
            EvidenceGate(args.rho_evidence_threshold, args.rho_evidence_min_updates, args.rho_evidence_factor, device)
            if args.rho_step_rule == "evidence" else None
        )
        self._before_update: list[torch.Tensor] | None = None

    # -- when to do the work ---------------------------------------------------------
    def update_due(self, global_step: int) -> bool:
        """An update at step t uses u_{t−1}: only every `rho_update_interval`-th step. The antithetic
        estimator measures at every window boundary, step 0 included. With `rho_train_batch="last"` it also
        needs B_{t−1}'s loss, measured at the end of step t − 1 (a checkpoint from a run without it has none)."""
        ready = self.u_valid or self.antithetic
        if self.args.rho_train_batch == "last" and self.stepped_batch is None:
            ready = False
        return self.learn and ready and global_step % self.args.rho_update_interval == 0

    def measures_stepped_batch(self, global_step: int, max_steps: int | None) -> bool:
        """`rho_train_batch="last"`: step t, just finished with u_t, is followed by an update that needs B_t (unless
        it was the run's last step)."""
        last_step = max_steps is not None and global_step + 1 >= max_steps
        return (self.learn and self.args.rho_train_batch == "last" and not last_step
                and (global_step + 1) % self.args.rho_update_interval == 0)

    def tracks_step(self, global_step: int) -> bool:
        """One-step: step t needs u_t only if step t+1 updates ρ. The trace follows every step."""
        if self.antithetic:
            return False
        if self.trace_decay or self.probe_decays:
            return self.learn
        return self.learn and (global_step + 1) % self.args.rho_update_interval == 0

    @property
    def needs_train_gradient(self) -> bool:
        """Only the squared gap has ∇L_train in its hypergradient."""
        return self.args.rho_objective == "squared-gap"

    # -- the antithetic windows ------------------------------------------------------
    def radius_at(self, global_step: int) -> torch.Tensor:
        """The radius step t perturbs with: ρ, or ρ·e^{±δ} in the antithetic windows."""
        if not self.antithetic:
            return self.value
        return self.value * math.exp(self._window_sign(global_step) * self.args.rho_antithetic_delta)

    def _window_sign(self, global_step: int) -> int:
        """+1 or −1 for the window of `global_step`: pairs of windows run +−, −+, +−, ... (the alternation
        cancels a linear trend of the loss between the two windows of a pair, over two pairs)."""
        window = global_step // self.args.rho_update_interval
        first_of_pair = window % 2 == 0
        return 1 if first_of_pair != ((window // 2) % 2 == 1) else -1

    def observe_window(self, val_loss: torch.Tensor, train_loss: torch.Tensor, global_step: int) -> bool:
        """At a window boundary: the validation loss at its start. Closing the second window of a pair,
        log ρ takes one step on G = (Δ_{+δ} − Δ_{−δ})/(2δ) ≈ dΔ/d log ρ. Returns whether ρ was updated."""
        window = global_step // self.args.rho_update_interval
        change = val_loss - self.window_start_loss  # Δ of the window that just ended
        self.window_start_loss = val_loss.double()
        if window == 0:
            return False
        if window % 2 == 1:
            self.first_window_change = change
            return False
        plus_minus = self.first_window_change - change  # Δ(first) − Δ(second)
        if self._window_sign(global_step - 1) > 0:  # the second window was the +δ one
            plus_minus = -plus_minus
        self._record_and_step(val_loss - train_loss, plus_minus, plus_minus / (2 * self.args.rho_antithetic_delta))
        return True

    # -- u_t -------------------------------------------------------------------------
    def buffers_like(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.u is None:
            self.u = [torch.zeros_like(p) for p in params]
        return self.u

    def directions_like(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The directions a tracked step carries: u, then each signal probe's trace."""
        if len(self.probes) < len(self.probe_decays):
            self.probes = [[torch.zeros_like(p) for p in params] for _ in self.probe_decays]
        return [self.buffers_like(params), *self.probes]

    def _decays(self) -> tuple[float, ...]:
        return (self.trace_decay, *self.probe_decays)

    def begin_direction_(self, directions: list[list[torch.Tensor]]) -> None:
        """Before d_t is added: each direction h ← 0 (one-step), or h ← μ·h_t, kept for after the step (trace; a
        trace broken by a skipped step starts again from 0). `directions`: u, then the probes (`directions_like`)."""
        self._kept = []
        for index, (decay, h) in enumerate(zip(self._decays(), directions)):
            if not (decay and self.u_valid):
                torch._foreach_zero_(h)
                self._kept.append(None)
                continue
            torch._foreach_mul_(h, decay)
            kept = self._kept_buffers.setdefault(index, [torch.empty_like(t) for t in h])
            copy_(kept, h)
            self._kept.append(kept)

    def apply_hessian_(self, directions: list[list[torch.Tensor]], descent_grads: list[torch.Tensor],
                       inv_scale: float) -> None:
        """d -> H·d, for each direction, in the diagonal and identity modes (`exact` is the trainer's HVP pass)."""
        if self.args.rho_hessian == "diagonal":
            for u in directions:
                torch._foreach_mul_(u, descent_grads)
                torch._foreach_mul_(u, descent_grads)
                if inv_scale != 1.0:
                    torch._foreach_mul_(u, inv_scale * inv_scale)

    def set_clip_coef(self, descent_grads: list[torch.Tensor], inv_scale: float, max_norm: float) -> None:
        """c_t of the loop's clipping to `max_norm` (torch's formula), held constant in the hypergradient."""
        if not max_norm or max_norm <= 0:
            self.clip_coef.fill_(1.0)
            return
        norm = global_norm(descent_grads).double() * inv_scale
        torch.clamp(max_norm / (norm + 1e-6), max=1.0, out=self.clip_coef)

    def apply_descent_jacobian_(self, optimizer, params: list[torch.Tensor],
                                directions: list[list[torch.Tensor]]) -> None:
        """H·d -> u_t = −η·c·J_P·H·d for each direction, reading the optimizer state right after its step."""
        inner = getattr(optimizer, "optimizer", optimizer)  # unwrap accelerate's AcceleratedOptimizer
        position = {id(p): i for i, p in enumerate(params)}
        for u, kept in zip(directions, self._kept or [None] * len(directions)):
            for group in inner.param_groups:
                members = [position[id(p)] for p in group["params"] if id(p) in position]
                if not members:
                    continue
                tangents = [u[i] for i in members]
                descent_jacobian_(inner, group, [params[i] for i in members], tangents)
                torch._foreach_mul_(tangents, (-group["lr"]) * self.clip_coef.to(tangents[0].dtype))
            if kept is not None:
                torch._foreach_add_(u, kept)  # h_{t+1} = μ·h_t − A_t·w_t
        self.u_valid = True

    # -- the ρ step ------------------------------------------------------------------
    def update(self, gap: torch.Tensor, inner: torch.Tensor) -> None:
        """ρ ← clip(ρ − lr·update(dF/dρ)), with dF/dρ = gap·inner (squared gap) or inner (val-loss);
        in the log space log ρ ← log ρ − lr·update(ρ·dF/dρ), then the clip.

        A non-finite gap or hypergradient leaves ρ and its optimizer state as they were, on the
        device (no host sync), and counts in `skipped_updates`.
        """
        grad = (gap * inner if self.needs_train_gradient else inner).double()
        self._record_and_step(gap, inner, grad * self.value if self.log_space else grad)  # log space: dF/d log ρ

    def _record_and_step(self, gap: torch.Tensor, inner: torch.Tensor, grad: torch.Tensor) -> None:
        """One step of the ρ optimizer on `grad` (of ρ, or of log ρ in the log space), or of the evidence rule, with
        the diagnostics."""
        self.last_grad, self.last_inner = grad.double(), inner.double()
        self.monitor.observe(gap, inner, grad)
        self._before_update = [t.clone() for t in self._scalars()]
        if self.evidence is not None:
            self.evidence.step_(self.value, grad.double())
        else:
            self._optimizer_step_(grad)
        self.value.clamp_(self.args.rho_min, self.args.rho_max)
        finite = torch.isfinite(gap) & torch.isfinite(grad) & torch.isfinite(self.value)
        for tensor, before in zip(self._scalars(), self._before_update):
            tensor.copy_(torch.where(finite, tensor, before))
        self.skipped_updates += (~finite).to(self.skipped_updates.dtype)

    def _optimizer_step_(self, grad: torch.Tensor) -> None:
        """ρ (log ρ in the log space) ← itself − lr · the ρ optimizer's direction for `grad`."""
        if self.args.rho_optimizer == "adam":
            beta1, beta2 = ADAM_BETAS
            self.step += 1
            self.exp_avg.mul_(beta1).add_(grad * (1 - beta1))
            self.exp_avg_sq.mul_(beta2).add_(grad * grad * (1 - beta2))
            m_hat = self.exp_avg / (1 - beta1**self.step)
            v_hat = self.exp_avg_sq / (1 - beta2**self.step)
            direction = m_hat / (v_hat.sqrt() + ADAM_EPS)
        else:
            direction = grad
        if self.log_space:
            self.value.mul_(torch.exp(-self.lr * direction))
        else:
            self.value.sub_(self.lr * direction)

    def skip_step(self) -> None:
        """The optimizer skipped this step (fp16 overflow, non-finite step): undo this step's ρ update and drop u."""
        if self._before_update is not None:
            for tensor, saved in zip(self._scalars(), self._before_update):
                tensor.copy_(saved)
        self.u_valid = False

    def plain_step_untracked(self) -> None:
        """A plain step (`sam_policy`) where this estimator would have tracked ∂θ/∂ρ: the one-step estimator's
        u_t = ∂θ_{t+1}/∂ρ through a plain step is zero, so the update that would read it, whose dF/dρ is then 0,
        is skipped; a trace not yet started stays so."""
        self.u_valid = False

    def step_done(self) -> None:
        self._before_update = None

    def _scalars(self) -> list[torch.Tensor]:
        return [self.value, self.step, self.exp_avg, self.exp_avg_sq, *(self.evidence.tensors() if self.evidence else [])]

    # -- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "rho": self.value,
            "step": self.step,
            "exp_avg": self.exp_avg,
            "exp_avg_sq": self.exp_avg_sq,
            "u": self.u,
            "u_valid": self.u_valid,
            "skipped_updates": self.skipped_updates,
            "monitor": self.monitor.state_dict(),
            "window_start_loss": self.window_start_loss,
            "first_window_change": self.first_window_change,
            "evidence": self.evidence.tensors() if self.evidence is not None else None,
            "probes": self.probes,
            "stepped_batch": self.stepped_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("rho", "step", "exp_avg", "exp_avg_sq"):
            getattr(self, "value" if name == "rho" else name).copy_(state[name])
        if state["u"] is not None:
            self.u = [t.to(self.value.device) for t in state["u"]]
        self.u_valid = state["u_valid"]
        self.skipped_updates.copy_(state.get("skipped_updates", 0))  # absent before lets-hf counted them
        if "monitor" in state:  # absent before lets-hf kept diagnostics and antithetic windows
            self.monitor.load_state_dict(state["monitor"])
            self.window_start_loss.copy_(state["window_start_loss"])
            self.first_window_change.copy_(state["first_window_change"])
        if len(state.get("probes", [])) == len(self.probe_decays):  # other probes: theirs start afresh
            self.probes = [[t.to(self.value.device) for t in probe] for probe in state.get("probes", [])]
        self.stepped_batch = state.get("stepped_batch")  # absent before rho_train_batch
        if self.stepped_batch is not None:
            self.stepped_batch = self.stepped_batch.to(self.value.device)
        if self.evidence is not None and state.get("evidence") is not None:  # absent before the evidence rule
            for tensor, saved in zip(self.evidence.tensors(), state["evidence"]):
                tensor.copy_(saved)


def descent_jacobian_(optimizer, group: dict, params: list[torch.Tensor], tangents: list[torch.Tensor]) -> None:
    """Multiply `tangents` in place by J_P, the optimizer's Jacobian w.r.t. the descent gradient.

    Optimizer state from earlier steps is held constant (design note). An optimizer the
    package does not know can provide `descent_jacobian_(group, params, tangents)` itself.
    """
    if hasattr(optimizer, "descent_jacobian_"):
        optimizer.descent_jacobian_(group, params, tangents)
    elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1, beta2 = group["betas"]
        states = [optimizer.state[p] for p in params]
        second = [s["max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"] for s in states]
        step = _as_scalar(states[0]["step"])  # Adam steps all parameters of a group together
        denom = torch._foreach_sqrt(second)
        torch._foreach_div_(denom, (1 - beta2**step) ** 0.5)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_div_(tangents, denom)
        torch._foreach_mul_(tangents, (1 - beta1) / (1 - beta1**step))
    elif isinstance(optimizer, torch.optim.SGD):
        if group.get("nesterov"):
            torch._foreach_mul_(tangents, 1 + group["momentum"])
    else:
        raise UsageError(
            f"{setting('learn_rho')} does not know the Jacobian of {type(optimizer).__name__}. Use SGD, Adam or AdamW "
            f"(e.g. {setting('optim', 'adamw_torch')}), or give the optimizer a "
            "`descent_jacobian_(group, params, tangents)` method."
        )


def _as_scalar(step):
    """A host number when that costs no device sync; a float64 device tensor otherwise (fused/capturable Adam)."""
    if torch.is_tensor(step):
        return float(step) if step.device.type == "cpu" else step.double()
    return float(step)


def check_optimizer_supported(optimizer) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    if not (hasattr(inner, "descent_jacobian_") or isinstance(inner, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD))):
        descent_jacobian_(inner, {}, [], [])  # raises the explanatory error
