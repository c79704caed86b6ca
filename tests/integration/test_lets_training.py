"""LETS training behaviour: bounds, update interval, resume, validation split, logs, fp16, errors."""

import datasets
import pytest
import torch

from lets_hf import LETSConfig, LETSTrainer, available_rules
from tests.heads import train
from tests.toy import TinyClassifier, ToyDataset

F64 = torch.float64


def _lets_args(make_args, **overrides):
    defaults = dict(sam_variant="sam", rho=0.1, learn_rho=True, rho_lr=0.01, per_device_train_batch_size=4, rho_batch_size=4)
    return make_args(**{**defaults, **overrides})


def test_rho_stays_within_bounds(make_args):
    args = _lets_args(make_args, rho_lr=0.5, rho_optimizer="sgd", rho_min=0.05, rho_max=0.12, max_steps=8)
    trainer = LETSTrainer(model=TinyClassifier(), args=args, train_dataset=ToyDataset(64))
    trainer.train()
    logged = [h["rho"] for h in trainer.state.log_history if "rho" in h]
    assert len(logged) == 8 and all(0.05 <= r <= 0.12 for r in logged)
    assert trainer.rho in (0.05, 0.12) or len(set(logged)) > 1


@pytest.mark.parametrize("interval,steps,expected", [(1, 6, 5), (3, 7, 2), (10, 9, 0)])
def test_one_validation_pass_every_k_steps(make_args, interval, steps, expected):
    val = ToyDataset(16, seed=1)
    val_rows = {tuple(row.tolist()) for row in val.x}
    calls = {"val": 0, "train": 0}

    class Counting(TinyClassifier):
        def forward(self, x, labels=None):
            calls["val" if tuple(x[0].tolist()) in val_rows else "train"] += 1
            return super().forward(x, labels)

    args = _lets_args(make_args, rho_update_interval=interval, max_steps=steps)
    LETSTrainer(model=Counting(), args=args, train_dataset=ToyDataset(64), rho_dataset=val).train()
    assert calls == {"val": expected, "train": 2 * steps}  # u exists from step 1 on: updates at t = k, 2k, ...


@pytest.mark.parametrize(
    "rho_optimizer,estimator",
    [("adam", {}), ("sgd", {}), ("adam", dict(rho_estimator="trace", rho_update_space="log", rho_objective="val-loss"))],
)
def test_resume_restores_rho_and_its_optimizer(make_args, tmp_path, rho_optimizer, estimator):
    """2N steps in one go equal N steps, save, resume in a new trainer, N more (the trace h and the
    diagnostics window included)."""
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, rho_optimizer=rho_optimizer, rho_lr=0.02,
                  logging_steps=1, **estimator)

    def run(output_dir, resume=None):
        args = _lets_args(make_args, output_dir=str(output_dir), **common)
        trainer = LETSTrainer(model=TinyClassifier(dtype=F64), args=args, train_dataset=ToyDataset(40, dtype=F64))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-3"))
    assert straight.rho != 0.1
    assert resumed.rho == pytest.approx(straight.rho, rel=1e-12)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    for h, k in zip(straight.radius.u, resumed.radius.u):
        torch.testing.assert_close(h, k, rtol=1e-12, atol=1e-14)
    assert resumed.state.log_history[-2]["rho_grad_snr"] == pytest.approx(straight.state.log_history[-2]["rho_grad_snr"])
    assert (tmp_path / "straight" / "checkpoint-3" / "lets_state.pt").is_file()


