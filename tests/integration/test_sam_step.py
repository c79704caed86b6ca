"""LETSTrainer's SAM/ASAM steps against hand-written reference steps on a tiny float64 model.

The dataset is exactly one batch, so Trainer's shuffling cannot change what a step sees.
"""

import math

import pytest
import torch
from transformers import Trainer

from lets_hf import LETSConfig, LETSTrainer, available_rules
from lets_hf.errors import UsageError
from tests.heads import build_model, train_rows, validation_rows
from tests.toy import TinyClassifier, ToyDataset

F64 = torch.float64
#: Where bf16 goes to a GPU, `use_cpu` stays as given.
NO_ACCELERATOR = pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(),
                                    reason="bf16 runs on the accelerator here")


def _loss_and_grads(model, data):
    model.zero_grad()
    loss = model(data.x, data.labels)["loss"]
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _direction(variant, model, grads, eta=0.01):
    """d with ε = ρ·d, written out per parameter (independent of the rules' foreach code)."""
    params = dict(model.named_parameters())
    t = {n: (params[n].detach().abs() + eta if "weight" in n else torch.ones_like(g)) for n, g in grads.items()}
    if variant == "sam":
        t = {n: torch.ones_like(g) for n, g in grads.items()}
    norm = math.sqrt(sum(float(((t[n] * g) ** 2).sum()) for n, g in grads.items()))
    return {n: t[n] * t[n] * g / (norm + 1e-12) for n, g in grads.items()}


def reference_sam(variant, rho, lr, steps, optimizer="sgd", n=8, max_grad_norm=0.0):
    """SAM by hand: g at θ, ε = ρ·d(g), g̃ at θ+ε, restore θ, optimizer step with g̃.

    `lr` is a number or one learning rate per step."""
    model, data = TinyClassifier(dtype=F64), ToyDataset(n, dtype=F64)
    lrs = lr if isinstance(lr, list) else [lr] * steps
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lrs[0])
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lrs[0], weight_decay=0.0)
    for step in range(steps):
        opt.param_groups[0]["lr"] = lrs[step]
        _, grads = _loss_and_grads(model, data)
        direction = _direction(variant, model, grads)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(rho * direction[name])
        _, descent = _loss_and_grads(model, data)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.sub_(rho * direction[name])
                p.grad = descent[name]
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
    return model


def _train(make_args, n=8, model=None, **overrides):
    model = model or TinyClassifier(dtype=F64)
    trainer = LETSTrainer(model=model, args=make_args(**overrides), train_dataset=ToyDataset(n, dtype=F64))
    trainer.train()
    return trainer


def _assert_same_params(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=name, **tol)


@pytest.mark.parametrize("variant,rho", [("sam", 0.05), ("asam", 0.5)])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw_torch"])
def test_step_matches_hand_written_reference(make_args, variant, rho, optimizer):
    lr = 0.1 if optimizer == "sgd" else 0.01
    trainer = _train(make_args, sam_variant=variant, rho=rho, optim=optimizer, learning_rate=lr, max_steps=3)
    reference = reference_sam(variant, rho, lr, steps=3, optimizer="sgd" if optimizer == "sgd" else "adamw")
    _assert_same_params(trainer.model, reference, rtol=1e-10, atol=1e-12)


def test_default_rho_comes_from_the_rule(make_args):
    trainer = _train(make_args, sam_variant="asam", max_steps=1)
    assert trainer.rho == 0.5
    _assert_same_params(trainer.model, reference_sam("asam", 0.5, 0.1, steps=1), rtol=1e-10, atol=1e-12)


