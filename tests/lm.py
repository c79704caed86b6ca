"""A tiny causal LM and a word-level tokenizer trained on the shipped SST-2 sentences (real text, no hub)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

SST2 = Path(__file__).resolve().parents[1] / "examples" / "data" / "glue" / "SST-2" / "train.tsv"
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
#: A chat template as small as it can be: role, text, end of turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] }}</s>{% endgeneration %}{% else %}{{ message['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def sentences(count: int, start: int = 0) -> list[str]:
    with SST2.open(encoding="utf-8", newline="") as file:
        rows = list(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [row[0].strip() for row in rows[start : start + count]]


def word_tokenizer(vocabulary_from: int = 400) -> tf.PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=512, special_tokens=SPECIALS)
    tokenizer.train_from_iterator([*sentences(vocabulary_from), "user: assistant:"], trainer)
    wrapped = tf.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_llama(tokenizer) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=37, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, attn_implementation="eager",
    )
    return tf.LlamaForCausalLM(config)
