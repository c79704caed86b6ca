"""Tiny real 🤗 heads built from configs, with data whose targets differ in length, and one
deterministic training run over them (importable from test files and launched scripts).

The heads cover the loss normalizations Trainer meets: a per-example mean that ignores
`num_items_in_batch` (BERT classification and regression), a token mean that honours it
(GPT-2) and a token mean that ignores it (BART).
"""

from __future__ import annotations

import os

import torch
import transformers as tf
from torch.distributed.tensor import DTensor

from lets_hf import LETSConfig, LETSTrainer
from lets_hf import loss_normalization as norms

HEADS = ("bert-classification", "bert-regression", "gpt2", "bart")
#: (kind, shift_labels) the probe must find: BERT drops the count, GPT-2 honours it (counting labels[..., 1:],
#: which Trainer gets wrong: GPT-2 has no loss_type), BART drops it.
EXPECTED_NORMALIZATION = {
    "bert-classification": (norms.MICRO_BATCH_MEAN, None),
    "bert-regression": (norms.MICRO_BATCH_MEAN, None),
    "gpt2": (norms.BY_NUM_ITEMS, True),
    "bart": (norms.TOKEN_MEAN, False),
}
#: (sam_variant, learn_rho) of the cases every head is checked in.
CASES = {"none": ("none", False), "sam": ("sam", False), "lets-sam": ("sam", True)}
#: LETS-SAM with the estimators beside the paper's (each run as the "lets-sam" case with these fields): Adam on log ρ,
#: whose first step moves ρ by rho_lr = 10% whatever the hypergradient's scale.
ESTIMATORS = {
    "trace": dict(rho_estimator="trace", rho_objective="val-loss", rho_update_space="log", rho_optimizer="adam", rho_lr=0.1),
    "antithetic": dict(
        rho_estimator="antithetic", rho_update_space="log", rho_antithetic_batches=1, rho_optimizer="adam", rho_lr=0.1
    ),
    # L_train on the batch just stepped on (one more backward per update, at the end of the step before it), and
    # with L_val on the next training batch's first pass (nothing held out, no validation pass)
    "last-batch": dict(rho_train_batch="last"),
    "next-batch": dict(rho_train_batch="last", rho_val_batch="next"),
}
#: LETS-SAM under each cheap `sam_policy` (each run as the "lets-sam" case with these fields): the 3 steps mix SAM and
#: plain steps, and ρ is updated once (SAM_STEPS; the tests check both). LookSAM (k = 2: SAM at 0 and 2) needs the
#: trace, which carries ∂θ/∂ρ across its plain step; the other two update ρ at step 1, after the SAM step 0.
POLICIES = {
    "ae-sam": dict(sam_policy="ae-sam", ae_sam_decay=0.5, ae_sam_c_start=-1.0, ae_sam_c_end=1.0),
    "looksam": dict(sam_policy="looksam", looksam_k=2, **ESTIMATORS["trace"]),
    "random": dict(sam_policy="random", random_sam_seed=11),
}
SAM_STEPS = {"ae-sam": [1, 1, 0], "looksam": [1, 0, 1], "random": [1, 1, 0]}
GLOBAL_BATCH = 8
STEPS = 3
#: SGD step of ρ per head, sized to the hypergradients of these models so that ρ moves by 10-40%.
RHO_LR = {"bert-classification": 1000.0, "bert-regression": 0.005, "gpt2": 3000.0, "bart": 10000.0}
VOCAB, LENGTH = 64, 8


def build_model(head: str) -> torch.nn.Module:
    """A float64 model without dropout, so that batch splits change nothing but summation order."""
    torch.manual_seed(0)
    if head.startswith("bert"):
        config = tf.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3 if head == "bert-classification" else 1,
            attn_implementation="eager",
        )
        model = tf.BertForSequenceClassification(config)
    elif head == "gpt2":
        config = tf.GPT2Config(
            vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
        )
        model = tf.GPT2LMHeadModel(config)
    elif head == "bart":
        config = tf.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=LENGTH,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, decoder_start_token_id=2, attn_implementation="eager",
        )
        model = tf.BartForConditionalGeneration(config)
    else:
        raise ValueError(f"unknown head {head!r}")
    return model.double()


def lora_llama() -> torch.nn.Module:
    """A tiny Llama with LoRA adapters on q and v (random A and B: both get gradients); needs peft."""
    import peft

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=37, max_position_embeddings=16, attn_implementation="eager",
    )
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(tf.LlamaForCausalLM(config).double(), lora)


