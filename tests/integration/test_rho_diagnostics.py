"""The hypergradient diagnostics in Trainer's log, recomputed by hand from the logged updates, and the
validation passes' own random stream (a frozen LETS run draws exactly as SAM on the same data)."""

import numpy as np
import pytest
import torch

from lets_hf import LETSConfig, LETSTrainer
from lets_hf.rho_curve import epoch_starts, plot_rho_curve
from lets_hf.validation import split_for_rho
from tests.heads import build_model, flat_parameters, train_rows, validation_rows

HEAD = "bert-classification"
WINDOW = 3


def _args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, sam_variant="sam", rho=0.05, learn_rho=True,
        rho_lr=0.01, rho_batch_size=4, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant",
        max_grad_norm=0.0, max_steps=6, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        seed=0, use_cpu=True, rho_diagnostics_window=WINDOW,
    )
    return LETSConfig(**{**settings, **overrides})


def test_logged_statistics_are_those_of_the_last_updates(tmp_path, one_thread):
    trainer = LETSTrainer(model=build_model(HEAD), args=_args(tmp_path), train_dataset=train_rows(HEAD),
                          rho_dataset=validation_rows(HEAD))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    updates = [entry for entry in logs if "gen_gap" in entry]  # one update per step from step 1 on
    assert len(updates) == 5 and "rho_grad_snr" not in updates[0]  # a std needs two updates
    for n, entry in enumerate(updates[1:], start=2):
        window = updates[max(0, n - WINDOW) : n]
        for name in ("gen_gap", "rho_inner"):
            values = [e[name] for e in window]
            assert entry[f"{name}_mean"] == pytest.approx(np.mean(values), rel=1e-9)
            assert entry[f"{name}_std"] == pytest.approx(np.std(values, ddof=1), rel=1e-9)
        grads = np.array([e["rho_grad"] for e in window])
        assert entry["rho_grad_snr"] == pytest.approx(abs(grads.mean()) / grads.std(ddof=1), rel=1e-9)
        assert entry["rho_grad_sign_agreement"] == pytest.approx(np.mean(np.sign(grads) == np.sign(grads.mean())))
        assert entry["rho_grad"] == pytest.approx(entry["gen_gap"] * entry["rho_inner"], rel=1e-9)  # squared gap

    path = plot_rho_curve(trainer.state.log_history, tmp_path / "rho_curve.png", trainer.args, task="tiny BERT")
    assert path.stat().st_size > 10_000


def test_the_curves_mark_where_each_epoch_after_the_first_begins():
    """The first epoch's gap estimates zero (L_train and L_val both on unseen data): the plot shows where it ends."""
    history = [{"step": step, "epoch": epoch} for step, epoch in ((5, 0.5), (10, 1.0), (15, 1.25), (20, 2.0), (25, 2.5))]
    assert epoch_starts(history) == [15, 25]
    assert epoch_starts([{"step": 5, "rho": 0.05}]) == []  # a log without epochs (a plain loop's) marks none


def test_val_loss_objective_logs_its_inner_product_as_the_hypergradient(tmp_path, one_thread):
    trainer = LETSTrainer(model=build_model(HEAD), args=_args(tmp_path, rho_objective="val-loss"),
                          train_dataset=train_rows(HEAD), rho_dataset=validation_rows(HEAD))
    trainer.train()
    updates = [entry for entry in trainer.state.log_history if "gen_gap" in entry]
    assert updates and all(entry["rho_grad"] == pytest.approx(entry["rho_inner"], rel=1e-12) for entry in updates)


def _with_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.2
    return model


def test_a_frozen_rho_trains_exactly_as_sam_on_the_same_examples(tmp_path, one_thread):
    """The validation passes draw dropout from their own stream: with ρ frozen (a step of 1e-300), LETS's
    parameters equal SAM's on the 90% of train that LETS keeps, bit for bit, dropout on."""
    rows = train_rows(HEAD) * 2
    lets = LETSTrainer(
        model=_with_dropout(build_model(HEAD)),
        args=_args(tmp_path / "lets", rho_optimizer="sgd", rho_lr=1e-300, rho_batch_size=2),
        train_dataset=rows,
    )
    lets.train()
    assert lets.rho == 0.05
    kept, _ = split_for_rho(rows, 0.1, 42)
    sam = LETSTrainer(model=_with_dropout(build_model(HEAD)), args=_args(tmp_path / "sam", learn_rho=False),
                      train_dataset=kept)
    sam.train()
    assert torch.equal(flat_parameters(lets.model), flat_parameters(sam.model))
    updates = [entry for entry in lets.state.log_history if "gen_gap" in entry]
    assert len(updates) == 5  # the validation passes ran (and drew dropout masks)


def test_a_frozen_rho_with_nothing_held_out_trains_exactly_as_sam_on_the_whole_train_set(tmp_path, one_thread):
    """`rho_val_batch="next"` with `rho_train_batch="last"`: nothing held out, and the re-evaluation of the batch
    just stepped on draws dropout from its own stream: with ρ frozen, LETS's parameters equal SAM's on all of
    train, bit for bit, dropout on."""
    rows = train_rows(HEAD) * 2
    fields = dict(rho_optimizer="sgd", rho_lr=1e-300, rho_train_batch="last", rho_val_batch="next")
    lets = LETSTrainer(model=_with_dropout(build_model(HEAD)), args=_args(tmp_path / "lets", **fields),
                       train_dataset=rows)
    lets.train()
    assert lets.rho == 0.05 and len(lets.train_dataset) == len(rows)
    sam = LETSTrainer(model=_with_dropout(build_model(HEAD)), args=_args(tmp_path / "sam", learn_rho=False),
                      train_dataset=rows)
    sam.train()
    assert torch.equal(flat_parameters(lets.model), flat_parameters(sam.model))
    assert len([entry for entry in lets.state.log_history if "gen_gap" in entry]) == 5  # the passes ran
