"""PEFT LoRA on a causal LM: only the adapters are perturbed and stepped, ρ learns, resume is exact."""

import copy

import pytest
import torch

from lets_hf import LETSConfig, LETSTrainer
from tests.checks import assert_resume_is_exact
from tests.heads import build_dataset, lora_llama

peft = pytest.importorskip("peft", reason="the PEFT tests need peft: pip install 'lets-hf[peft]' (the dev extra has it)")

RHO, LR = 0.05, 0.1


def _args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path), sam_variant="sam", rho=RHO, per_device_train_batch_size=8, optim="sgd",
        learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, max_steps=1, report_to="none",
        use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0,
        train_sampling_strategy="sequential",
    )
    return LETSConfig(**{**settings, **overrides})


def _rows(n, seed=1):
    return build_dataset("gpt2", n, seed=seed)  # causal-LM rows: input_ids, attention_mask, labels (-100 padded)


def _state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_one_sam_step_moves_only_the_adapters_as_sam_by_hand(tmp_path, one_thread):
    model = lora_llama()
    reference = copy.deepcopy(model)
    before = _state(model)
    trainer = LETSTrainer(model=model, args=_args(tmp_path), train_dataset=_rows(8))
    trainer.train()

    adapters = [p for p in reference.parameters() if p.requires_grad]
    assert adapters and all("lora_" in n for n, p in reference.named_parameters() if p.requires_grad)
    assert len(trainer.engine._backup) == len(adapters)  # the θ backup (and so ε) covers the adapters only
    batch = {key: torch.stack([row[key] for row in _rows(8)]) for key in _rows(8)[0]}
    grads = torch.autograd.grad(reference(**batch).loss, adapters)
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(adapters, grads):
            p.add_(g, alpha=RHO / float(norm))
    descent = torch.autograd.grad(reference(**batch).loss, adapters)
    expected = [p.detach() - RHO * g / norm - LR * d for p, g, d in zip(adapters, grads, descent)]

    trained = dict(model.named_parameters())
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    for name, want in zip(names, expected):
        torch.testing.assert_close(trained[name].detach(), want, rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[name]), name  # frozen base weights: bit-identical
        else:
            assert not torch.equal(p, before[name]), name


def test_learned_rho_on_lora(tmp_path, one_thread):
    args = _args(tmp_path, learn_rho=True, rho_lr=0.005, rho_batch_size=8, max_steps=4)  # adam: ~rho_lr per update
    trainer = LETSTrainer(model=lora_llama(), args=args, train_dataset=_rows(32), rho_dataset=_rows(8, seed=2))
    trainer.train()
    gaps = [entry["gen_gap"] for entry in trainer.state.log_history if "gen_gap" in entry]
    assert len(gaps) == 3 and all(abs(gap) < 1 for gap in gaps)  # a per-token gap, updates at steps 2-4
    assert abs(trainer.rho - RHO) > 1e-3


def test_resume_restores_adapters_rho_and_its_optimizer(tmp_path, one_thread):
    """4 steps in one go equal 2 steps, save, resume in a new trainer, 2 more."""

    def run(output_dir, resume=None):
        args = _args(
            output_dir, learn_rho=True, rho_lr=0.01, rho_batch_size=8, max_steps=4, save_strategy="steps", save_steps=2
        )
        trainer = LETSTrainer(model=lora_llama(), args=args, train_dataset=_rows(32), rho_dataset=_rows(8, seed=2))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    assert_resume_is_exact(run, tmp_path, initial_rho=RHO)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "lets_state.pt").is_file()
