"""Tiny, in-process text encoders for tests (no download): word-level tokenizers, a T5 and a Qwen2."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import transformers


def word_tokenizer(words: Sequence[str], style: str) -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words``: ``"t5"`` (appends ``</s>``, pads with ``<pad>``, as
    Flan-T5's) or ``"qwen"`` (pads with ``<|endoftext|>``, no special tokens added, as Qwen2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", words.index("</s>"))])
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", padding_side="right"
        )
    if style == "qwen":
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="<unk>")
    raise ValueError(f"unknown tokenizer style {style!r}")


def tiny_t5(vocab: int, d_model: int, seed: int = 0) -> transformers.T5EncoderModel:
    torch.manual_seed(seed)
    cfg = transformers.T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0,
    )
    return transformers.T5EncoderModel(cfg)


def tiny_qwen2(vocab: int, layers: int, max_positions: int, seed: int = 0) -> transformers.Qwen2Model:
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions)
    return transformers.Qwen2Model(cfg)
