"""BiSAM, BSAM and LightSAM against hand-written math on a tiny float64 model.

The training set is exactly one batch (and the ρ validation set one validation batch),
so Trainer's shuffling cannot change what a step sees. The reference below rewrites
each rule from its paper's formulas with plain autograd, independently of lets_hf.
"""

import copy
import math

import pytest
import torch

from lets_hf import LETSConfig, LETSTrainer, get_rule
from lets_hf.methods import METHODS, apply_method
from lets_hf.optim import AdaGrad, AdaGradNorm, create_lightsam_optimizer, lightsam_optimizer_cls_and_kwargs
from tests.toy import TinyClassifier, ToyDataset

F64 = torch.float64
N, RHO, LR, RHO_MIN = 8, 0.05, 0.3, 0.02
TRAIN, VAL = ToyDataset(N, dtype=F64), ToyDataset(N, seed=1, dtype=F64)
BETA1, BETA2, ADAM_EPS, U0 = 0.9, 0.999, 1e-8, 1e-8
NEW_RULES = ["bisam", "bsam", "lightsam-adagrad-norm", "lightsam-adagrad", "lightsam-adam"]


# --------------------------------------------------------------------------- reference
def _model_loss(model, data):
    return lambda theta: torch.func.functional_call(model, theta, (data.x, data.labels))["loss"]


def _phi(surrogate, x, alpha=0.1):
    if surrogate == "tanh":
        return torch.tanh(alpha * x)
    gamma = math.log(math.e - 1)
    return 1 - torch.log(1 + torch.exp(gamma - x))


def surrogate_by_loop(logits, labels, surrogate="log", mu=1.0, alpha=0.1):
    """Q = mean over labelled rows of log Σ_j exp(μ·φ(logit_ij − logit_iy)), one row and class at a time."""
    rows, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).tolist()
    total, count = 0.0, 0
    for i, y in enumerate(labels):
        if y == -100:
            continue
        terms = [torch.exp(mu * _phi(surrogate, rows[i, j] - rows[i, y], alpha)) for j in range(rows.shape[1])]
        total, count = total + torch.log(sum(terms)), count + 1
    return total / count


def _model_surrogate(model, data):
    return lambda theta: surrogate_by_loop(torch.func.functional_call(model, theta, (data.x,))["logits"], data.labels)


def _grad(loss, theta):
    """∇loss at theta, differentiable in whatever theta depends on (ρ, for the hypergradient)."""
    tracked = any(v.requires_grad for v in theta.values())
    inputs = theta if tracked else {n: v.detach().requires_grad_() for n, v in theta.items()}
    grads = torch.autograd.grad(loss(inputs), list(inputs.values()), create_graph=tracked)
    return dict(zip(inputs, grads))


def _sq_norm(tree):
    return sum((v.detach() ** 2).sum() for v in tree.values())


