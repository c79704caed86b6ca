"""Beam-search translation of a token-batch dataset, for BLEU (fairseq-generate's role).

Trainer's evaluation loop only scores teacher-forced loss. `LETSSeq2SeqTrainer`'s
`predict_with_generate` would give padded token arrays in dataset order, but each row here is a
token batch of many sentences whose hypotheses BLEU needs in the split's line order; so
generation runs here after training, with the model's saved `generation_config` (beam 5).
Hypotheses come back in the split's line order, BPE removed; `<unk>` stays in the text, as
fairseq prints it.
"""

from __future__ import annotations

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .bpe import IwsltBpeTokenizer
from .data import TranslationCollator


@torch.no_grad()
def translate(
    model: PreTrainedModel,
    tokenizer: IwsltBpeTokenizer,
    batches: Dataset,
    collator: TranslationCollator,
    desc: str = "translate",
) -> list[str]:
    """Tokenized-text hypotheses for every sentence of `batches` (rows from `data.batch_dataset`)."""
    model.eval()
    not_text = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    hypotheses: list[str] = [""] * sum(len(ids) for ids in batches["ids"])
    for row in tqdm(batches, desc=desc, unit="batch"):
        inputs = collator([{"input_ids": row["input_ids"]}])
        outputs = model.generate(**{name: tensor.to(model.device) for name, tensor in inputs.items()})
        for sentence_id, tokens in zip(row["ids"], outputs.tolist()):
            hypotheses[sentence_id] = tokenizer.decode([token for token in tokens if token not in not_text])
    return hypotheses