def test_sam_resume_is_exact(make_args, tmp_path):
    def run(output_dir, resume=None):
        args = make_args(output_dir=str(output_dir), sam_variant="asam", optim="adamw_torch", learning_rate=0.01,
                         per_device_train_batch_size=4, max_steps=4, save_strategy="steps", save_steps=2)
        trainer = LETSTrainer(model=TinyClassifier(dtype=F64), args=args, train_dataset=ToyDataset(24, dtype=F64))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "steps,logging_steps,saved_at,rho_update_interval",
    [
        (4, 4, 2, 1),  # the log at step 4 averages steps 1-4: two of them before the checkpoint
        (8, 2, 7, 4),  # ρ updated at step 5 only: the log at step 8 repeats the gap logged at step 6
    ],
)
def test_the_first_log_after_a_resume_is_the_uninterrupted_runs(tmp_path, one_thread, steps, logging_steps, saved_at,
                                                                 rho_update_interval):
    """The engine's metrics not yet logged (the gap, the hypergradient, the first-pass gradient norm), and the last
    logged ones, are in the checkpoint: the resumed run's first log equals the uninterrupted run's, on a real BERT
    head. Trainer's own `loss` is left out: Trainer does not checkpoint its sum since the last log."""
    settings = dict(max_steps=steps, logging_steps=logging_steps, save_strategy="steps", save_steps=saved_at,
                    rho_update_interval=rho_update_interval)
    whole = train("bert-classification", "lets-sam", str(tmp_path / "whole"), batch=8, **settings)
    resumed = train("bert-classification", "lets-sam", str(tmp_path / "resumed"), batch=8,
                    resume=str(tmp_path / "whole" / f"checkpoint-{saved_at}"), **settings)

    first_log_after_resume = (saved_at // logging_steps + 1) * logging_steps

    def log_at(run):
        (entry,) = [e for e in run["log_history"] if e["step"] == first_log_after_resume and "loss" in e]
        return {key: value for key, value in entry.items() if key != "loss"}

    assert "gen_gap" in log_at(whole) and "first_grad_norm" in log_at(whole)
    assert log_at(resumed) == pytest.approx(log_at(whole), rel=1e-12)


def test_validation_split_never_overlaps_training(make_args):
    data = ToyDataset(50)
    table = datasets.Dataset.from_dict({"x": data.x.tolist(), "labels": data.labels.tolist(), "idx": list(range(50))})
    trainer = LETSTrainer(model=TinyClassifier(), args=_lets_args(make_args, rho_val_fraction=0.2), train_dataset=table)
    train_ids, rho_ids = set(trainer.train_dataset["idx"]), set(trainer.rho_dataset["idx"])
    assert len(rho_ids) == 10 and not train_ids & rho_ids and train_ids | rho_ids == set(range(50))
    again = LETSTrainer(model=TinyClassifier(), args=_lets_args(make_args, rho_val_fraction=0.2), train_dataset=table)
    assert set(again.rho_dataset["idx"]) == rho_ids  # fixed seed


def test_the_antithetic_estimator_holds_out_only_its_fixed_batches(make_args):
    """2 batches of 4: 8 of 50 examples held out (not rho_val_fraction's 10), never trained on."""
    data = ToyDataset(50)
    table = datasets.Dataset.from_dict({"x": data.x.tolist(), "labels": data.labels.tolist(), "idx": list(range(50))})
    args = _lets_args(make_args, rho_val_fraction=0.2, rho_estimator="antithetic", rho_update_space="log",
                      rho_antithetic_batches=2)
    trainer = LETSTrainer(model=TinyClassifier(), args=args, train_dataset=table)
    train_ids, rho_ids = set(trainer.train_dataset["idx"]), set(trainer.rho_dataset["idx"])
    assert len(rho_ids) == 8 and not train_ids & rho_ids and train_ids | rho_ids == set(range(50))


def test_logs_carry_rho_gap_and_hypergradient_every_logging_step(make_args):
    args = _lets_args(make_args, max_steps=6, logging_steps=1, rho_update_interval=2)
    trainer = LETSTrainer(model=TinyClassifier(), args=args, train_dataset=ToyDataset(64))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6
    for entry in logs[2:]:  # the first update is at step 2
        assert {"rho", "gen_gap", "rho_grad", "first_grad_norm"} <= entry.keys()


class _Poisoned(TinyClassifier):
    """Returns an infinite loss on one chosen forward call: a stand-in for fp16 overflow."""

    def __init__(self, poison_call, **kwargs):
        super().__init__(**kwargs)
        self.poison_call, self.calls = poison_call, 0

    def forward(self, x, labels=None):
        self.calls += 1
        out = super().forward(x, labels)
        if self.calls == self.poison_call:
            out["loss"] = out["loss"] * float("inf")
        return out


def _fp16_trainer(make_args, poison_call=None, variant="sam"):
    args = _lets_args(make_args, sam_variant=variant, max_steps=4, optim="adamw_torch", learning_rate=0.01)
    trainer = LETSTrainer(model=_Poisoned(poison_call), args=args, train_dataset=ToyDataset(64), rho_dataset=ToyDataset(16, seed=1))
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # CPU stand-in for CUDA amp
    return trainer


@pytest.mark.parametrize("variant", available_rules())
def test_fp16_scaler_unscales_before_the_rule_and_the_rho_update(make_args, variant):
    """Scaled and unscaled runs agree: every scale-dependent quantity was unscaled first."""
    scaled = _fp16_trainer(make_args, variant=variant)
    scaled.train()
    plain_args = _lets_args(make_args, sam_variant=variant, max_steps=4, optim="adamw_torch", learning_rate=0.01)
    plain = LETSTrainer(model=_Poisoned(None), args=plain_args, train_dataset=ToyDataset(64), rho_dataset=ToyDataset(16, seed=1))
    plain.train()
    assert scaled.accelerator.scaler.get_scale() == 2.0**10
    assert scaled.engine.grad_scaler is scaled.accelerator.scaler and plain.engine.grad_scaler is None
    assert scaled.rho == pytest.approx(plain.rho, rel=1e-6)
    for p, q in zip(scaled.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("poison_call,where", [(6, "first pass"), (8, "second pass")])
def test_fp16_overflow_skips_the_step_for_theta_and_rho(make_args, poison_call, where):
    """Forward calls: step 0 = 1, 2; step 1 = 3, 4 (validation), 5; step 2 = 6, 7 (validation), 8."""
    reference = _fp16_trainer(make_args)
    reference.args.max_steps = 2
    reference.train()
    poisoned = _fp16_trainer(make_args, poison_call=poison_call)
    poisoned.args.max_steps = 3
    poisoned.train()
    assert poisoned.accelerator.scaler.get_scale() == 2.0**9, where  # the scaler saw the inf and backed off
    for p, q in zip(poisoned.model.parameters(), reference.model.parameters()):
        assert torch.equal(p, q), where  # the overflowing step changed no parameter
    assert poisoned.rho == reference.rho, where  # ... and not ρ
    assert not poisoned.radius.u_valid


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(sam_variant="adasam"), "Unknown sam_variant 'adasam'"),
        (dict(rho=0.0), "rho must be > 0"),
        (dict(rho=-0.1), "rho must be > 0"),
        (dict(sam_variant="none", learn_rho=True), "learn_rho=True needs a perturbation"),
        (dict(sam_scope="shard"), "Unknown sam_scope"),
        (dict(rho_hessian="full"), "Unknown rho_hessian"),
        (dict(rho_min=0.5, rho_max=0.1), "rho_min < rho_max"),
        (dict(rho_update_interval=0), "rho_update_interval must be >= 1"),
        (dict(rho_estimator="hypergrad"), "Unknown rho_estimator 'hypergrad'"),
        (dict(rho_objective="gap"), "Unknown rho_objective"),
        (dict(rho_update_space="exp"), "Unknown rho_update_space"),
        (dict(rho_trace_decay=1.0), r"rho_trace_decay must be in \[0, 1\)"),
        (dict(rho_diagnostics_window=1), "rho_diagnostics_window must be >= 2"),
        (dict(fsdp=True, fsdp_config={"version": 1}), "does not support FSDP1"),
        (dict(fsdp=True, sam_scope="local"), "sam_scope='local' is not supported under FSDP2"),
        (dict(fsdp=True, learn_rho=True, rho_hessian="exact"), "rho_hessian='exact' is not supported under FSDP2"),
    ],
)
def test_bad_config_names_the_fix(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        LETSConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **overrides)


