"""The hypergradient estimators, objectives and the log-space update against independent math, on a real
🤗 head (a 2-layer float64 BERT classifier without dropout).

Three steps on three known sequential batches B_0, B_1, B_2 build ∂θ_3/∂ρ; step 3 (on B_0 again, the
second epoch) updates ρ once, at θ_3, with `rho_update_interval=3`. The reference differentiates the
objective at θ_3(ρ) with autograd through the three unrolled steps

    θ_{t+1} = θ'_t − η·P_t(∇L(B_t; θ'_t + ρ·d_t)),     θ'_t = μ·θ_t + (1 − μ)·stop_grad(θ_t)

where d_t comes from stop_grad(θ_t) (the rule's direction is held constant) and the optimizer's state from
earlier steps is held constant (the design note). θ'_t has θ_t's value and μ times its derivative, so
dθ_{t+1}/dρ = μ·(I − η·J_P·H_t)·h_t − η·J_P·H_t·d_t: the trace, with the exact Hessian H_t of L(B_t)
at the perturbed point. The diagonal mode is checked against its recursion written out by hand.
"""

import math
import re

import pytest
import torch
from torch.func import functional_call

from lets_hf import LETSConfig, LETSTrainer
from lets_hf.errors import UsageError
from tests.heads import build_model, train, train_rows, validation_rows

HEAD = "bert-classification"
RHO, LR, STEPS = 0.05, 0.5, 3
BETAS, EPS = (0.9, 0.999), 1e-8