def reference_step(variant, model, theta, state, rho, lr=LR, lr_ratio=1.0):
    """One step of `variant` with SGD (or LightSAM's own descent); statistics of g̃ held constant."""
    train_loss = _model_loss(model, TRAIN)
    t = state["t"] = state.get("t", 0) + 1
    g = _grad(_model_surrogate(model, TRAIN) if variant == "bisam" else train_loss, theta)
    state.setdefault("g", []).append(g)
    if variant == "lightsam-adagrad-norm":
        state["u"] = state.get("u", U0) + _sq_norm(g)
        d = {n: g[n] / state["u"].sqrt() for n in g}
    elif variant == "lightsam-adagrad":
        state["u"] = {n: state.get("u", {}).get(n, U0) + g[n] ** 2 for n in g}
        d = {n: g[n] / state["u"][n].sqrt() for n in g}
    elif variant == "lightsam-adam":
        state["u"] = {n: BETA2 * state.get("u", {}).get(n, 0.0) + (1 - BETA2) * g[n] ** 2 for n in g}
        d = {n: g[n] / (state["u"][n] / (1 - BETA2**t) + U0).sqrt() for n in g}
    else:
        d = {n: g[n] / _sq_norm(g).sqrt() for n in g}
    descent = _grad(train_loss, {n: theta[n] + rho * d[n] for n in theta})
    state.setdefault("g_tilde", []).append({n: v.detach() for n, v in descent.items()})
    if variant == "bsam":
        g_min = _grad(train_loss, {n: theta[n] - RHO_MIN * lr_ratio * d[n] for n in theta})
        ratio = (_sq_norm(descent) / _sq_norm(g_min)).sqrt()
        descent = {n: descent[n] + g[n] - ratio * g_min[n] for n in theta}
    if variant == "lightsam-adagrad-norm":
        state["v"] = state.get("v", U0) + _sq_norm(descent)
        step = {n: descent[n] / state["v"].sqrt() for n in theta}
    elif variant == "lightsam-adagrad":
        state["v"] = {n: state.get("v", {}).get(n, U0) + descent[n].detach() ** 2 for n in theta}
        step = {n: descent[n] / state["v"][n].sqrt() for n in theta}
    elif variant == "lightsam-adam":  # AdamW without weight decay
        m = {n: BETA1 * state.get("m", {}).get(n, 0.0) + (1 - BETA1) * descent[n] for n in theta}
        state["v"] = {n: BETA2 * state.get("v", {}).get(n, 0.0) + (1 - BETA2) * descent[n].detach() ** 2 for n in theta}
        state["m"] = {n: v.detach() for n, v in m.items()}
        step = {n: m[n] / (1 - BETA1**t) / ((state["v"][n] / (1 - BETA2**t)).sqrt() + ADAM_EPS) for n in theta}
    else:
        step = descent
    return {n: theta[n] - lr * step[n] for n in theta}


def reference_run(variant, steps, lrs=None):
    model = TinyClassifier(dtype=F64)
    theta, state = {n: p.detach().clone() for n, p in model.named_parameters()}, {}
    for t in range(steps):
        lr = lrs[t] if lrs else LR
        theta = reference_step(variant, model, theta, state, RHO, lr=lr, lr_ratio=lr / LR)
    return theta, state


def reference_hypergradient(variant):
    """dF/dρ through θ_1(ρ) = θ_0 − η·P(∇L(θ_0 + ρ·d_0)), F = ½(L_val(θ_1) − L_train(θ_1))²."""
    model = TinyClassifier(dtype=F64)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    rho = torch.tensor(RHO, dtype=F64, requires_grad=True)
    theta1 = reference_step(variant, model, theta0, {}, rho)
    gap = _model_loss(model, VAL)(theta1) - _model_loss(model, TRAIN)(theta1)
    return float(torch.autograd.grad(0.5 * gap**2, rho)[0])


# --------------------------------------------------------------------------- trainer
def _trainer(make_args, variant, steps, train=True, **overrides):
    args = make_args(
        sam_variant=variant, rho=RHO, learning_rate=LR, max_steps=steps, per_device_train_batch_size=N,
        bsam_rho_min=RHO_MIN, **overrides,
    )
    extra = {"optimizer_cls_and_kwargs": lightsam_optimizer_cls_and_kwargs(args)} if variant.startswith("lightsam") else {}
    rho_dataset = VAL if args.learn_rho else None
    trainer = LETSTrainer(model=TinyClassifier(dtype=F64), args=args, train_dataset=TRAIN, rho_dataset=rho_dataset, **extra)
    if train:
        trainer.train()
    return trainer


def _assert_params(trainer, expected, rtol=1e-10):
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=rtol, atol=1e-12, msg=name)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("variant", ["sam", *NEW_RULES])
def test_steps_match_hand_written_math(make_args, variant, steps):
    expected, _ = reference_run(variant, steps)
    _assert_params(_trainer(make_args, variant, steps), expected)