def test_fsdp2_is_accepted_for_sam_asam_and_learned_rho(tmp_path):
    for overrides in (dict(sam_variant="sam"), dict(sam_variant="asam", learn_rho=True), dict(learn_rho=True)):
        args = LETSConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, fsdp=True, **overrides)
        assert args.fsdp_plugin_args["fsdp_version"] == 2


def test_deepspeed_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not support DeepSpeed"):
        LETSConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, deepspeed={"train_batch_size": 8})


def test_learned_rho_needs_validation_data(make_args):
    with pytest.raises(ValueError, match="rho_dataset is empty"):
        LETSTrainer(model=TinyClassifier(), args=_lets_args(make_args), train_dataset=ToyDataset(32), rho_dataset=ToyDataset(0))
    with pytest.raises(ValueError, match="too few to hold out"):
        LETSTrainer(model=TinyClassifier(), args=_lets_args(make_args), train_dataset=ToyDataset(1))
    with pytest.raises(ValueError, match="fewer than one global validation batch"):
        LETSTrainer(model=TinyClassifier(), args=_lets_args(make_args, rho_batch_size=8), train_dataset=ToyDataset(32), rho_dataset=ToyDataset(4))


def test_optimizer_without_known_jacobian_is_refused(make_args):
    trainer = LETSTrainer(model=TinyClassifier(), args=_lets_args(make_args, optim="adagrad"), train_dataset=ToyDataset(64))
    with pytest.raises(ValueError, match="does not know the Jacobian of Adagrad"):
        trainer.train()