def test_every_parameter_with_a_gradient_is_perturbed_and_restored_exactly(make_args):
    """With lr = 0 the step must leave θ bit-identical: restore is a copy, not θ + ε − ε."""
    seen = {}

    class Recording(TinyClassifier):
        def forward(self, x, labels=None):
            seen.setdefault("points", []).append([p.detach().clone() for p in self.parameters()])
            return super().forward(x, labels)

    model = Recording(dtype=F64)
    before = [p.detach().clone() for p in model.parameters()]
    _train(make_args, model=model, sam_variant="sam", rho=0.3, learning_rate=0.0, max_steps=1)
    first, second = seen["points"]
    assert all(torch.equal(a, b) for a, b in zip(first, before))
    assert all(not torch.equal(a, b) for a, b in zip(second, before))  # every parameter moved by ε
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_sam_variant_none_is_bit_identical_to_trainer(make_args):
    args = make_args(sam_variant="none", optim="adamw_torch", learning_rate=0.01, max_steps=4, per_device_train_batch_size=4)
    ours = LETSTrainer(model=TinyClassifier(), args=args, train_dataset=ToyDataset(16))
    ours.train()
    plain = Trainer(model=TinyClassifier(), args=args, train_dataset=ToyDataset(16))
    plain.train()
    assert all(torch.equal(p, q) for p, q in zip(ours.model.parameters(), plain.model.parameters()))


@pytest.mark.parametrize("learn_rho", [False, True])
@pytest.mark.parametrize("variant", available_rules())
def test_accumulation_matches_full_batch_in_global_scope(make_args, variant, learn_rho):
    common = dict(sam_variant=variant, rho=0.1, max_steps=3, learn_rho=learn_rho, rho_lr=0.01)
    runs = []
    for batch, accumulation in [(8, 1), (2, 4)]:
        args = make_args(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, rho_batch_size=8, **common)
        trainer = LETSTrainer(
            model=TinyClassifier(dtype=F64), args=args, train_dataset=ToyDataset(8, dtype=F64),
            rho_dataset=ToyDataset(8, seed=1, dtype=F64) if learn_rho else None,
        )
        trainer.train()
        runs.append(trainer)
    _assert_same_params(runs[0].model, runs[1].model, rtol=1e-10, atol=1e-12)
    assert runs[0].rho == pytest.approx(runs[1].rho, rel=1e-10)
    if learn_rho:
        assert runs[0].rho != 0.1