def test_bsam_min_radius_follows_a_linear_schedule(make_args):
    steps = 3
    trainer = _trainer(make_args, "bsam", steps, lr_scheduler_type="linear")
    expected, _ = reference_run("bsam", steps, lrs=[LR * (1 - t / steps) for t in range(steps)])
    _assert_params(trainer, expected)
    assert trainer.rule.min_side_radius(0.5) == pytest.approx(RHO_MIN / 2)


def test_bsam_combine_keeps_the_grad_scale():
    """fp16 contract: g_min and the kept g_max arrive scaled by s, the stored g unscaled."""
    generator = torch.Generator().manual_seed(0)
    g, g_max, g_min = ([torch.randn(3, 2, generator=generator, dtype=F64), torch.randn(4, generator=generator, dtype=F64)]
                       for _ in range(3))
    scale, rule = 8.0, get_rule("bsam", LETSConfig(output_dir="unused", report_to="none", use_cpu=True))
    rule.direction_(["a.weight", "a.bias"], g, [t.clone() for t in g])
    rule.keep_ascent_gradient_([scale * t for t in g_max])
    descent = [scale * t for t in g_min]
    rule.combine_(descent, grad_scale=scale)
    ratio = math.sqrt(sum(float((t**2).sum()) for t in g_max) / sum(float((t**2).sum()) for t in g_min))
    for out, a, b, c in zip(descent, g_max, g, g_min):
        torch.testing.assert_close(out, scale * (a + b - ratio * c), rtol=1e-12, atol=1e-12)


def test_bsam_under_fp16_loss_scaling_equals_the_unscaled_run(make_args):
    def run(scale):
        trainer = _trainer(make_args, "bsam", 3, train=False)
        if scale:
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)  # CPU stand-in for CUDA amp
        trainer.train()
        return trainer

    scaled, plain = run(2.0**10), run(None)
    assert scaled.accelerator.scaler.get_scale() == 2.0**10
    _assert_params(scaled, {n: p.detach() for n, p in plain.model.named_parameters()}, rtol=1e-9)


def test_bsam_clip_coefficient_is_that_of_the_combined_gradient(make_args):
    trainer = _trainer(make_args, "bsam", 1, learn_rho=True, rho_hessian="identity", rho_batch_size=N, max_grad_norm=0.05)
    theta0 = dict(TinyClassifier(dtype=F64).named_parameters())
    theta1, _ = reference_run("bsam", 1)  # unclipped SGD: θ_1 = θ_0 − η·(combined gradient)
    norm = math.sqrt(sum(float(((theta0[n].detach() - theta1[n]) / LR).pow(2).sum()) for n in theta1))
    assert float(trainer.radius.clip_coef) == pytest.approx(min(1.0, 0.05 / (norm + 1e-6)), rel=1e-10)


# --------------------------------------------------------------------------- BiSAM surrogate
@pytest.mark.parametrize("surrogate, mu, alpha", [("log", 1.0, 0.1), ("log", 2.5, 0.1), ("tanh", 1.0, 0.1), ("tanh", 10.0, 0.3)])
def test_bisam_surrogate_matches_a_loop(surrogate, mu, alpha):
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6, 5, generator=generator, dtype=F64)
    labels = torch.randint(0, 5, (6,), generator=generator)
    rule = get_rule("bisam", LETSConfig(output_dir="unused", report_to="none", use_cpu=True, bisam_surrogate=surrogate,
                                        bisam_mu=mu, bisam_alpha=alpha))
    value = rule.first_pass_loss(logits, labels)
    assert float(value) == pytest.approx(float(surrogate_by_loop(logits, labels, surrogate, mu, alpha)), rel=1e-12)