def _batch(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


TRAIN_BATCHES = [_batch(train_rows(HEAD)[8 * t : 8 * (t + 1)]) for t in range(STEPS)]
VAL_BATCH = _batch(validation_rows(HEAD))


def _loss(model, params, batch):
    return functional_call(model, params, args=(), kwargs=batch).loss


def _grad(model, params, batch, create_graph=False):
    names = list(params)
    grads = torch.autograd.grad(_loss(model, params, batch), [params[n] for n in names], create_graph=create_graph)
    return dict(zip(names, grads))


def _sam_direction(g):
    norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
    return {n: v / (norm + 1e-12) for n, v in g.items()}


def reference_hypergradient(optimizer: str, decay: float, objective: str, plain_steps=(), train_batch: int = 0,
                            val_batch: dict = VAL_BATCH) -> float:
    """dF/dρ at θ_3 by autograd through the unrolled steps (see the module docstring); the steps in `plain_steps`
    take no SAM (`sam_policy`): θ_{t+1} = θ'_t − η·P_t(∇L(B_t; θ'_t)). The squared gap's L_train is on
    B_`train_batch`: B_0, the next batch (the paper's), or B_2, the last one stepped on; L_val on `val_batch`."""
    model = build_model(HEAD)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    rho = torch.tensor(RHO, dtype=torch.float64, requires_grad=True)
    m = {n: torch.zeros_like(v) for n, v in theta.items()}
    v = {n: torch.zeros_like(t) for n, t in theta.items()}
    for t, batch in enumerate(TRAIN_BATCHES):
        fixed = {n: p.detach().requires_grad_() for n, p in theta.items()}
        d = _sam_direction(_grad(model, fixed, batch))
        traced = {n: decay * theta[n] + (1 - decay) * theta[n].detach() for n in theta}
        radius = 0.0 if t in plain_steps else rho
        descent = _grad(model, {n: traced[n] + radius * d[n] for n in theta}, batch, create_graph=True)
        if optimizer == "sgd":
            theta = {n: traced[n] - LR * descent[n] for n in theta}
            continue
        step = t + 1  # torch's AdamW (weight decay 0), with m_{t-1} and v_t held constant
        for n in theta:
            v[n] = BETAS[1] * v[n] + (1 - BETAS[1]) * descent[n].detach() ** 2
        m_new = {n: BETAS[0] * m[n].detach() + (1 - BETAS[0]) * descent[n] for n in theta}
        denom = {n: v[n].sqrt() / math.sqrt(1 - BETAS[1] ** step) + EPS for n in theta}
        theta = {n: traced[n] - LR / (1 - BETAS[0] ** step) * m_new[n] / denom[n] for n in theta}
        m = m_new
    val_loss = _loss(model, theta, val_batch)
    if objective == "val-loss":
        objective_value = val_loss
    else:
        objective_value = 0.5 * (val_loss - _loss(model, theta, TRAIN_BATCHES[train_batch])) ** 2
    (hypergradient,) = torch.autograd.grad(objective_value, rho)
    return float(hypergradient)


def diagonal_trace_hypergradient(decay: float) -> float:
    """The diagonal mode's recursion by hand (SGD): h ← μ·h − η·g̃²·(μ·h + d); squared-gap objective."""
    model = build_model(HEAD)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    h = {n: torch.zeros_like(p) for n, p in theta.items()}
    for batch in TRAIN_BATCHES:
        d = _sam_direction(_grad(model, {n: p.clone().requires_grad_() for n, p in theta.items()}, batch))
        perturbed = {n: (theta[n] + RHO * d[n]).requires_grad_() for n in theta}
        descent = _grad(model, perturbed, batch)
        h = {n: decay * h[n] - LR * descent[n] ** 2 * (decay * h[n] + d[n]) for n in theta}
        theta = {n: theta[n] - LR * descent[n] for n in theta}
    at = {n: p.clone().requires_grad_() for n, p in theta.items()}
    val_grad, train_grad = _grad(model, at, VAL_BATCH), _grad(model, at, TRAIN_BATCHES[0])
    with torch.no_grad():
        gap = _loss(model, theta, VAL_BATCH) - _loss(model, theta, TRAIN_BATCHES[0])
    return float(gap * sum(((val_grad[n] - train_grad[n]) * h[n]).sum() for n in theta))


def trainer_after_one_update(tmp_path, **overrides) -> LETSTrainer:
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, sam_variant="sam", rho=RHO, learn_rho=True,
        rho_hessian="exact", rho_optimizer="sgd", rho_lr=1e-12, rho_batch_size=8, rho_update_interval=STEPS,
        optim="sgd", learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        adam_epsilon=EPS, max_steps=STEPS + 1, train_sampling_strategy="sequential", report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, use_cpu=True,
    )
    args = LETSConfig(**{**settings, **overrides})
    trainer = LETSTrainer(
        model=build_model(HEAD), args=args, train_dataset=train_rows(HEAD),
        rho_dataset=validation_rows(HEAD) if args.rho_val_batch == "held-out" else None,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("optimizer", ["sgd", "adamw_torch"])
@pytest.mark.parametrize("decay", [0.5, 0.9])
@pytest.mark.parametrize("objective", ["squared-gap", "val-loss"])
def test_trace_matches_autograd_through_the_unrolled_steps(tmp_path, one_thread, optimizer, decay, objective):
    trainer = trainer_after_one_update(
        tmp_path, rho_estimator="trace", rho_trace_decay=decay, rho_objective=objective, optim=optimizer
    )
    expected = reference_hypergradient("sgd" if optimizer == "sgd" else "adamw", decay, objective)
    assert float(trainer.radius.last_grad) == pytest.approx(expected, rel=1e-6)
    # the one-step estimator differs from the trace here: the test can tell them apart
    assert reference_hypergradient("sgd" if optimizer == "sgd" else "adamw", 0.0, objective) != pytest.approx(
        expected, rel=1e-3
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adamw_torch"])
@pytest.mark.parametrize("decay, accumulation", [(0.0, 1), (0.5, 1), (0.5, 2)])
def test_last_train_batch_matches_autograd_through_the_unrolled_steps(tmp_path, one_thread, optimizer, decay,
                                                                      accumulation):
    """`rho_train_batch="last"`: the update at θ_3 takes L_train on B_2, the batch step 2 stepped on (re-evaluated
    right after it, as 2 micro-batches of 4 with accumulation), instead of B_0, the next one."""
    estimator = dict(rho_estimator="trace", rho_trace_decay=decay) if decay else {}
    trainer = trainer_after_one_update(tmp_path, rho_train_batch="last", optim=optimizer,
                                       per_device_train_batch_size=8 // accumulation,
                                       gradient_accumulation_steps=accumulation, **estimator)
    reference = "sgd" if optimizer == "sgd" else "adamw"
    expected = reference_hypergradient(reference, decay, "squared-gap", train_batch=STEPS - 1)
    assert float(trainer.radius.last_grad) == pytest.approx(expected, rel=1e-6)
    assert reference_hypergradient(reference, decay, "squared-gap") != pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw_torch"])
@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_next_validation_batch_matches_autograd_through_the_unrolled_steps(tmp_path, one_thread, optimizer, decay):
    """`rho_val_batch="next"`: nothing held out; the update at θ_3 takes L_val on B_3 = B_0 (the next batch's first
    pass) and L_train on B_2, the batch just stepped on."""
    estimator = dict(rho_estimator="trace", rho_trace_decay=decay) if decay else {}
    trainer = trainer_after_one_update(tmp_path, rho_train_batch="last", rho_val_batch="next", optim=optimizer,
                                       **estimator)
    assert trainer.rho_dataset is None and len(trainer.train_dataset) == 8 * STEPS  # nothing held out
    reference = "sgd" if optimizer == "sgd" else "adamw"
    expected = reference_hypergradient(reference, decay, "squared-gap", train_batch=STEPS - 1, val_batch=TRAIN_BATCHES[0])
    assert float(trainer.radius.last_grad) == pytest.approx(expected, rel=1e-6)


def test_last_train_batch_resumes_exactly(tmp_path, one_thread):
    """The update at the end of a step is in the checkpoint written after that step; nothing crosses to the next."""
    fields = dict(rho_train_batch="last", max_steps=6, save_strategy="steps", save_steps=3)
    straight = train(HEAD, "lets-sam", str(tmp_path / "straight"), batch=8, **fields)
    resumed = train(HEAD, "lets-sam", str(tmp_path / "resumed"), batch=8, resume=str(tmp_path / "straight" / "checkpoint-3"),
                    **fields)
    assert resumed["rho"] == straight["rho"] != RHO
    assert resumed["gen_gap"][-3:] == straight["gen_gap"][-3:]
    torch.testing.assert_close(resumed["theta"], straight["theta"], rtol=0, atol=0)


@pytest.mark.parametrize("objective", ["squared-gap", "val-loss"])
def test_one_step_is_the_trace_without_memory(tmp_path, one_thread, objective):
    """The paper's estimator: ∂θ_3/∂ρ through the last step only (μ = 0 in the unrolled reference)."""
    trainer = trainer_after_one_update(tmp_path, rho_estimator="one-step", rho_objective=objective)
    assert float(trainer.radius.last_grad) == pytest.approx(reference_hypergradient("sgd", 0.0, objective), rel=1e-6)


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_diagonal_trace_matches_its_recursion_by_hand(tmp_path, one_thread, decay):
    trainer = trainer_after_one_update(tmp_path, rho_estimator="trace", rho_trace_decay=decay, rho_hessian="diagonal")
    assert float(trainer.radius.last_grad) == pytest.approx(diagonal_trace_hypergradient(decay), rel=1e-8)


@pytest.mark.parametrize("rho_optimizer", ["sgd", "adam"])
def test_log_space_steps_log_rho(tmp_path, one_thread, rho_optimizer):
    """log ρ ← log ρ − lr·update(ρ·dF/dρ): plain, or Adam's first step, whose update is the sign."""
    lr = 1000.0 if rho_optimizer == "sgd" else 0.3  # dF/d log ρ is ~1e-4 here
    trainer = trainer_after_one_update(tmp_path, rho_update_space="log", rho_optimizer=rho_optimizer, rho_lr=lr)
    log_grad = float(trainer.radius.last_grad)  # in the log space: dF/d log ρ = ρ·dF/dρ
    assert log_grad == pytest.approx(RHO * reference_hypergradient("sgd", 0.0, "squared-gap"), rel=1e-6)
    step = log_grad if rho_optimizer == "sgd" else math.copysign(1.0, log_grad)
    assert trainer.rho == pytest.approx(RHO * math.exp(-lr * step), rel=1e-9)
    assert trainer.rho != pytest.approx(RHO, rel=1e-3)


def test_log_space_default_step_is_relative(tmp_path, one_thread):
    """No rho_lr: 2% of ρ per Adam update in the log space, whatever ρ₀."""
    trainer = trainer_after_one_update(tmp_path, rho_update_space="log", rho_optimizer="adam", rho_lr=None)
    assert trainer.rho == pytest.approx(RHO * math.exp(-0.02 * math.copysign(1.0, float(trainer.radius.last_grad))))


def _sam_step(model, theta, batch, radius):
    d = _sam_direction(_grad(model, {n: p.clone().requires_grad_() for n, p in theta.items()}, batch))
    descent = _grad(model, {n: (theta[n] + radius * d[n]).requires_grad_() for n in theta}, batch)
    return {n: theta[n] - LR * descent[n] for n in theta}


def test_antithetic_windows_and_update_match_a_run_by_hand(tmp_path, one_thread):
    """Windows of one step run at ρ·e^{+δ}, ρ·e^{−δ} (pair 0: +−); the validation loss (eval mode) at θ_0, θ_1,
    θ_2 gives G = ((L_1 − L_0) − (L_2 − L_1))/(2δ); log ρ steps by −lr·G (SGD); step 2 (pair 1 opens with −)
    runs at the new ρ·e^{−δ}."""
    delta, lr = 0.5, 3.0
    trainer = trainer_after_one_update(
        tmp_path, rho_estimator="antithetic", rho_update_space="log", rho_antithetic_delta=delta,
        rho_antithetic_batches=1, rho_update_interval=1, rho_lr=lr, max_steps=3,
    )
    model = build_model(HEAD).eval()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for t, sign in enumerate([1, -1]):
        losses.append(float(_loss(model, theta, VAL_BATCH)))
        theta = _sam_step(model, theta, TRAIN_BATCHES[t], RHO * math.exp(sign * delta))
    losses.append(float(_loss(model, theta, VAL_BATCH)))
    G = ((losses[1] - losses[0]) - (losses[2] - losses[1])) / (2 * delta)
    assert float(trainer.radius.last_grad) == pytest.approx(G, rel=1e-6)
    rho = RHO * math.exp(-lr * G)
    assert trainer.rho == pytest.approx(rho, rel=1e-9) and trainer.rho != pytest.approx(RHO, rel=1e-3)
    theta = _sam_step(model, theta, TRAIN_BATCHES[2], rho * math.exp(-delta))
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), theta[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "fields, needs",
    [
        (dict(sam_scope="local"), "sam_scope='global'"),
        (dict(rho_estimator="antithetic", rho_update_space="log"), "rho_estimator='one-step' or 'trace'"),
        (dict(sam_policy="ae-sam"), "sam_policy='every'"),
        (dict(rho_train_batch="next", rho_val_batch="next"), "rho_val_batch='next' needs rho_train_batch='last'"),
    ],
)
def test_last_train_batch_refuses_what_it_cannot_follow(tmp_path, fields, needs):
    with pytest.raises(UsageError, match=re.escape(needs)):
        LETSConfig(output_dir=str(tmp_path), **{"sam_variant": "sam", "learn_rho": True, "rho_train_batch": "last",
                                                **fields})


def test_next_validation_batch_refuses_held_out_data_it_would_ignore(tmp_path):
    args = LETSConfig(output_dir=str(tmp_path), sam_variant="sam", learn_rho=True, rho_train_batch="last",
                      rho_val_batch="next", use_cpu=True, report_to="none")
    with pytest.raises(UsageError, match="rho_dataset would go unused"):
        LETSTrainer(model=build_model(HEAD), args=args, train_dataset=train_rows(HEAD), rho_dataset=validation_rows(HEAD))


@pytest.mark.parametrize("head", ["bert-regression", "gpt2", "bart"])
def test_nothing_held_out_with_rho_frozen_trains_as_sam_on_every_head(tmp_path, one_thread, head):
    """`rho_val_batch="next"` with `rho_train_batch="last"` on the other loss normalizations (regression, a causal LM
    that honours num_items_in_batch, a seq2seq that drops it): with ρ frozen θ is SAM's bit for bit, on all of
    train, while the updates ran (B_t re-evaluated, the next batch's first pass read)."""
    from tests.heads import GLOBAL_BATCH, train as train_head

    frozen = train_head(head, "lets-sam", str(tmp_path / "lets"), batch=GLOBAL_BATCH, rho_optimizer="sgd",
                        rho_lr=1e-300, rho_train_batch="last", rho_val_batch="next")
    sam = train_head(head, "sam", str(tmp_path / "sam"), batch=GLOBAL_BATCH)
    assert frozen["rho"] == 0.05 and len(frozen["gen_gap"]) == 2
    torch.testing.assert_close(frozen["theta"], sam["theta"], rtol=0, atol=0)
