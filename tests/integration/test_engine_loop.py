"""`LETSEngine` in a plain loop (no Trainer) equals `LETSTrainer`: same real 🤗 head, data order and settings,
θ and ρ equal to float reduction order, with and without accumulation, with and without an Accelerator."""

import copy

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import default_data_collator

from lets_hf import LETSArguments
from lets_hf.engine import LETSEngine
from lets_hf.errors import UsageError
from lets_hf.validation import RhoBatches
from tests.heads import CASES, GLOBAL_BATCH, RHO_LR, build_model, flat_parameters, train, train_rows, validation_rows

HEAD = "bert-classification"


def plain_loop(case: str, accumulation: int, accelerator: Accelerator | None = None, steps: int | None = None,
               resume: dict | None = None, **fields) -> dict:
    """The README's loop without Trainer: SGD, constant lr, sequential batches; `steps` stops
    early, `resume` (model, optimizer and engine state) skips the batches already trained on."""
    sam_variant, learn_rho = CASES[case]
    model = build_model(HEAD)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(train_rows(HEAD), batch_size=GLOBAL_BATCH // accumulation, collate_fn=default_data_collator)
    if accelerator is not None:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    args = LETSArguments(sam_variant=sam_variant, rho=0.05, learn_rho=learn_rho, rho_optimizer="sgd",
                         rho_lr=RHO_LR[HEAD], rho_batch_size=GLOBAL_BATCH, **fields)
    rho_batches = RhoBatches(validation_rows(HEAD), default_data_collator, GLOBAL_BATCH, 1, 0, args.rho_seed)
    engine = LETSEngine(model, optimizer, args, loss_fn=lambda model, batch: model(**batch).loss,
                        accelerator=accelerator, rho_batches=rho_batches if learn_rho else None,
                        gradient_accumulation_steps=accumulation)
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        engine.load_state_dict(resume["engine"])
    for i, batch in enumerate(loader):
        if i < engine.global_step * accumulation:
            continue
        if steps is not None and engine.global_step == steps:
            break
        if accelerator is None:
            engine.backward(batch)
            engine.step()
        else:
            with accelerator.accumulate(model):
                engine.backward(batch)
                engine.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "engine": engine.state_dict()}
    return {"theta": flat_parameters(model), "rho": engine.rho, "engine": engine, "state": copy.deepcopy(state)}


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("case", ["sam", "lets-sam"])
def test_plain_loop_equals_lets_trainer(tmp_path, case, accumulation):
    trainer = train(HEAD, case, str(tmp_path), batch=GLOBAL_BATCH // accumulation, accumulation=accumulation)
    loop = plain_loop(case, accumulation)
    torch.testing.assert_close(loop["theta"], trainer["theta"], rtol=1e-10, atol=1e-12)
    assert loop["rho"] == pytest.approx(trainer["rho"], rel=1e-9)
    if case == "lets-sam":
        assert loop["rho"] != 0.05  # ρ moved: the comparison covers the hypergradient


def test_plain_loop_under_an_accelerator_with_accumulation_equals_lets_trainer(tmp_path):
    trainer = train(HEAD, "lets-sam", str(tmp_path), batch=GLOBAL_BATCH // 2, accumulation=2)
    loop = plain_loop("lets-sam", 2, accelerator=Accelerator(cpu=True, gradient_accumulation_steps=2))
    torch.testing.assert_close(loop["theta"], trainer["theta"], rtol=1e-10, atol=1e-12)
    assert loop["rho"] == pytest.approx(trainer["rho"], rel=1e-9)


@pytest.mark.parametrize("estimator", [{}, {"rho_estimator": "trace"}])
def test_engine_state_round_trips_so_a_resumed_loop_is_exact(estimator):
    whole = plain_loop("lets-sam", 1, **estimator)
    first_two = plain_loop("lets-sam", 1, steps=2, **estimator)
    resumed = plain_loop("lets-sam", 1, resume=first_two["state"], **estimator)
    assert resumed["engine"].global_step == whole["engine"].global_step == 3
    assert resumed["rho"] == whole["rho"] != first_two["rho"]
    torch.testing.assert_close(resumed["theta"], whole["theta"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["engine"].radius.u, whole["engine"].radius.u, rtol=0, atol=0)


def test_a_learned_rho_without_validation_batches_is_refused():
    args = LETSArguments(sam_variant="sam", learn_rho=True)
    model = build_model(HEAD)
    with pytest.raises(UsageError, match="needs validation data"):
        LETSEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), args, loss_fn=lambda m, b: m(**b).loss)
