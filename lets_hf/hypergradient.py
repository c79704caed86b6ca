"""The engine's upper level: the passes that measure ρ's signal, and the ρ update they feed.

`Radius` (lets_hf.radius) holds the math on tensors already computed; this module runs the passes
that compute them: the validation pass (L_val and ⟨∇L_val, u⟩), the training gradient a surrogate
first pass did not give, the Hessian-vector product of the `exact` mode, and the antithetic
estimator's fixed validation loss. Every pass goes through the loop's `passes`, so a Trainer and a
plain loop scale, prepare and count their batches alike.
"""

from __future__ import annotations

import warnings

import torch

from .distributed import average_scalars, reshard
from .passes import synced_on_last
from .tensor_lists import global_dot, global_norm, trainable_with_grad
from .validation import own_random_stream

#: Step of the finite-difference Hessian-vector product, relative to ‖d‖ (exact mode fallback).
FD_STEP = 1e-3


class Hypergradient:
    """The ρ updates of one `LETSEngine` (its passes, accelerator, radius and rule)."""

    def __init__(self, engine, rho_batches):
        self.engine = engine
        self.rho_batches = rho_batches
        self._fixed_batches = None  # the antithetic estimator's, drawn at its first window boundary
        self._hvp_by_double_backward = True

    def measure_stepped_batch(self, model, params, batches) -> None:
        """`rho_train_batch="last"`, right after step t: L_train and ⟨∇L_train, h⟩ for u_t and each probe on B_t
        (this rank's micro-batches `batches`, scaled as the loop scales them) at θ_{t+1}, averaged over ranks and
        kept for the update at the start of step t+1 (`Radius.stepped_batch`, in the checkpoint). The pass draws its
        dropout from a stream of its own, so the training steps draw as without it."""
        engine, losses = self.engine, []
        seed = (engine.args.rho_seed << 40) ^ (engine.global_step << 12) ^ engine.accelerator.process_index | 1 << 62

        def loss_of(model, batch):
            with own_random_stream(seed + (len(losses) << 32), engine.accelerator.device):
                loss = self._micro_batch_loss(model, batch)
            losses.append(loss.detach())
            return loss

        grads = self.sum_gradients(engine.accelerator.unwrap_model(model), params, batches, loss_of)
        if not engine.sharded:
            engine.average_grads(grads)
        dots = [global_dot(grads, h) for h in engine.directions_for(params, model)]
        engine.radius.stepped_batch = average_scalars(torch.stack([torch.stack(losses).sum(), *dots]).double())

    def update_rho(self, model, params, grads, first_loss, batches, micro_batches: int) -> None:
        """One upper-level step at θ_{t+1}: the gap L_val − L_train and the inner product of the objective,
        ⟨∇L_val − ∇L_train, u⟩ (squared gap) or ⟨∇L_val, u⟩ (val-loss); `Radius.update` combines them. The
        antithetic estimator instead measures the validation loss at its window boundary.

        `first_loss` and `grads` are the first pass's loss and gradient on `batches` (B_{t+1}), scaled by
        1/`micro_batches` as the loop scales the loss for accumulation. L_train is B_{t+1}'s (`rho_train_batch`
        "next", the paper's) or B_t's, measured at the end of step t ("last"); L_val is a held-out batch's
        (`rho_val_batch` "held-out") or B_{t+1}'s ("next"). Rules whose first pass descends on a surrogate pay one
        more backward here for the gradient of B_{t+1}'s training loss, where it is used.
        """
        engine, radius = self.engine, self.engine.radius
        if radius.antithetic:
            self._antithetic_boundary(model, first_loss)
            return
        directions = engine.directions_for(params, model)  # u, then the signal probes
        with_train = radius.needs_train_gradient or bool(radius.probe_decays)
        train_from_first_pass = with_train and engine.args.rho_train_batch == "next"
        val_from_first_pass = engine.args.rho_val_batch == "next"
        from_first_pass = train_from_first_pass or val_from_first_pass
        if from_first_pass and engine.rule.first_pass_loss is not None:  # the first pass gave ∇Q: take ∇L
            grads = self.sum_gradients(engine.accelerator.unwrap_model(model), params, batches)
            if engine.args.sam_scope == "global" and not engine.sharded:
                engine.average_grads(grads)
        first_dots = [global_dot(grads, h) * micro_batches for h in directions] if from_first_pass else None
        if val_from_first_pass:
            val_loss, val_dots = first_loss.detach(), first_dots
        else:
            val_loss, val_dots = self._validation_pass(model, params, directions)
        if engine.args.rho_train_batch == "last":
            train_loss, *train_dots = radius.stepped_batch
        else:
            train_loss, train_dots = first_loss.detach(), first_dots
        inner = val_dots[0] - train_dots[0] if radius.needs_train_gradient else val_dots[0]
        scalars = [val_loss.double(), inner.double(), train_loss.double()]
        for val_dot, train_dot in zip(val_dots[1:], train_dots[1:] if train_dots else []):
            scalars += [val_dot.double(), train_dot.double()]
        val_loss, inner, train_loss, *probe_dots = average_scalars(torch.stack(scalars))
        gap = val_loss - train_loss
        radius.update(gap, inner)
        self._record(gap)
        self._record_probes(gap, probe_dots)

    def _record(self, gap) -> None:
        self.engine.metrics.record("gen_gap", gap)
        self.engine.metrics.record("rho_inner", self.engine.radius.last_inner)
        self.engine.metrics.record("rho_grad", self.engine.radius.last_grad)
        if self.engine.radius.evidence is not None:  # how close the evidence since ρ's last move is to moving it
            self.engine.metrics.record("rho_evidence_t", self.engine.radius.evidence.last_t)

    def _record_probes(self, gap, dots) -> None:
        """Each signal probe's dF/dρ under both objectives, from this update's validation batch: squared gap
        gap·⟨∇L_val − g, h⟩, val-loss ⟨∇L_val, h⟩ (`dots`: ⟨∇L_val, h⟩, ⟨g, h⟩ per probe)."""
        for decay, val_dot, train_dot in zip(self.engine.radius.probe_decays, dots[0::2], dots[1::2]):
            self.engine.metrics.record(f"rho_probe_mu{decay:g}_squared_gap", gap * (val_dot - train_dot))
            self.engine.metrics.record(f"rho_probe_mu{decay:g}_val_loss", val_dot)

    def _antithetic_boundary(self, model, train_loss) -> None:
        """A window boundary of the antithetic estimator: the validation loss on its fixed batches, in eval mode."""
        val_loss, train_loss = average_scalars(torch.stack([self._fixed_validation_loss(model), train_loss.detach().double()]))
        if self.engine.radius.observe_window(val_loss, train_loss, self.engine.global_step):
            self._record(val_loss - train_loss)

    def _fixed_validation_loss(self, model) -> torch.Tensor:
        """Mean loss of this rank's share of the first `rho_antithetic_batches` validation batches (the same
        batches at every call, a function of `rho_seed` only), without dropout or gradient."""
        engine = self.engine
        if self._fixed_batches is None:
            stream = self.rho_batches.restarted()
            self._fixed_batches = [next(stream) for _ in range(engine.args.rho_antithetic_batches)]
        unwrapped = engine.accelerator.unwrap_model(model)
        unwrapped.eval()
        try:
            with torch.no_grad(), engine.passes.extra_pass():
                losses = [engine.passes.validation_loss(unwrapped, batch).double() for batch in self._fixed_batches]
        finally:
            unwrapped.train()
        if engine.sharded:
            reshard(unwrapped)
        return torch.stack(losses).mean()

    def _validation_pass(self, model, params, directions):
        """L_val and ⟨∇L_val, h⟩ for each direction h on this rank's shard of one validation batch, scaled as the
        loop scales a train batch: their mean over ranks is the global per-example or per-token mean. Under DDP
        the gradient is this rank's (no DDP hooks); under FSDP2 it is already the mean over ranks."""
        engine = self.engine
        batch = next(self.rho_batches)
        unwrapped = engine.accelerator.unwrap_model(model)
        scale = 1.0 / engine.scale_inverse()
        val_loss = []

        def scaled_loss(model, batch):
            with engine.passes.extra_pass(), own_random_stream(self.rho_batches.pass_seed(), engine.accelerator.device):
                loss = engine.passes.validation_loss(model, batch)
            val_loss.append(loss.detach())
            return loss * scale

        if engine.sharded:
            val_grads = self._synced_gradients(unwrapped, params, [batch], scaled_loss)
        else:
            val_grads = torch.autograd.grad(scaled_loss(unwrapped, batch), params, allow_unused=True)
            used = [i for i, g in enumerate(val_grads) if g is not None]
            val_grads, directions = [val_grads[i] for i in used], [[h[i] for i in used] for h in directions]
        return val_loss[0], [global_dot(val_grads, h) / scale for h in directions]

    # ------------------------------------------------------------------ u_t's Hessian and clipping
    def clip_coefficient(self, model) -> None:
        """c_t of the final descent gradient (what the loop clips), for the hypergradient."""
        _, _, descent = trainable_with_grad(model)
        self.engine.radius.set_clip_coef(descent, self.engine.scale_inverse(), self.engine.max_grad_norm)

    def hessian_direction_(self, model, cached) -> None:
        """After the second passes: u ← H·d (θ still perturbed for `exact`)."""
        engine = self.engine
        _, params, descent = trainable_with_grad(model)
        descent_scale = engine.scale_inverse()
        directions = engine.directions_for(params)
        if engine.args.rho_hessian == "exact":  # no signal probes (refused): u alone
            u = directions[0]
            torch._foreach_copy_(u, self._exact_hvp(model, params, u, cached, descent, descent_scale))
        else:
            engine.radius.apply_hessian_(directions, descent, descent_scale)

    def _exact_hvp(self, model, params, direction, cached, descent, descent_scale):
        """H(θ+ε)·d over the global batch: double backward, or, where a kernel has no double
        backward (fused attention), the finite difference (∇L(θ+ε+δd) − g̃)/δ."""
        engine = self.engine
        unwrapped = engine.accelerator.unwrap_model(model)
        if self._hvp_by_double_backward:
            try:
                hvp = self._double_backward_hvp(unwrapped, params, direction, cached)
                engine.average_grads(hvp)
                return hvp
            except RuntimeError as error:
                warnings.warn(
                    f"Double backward unavailable ({str(error).splitlines()[0]}); the exact ρ Hessian falls back "
                    "to a finite difference of gradients."
                )
                self._hvp_by_double_backward = False
        step = FD_STEP / (global_norm(direction) + 1e-12)
        with torch.no_grad():
            torch._foreach_add_(params, torch._foreach_mul(direction, step))
        beyond = self.sum_gradients(unwrapped, params, cached)  # θ is restored from the backup afterwards
        engine.average_grads(beyond)
        torch._foreach_sub_(beyond, torch._foreach_mul(descent, descent_scale))
        torch._foreach_div_(beyond, step)
        return beyond

    def _micro_batch_loss(self, model, batch):
        with self.engine.passes.extra_pass():
            return self.engine.passes.loss(model, batch)

    def _double_backward_hvp(self, model, params, direction, cached):
        hvp = None
        for batch in cached:
            loss = self._micro_batch_loss(model, batch)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            grads, dirs = zip(*[(g, d) for g, d in zip(grads, direction) if g is not None])
            products = torch.autograd.grad(grads, params, grad_outputs=dirs, allow_unused=True)
            products = [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(products, params)]
            hvp = products if hvp is None else torch._foreach_add(hvp, products)
        return hvp

    # ------------------------------------------------------------------ gradients outside the loop's backward
    def sum_gradients(self, model, params, cached, loss_of=None):
        """Gradient of the training loss (`loss_of(model, batch)`, by default the loop's scaled loss) over this
        rank's micro-batches (no DDP hooks); under FSDP2, over the global batch (see `_synced_gradients`)."""
        loss_of = loss_of or self._micro_batch_loss
        if self.engine.sharded:
            return self._synced_gradients(model, params, cached, loss_of)
        total = None
        for batch in cached:
            loss = loss_of(model, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            total = grads if total is None else torch._foreach_add(total, grads)
        return total

    def _synced_gradients(self, model, params, batches, loss_of) -> list[torch.Tensor]:
        """FSDP2: the gradient of Σ `loss_of(model, batch)` over `batches`, averaged over ranks and sharded
        like `params`. `torch.autograd.grad` cannot reach sharded parameters (FSDP2 all-gathers them outside
        autograd), so this backward goes through FSDP2's hooks, with the `.grad` in use set aside."""
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        for batch in synced_on_last(self.engine.accelerator, model, batches):
            loss_of(model, batch).backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        for p, grad in zip(params, kept):
            p.grad = grad
        return grads
