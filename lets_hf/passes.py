"""How the engine runs a micro-batch: the one seam between `LETSEngine` and the loop that drives it.

A `passes` object has five methods, each on one micro-batch `batch` of the loop's own format:

    backward(model, batch)         forward and backward into `.grad`, as the loop's own pass; returns the
                                   detached loss, scaled for accumulation as the loop scales it
    loss(model, batch)             the same loss, differentiable, without backward (Hessian-vector products)
    validation_loss(model, batch)  the loss of a ρ validation batch, scaled as one train batch (no accumulation)
    extra_pass()                   a context around the passes LETS adds to the loop's own
    accumulation_steps()           micro-batches in the current optimizer step

`LoopPasses` serves a plain loop from `loss_fn(model, batch)`; `LETSMixin` serves Trainer's.
`synced_on_last` runs the engine's own passes over several micro-batches with one gradient sync.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate.utils import DistributedType, send_to_device


class LoopPasses:
    """A plain PyTorch or Accelerate loop: `loss_fn(model, batch)` is the mean loss of one micro-batch."""

    def __init__(self, loss_fn, accelerator):
        self.loss_fn, self.accelerator = loss_fn, accelerator

    def backward(self, model, batch) -> torch.Tensor:
        loss = self.loss_fn(model, batch)
        self.accelerator.backward(loss)  # divides by the accumulation steps, and scales for fp16
        return loss.detach() / self.accumulation_steps()

    def loss(self, model, batch) -> torch.Tensor:
        return self.loss_fn(model, batch) / self.accumulation_steps()

    def validation_loss(self, model, batch) -> torch.Tensor:
        return self.loss_fn(model, send_to_device(batch, self.accelerator.device))

    def extra_pass(self):
        return contextlib.nullcontext()

    def accumulation_steps(self) -> int:
        return self.accelerator.gradient_accumulation_steps


class SingleProcess:
    """What the engine asks of an `accelerate.Accelerator`, for a loop on one process that has none:
    no sync to skip, no loss scaling, and micro-batches counted by the engine."""

    distributed_type = DistributedType.NO
    is_fsdp2 = False
    num_processes = 1
    process_index = 0
    is_main_process = True
    scaler = None
    optimizer_step_was_skipped = False

    def __init__(self, model, gradient_accumulation_steps: int):
        self.device = next(model.parameters()).device
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.sync_gradients = gradient_accumulation_steps == 1
        self._micro_batches = 0

    def start_micro_batch(self) -> None:
        self._micro_batches = self._micro_batches % self.gradient_accumulation_steps + 1
        self.sync_gradients = self._micro_batches == self.gradient_accumulation_steps

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gradient_accumulation_steps).backward()

    def no_sync(self, model):
        return contextlib.nullcontext()

    def unwrap_model(self, model):
        return model

    def clip_grad_norm_(self, parameters, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def synced_on_last(accelerator, model, batches):
    """Yields each of `batches` with gradient sync off but for the last: DDP's all-reduce (FSDP2's
    reduce-scatter) then runs once, over the gradient accumulated from all of them."""
    for i, batch in enumerate(batches):
        with contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model):
            yield batch