def test_bisam_phi_is_a_lower_bound_of_the_step_through_zero():
    x = torch.linspace(-20, 20, 401, dtype=F64)
    for surrogate in ("log", "tanh"):
        phi = get_rule("bisam", LETSConfig(output_dir="unused", report_to="none", use_cpu=True,
                                           bisam_surrogate=surrogate)).phi(x)
        assert float(phi[200]) == pytest.approx(0.0, abs=1e-15)  # φ(0) = 0
        assert bool((phi <= (x >= 0).double() + 1e-12).all())


def test_bisam_token_level_skips_ignored_labels_and_keeps_logits():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=generator, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5), generator=generator)
    labels[0, 3:] = -100
    labels[1, 0] = -100
    before = logits.detach().clone()
    rule = get_rule("bisam", LETSConfig(output_dir="unused", report_to="none", use_cpu=True))
    value = rule.first_pass_loss(logits, labels)
    assert float(value.detach()) == pytest.approx(float(surrogate_by_loop(logits.detach(), labels)), rel=1e-12)
    assert torch.equal(logits.detach(), before)  # never modified in place
    (gradient,) = torch.autograd.grad(value, logits)
    assert (gradient[labels == -100] == 0).all() and (gradient[labels != -100] != 0).any()


def test_bisam_all_ignored_gives_zero_not_nan():
    rule = get_rule("bisam", LETSConfig(output_dir="unused", report_to="none", use_cpu=True))
    value = rule.first_pass_loss(torch.randn(3, 4), torch.full((3,), -100))
    assert float(value) == 0.0


@pytest.mark.parametrize("logits, labels", [(torch.randn(4, 1), torch.randn(4)), (torch.randn(4, 1), torch.zeros(4, dtype=torch.long))])
def test_bisam_rejects_regression_with_the_fix(logits, labels):
    rule = get_rule("bisam", LETSConfig(output_dir="unused", report_to="none", use_cpu=True))
    with pytest.raises(ValueError, match="regression.*sam_variant='sam'"):
        rule.first_pass_loss(logits, labels)


# --------------------------------------------------------------------------- LightSAM statistics
def _flat_sq(tree):
    return float(_sq_norm(tree))


@pytest.mark.parametrize("variant", ["lightsam-adagrad-norm", "lightsam-adagrad", "lightsam-adam"])
def test_lightsam_statistics_accumulate_over_two_steps(make_args, variant):
    trainer = _trainer(make_args, variant, 2)
    _, ref = reference_run(variant, 2)
    (g0, g1), (h0, h1) = ref["g"], ref["g_tilde"]
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around ours
    if variant == "lightsam-adagrad-norm":
        assert float(trainer.rule.u) == pytest.approx(U0 + _flat_sq(g0) + _flat_sq(g1), rel=1e-12)
        assert float(optimizer.v) == pytest.approx(U0 + _flat_sq(h0) + _flat_sq(h1), rel=1e-12)
        return
    for name, p in trainer.model.named_parameters():
        if variant == "lightsam-adagrad":
            u, v = U0 + g0[name] ** 2 + g1[name] ** 2, U0 + h0[name] ** 2 + h1[name] ** 2
            stored_v = optimizer.state[p]["sum"]
        else:  # EMAs from zero: (1 − β2)(β2·x_0² + x_1²)
            u = (1 - BETA2) * (BETA2 * g0[name] ** 2 + g1[name] ** 2)
            v = (1 - BETA2) * (BETA2 * h0[name] ** 2 + h1[name] ** 2)
            stored_v = optimizer.state[p]["exp_avg_sq"]
        torch.testing.assert_close(trainer.rule.u[name], u, rtol=1e-10, atol=1e-20)
        torch.testing.assert_close(stored_v, v, rtol=1e-10, atol=1e-20)


