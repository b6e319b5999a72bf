"""Full-size Infinity transformers built on the meta device have exactly the official state-dict keys and
shapes, the named configs agree with the manifests, and the official loader's adaptations are reproduced."""

from __future__ import annotations

import json

import pytest
import torch

from fastvar.checkpoints import CheckpointError
from fastvar.models.infinity import (
    INFINITY_MODELS,
    Infinity,
    InfinityConfig,
    infinity_config,
    load_infinity_state,
)

from .parity.conftest import manifest_files

TRANSFORMER_MANIFESTS = [p for p in manifest_files("infinity") if json.loads(p.read_text())["kind"] == "transformer"]


def _config(man: dict) -> InfinityConfig:
    kw = {k: v for k, v in man["constructor_kwargs"].items() if k != "vae_local"}
    return InfinityConfig.from_official_kwargs(kw, d_vae=man["derived"]["d_vae"])


def test_all_transformer_manifests_found():
    assert len(TRANSFORMER_MANIFESTS) >= 4


@pytest.mark.parametrize("path", TRANSFORMER_MANIFESTS, ids=lambda p: p.stem)
def test_state_dict_matches_manifest(path):
    man = json.loads(path.read_text())
    cfg = _config(man)
    assert cfg.head_dim == man["derived"]["head_dim"]
    assert cfg.mlp_hidden == man["derived"]["mlp_hidden"]
    assert cfg.vocab == man["derived"]["V"]
    with torch.device("meta"):
        model = Infinity(cfg)
    ours = sorted((k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items())
    theirs = sorted((k, list(s), d) for k, s, d in man["state_dict"])
    assert ours == theirs
    assert sum(v.numel() for v in model.state_dict().values()) == man["num_elements"]
    assert model.text_proj_for_sos.ca.num_heads == man["derived"]["text_pool_heads"]


@pytest.mark.parametrize("path", TRANSFORMER_MANIFESTS, ids=lambda p: p.stem)
def test_named_configs_match_manifests(path):
    man = json.loads(path.read_text())
    names = [n for n, s in INFINITY_MODELS.items() if s["manifest"] == path.stem]
    assert names, f"no named config for manifest {path.stem}"
    for name in names:
        spec = INFINITY_MODELS[name]
        for k, v in spec["kwargs"].items():
            assert man["constructor_kwargs"][k] == v, (name, k)
        assert spec["vae"] == man["vae"]["file"].removesuffix(".pth")
        assert infinity_config(name) == _config(man)


def test_unknown_name_lists_known():
    with pytest.raises(KeyError, match="infinity-2b"):
        infinity_config("infinity-3b")


def _tiny(text_maxlen: int = 8) -> Infinity:
    torch.manual_seed(0)
    cfg = InfinityConfig(embed_dim=64, depth=2, num_heads=2, text_channels=16, text_maxlen=text_maxlen, d_vae=4,
                         block_chunks=2)
    return Infinity(cfg)


def test_load_adapts_cfg_uncond_rows_and_drops_legacy_buffers():
    src = _tiny(text_maxlen=5)
    dst = _tiny(text_maxlen=8)
    sd = src.state_dict()
    sd["attn_bias_for_masking"] = torch.zeros(1, 1, 3, 3)
    sd["lvl_1L"] = torch.zeros(1, 3)
    own_tail = dst.cfg_uncond.detach()[5:].clone()
    load_infinity_state(dst, sd)
    assert torch.equal(dst.cfg_uncond[:5], src.cfg_uncond)
    assert torch.equal(dst.cfg_uncond[5:], own_tail)
    assert "attn_bias_for_masking" in sd  # the caller's dict is not modified
    small = _tiny(text_maxlen=3)
    load_infinity_state(small, src.state_dict())
    assert torch.equal(small.cfg_uncond, src.cfg_uncond[:3])


def test_load_mismatch_is_a_clear_error():
    model = _tiny()
    sd = model.state_dict()
    sd.pop("head.bias")
    sd["block_chunks.0.module.0.sa.proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"missing key.*head\.bias|shape mismatch") as e:
        load_infinity_state(model, sd)
    msg = str(e.value)
    assert "head.bias" in msg and "sa.proj.weight" in msg and "embed_dim=64" in msg


def test_build_infinity_random_init_on_device_dtype():
    from fastvar.models.infinity import build_infinity

    model = build_infinity("infinity-layer12", dtype=torch.bfloat16, depth=1, block_chunks=1)
    assert model.dtype == torch.bfloat16 and model.depth == 1 and model.C == 768
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
    assert float(model.layers[0].sa.zero_k_bias.abs().max()) == 0.0


def test_spatial_patchify_generation_shapes():
    """8B-style models fold 2x2 latent cells into one token: bits and codes live on the doubled grid."""
    from fastvar.text import TextCondition

    torch.manual_seed(0)
    d = 3
    model = Infinity(InfinityConfig(embed_dim=64, depth=2, num_heads=2, text_channels=16, text_maxlen=8, d_vae=4 * d,
                                    apply_spatial_patchify=True)).eval()
    text = TextCondition(torch.randn(5, 16), [5], torch.tensor([0, 5], dtype=torch.int32), 5)
    sizes = [(1, 1), (2, 2), (4, 3)]
    out = model.autoregressive_infer(text, sizes, cfg=3.0, tau=0.5, g_seed=1, rope_ref_hw=(8, 6))
    assert [tuple(b.shape) for b in out.bits] == [(1, 2, 2, d), (1, 4, 4, d), (1, 8, 6, d)]
    assert out.summed_codes.shape == (1, d, 8, 6)
    again = model.autoregressive_infer(text, sizes, cfg=3.0, tau=0.5, g_seed=1, rope_ref_hw=(8, 6))
    assert torch.equal(out.summed_codes, again.summed_codes)  # same seed, same result