def test_local_scope_perturbs_each_micro_batch_with_its_own_gradient(make_args):
    """Local scope, 2 micro-batches of 4 (in sampler order): g̃ = mean_i ∇L_i(θ + ρ·g_i/‖g_i‖)."""
    order = []

    class Ordered(LETSTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            order.append(inputs["x"].clone())
            return super().training_step(model, inputs, num_items_in_batch)

    args = make_args(sam_variant="sam", rho=0.2, sam_scope="local", per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1)
    trainer = Ordered(model=TinyClassifier(dtype=F64), args=args, train_dataset=ToyDataset(8, dtype=F64))
    trainer.train()

    reference, data = TinyClassifier(dtype=F64), ToyDataset(8, dtype=F64)
    rows = {tuple(x.tolist()): i for i, x in enumerate(data.x)}
    total = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    for x in order:
        idx = torch.tensor([rows[tuple(r.tolist())] for r in x])
        micro = ToyDataset(8, dtype=F64)
        micro.x, micro.labels = data.x[idx], data.labels[idx]
        _, grads = _loss_and_grads(reference, micro)
        direction = _direction("sam", reference, grads)
        with torch.no_grad():
            for n, p in reference.named_parameters():
                p.add_(0.2 * direction[n])
        _, descent = _loss_and_grads(reference, micro)
        with torch.no_grad():
            for n, p in reference.named_parameters():
                p.sub_(0.2 * direction[n])
                total[n] += descent[n] / 2
    with torch.no_grad():
        for n, p in reference.named_parameters():
            p.sub_(0.1 * total[n])
    _assert_same_params(trainer.model, reference, rtol=1e-10, atol=1e-12)


def test_clipping_applies_to_the_descent_gradient(make_args):
    trainer = _train(make_args, sam_variant="sam", rho=0.05, max_grad_norm=0.05, max_steps=2)
    reference = reference_sam("sam", 0.05, 0.1, steps=2, max_grad_norm=0.05)
    _assert_same_params(trainer.model, reference, rtol=1e-10, atol=1e-12)
    unclipped = reference_sam("sam", 0.05, 0.1, steps=2)
    assert not torch.allclose(trainer.model.out.weight, unclipped.out.weight)


def test_zero_gradient_gives_no_perturbation_and_no_nan(make_args):
    model = TinyClassifier(dtype=F64)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # tanh(0) = 0 and equal logits: every gradient but the output bias is zero
        model.out.bias.requires_grad_(False)
    trainer = _train(make_args, model=model, sam_variant="sam", rho=0.05, max_steps=2)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(float(h["first_grad_norm"]) == 0.0 for h in trainer.state.log_history if "loss" in h)


def test_logs_carry_rho_and_first_pass_grad_norm(make_args):
    trainer = _train(make_args, sam_variant="sam", rho=0.05, max_steps=4, logging_steps=2)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for entry in logs:
        assert entry["rho"] == 0.05 and entry["first_grad_norm"] > 0


def test_lr_schedule_is_followed(make_args):
    """Linear decay over 3 steps: the SAM steps use lr·(1, 2/3, 1/3), as Trainer's scheduler says."""
    trainer = _train(make_args, sam_variant="sam", rho=0.05, lr_scheduler_type="linear", max_steps=3)
    reference = reference_sam("sam", 0.05, [0.1, 0.1 * 2 / 3, 0.1 / 3], steps=3)
    _assert_same_params(trainer.model, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", available_rules())
def test_bf16_trains_on_cpu(make_args, variant):
    """bf16 autocast: both passes and the ρ update run, and stay finite and close to fp32."""
    common = dict(sam_variant=variant, learn_rho=True, per_device_train_batch_size=8, rho_batch_size=8, max_steps=4, rho_lr=0.01)
    runs = {}
    for bf16 in (False, True):
        trainer = LETSTrainer(model=TinyClassifier(), args=make_args(bf16=bf16, **common), train_dataset=ToyDataset(128))
        trainer.train()
        runs[bf16] = trainer
    assert runs[True].args.bf16 and runs[True].accelerator.mixed_precision == "bf16"
    assert all(torch.isfinite(p).all() for p in runs[True].model.parameters())
    assert runs[True].rho != runs[True].radius.value.new_tensor(runs[True].rule.default_rho).item()  # ρ moved
    for p, q in zip(runs[True].model.parameters(), runs[False].model.parameters()):
        torch.testing.assert_close(p, q, rtol=0.05, atol=0.02)


@NO_ACCELERATOR
def test_bf16_without_use_cpu_trains_a_real_head_on_the_cpu(tmp_path, one_thread):
    """TrainingArguments alone asks for use_cpu=True on a machine that has nothing but a CPU."""
    args = LETSConfig(
        output_dir=str(tmp_path), bf16=True, sam_variant="sam", learn_rho=True, rho_lr=0.01, per_device_train_batch_size=8,
        rho_batch_size=8, max_steps=2, report_to="none", save_strategy="no", disable_tqdm=True,
    )
    assert args.use_cpu
    model = build_model("bert-classification").float()
    logits_dtypes = set()
    model.classifier.register_forward_hook(lambda module, inputs, output: logits_dtypes.add(output.dtype))
    trainer = LETSTrainer(model=model, args=args, train_dataset=train_rows("bert-classification"),
                          rho_dataset=validation_rows("bert-classification"))
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16" and logits_dtypes == {torch.bfloat16}
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"]) and trainer.rho != 0.05  # ρ was updated


@NO_ACCELERATOR
def test_bf16_on_a_cpu_without_bfloat16_says_what_to_change(tmp_path, monkeypatch):
    monkeypatch.setattr("lets_hf.config.is_torch_bf16_available_on_device", lambda device: False)
    with pytest.raises(UsageError, match=r"^bf16=True needs a GPU or a CPU that computes in bfloat16.*: set bf16=False\.$"):
        LETSConfig(output_dir=str(tmp_path), bf16=True, report_to="none")