@pytest.mark.parametrize("variant", ["lightsam-adagrad-norm", "lightsam-adagrad", "lightsam-adam"])
def test_lightsam_rule_state_dict_round_trip(variant):
    args = LETSConfig(output_dir="unused", report_to="none", use_cpu=True, sam_variant=variant)
    generator = torch.Generator().manual_seed(0)
    names, params = ["a.weight", "a.bias"], [torch.zeros(3, 2, dtype=F64), torch.zeros(4, dtype=F64)]
    gradients = [[torch.randn(p.shape, generator=generator, dtype=F64) for p in params] for _ in range(3)]
    original = get_rule(variant, args)
    for grads in gradients[:2]:
        original.direction_(names, params, [g.clone() for g in grads])
    restored = get_rule(variant, args)
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    d_original, d_restored = [g.clone() for g in gradients[2]], [g.clone() for g in gradients[2]]
    original.direction_(names, params, d_original)
    restored.direction_(names, params, d_restored)
    for a, b in zip(d_original, d_restored):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer_cls", [AdaGradNorm, AdaGrad])
def test_lightsam_optimizer_state_dict_round_trip(optimizer_cls):
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(3, 2, generator=generator, dtype=F64), torch.randn(4, generator=generator, dtype=F64)]
    gradients = [[torch.randn(p.shape, generator=generator, dtype=F64) for p in start] for _ in range(2)]

    def stepped(params, optimizer, grads):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()

    params = [p.clone().requires_grad_() for p in start]
    original = optimizer_cls(params, lr=0.1, weight_decay=0.01)
    stepped(params, original, gradients[0])
    copies = [p.detach().clone().requires_grad_() for p in params]
    restored = optimizer_cls(copies, lr=0.1, weight_decay=0.01)
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    stepped(params, original, gradients[1])
    stepped(copies, restored, gradients[1])
    for a, b in zip(params, copies):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", ["lightsam-adagrad-norm", "lightsam-adagrad", "lightsam-adam"])
def test_lightsam_resumes_exactly_from_a_checkpoint(make_args, tmp_path, variant):
    through = _trainer(make_args, variant, 3)
    _trainer(make_args, variant, 3, save_strategy="steps", save_steps=2, output_dir=str(tmp_path / "ckpt"))
    resumed = _trainer(make_args, variant, 3, train=False, output_dir=str(tmp_path / "ckpt"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "ckpt" / "checkpoint-2"))
    _assert_params(resumed, {n: p.detach() for n, p in through.model.named_parameters()}, rtol=0)


def test_adagrad_norm_jacobian_is_one_over_root_v():
    p = torch.zeros(3, dtype=F64, requires_grad=True)
    optimizer = AdaGradNorm([p], lr=0.1)
    p.grad = torch.tensor([3.0, 0.0, 4.0], dtype=F64)
    optimizer.step()
    tangents = [torch.ones(3, dtype=F64)]
    optimizer.descent_jacobian_(optimizer.param_groups[0], [p], tangents)
    torch.testing.assert_close(tangents[0], torch.full((3,), 1 / math.sqrt(U0 + 25.0), dtype=F64))
    torch.testing.assert_close(p.detach(), -0.1 * torch.tensor([3.0, 0.0, 4.0], dtype=F64) / math.sqrt(U0 + 25.0))


# --------------------------------------------------------------------------- LETS hypergradient
@pytest.mark.parametrize("variant", ["sam", *NEW_RULES])
def test_exact_hypergradient_matches_autograd_through_the_unrolled_step(make_args, variant):
    trainer = _trainer(
        make_args, variant, 2, learn_rho=True, rho_hessian="exact", rho_optimizer="sgd", rho_lr=1e-9,
        rho_batch_size=N, rho_update_interval=1,
    )
    assert float(trainer.radius.last_grad) == pytest.approx(reference_hypergradient(variant), rel=1e-6)


# --------------------------------------------------------------------------- config, presets, defaults
def test_bsam_rejects_the_local_scope():
    with pytest.raises(ValueError, match="bsam.*sam_scope='global'"):
        LETSConfig(output_dir="unused", report_to="none", use_cpu=True, sam_variant="bsam", sam_scope="local")


