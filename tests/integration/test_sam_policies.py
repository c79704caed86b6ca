"""`sam_policy` (lets_hf/policies.py): which steps take SAM, against a hand-written loop on a real 🤗 head (a
2-layer float64 BERT classifier without dropout, 6 SGD steps of 4 examples), in `LETSTrainer` and in the plain
loop, with accumulation; each rule with each policy; how ρ's estimators cross a plain step; the buffers and host
reads a policy adds; the CLI and the loop example. (2 processes and FSDP2: tests/distributed/.)"""

import math

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from torch.func import functional_call

from lets_hf import LETSArguments, cli
from lets_hf.errors import UsageError
from lets_hf.methods import METHODS
from lets_hf.policies import AESAM
from lets_hf.tasks.glue import GlueArguments
from tests.heads import build_model, train, train_rows
from tests.integration import test_rho_estimators as estimators
from tests.integration.test_engine_loop import assert_same_run
from tests.integration.test_step_invariants import _host_reads_per_step, _peak_over_parameters
from tests.loop import plain_loop

HEAD, RHO, LR, BATCH, STEPS = "bert-classification", 0.05, 0.1, 4, 6
#: policy -> its fields in these runs, chosen so that 6 steps mix SAM and plain steps (asserted below): AE-SAM with a
#: fast EMA and a schedule that matters (c_t from −1 to 1 gives a SAM step where 1 to −1 would not), LookSAM with
#: k = 2 (SAM at 0, 2, 4; two reuses of g_v), random with the default seed.
POLICIES = {
    "every": {},
    "ae-sam": dict(sam_policy="ae-sam", ae_sam_decay=0.5, ae_sam_c_start=-1.0, ae_sam_c_end=1.0),
    "looksam": dict(sam_policy="looksam", looksam_k=2, looksam_alpha=0.7),
    "random": dict(sam_policy="random", random_sam_p=0.5, random_sam_seed=42),
}
EXPECTED_SAM_STEPS = {
    "every": [1, 1, 1, 1, 1, 1],
    "ae-sam": [1, 1, 1, 0, 1, 1],
    "looksam": [1, 0, 1, 0, 1, 0],
    "random": [0, 0, 1, 1, 0, 1],
}