def target_lengths(n: int, seed: int, balanced: bool) -> list[int]:
    """Real targets per example, 1..LENGTH. `balanced`: in every global batch of 8 (sequential
    order), examples 0-3 and 4-7 hold the same total, so 2 ranks see equal token counts."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, LENGTH + 1, (n,), generator=generator).tolist()
    if balanced:
        for start in range(0, n, GLOBAL_BATCH):
            half = GLOBAL_BATCH // 2
            lengths[start + half : start + GLOBAL_BATCH] = lengths[start : start + half][::-1]
    return lengths


def build_dataset(head: str, n: int, seed: int, balanced: bool = False, equal_lengths: bool = False) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [LENGTH // 2 + 1] * n if equal_lengths else target_lengths(n, seed, balanced)
    rows = []
    for length in lengths:
        input_ids = torch.randint(3, VOCAB, (LENGTH,), generator=generator)
        mask = (torch.arange(LENGTH) < length).long()
        row = {"input_ids": input_ids, "attention_mask": mask}
        if head == "bert-classification":
            row["labels"] = torch.randint(0, 3, (), generator=generator)
        elif head == "bert-regression":
            row["labels"] = torch.rand((), generator=generator, dtype=torch.float64) * 5
        elif head == "gpt2":
            row["labels"] = input_ids.masked_fill(mask == 0, -100)
        else:  # bart: a full source, a target of `length` real tokens
            row["attention_mask"] = torch.ones(LENGTH, dtype=torch.long)
            row["labels"] = torch.randint(3, VOCAB, (LENGTH,), generator=generator).masked_fill(mask == 0, -100)
        rows.append(row)
    return rows


def train_rows(head: str, balanced: bool = False) -> list[dict]:
    return build_dataset(head, GLOBAL_BATCH * STEPS, seed=1, balanced=balanced)


def validation_rows(head: str, balanced: bool = False) -> list[dict]:
    """One global validation batch (`rho_batch_size` × processes = 8)."""
    return build_dataset(head, GLOBAL_BATCH, seed=2, equal_lengths=balanced)


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    """θ as one flat tensor; FSDP2's sharded parameters are gathered (a collective: every rank calls it)."""
    full = [p.full_tensor() if isinstance(p, DTensor) else p for p in model.parameters()]
    return torch.cat([p.detach().reshape(-1) for p in full])


def optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[dict]:
    """The optimizer's per-parameter state in `model.parameters()` order (FSDP2 shards gathered), whatever
    its parameter groups."""
    def full(value):
        return value.full_tensor() if isinstance(value, DTensor) else value

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return [{k: full(v) for k, v in inner.state.get(p, {}).items()} for p in model.parameters()]


def train(
    head: str,
    case: str,
    output_dir: str,
    batch: int,
    accumulation: int = 1,
    average_tokens: bool = True,
    balanced: bool = False,
    resume: str | None = None,
    dtype: torch.dtype = torch.float64,
    model: torch.nn.Module | None = None,
    **overrides,
) -> dict:
    """`STEPS` SGD steps on `head` (sequential batches); returns θ (flat), ρ, the logged losses and gaps, the whole
    log, the loss normalization the trainer chose, the trained model, the optimizer state and the fp16 grad scale
    (None without one)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    sam_variant, learn_rho = CASES[case]
    settings = dict(
        output_dir=output_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        sam_variant=sam_variant, rho=0.05, learn_rho=learn_rho, rho_optimizer="sgd", rho_lr=RHO_LR[head],
        rho_batch_size=GLOBAL_BATCH // world, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant",
        max_grad_norm=0.0, max_steps=STEPS, train_sampling_strategy="sequential",
        average_tokens_across_devices=average_tokens, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=0, use_cpu=True, ddp_backend="gloo" if world > 1 else None,
    )
    args = LETSConfig(**{**settings, **overrides})
    trainer = LETSTrainer(
        model=(build_model(head) if model is None else model).to(dtype),
        args=args,
        train_dataset=train_rows(head, balanced),
        rho_dataset=validation_rows(head, balanced) if learn_rho and args.rho_val_batch == "held-out" else None,
    )
    trainer.train(resume_from_checkpoint=resume)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "theta": flat_parameters(trainer.model),
        "rho": trainer.rho,
        "sam_steps": [int(entry.get("sam_step_share", 1)) for entry in logs],  # one log per step in these runs
        "loss": [entry["loss"] for entry in logs],
        "gen_gap": [entry["gen_gap"] for entry in logs if "gen_gap" in entry],
        "log_history": trainer.state.log_history,
        "world": args.world_size,
        "normalization": trainer.loss_normalization,
        "model": trainer.model,
        "optimizer_state": optimizer_state(trainer.optimizer, trainer.model),
        "grad_scale": trainer.engine.grad_scaler.get_scale() if trainer.engine.grad_scaler is not None else None,
    }
