"""Full-size BSQ-VAEs built on the meta device have exactly the official state-dict keys and shapes, the
named configs agree with the manifests, and the loader follows the official file conventions."""

from __future__ import annotations

import json

import pytest
import torch

from fastvar.checkpoints import CheckpointError
from fastvar.tokenizers.bsq import BSQ_VAE_MODELS, BSQVAE, BSQVAEConfig, bsq_vae_config, load_bsq_vae_state

from .parity.conftest import manifest_files

VAE_MANIFESTS = [p for p in manifest_files("infinity") if json.loads(p.read_text())["kind"] == "vae"]


def _config(man: dict) -> BSQVAEConfig:
    args = man["resulting_AutoEncoder_args"]
    return BSQVAEConfig.from_official_kwargs(
        man["constructor_kwargs"],
        {"base_ch": args["base_ch"], "num_res_blocks": args["num_res_blocks"]},
        spatial_patchify=bool(man["apply_spatial_patchify"]),
    )


def test_all_vae_manifests_found():
    assert {p.stem for p in VAE_MANIFESTS} == set(BSQ_VAE_MODELS)


@pytest.mark.parametrize("path", VAE_MANIFESTS, ids=lambda p: p.stem)
def test_state_dict_matches_manifest(path):
    man = json.loads(path.read_text())
    cfg = _config(man)
    assert cfg == bsq_vae_config(path.stem)
    assert cfg.codebook_dim == man["vae_type"]
    with torch.device("meta"):
        vae = BSQVAE(cfg)
    ours = sorted((k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in vae.state_dict().items())
    theirs = sorted((k, list(s), d) for k, s, d in man["state_dict"])
    assert ours == theirs
    assert len(ours) == man["num_tensors"]
    assert sum(v.numel() for v in vae.state_dict().values()) == man["num_elements"]


def _small() -> BSQVAE:
    torch.manual_seed(0)
    cfg = BSQVAEConfig(4, patch_size=4, base_ch=32, num_res_blocks=1, encoder_ch_mult=(1, 1, 2), decoder_ch_mult=(1, 1, 2))
    return BSQVAE(cfg)


def _randomised(vae: BSQVAE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sd = vae.state_dict()
    return {k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()) for k, v in sd.items()}


def test_loader_official_conventions(tmp_path):
    src = _randomised(_small())
    # plain nn.Conv2d / nn.GroupNorm names, no mask at all, top-level 'vae', plus an 'ema' copy that must be ignored
    plain = {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
             .replace(".norm.weight", ".weight").replace(".norm.bias", ".bias"): v
             for k, v in src.items() if not k.endswith("lfq.mask")}
    path = tmp_path / "vae.pth"
    torch.save({"vae": plain, "ema": {k: torch.zeros_like(v) for k, v in plain.items()}}, path)
    vae = load_bsq_vae_state(_small(), path)
    for k, v in vae.state_dict().items():
        assert torch.equal(v, src[k]), k
    assert torch.equal(vae.state_dict()["quantize.lfq.mask"], torch.tensor([8, 4, 2, 1]))
    ema = load_bsq_vae_state(_small(), path, use_ema=True)
    assert all(v.abs().sum() == 0 for k, v in ema.state_dict().items() if v.is_floating_point())


def test_loader_reports_mismatches():
    src = _randomised(_small())
    bad = dict(src)
    bad.pop("decoder.conv_out.conv.bias")
    bad["encoder.extra.weight"] = torch.zeros(1)
    bad["encoder.conv_in.conv.weight"] = torch.zeros(7, 3, 3, 3)
    with pytest.raises(CheckpointError) as e:
        load_bsq_vae_state(_small(), bad)
    msg = str(e.value)
    assert "decoder.conv_out.conv.bias" in msg and "encoder.extra.weight" in msg and "encoder.conv_in.conv.weight" in msg
    # non-strict: missing/unexpected tolerated (official behaviour), shapes still checked
    bad["encoder.conv_in.conv.weight"] = src["encoder.conv_in.conv.weight"]
    vae = load_bsq_vae_state(_small(), bad, strict=False)
    assert torch.equal(vae.state_dict()["encoder.conv_in.conv.weight"], src["encoder.conv_in.conv.weight"])


def test_config_rejects_projected_codebooks():
    with pytest.raises(ValueError, match="codebook_size"):
        BSQVAEConfig.from_official_kwargs({"codebook_dim": 16, "codebook_size": 2**18})
    with pytest.raises(KeyError, match="infinity_vae_d32reg"):
        bsq_vae_config("infinity_vae_d99")


def test_small_vae_roundtrip_shapes():
    """Encode/quantise/decode run end to end for a non-square schedule and give consistent shapes."""
    vae = _small().eval()
    x = torch.rand(2, 3, 24, 16) * 2 - 1
    sizes = [(1, 1), (2, 1), (3, 2), (6, 4)]
    with torch.no_grad():
        enc = vae.encode(x, sizes)
        summed, img = vae.decode_from_bits(enc.bits, sizes)
    assert enc.h.shape == enc.z.shape == (2, 4, 6, 4)
    assert [tuple(b.shape) for b in enc.bits] == [(2, h * w, 4) for h, w in sizes]
    assert [tuple(v.shape) for v in enc.var_input] == [(2, 4, 1, h, w) for h, w in sizes[1:]]
    torch.testing.assert_close(summed.squeeze(2), enc.z, atol=1e-6, rtol=0)
    assert img.shape == x.shape and img.abs().max() <= 1
    with pytest.raises(ValueError, match="latent"):
        vae.encode(x, sizes[:-1])
