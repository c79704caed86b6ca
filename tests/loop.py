"""The README's plain loop ("Without Trainer") on the real heads of `tests.heads`: `LETSEngine` driven
without Trainer, with the settings, data order and validation batches of `tests.heads.train`, so that
the two can be compared number for number (in one process and in launched ones)."""

from __future__ import annotations

import copy

import torch
from torch.utils.data import DataLoader
from transformers import default_data_collator

from lets_hf import LETSArguments, LETSEngine, RhoBatches
from tests.heads import CASES, GLOBAL_BATCH, RHO_LR, build_model, flat_parameters, optimizer_state, train_rows, validation_rows

#: `tests.heads.train`'s optimizer settings -> the loop's optimizer
OPTIMIZERS = {"sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
              "adamw_torch": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)}


def plain_loop(head: str, case: str, batch: int, accumulation: int = 1, accelerator=None, steps: int | None = None,
               resume: dict | None = None, optim: str = "sgd", learning_rate: float = 0.1, model=None,
               **fields) -> dict:
    """The loop of `tests.heads.train(head, case, batch=..., accumulation=..., optim=..., **fields)`: constant lr,
    sequential batches (sharded by `accelerator.prepare` on several processes). `steps` stops early, `resume`
    (model, optimizer and engine state) skips the batches already trained on."""
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    sam_variant, learn_rho = CASES[case]
    args = LETSArguments(**{
        "sam_variant": sam_variant, "rho": 0.05, "learn_rho": learn_rho, "rho_optimizer": "sgd",
        "rho_lr": RHO_LR[head], "rho_batch_size": GLOBAL_BATCH // world, **fields,
    })
    model = build_model(head) if model is None else model
    loader = DataLoader(train_rows(head), batch_size=batch, collate_fn=default_data_collator)
    optimizer = OPTIMIZERS[optim](model.parameters(), learning_rate)
    if accelerator is not None:  # together: FSDP2 swaps the optimizer's parameters for their shards
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    rho_batches = RhoBatches(validation_rows(head), default_data_collator, args.rho_batch_size, world, rank, args.rho_seed)
    engine = LETSEngine(model, optimizer, args, loss_fn=lambda model, batch: model(**batch).loss, accelerator=accelerator,
                        rho_batches=rho_batches if learn_rho else None, gradient_accumulation_steps=accumulation,
                        max_steps=len(loader) // accumulation)  # the whole run's, also when `steps` stops it early
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        engine.load_state_dict(resume["engine"])
    for i, micro_batch in enumerate(loader):
        if i < engine.global_step * accumulation:
            continue
        if steps is not None and engine.global_step == steps:
            break
        if accelerator is None:
            engine.backward(micro_batch)
            engine.step()
        else:
            with accelerator.accumulate(model):
                engine.backward(micro_batch)
                engine.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "engine": engine.state_dict()}
    return {
        "theta": flat_parameters(model), "rho": engine.rho, "engine": engine, "state": copy.deepcopy(state),
        "optimizer_state": optimizer_state(optimizer, model), "world": world,
        "gen_gap": engine.pop_metrics().get("gen_gap"),
    }
