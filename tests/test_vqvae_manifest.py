"""The full-size VQVAE built on the meta device has exactly the official keys and shapes."""

from __future__ import annotations

import json

import torch

from fastvar.tokenizers.vqvae import VQVAE

from .parity.conftest import manifest_files


def _manifest():
    [path] = [p for p in manifest_files("var") if p.name.startswith("vae_")]
    return json.loads(path.read_text())


def _build(man, patch_nums=None):
    kw = man["constructor_kwargs"]
    d = man["derived"]
    return VQVAE(vocab_size=kw["vocab_size"], z_channels=kw["z_channels"], ch=kw["ch"], ch_mult=d["ch_mult"],
                 num_res_blocks=d["num_res_blocks"], patch_nums=patch_nums or kw["v_patch_nums"],
                 share_quant_resi=kw["share_quant_resi"], quant_resi=d["quant_resi"])


def test_vqvae_state_dict_matches_manifest():
    man = _manifest()
    with torch.device("meta"):
        vae = _build(man)
    ours = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in vae.state_dict().items()]
    assert sorted(ours) == sorted((k, list(s), d) for k, s, d in man["state_dict"])
    assert sum(p.numel() for p in vae.parameters()) + vae.quantize.ema_vocab_hit_SV.numel() >= man["num_params"] - 1
    assert vae.downsample == man["derived"]["downsample"]


def test_ema_buffer_with_other_scale_count_is_tolerated():
    small = VQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 1), patch_nums=(1, 2, 4), using_sa=False)
    sd = small.state_dict()
    sd["quantize.ema_vocab_hit_SV"] = torch.ones(7, 16)
    small.load_state_dict(sd, strict=True)
    assert small.quantize.ema_vocab_hit_SV.shape == (3, 16)
