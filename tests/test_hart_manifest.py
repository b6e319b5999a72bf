"""HART without fixtures: full-size key/shape parity with the manifests (meta device), the official-folder
loader, the lazily exposed attention mask, and the Qwen2 context builder (tiny random Qwen2, no download)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fastvar.checkpoints import CheckpointError
from fastvar.models.hart import HART, HARTConfig, block_causal_bias, hart_config, load_hart_folder

from ._tiny_text import tiny_qwen2, word_tokenizer
from .parity.conftest import manifest_files


def _manifest(kind: str) -> dict:
    paths = [p for p in manifest_files("hart") if p.stem.endswith(kind)]
    assert len(paths) == 1, f"expected one HART {kind} manifest, found {paths}"
    return json.loads(paths[0].read_text())


def _entries(sd) -> list:
    return [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()]


# ---------------------------------------------------------------------------------------------- manifests
def test_llm_state_dict_matches_manifest():
    man = _manifest("llm")
    with torch.device("meta"):
        model = HART(hart_config("hart-0.7b"))
    sd = model.state_dict()
    assert _entries(sd) == [(k, list(s), d) for k, s, d in man["state_dict"]]  # same keys, shapes, dtypes, order
    n = sum(v.numel() for k, v in sd.items() if k not in ("lvl_1L", "attn_bias_for_masking"))
    assert n == man["num_params_excluding_buffers"]
    assert sum(p.numel() for p in model.diffloss.parameters()) == man["num_params_diffusion_head"]


def test_named_config_is_the_manifest_constructor():
    man = _manifest("llm")
    tok = _manifest("tokenizer")["constructor_kwargs"]
    cfg = HARTConfig.from_official(man["constructor_kwargs"], vocab_size=tok["vocab_size"], cvae=tok["z_channels"])
    assert cfg.to_dict() == hart_config("hart-0.7b").to_dict()


def test_tokenizer_state_dict_matches_manifest():
    from fastvar.tokenizers.hart_tokenizer import HARTTokenizer, split_tokenizer_state

    man = _manifest("tokenizer")
    with torch.device("meta"):
        tok = HARTTokenizer.from_official_config(man["constructor_kwargs"])
    theirs = [(k, list(s), d) for k, s, d in man["state_dict"]]
    assert _entries({"vae." + k: v for k, v in tok.state_dict().items()}) == [e for e in theirs if e[0].startswith("vae.")]
    assert sum(v.numel() for v in tok.state_dict().values()) == man["num_params_vae"]  # ema_vocab_hit_SV included
    # The discriminator keys are recognised and dropped on purpose, nothing else is.
    fake = {k: torch.empty(0) for k, _, _ in man["state_dict"]}
    vae_sd, dropped = split_tokenizer_state(fake)
    assert set(dropped) == {k for k in fake if k.startswith("disc.")}
    assert len(vae_sd) == len(fake) - len(dropped)


def test_unsupported_official_configs_are_rejected():
    with pytest.raises(ValueError, match="not supported"):
        HARTConfig.from_official({"context_token": 12}, vocab_size=64, cvae=4)  # HF defaults: gpt2 blocks with AdaLN


# ---------------------------------------------------------------------------------------------- mask + loader
def _tiny_config(**kw) -> HARTConfig:
    base = dict(context_token=5, context_dim=8, depth=2, embed_dim=16, num_heads=2, patch_nums=(1, 2, 4),
                diff_width=16, diff_depth=1, vocab_size=32, cvae=4)
    return HARTConfig(**{**base, **kw})


def test_attention_mask_is_exposed_not_stored():
    torch.manual_seed(0)
    model = HART(_tiny_config())
    assert "attn_bias_for_masking" not in dict(model.named_buffers())
    sd = model.state_dict()
    keys = list(sd)
    assert keys.index("attn_bias_for_masking") == keys.index("lvl_1L") + 1
    lvl = sd["lvl_1L"][0]
    assert lvl.tolist() == [0] * 5 + [1] * 4 + [2] * 16
    bias = sd["attn_bias_for_masking"][0, 0]
    assert torch.equal(bias == 0, lvl[:, None] >= lvl[None, :]) and torch.isinf(bias[bias != 0]).all()
    other = HART(_tiny_config())
    other.load_state_dict(sd, strict=True)  # the official strict ema_model.bin load
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    bad = dict(sd, attn_bias_for_masking=block_causal_bias(torch.zeros(1, 3, dtype=torch.long)))
    with pytest.raises(ValueError, match="context_token or patch_nums"):
        other.load_state_dict(bad)


def _write_folder(root, model: HART, tok, with_disc: bool = True) -> None:
    llm, tdir = root / "llm", root / "tokenizer"
    llm.mkdir(parents=True)
    tdir.mkdir()
    cfg = model.config.to_dict()
    cfg.update(model_type="hart_transformer_t2i", vae_path=None, flash_if_available=True)
    (llm / "config.json").write_text(json.dumps(cfg))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({k: v for k, v in sd.items() if k != "attn_bias_for_masking"}, str(llm / "model.safetensors"))
    ema = {k: v + 1 if v.is_floating_point() and k != "attn_bias_for_masking" else v for k, v in sd.items()}
    torch.save(ema, llm / "ema_model.bin")
    (tdir / "config.json").write_text(json.dumps(dict(tok.official_config(), model_type="hart_autoencoder_with_disc")))
    tsd = {"vae." + k: v.contiguous() for k, v in tok.state_dict().items()}
    if with_disc:
        tsd["disc.main.0.weight"] = torch.zeros(2, 3, 4, 4)
    save_file(tsd, str(tdir / "model.safetensors"))


def _tiny_tokenizer():
    from fastvar.tokenizers.hart_tokenizer import HARTTokenizer

    return HARTTokenizer(vocab_size=32, z_channels=4, ch=32, ch_mult=(1, 1), patch_nums=(1, 2, 4))


def test_load_hart_folder_roundtrip(tmp_path):
    torch.manual_seed(0)
    model, tok = HART(_tiny_config()), _tiny_tokenizer()
    _write_folder(tmp_path, model, tok)
    ours, tok2 = load_hart_folder(tmp_path, use_ema=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ours.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(tok.state_dict().values(), tok2.state_dict().values()))
    ema, _ = load_hart_folder(tmp_path / "llm", use_ema=True)  # the official model_path points at llm/
    torch.testing.assert_close(ema.head.weight, model.head.weight + 1)


def test_load_hart_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="llm/config.json"):
        load_hart_folder(tmp_path)
    torch.manual_seed(0)
    model, tok = HART(_tiny_config()), _tiny_tokenizer()
    _write_folder(tmp_path, model, tok)
    cfg = json.loads((tmp_path / "llm" / "config.json").read_text())
    (tmp_path / "llm" / "config.json").write_text(json.dumps(dict(cfg, depth=3)))
    with pytest.raises(CheckpointError, match="missing key"):
        load_hart_folder(tmp_path, use_ema=False)


# ---------------------------------------------------------------------------------------------- text encoder
WORDS = ["<|endoftext|>", "<unk>", "a", "red", "cat", "on", "the", "mat", "given", "prompt", ":"]


def _qwen(max_length: int = 8, system: str | None = "given a prompt :"):
    from fastvar.text.qwen2 import Qwen2TextEncoder

    return Qwen2TextEncoder(tiny_qwen2(len(WORDS), layers=2, max_positions=64), word_tokenizer(WORDS, "qwen"),
                            max_length=max_length, system_prompt=system)


def test_qwen2_context_matches_encode_prompts():
    enc = _qwen()
    ctx = enc(["a red cat on the mat", "a cat"])
    assert ctx.tokens.shape == (2, 8) and ctx.features.shape == (2, 8, 16) and ctx.features.dtype == torch.float32
    assert ctx.mask.tolist() == [[True] * 6 + [False] * 2, [True] * 2 + [False] * 6]
    assert ctx.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 5, 5], [0, 1, 1, 1, 1, 1, 1, 1]]
    # hart.utils.encode_prompts with the system prompt: run on [system | prompt], keep the prompt rows of
    # the last entry of hidden_states.
    sys_ids = enc.tokenizer("given a prompt :", return_tensors="pt").input_ids.repeat(2, 1)
    with torch.no_grad():
        mask = torch.cat([torch.ones_like(sys_ids).bool(), ctx.mask], 1)
        out = enc.model(torch.cat([sys_ids, ctx.tokens], 1), attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(ctx.features, out.hidden_states[-1][:, 4:].float(), atol=0, rtol=0)


def test_qwen2_without_system_prompt_and_truncation():
    enc = _qwen(max_length=4, system=None)
    ctx = enc("a red cat on the mat")
    assert ctx.tokens.shape == (1, 4) and ctx.mask.all()
    with torch.no_grad():
        ref = enc.model(ctx.tokens, attention_mask=ctx.mask, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(ctx.features, ref, atol=0, rtol=0)
