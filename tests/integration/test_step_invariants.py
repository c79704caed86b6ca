"""Performance invariants that can be counted, not timed: host syncs, peak tensor memory, buffer reuse."""

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import Trainer, TrainerCallback

from lets_hf import LETSTrainer
from tests.conftest import REPO
from tests.toy import TinyClassifier, ToyDataset

sys.path.insert(0, str(REPO / "benchmarks"))
from step_cost import peak_live_bytes  # noqa: E402  (the benchmark's own memory measure)

HOST_READS = {"item", "__float__", "__bool__", "__int__", "tolist"}
VARIANTS = [
    dict(sam_variant="none"),
    dict(sam_variant="sam"),
    dict(sam_variant="asam"),
    dict(sam_variant="bisam"),
    dict(sam_variant="bsam"),
    dict(sam_variant="lightsam-adagrad-norm"),
    dict(sam_variant="sam", learn_rho=True),
    dict(sam_variant="sam", learn_rho=True, rho_hessian="exact"),
    dict(sam_variant="asam", learn_rho=True, rho_hessian="identity", rho_update_interval=2),
    dict(sam_variant="sam", learn_rho=True, sam_scope="local", gradient_accumulation_steps=2),
]


class _HostReads(TorchFunctionMode):
    """Counts tensor → Python conversions (a device sync on a GPU), except reads of Adam's step
    counters, which torch keeps on the CPU even when training on a GPU."""

    def __init__(self, exempt: set[int]):
        super().__init__()
        self.exempt, self.count = exempt, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS and id(args[0]) not in self.exempt:
            self.count += 1
        return func(*args, **(kwargs or {}))


class _CountHostReads(TrainerCallback):
    """Counts host reads from the start of each step (from the second on) to the optimizer step's end."""

    def __init__(self):
        self.per_step, self._mode = [], None

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == 0:  # Adam's state (and its step counters) is created by the first step
            return
        inner = getattr(optimizer, "optimizer", optimizer)
        self._mode = _HostReads({id(s["step"]) for s in inner.state.values() if "step" in s})
        self._mode.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.per_step.append(self._mode.count)
            self._mode = None


def _quiet_args(make_args, **overrides):
    """Four-example steps with clipping and no logging step in the window."""
    defaults = dict(learning_rate=1e-3, max_grad_norm=1.0, logging_steps=100, per_device_train_batch_size=4,
                    rho_batch_size=4)
    return make_args(**{**defaults, **overrides})


def _host_reads_per_step(make_args, trainer_cls=LETSTrainer, **overrides) -> list[int]:
    args = _quiet_args(make_args, optim="adamw_torch", max_steps=4, **overrides)
    trainer = trainer_cls(model=TinyClassifier(), args=args, train_dataset=ToyDataset(64))
    counter = _CountHostReads()
    trainer.add_callback(counter)  # last, so that LETS's own step-end work is counted too
    trainer.train()
    return counter.per_step


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_one_host_read_beyond_trainers_own_on_a_step_that_does_not_log(make_args, variant):
    """The only read LETS adds is the non-finite guard's flag, once per optimizer step (lets_hf/nonfinite.py)."""
    extra = {k: v for k, v in variant.items() if k == "gradient_accumulation_steps"}
    plain = _host_reads_per_step(make_args, trainer_cls=Trainer, **extra)
    assert len(plain) == 3 and plain[0] > 0  # Trainer itself reads each loss (its NaN filter): the counter sees reads
    assert _host_reads_per_step(make_args, **variant) == [reads + 1 for reads in plain]


class _Wide(TinyClassifier):
    """Parameters (8 MB) dwarf the activations, so a parameter-sized buffer shows in the peak."""

    def __init__(self):
        super().__init__(in_features=2048, hidden=1024, classes=3)


def _wide_trainer(make_args, **overrides) -> LETSTrainer:
    # SGD: no optimizer state or temporaries, so the peak is in the backward pass, where SAM's extra buffers live
    args = _quiet_args(make_args, optim="sgd", max_steps=3, **overrides)
    return LETSTrainer(model=_Wide(), args=args, train_dataset=ToyDataset(64, in_features=2048))


def _peak_over_parameters(make_args, **overrides) -> float:
    """Peak live tensor bytes of a 3-step run, in parameter-sized buffers."""
    trainer = _wide_trainer(make_args, **overrides)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train()
    return peak_live_bytes(prof) / sum(p.numel() * p.element_size() for p in trainer.model.parameters())


def test_sam_peak_memory_is_plain_training_plus_one_parameter_buffer(make_args):
    plain = _peak_over_parameters(make_args, sam_variant="none")  # plain Trainer
    sam = _peak_over_parameters(make_args, sam_variant="sam")
    lets = _peak_over_parameters(make_args, sam_variant="sam", learn_rho=True)
    assert sam - plain == pytest.approx(1.0, abs=0.05)  # the backup of θ, nothing else
    # + u = ∂θ/∂ρ, and the validation gradient that exists during the ρ update's backward
    assert lets - plain == pytest.approx(3.0, abs=0.05)


def test_buffers_are_allocated_once(make_args):
    trainer = _wide_trainer(make_args, sam_variant="sam", learn_rho=True)
    trainer.train()
    before = [t.data_ptr() for t in [*trainer.engine._backup.values(), *trainer.radius.u]]
    trainer.args.max_steps = 6
    trainer.train(resume_from_checkpoint=False)
    after = [t.data_ptr() for t in [*trainer.engine._backup.values(), *trainer.radius.u]]
    assert before == after
