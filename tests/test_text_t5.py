"""The T5 wrapper packs features exactly like the official encode_prompt (tiny random T5, no download)."""

from __future__ import annotations

import torch

from fastvar.models.infinity import Infinity, InfinityConfig
from fastvar.text import TextCondition
from fastvar.text.t5 import T5TextEncoder

from ._tiny_text import tiny_t5, word_tokenizer

WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "cat", "on", "the", "mat", "dog"]


def _encoder(max_length: int = 16) -> T5TextEncoder:
    return T5TextEncoder(tiny_t5(len(WORDS), 32), word_tokenizer(WORDS, "t5"), max_length=max_length)


def test_packing_matches_unpadded_encoder_rows():
    enc = _encoder()
    cond = enc(["a red cat on the mat", "a dog"])
    assert isinstance(cond, TextCondition)
    assert cond.lens == [7, 3]  # words + </s>
    assert cond.cu_seqlens_k.dtype == torch.int32 and cond.cu_seqlens_k.tolist() == [0, 7, 10]
    assert cond.max_len == 7 and cond.kv_compact.shape == (10, 32) and cond.kv_compact.dtype == torch.float32
    with torch.no_grad():
        for i, text in enumerate(["a red cat on the mat", "a dog"]):
            ids = enc.tokenizer(text, return_tensors="pt").input_ids
            alone = enc.encoder(input_ids=ids)["last_hidden_state"][0]
            s, e = cond.cu_seqlens_k[i].item(), cond.cu_seqlens_k[i + 1].item()
            torch.testing.assert_close(cond.kv_compact[s:e], alone, atol=1e-5, rtol=1e-5)


def test_single_prompt_and_truncation():
    enc = _encoder(max_length=4)
    cond = enc("a red cat on the mat")
    assert cond.lens == [4] and cond.kv_compact.shape == (4, 32)


def test_from_local_folder(tmp_path):
    enc = _encoder()
    enc.encoder.save_pretrained(tmp_path)
    enc.tokenizer.save_pretrained(tmp_path)
    again = T5TextEncoder.from_pretrained(str(tmp_path), device="cpu", max_length=16, local_files_only=True)
    assert again.channels == 32 and again.encoder.dtype == torch.float32
    a, b = enc("a dog"), again("a dog")
    assert a.lens == b.lens
    torch.testing.assert_close(a.kv_compact, b.kv_compact)


def test_condition_feeds_infinity_text_path():
    enc = _encoder()
    torch.manual_seed(0)
    model = Infinity(InfinityConfig(embed_dim=64, depth=2, num_heads=2, text_channels=enc.channels, text_maxlen=16,
                                    d_vae=4, block_chunks=1)).eval()
    with torch.no_grad():
        sos, text = model.prepare_text(enc(["a red cat", "a dog"]), cfg_batch=True)
    assert sos.shape == (4, 64) and text.segments == [(0, 4), (4, 7), (7, 11), (11, 14)]
