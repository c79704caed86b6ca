"""fairseq's `transformer_iwslt_de_en` (and smaller shapes) as a Hugging Face `MarianMTModel`, from scratch.

Why Marian: it is the Hugging Face seq2seq class that expresses this fairseq model with
its own config switches and no code of ours in the forward pass. Like fairseq's
`transformer` it is post-norm (`normalize_before=False`), scales embeddings by sqrt(d_model),
uses sinusoidal positions and ReLU when asked, has no embedding LayerNorm, and, with
`share_encoder_decoder_embeddings=False` and `tie_word_embeddings=True`, has a separate
source vocabulary and ties only the decoder's input and output embeddings
(`--share-decoder-input-output-embed`), which survives save/load. `FSMTForConditionalGeneration`
(the port of fairseq's WMT19 transformer) can't: in transformers 5 its `tie_word_embeddings`
also ties the encoder embedding to the decoder's, which breaks a separate source vocabulary.
Bart has learned positions and an embedding LayerNorm. What remains different from fairseq:
Marian's sinusoid frequencies are 10000^(-i/(d/2)) instead of 10000^(-i/(d/2-1)) and its
positions start at 0 instead of pad+1 (a fixed relabeling of positions, irrelevant when training
from scratch), and its output has a zero, untrained `final_logits_bias` buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn
from transformers import GenerationConfig, MarianConfig, MarianMTModel

from .bpe import MAX_POSITIONS, IwsltBpeTokenizer


@dataclass(frozen=True)
class TransformerShape:
    layers: int  # encoder layers = decoder layers
    d_model: int
    ffn_dim: int
    heads: int
    dropout: float


ARCHITECTURES: dict[str, TransformerShape] = {
    # fairseq's transformer_iwslt_de_en: 6+6 layers, 512 wide, FFN 1024, 4 heads, dropout 0.3 (~39M parameters).
    "transformer_iwslt_de_en": TransformerShape(layers=6, d_model=512, ffn_dim=1024, heads=4, dropout=0.3),
    # For CPU benchmarks: half the depth and width (~8M parameters with the 10k-merge vocabularies).
    "transformer_small": TransformerShape(layers=3, d_model=256, ffn_dim=512, heads=4, dropout=0.3),
    # For tests: seconds per step on a CPU.
    "transformer_tiny": TransformerShape(layers=2, d_model=64, ffn_dim=128, heads=2, dropout=0.1),
}


def build_config(arch: str, tokenizer: IwsltBpeTokenizer) -> MarianConfig:
    """The config of `arch` over the tokenizer's source and target dictionaries (fairseq's special ids)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown --arch {arch!r}: choose one of {list(ARCHITECTURES)}.")
    shape = ARCHITECTURES[arch]
    return MarianConfig(
        vocab_size=len(tokenizer.source_dictionary),
        decoder_vocab_size=len(tokenizer.target_dictionary),
        share_encoder_decoder_embeddings=False,
        tie_word_embeddings=True,
        encoder_layers=shape.layers,
        decoder_layers=shape.layers,
        d_model=shape.d_model,
        encoder_ffn_dim=shape.ffn_dim,
        decoder_ffn_dim=shape.ffn_dim,
        encoder_attention_heads=shape.heads,
        decoder_attention_heads=shape.heads,
        dropout=shape.dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        activation_function="relu",
        scale_embedding=True,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # fairseq's decoder input is the target shifted right behind </s>, and generation starts from </s>.
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )


def generation_config(config: MarianConfig, num_beams: int = 5, max_new_tokens: int = 200) -> GenerationConfig:
    """fairseq-generate's search: beam 5, length penalty 1, up to 200 tokens, never `<pad>`.

    A sentence's search ends once `num_beams` hypotheses are finished (`early_stopping=True`),
    as in fairseq's SequenceGenerator; `num_beams=1` is greedy search, which has no such option.
    """
    return GenerationConfig(
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        length_penalty=1.0,
        early_stopping=num_beams > 1,
        suppress_tokens=[config.pad_token_id],
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        forced_eos_token_id=config.forced_eos_token_id,
    )


def init_like_fairseq(model: MarianMTModel) -> None:
    """fairseq's initialization, since the recipe's hyperparameters were tuned with it: embeddings
    N(0, d^-1/2) with a zero pad row (Transformers' N(0, 0.02) starts the sqrt(d)-scaled embeddings
    2x smaller), attention projections Xavier-uniform (q, k, v with gain 1/sqrt(2), out_proj with a
    zero bias, as MultiheadAttention.reset_parameters), feed-forward layers PyTorch's default
    (fairseq builds them as plain nn.Linear)."""
    d_model = model.config.d_model
    for embedding in (model.model.encoder.embed_tokens, model.model.decoder.embed_tokens):
        nn.init.normal_(embedding.weight, mean=0.0, std=d_model**-0.5)
        nn.init.zeros_(embedding.weight[embedding.padding_idx])
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is model.lm_head:
            continue
        module.reset_parameters()
        if name.endswith(("q_proj", "k_proj", "v_proj")):
            nn.init.xavier_uniform_(module.weight, gain=1 / math.sqrt(2))
        elif name.endswith("out_proj"):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)


def build_model(
    arch: str, tokenizer: IwsltBpeTokenizer, num_beams: int = 5, max_new_tokens: int = 200
) -> MarianMTModel:
    """A freshly initialized `arch` whose saved `generation_config` is the recipe's beam search."""
    model = MarianMTModel(build_config(arch, tokenizer))
    init_like_fairseq(model)
    model.generation_config = generation_config(model.config, num_beams, max_new_tokens)
    return model