@pytest.mark.parametrize("field, value", [("bisam_surrogate", "relu"), ("bisam_mu", 0.0), ("bisam_alpha", -1.0), ("bsam_rho_min", -0.1)])
def test_invalid_new_fields_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        LETSConfig(output_dir="unused", report_to="none", use_cpu=True, **{field: value})


@pytest.mark.parametrize("rule", NEW_RULES)
def test_presets_with_and_without_learned_rho(rule):
    config = LETSConfig(output_dir="unused", report_to="none", use_cpu=True)
    assert {rule, f"lets-{rule}"} <= set(METHODS)
    plain, learned = apply_method(config, rule), apply_method(config, f"lets-{rule}")
    assert (plain.sam_variant, plain.learn_rho, learned.sam_variant, learned.learn_rho) == (rule, False, rule, True)


def test_lightsam_optimizers_follow_the_variant():
    model = TinyClassifier()
    expected = {"lightsam-adagrad-norm": AdaGradNorm, "lightsam-adagrad": AdaGrad, "lightsam-adam": torch.optim.AdamW}
    for variant, optimizer_cls in expected.items():
        args = LETSConfig(output_dir="unused", report_to="none", use_cpu=True, sam_variant=variant, weight_decay=0.1)
        optimizer = create_lightsam_optimizer(model, args)
        assert type(optimizer) is optimizer_cls and optimizer.param_groups[0]["lr"] == args.learning_rate
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # weights, then biases
    with pytest.raises(ValueError, match="not a LightSAM variant"):
        lightsam_optimizer_cls_and_kwargs(LETSConfig(output_dir="unused", report_to="none", use_cpu=True))


def test_default_radii():
    args = LETSConfig(output_dir="unused", report_to="none", use_cpu=True)
    radii = {name: get_rule(name, args).default_rho for name in NEW_RULES}
    assert radii == {"bisam": 0.05, "bsam": 0.05, "lightsam-adagrad-norm": 0.05, "lightsam-adagrad": 1e-5,
                     "lightsam-adam": 1e-5}


def test_bisam_logs_the_training_loss_not_the_surrogate(make_args):
    """The surrogate only steers ε: Trainer's logged loss stays the model's cross-entropy at θ."""
    data = ToyDataset(8, dtype=F64)
    trainer = LETSTrainer(
        model=TinyClassifier(dtype=F64), args=make_args(sam_variant="bisam", max_steps=1, learning_rate=0.0),
        train_dataset=data,
    )
    trainer.train()
    expected = float(TinyClassifier(dtype=F64)(data.x, data.labels)["loss"].detach())
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-6)


def test_bisam_surrogate_of_a_causal_lm_scores_the_next_token(make_args):
    """Causal LMs shift inside their loss; the surrogate must pair logit t with label t+1 as well."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)).double().eval()
    ids = torch.randint(0, 11, (2, 6))
    labels = ids.clone()
    labels[0, :2] = -100  # an unscored prompt
    trainer = LETSTrainer(model=model, args=make_args(sam_variant="bisam", max_steps=1), train_dataset=ToyDataset(8))
    trainer.engine.surrogate_pass = True
    loss = trainer.compute_loss(model, {"input_ids": ids, "labels": labels})
    logits = model(input_ids=ids).logits
    expected = trainer.rule.first_pass_loss(logits[:, :-1], labels[:, 1:])
    misaligned = trainer.rule.first_pass_loss(logits, labels)
    (grad,) = torch.autograd.grad(loss, model.lm_head.weight)  # the first pass descends on ∇Q
    (reference,) = torch.autograd.grad(expected, model.lm_head.weight, retain_graph=True)
    (wrong,) = torch.autograd.grad(misaligned, model.lm_head.weight)
    torch.testing.assert_close(grad, reference)
    assert not torch.allclose(grad, wrong)