def _batch(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def _gradient(model, theta, batch):
    params = {n: p.clone().requires_grad_() for n, p in theta.items()}
    loss = functional_call(model, params, args=(), kwargs=batch).loss
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def _norm(vectors):
    return torch.sqrt(sum((v**2).sum() for v in vectors.values()))


def _dot(a, b):
    return sum((a[n] * b[n]).sum() for n in a)


def reference(policy: str, steps: int = STEPS) -> tuple[torch.Tensor, list[int]]:
    """The policy by hand, per the papers (AE-SAM: Jiang et al. 2023, Alg. 1; LookSAM: Liu et al. 2022, Alg. 1;
    SS-SAM's Bernoulli draw), in dicts of tensors: θ after `steps` SGD steps, and which steps took SAM."""
    fields = {**LETSArguments().__dict__, **POLICIES[policy]}
    model = build_model(HEAD)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = train_rows(HEAD)
    mean = var = 0.0
    g_v = None
    taken = []
    for t in range(steps):
        batch = _batch(rows[BATCH * t : BATCH * (t + 1)])
        g = _gradient(model, theta, batch)
        if policy == "ae-sam":
            squared = float(_norm(g)) ** 2
            delta = fields["ae_sam_decay"]
            mean = delta * mean + (1 - delta) * squared
            var = delta * var + (1 - delta) * (squared - mean) ** 2
            c = fields["ae_sam_c_start"] + (fields["ae_sam_c_end"] - fields["ae_sam_c_start"]) * t / steps
            sam = squared >= mean + c * math.sqrt(var)
        elif policy == "looksam":
            sam = t % fields["looksam_k"] == 0
        elif policy == "random":
            sam = np.random.default_rng([fields["random_sam_seed"], t]).random() < fields["random_sam_p"]
        else:
            sam = True
        if sam:
            norm = _norm(g)
            descent = _gradient(model, {n: theta[n] + RHO * g[n] / (norm + 1e-12) for n in theta}, batch)
            if policy == "looksam":  # the SAM gradient's component orthogonal to g
                g_v = {n: descent[n] - _dot(g, descent) / (norm**2 + 1e-12) * g[n] for n in g}
        elif policy == "looksam":
            scale = fields["looksam_alpha"] * _norm(g) / (_norm(g_v) + 1e-12)
            descent = {n: g[n] + scale * g_v[n] for n in g}
        else:
            descent = g
        theta = {n: theta[n] - LR * descent[n] for n in theta}
        taken.append(int(sam))
    return torch.cat([p.reshape(-1) for p in theta.values()]), taken


def sam_steps(run: dict) -> list[int]:
    """Which steps took SAM, from the Trainer log (one entry per step)."""
    return [int(entry.get("sam_step_share", 1)) for entry in run["log_history"] if "loss" in entry]


@pytest.mark.parametrize("policy", POLICIES)
def test_each_policy_equals_a_hand_written_loop_in_the_trainer_and_the_plain_loop(tmp_path, one_thread, policy):
    expected, taken = reference(policy)
    assert taken == EXPECTED_SAM_STEPS[policy]  # SAM and plain steps both occur: the comparison sees both
    trainer = train(HEAD, "sam", str(tmp_path / "one"), batch=BATCH, max_steps=STEPS, **POLICIES[policy])
    assert sam_steps(trainer) == taken
    torch.testing.assert_close(trainer["theta"], expected, rtol=1e-10, atol=1e-12)
    accumulated = train(HEAD, "sam", str(tmp_path / "acc"), batch=BATCH // 2, accumulation=2, max_steps=STEPS,
                        **POLICIES[policy])
    torch.testing.assert_close(accumulated["theta"], expected, rtol=1e-10, atol=1e-12)
    for loop in (plain_loop(HEAD, "sam", BATCH, **POLICIES[policy]),
                 plain_loop(HEAD, "sam", BATCH // 2, accumulation=2, **POLICIES[policy])):
        assert loop["engine"].global_step == STEPS
        torch.testing.assert_close(loop["theta"], expected, rtol=1e-10, atol=1e-12)


def test_every_is_the_default_and_logs_no_share(tmp_path, one_thread):
    run = train(HEAD, "sam", str(tmp_path), batch=BATCH, max_steps=2)
    assert LETSArguments().sam_policy == "every"
    assert not any("sam_step_share" in entry for entry in run["log_history"])


@pytest.mark.parametrize("sam_variant", ["asam", "bsam"])
@pytest.mark.parametrize("policy", ["ae-sam", "looksam", "random"])
def test_each_rule_takes_each_policy_the_same_in_the_trainer_and_the_plain_loop(tmp_path, one_thread, sam_variant,
                                                                                 policy):
    fields = {**POLICIES[policy], "sam_variant": sam_variant}
    trainer = train(HEAD, "sam", str(tmp_path), batch=BATCH // 2, accumulation=2, max_steps=STEPS, **fields)
    loop = plain_loop(HEAD, "sam", BATCH // 2, accumulation=2, **fields)
    assert 0 < sum(sam_steps(trainer)) < STEPS
    assert_same_run(loop, trainer, learned=False)


@pytest.mark.parametrize("sam_variant", ["lightsam-adagrad-norm", "lightsam-adam"])
def test_a_rules_own_statistics_advance_on_sam_steps_only(one_thread, sam_variant):
    """LightSAM's accumulator is a statistic of the perturbation's gradients: LookSAM's plain step 3 leaves it, its
    SAM step 4 moves it."""
    u = [plain_loop(HEAD, "sam", BATCH, steps=steps, sam_variant=sam_variant, **POLICIES["looksam"])["engine"].rule.u
         for steps in (3, 4, 5)]
    first = [torch.stack([t.reshape(-1)[0] for t in (v.values() if isinstance(v, dict) else [v])]) for v in u]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])


def test_bisam_with_random_takes_plain_steps_on_the_loss(tmp_path, one_thread):
    """BiSAM's first pass is on its surrogate; a plain step must descend on the loss: the first two steps (both
    plain with the seed) equal SAM's under the same draws, and the SAM step after them differs."""
    fields = POLICIES["random"]
    bisam = train(HEAD, "sam", str(tmp_path / "bisam"), batch=BATCH, max_steps=2, sam_variant="bisam", **fields)
    sam = train(HEAD, "sam", str(tmp_path / "sam"), batch=BATCH, max_steps=2, **fields)
    assert sam_steps(bisam) == [0, 0]
    torch.testing.assert_close(bisam["theta"], sam["theta"], rtol=0, atol=0)
    third = [train(HEAD, "sam", str(tmp_path / f"{v}3"), batch=BATCH, max_steps=3, sam_variant=v, **fields)["theta"]
             for v in ("bisam", "sam")]
    assert not torch.allclose(third[0], third[1])


def _random_seed_with(pattern: list[bool]) -> int:
    """The first `random_sam_seed` whose draws (p = 0.5) take SAM exactly on `pattern`'s steps."""
    return next(seed for seed in range(1000)
                if [np.random.default_rng([seed, t]).random() < 0.5 for t in range(len(pattern))] == pattern)


def test_the_trace_crosses_a_plain_step_as_autograd_through_the_unrolled_steps(tmp_path, one_thread):
    """Steps 0 and 2 take SAM, step 1 does not, step 3 (SAM) updates ρ: h ← μ·(I − η·H_1)·h through the plain step
    (exact Hessian at θ_1, no perturbation), against autograd through θ_{t+1} = θ'_t − η·∇L(B_t; θ'_t) there."""
    seed = _random_seed_with([True, False, True, True])
    trainer = estimators.trainer_after_one_update(
        tmp_path, rho_estimator="trace", rho_trace_decay=0.5, sam_policy="random", random_sam_seed=seed
    )
    assert [int(e["sam_step_share"]) for e in trainer.state.log_history if "loss" in e] == [1, 0, 1, 1]
    expected = estimators.reference_hypergradient("sgd", 0.5, "squared-gap", plain_steps={1})
    assert float(trainer.radius.last_grad) == pytest.approx(expected, rel=1e-6)
    assert estimators.reference_hypergradient("sgd", 0.5, "squared-gap") != pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("pattern,updates", [([True, True, True, True], 3), ([True, True, False, True], 1),
                                             ([True, True, True, False], 2)])
def test_one_step_updates_rho_only_on_a_sam_step_after_a_sam_step(tmp_path, one_thread, pattern, updates):
    """ρ due every step: the update at step t reads ∂θ_t/∂ρ through step t − 1, zero where that step was plain (the
    update is then skipped, not run on the stale u of an earlier step), and runs only if step t takes SAM."""
    trainer = estimators.trainer_after_one_update(
        tmp_path, rho_estimator="one-step", rho_update_interval=1, sam_policy="random",
        random_sam_seed=_random_seed_with(pattern),
    )
    assert [int(e["sam_step_share"]) for e in trainer.state.log_history if "loss" in e] == [int(p) for p in pattern]
    assert int(trainer.radius.monitor.count) == updates
    if pattern[2] and pattern[3]:  # the last update is step 3's, through step 2 (ρ barely moves: rho_lr = 1e-12)
        assert float(trainer.radius.last_grad) == pytest.approx(
            estimators.reference_hypergradient("sgd", 0.0, "squared-gap"), rel=1e-6
        )


def test_the_antithetic_windows_count_plain_steps_too(tmp_path, one_thread):
    """Its validation loss is measured at every window boundary, SAM step or not: as many ρ updates as SAM's."""
    fields = dict(rho_estimator="antithetic", rho_update_space="log", rho_antithetic_batches=1, rho_update_interval=1,
                  max_steps=5)
    every = estimators.trainer_after_one_update(tmp_path / "every", **fields)
    looksam = estimators.trainer_after_one_update(tmp_path / "looksam", sam_policy="looksam", looksam_k=2, **fields)
    assert int(every.radius.monitor.count) == int(looksam.radius.monitor.count) == 2  # pairs (0, 1) and (2, 3)
    assert looksam.rho != every.rho  # the windows ran other steps


@pytest.mark.parametrize("policy", ["ae-sam", "looksam", "random"])
def test_only_looksam_keeps_a_parameter_sized_buffer(one_thread, policy):
    run = plain_loop(HEAD, "sam", BATCH, **POLICIES[policy])
    tensors = _tensors(run["engine"].policy.state_dict())
    parameters = sum(p.numel() for p in run["engine"].model.parameters())
    assert sum(t.numel() for t in tensors) == (parameters if policy == "looksam" else 2 if policy == "ae-sam" else 0)


def _tensors(tree):
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in _tensors(value)]
    return [tree] if torch.is_tensor(tree) else []


def test_peak_memory_of_looksam_is_sams_plus_one_parameter_buffer_and_of_the_others_sams(make_args):
    sam = _peak_over_parameters(make_args, sam_variant="sam")
    for policy, extra in (("looksam", 1.0), ("ae-sam", 0.0), ("random", 0.0)):
        peak = _peak_over_parameters(make_args, sam_variant="sam", **{**POLICIES[policy], "random_sam_seed": 0})
        assert peak - sam == pytest.approx(extra, abs=0.05), policy


@pytest.mark.parametrize("policy,extra", [("looksam", 0), ("random", 0), ("ae-sam", 1)])
def test_only_ae_sam_reads_the_device_for_its_decision(make_args, policy, extra):
    """Beyond SAM's one read per step (the non-finite guard), AE-SAM's comparison is the only host read a policy adds."""
    sam = _host_reads_per_step(make_args, sam_variant="sam")
    assert _host_reads_per_step(make_args, sam_variant="sam", **POLICIES[policy]) == [r + extra for r in sam]


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(sam_variant="none", sam_policy="random"), "sam_variant='none'"),
        (dict(sam_policy="ae-sam", sam_scope="local"), "needs sam_scope='global'"),
        (dict(sam_policy="looksam", sam_scope="local"), "needs sam_scope='global'"),
        (dict(sam_policy="ae-sam", sam_variant="bisam"), "sam_policy='random'"),
        (dict(sam_policy="looksam", learn_rho=True), "rho_estimator='trace'"),
        (dict(sam_policy="sometimes"), "Unknown sam_policy"),
        (dict(sam_policy="random", random_sam_p=1.5), "random_sam_p"),
        (dict(sam_policy="ae-sam", ae_sam_decay=1.0), "ae_sam_decay"),
        (dict(sam_policy="looksam", looksam_k=0), "looksam_k"),
    ],
)
def test_combinations_that_cannot_run_exactly_are_refused_with_what_to_change(fields, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        LETSArguments(**fields)


def test_random_in_the_local_scope_is_sam_or_plain_per_step(tmp_path, one_thread):
    """m-sharpness with the random policy: plain steps descend on the micro-batches' mean gradient, SAM steps
    perturb each micro-batch with its own; the first two steps (plain) equal the global scope's."""
    fields = dict(POLICIES["random"], sam_scope="local")
    local = train(HEAD, "sam", str(tmp_path / "local"), batch=BATCH // 2, accumulation=2, max_steps=2, **fields)
    reference_two, _ = reference("random", steps=2)
    torch.testing.assert_close(local["theta"], reference_two, rtol=1e-10, atol=1e-12)
    three = train(HEAD, "sam", str(tmp_path / "three"), batch=BATCH // 2, accumulation=2, max_steps=3, **fields)
    torch.testing.assert_close(plain_loop(HEAD, "sam", BATCH // 2, accumulation=2, steps=3, **fields)["theta"],
                               three["theta"], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(three["theta"], reference("random", steps=3)[0])  # the local SAM step differs


@pytest.mark.parametrize("policy", ["ae-sam", "looksam"])
def test_a_loss_scaled_loop_decides_and_reuses_as_an_unscaled_one(one_thread, policy):
    """fp16's loss scaling (a CPU `GradScaler` standing in for CUDA amp): AE-SAM reads the unscaled norm, LookSAM adds
    its component at the scale of the `.grad` it changes, which the grad scaler then unscales."""
    from accelerate import Accelerator

    try:
        scaled_accelerator = Accelerator(cpu=True)
        scaled_accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        scaled = plain_loop(HEAD, "sam", BATCH, accelerator=scaled_accelerator, model=build_model(HEAD).float(),
                            **POLICIES[policy])
        plain = plain_loop(HEAD, "sam", BATCH, accelerator=Accelerator(cpu=True), model=build_model(HEAD).float(),
                           **POLICIES[policy])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert scaled["engine"].grad_scaler is not None and scaled["engine"].global_step == STEPS
    torch.testing.assert_close(scaled["theta"], plain["theta"], rtol=1e-5, atol=1e-6)
    expected, _ = reference(policy)
    torch.testing.assert_close(plain["theta"], expected.float(), rtol=1e-4, atol=1e-5)


def test_ae_sam_in_a_loop_needs_the_runs_length():
    model = build_model(HEAD)
    with pytest.raises(UsageError, match="pass max_steps="):
        from lets_hf import LETSEngine

        LETSEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), LETSArguments(sam_policy="ae-sam"),
                   loss_fn=lambda m, b: m(**b).loss)


# ---------------------------------------------------------------------- resume
@pytest.mark.parametrize("policy,saved_at", [("ae-sam", 3), ("looksam", 3), ("random", 2)])
def test_a_resumed_plain_loop_equals_the_uninterrupted_one(one_thread, policy, saved_at):
    """Saved after a SAM step whose successor reuses (LookSAM) or reads the running statistics (AE-SAM)."""
    whole = plain_loop(HEAD, "sam", BATCH, **POLICIES[policy])
    first = plain_loop(HEAD, "sam", BATCH, steps=saved_at, **POLICIES[policy])
    resumed = plain_loop(HEAD, "sam", BATCH, resume=first["state"], **POLICIES[policy])
    assert resumed["engine"].global_step == STEPS
    torch.testing.assert_close(resumed["theta"], whole["theta"], rtol=0, atol=0)


def test_a_run_resumed_under_another_policy_starts_that_policy_afresh(one_thread):
    """LookSAM's state means nothing to AE-SAM (and `every` has none): the resumed run's policy starts as at step 0."""
    looksam_state = plain_loop(HEAD, "sam", BATCH, steps=3, **POLICIES["looksam"])["state"]
    every_state = plain_loop(HEAD, "sam", BATCH, steps=3)["state"]
    ae_sam_state = plain_loop(HEAD, "sam", BATCH, steps=3, **POLICIES["ae-sam"])["state"]
    assert float(ae_sam_state["engine"]["policy"]["mean"]) > 0
    for state in (looksam_state, every_state):
        resumed = plain_loop(HEAD, "sam", BATCH, steps=3, resume=state, **POLICIES["ae-sam"])  # loads, takes no step
        assert float(resumed["engine"].policy.mean) == float(resumed["engine"].policy.var) == 0.0
    restored = plain_loop(HEAD, "sam", BATCH, steps=3, resume=ae_sam_state, **POLICIES["ae-sam"])
    assert float(restored["engine"].policy.mean) == float(ae_sam_state["engine"]["policy"]["mean"])


@pytest.mark.parametrize("policy", ["ae-sam", "looksam"])
def test_a_resumed_trainer_equals_the_uninterrupted_one(tmp_path, one_thread, policy):
    """Through a checkpoint on disk: LookSAM's g_v and AE-SAM's μ and σ² come back with the engine's state."""
    settings = dict(batch=BATCH, max_steps=STEPS, save_strategy="steps", save_steps=3, **POLICIES[policy])
    whole = train(HEAD, "sam", str(tmp_path / "whole"), **settings)
    resumed = train(HEAD, "sam", str(tmp_path / "resumed"), resume=str(tmp_path / "whole" / "checkpoint-3"), **settings)
    assert sam_steps(resumed)[-3:] == sam_steps(whole)[-3:] == EXPECTED_SAM_STEPS[policy][-3:]
    torch.testing.assert_close(resumed["theta"], whole["theta"], rtol=0, atol=0)


# ---------------------------------------------------------------------- the command line and the loop example
@pytest.mark.parametrize("method", METHODS)
def test_every_method_parses_with_a_policy(method):
    argv = ["--task", "sst2", "--model_name_or_path", "x", "--output_dir", "/tmp/unused", "--method", method,
            "--sam_policy", "random"]
    if method == "adamw":
        with pytest.raises(UsageError, match="sam_variant='none'"):
            cli.parse_command_line(GlueArguments, argv)
        return
    _, config = cli.parse_command_line(GlueArguments, argv)
    assert config.sam_policy == "random" and config.sam_variant == method.removeprefix("lets-")


def _count_decisions(monkeypatch) -> list:
    calls = []
    original = AESAM.decide

    def counting(self, step, grad_norm, max_steps):
        calls.append((step, max_steps))
        return original(self, step, grad_norm, max_steps)

    monkeypatch.setattr(AESAM, "decide", counting)
    return calls


def test_the_cli_runs_lets_asam_with_ae_sam(tiny_model, tmp_path, one_thread, monkeypatch):
    import json

    from tests.integration.test_cli_errors import glue

    calls = _count_decisions(monkeypatch)
    cli.main(glue(tiny_model, tmp_path, "--max_seq_length", "32", "--max_train_samples", "64", "--max_eval_samples",
                  "16", "--max_steps", "3", "--logging_steps", "1", "--per_device_train_batch_size", "4",
                  "--method", "lets-asam", "--sam_policy", "ae-sam"))
    assert calls == [(0, 3), (1, 3), (2, 3)]  # the engine decided with AE-SAM, knowing the run's length
    args = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)
    assert (args.sam_variant, args.learn_rho, args.sam_policy) == ("asam", True, "ae-sam")
    logs = [e for e in json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert all("sam_step_share" in e for e in logs)


def test_the_loop_example_runs_lets_asam_with_ae_sam(tiny_model, tmp_path, monkeypatch, one_thread):
    import json

    from tests.integration.test_accelerate_loop import accelerate_loop, flags

    calls = _count_decisions(monkeypatch)
    try:
        accelerate_loop.main(flags(tiny_model, tmp_path / "out", method="lets-asam", sam_policy="ae-sam",
                                   max_train_steps=3))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert calls == [(0, 3), (1, 3), (2, 3)]  # the loop example hands the engine its run's length
    logs = [e for e in json.loads((tmp_path / "out" / "log_history.json").read_text()) if "loss" in e]
    assert [e["step"] for e in logs] == [1, 2, 3] and all(e["sam_step_share"] in (0.0, 1.0) for e in logs)
