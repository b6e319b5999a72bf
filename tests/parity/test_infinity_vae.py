"""Infinity BSQ-VAE parity against the official code (fixtures in $FASTVAR_PARITY_DIR/infinity/tiny).

Sizes, schedules and kwargs come from the fixture JSON; tolerances are the README's (features / codes
1e-5, decoded float image 1e-4, bits exact, uint8 images |Δ| <= 1 on <= 0.1 % of values).
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

from fastvar.schedules_infinity import accumulate_codes, bits_to_codes, next_scale_input, schedule_sizes
from fastvar.tokenizers.bsq import BSQVAE, BSQVAEConfig, load_bsq_vae_state, unpack_bits

from .conftest import load_fixture

FEAT_TOL = 1e-5
IMG_TOL = 1e-4
U8_MAX_FRACTION = 1e-3


def fix():
    return load_fixture("infinity")


@cache
def build_vae() -> BSQVAE:
    f = fix()
    cfg = BSQVAEConfig.from_official_kwargs(f.config["vae_constructor_kwargs"], f.config["vae_namespace_overrides"])
    vae = BSQVAE(cfg).eval().requires_grad_(False)
    return load_bsq_vae_state(vae, f.weights_with_prefix("vae."))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _split_bits(flat: torch.Tensor, sizes) -> list[torch.Tensor]:
    """(B, L, d) -> per scale (B, 1, h, w, d), as the fixture's input preprocessing describes."""
    out, p = [], 0
    B, _, d = flat.shape
    for h, w in sizes:
        out.append(flat[:, p : p + h * w].reshape(B, 1, h, w, d))
        p += h * w
    assert p == flat.shape[1]
    return out


def _u8_bgr(img: torch.Tensor) -> torch.Tensor:
    """The official post-processing: [-1, 1] -> (B, H, W, 3) uint8 (truncation), channels flipped to BGR."""
    return ((img + 1) / 2).permute(0, 2, 3, 1).mul(255).to(torch.uint8).flip(-1)


def _assert_u8_close(ours: torch.Tensor, ref: torch.Tensor):
    diff = (ours.int() - ref.int()).abs()
    assert diff.max().item() <= 1
    assert (diff > 0).float().mean().item() <= U8_MAX_FRACTION


def test_vae_encode():
    f = fix()
    case = f.case("vae_encode")
    x = f.t("vae_encode.input.image_u8").float().div(255)
    x = x.add(x).add_(-1)  # the fixture's input_preprocessing
    with torch.no_grad():
        enc = build_vae().encode(x, case["scale_schedule"])
    assert _max_diff(enc.h, f.t("vae_encode.output.raw_features")) <= FEAT_TOL
    assert _max_diff(enc.z, f.t("vae_encode.output.z")) <= FEAT_TOL
    bits = torch.cat(enc.bits, 1)
    assert bits.dtype == torch.int32
    assert torch.equal(bits.long(), f.t("vae_encode.output.bit_indices"))
    B, d = enc.h.shape[:2]
    var_input = torch.cat([v.reshape(B, d, -1).permute(0, 2, 1) for v in enc.var_input], 1)
    assert _max_diff(var_input, f.t("vae_encode.output.var_input")) <= FEAT_TOL


def test_vae_decode():
    f = fix()
    case = f.case("vae_decode")
    sizes = schedule_sizes(case["scale_schedule"])
    bits = _split_bits(f.t("vae_decode.input.bit_indices"), sizes)
    with torch.no_grad():
        summed, img = build_vae().decode_from_bits(bits, case["scale_schedule"])
    assert _max_diff(summed, f.t("vae_decode.output.summed_codes")) <= FEAT_TOL
    assert _max_diff(img, f.t("vae_decode.output.image")) <= IMG_TOL
    # the fixture's own check: decoding the encoder's labels rebuilds the encoder's z exactly
    assert torch.equal(f.t("vae_decode.output.summed_codes").squeeze(2), f.t("vae_encode.output.z"))


def _inference_cases_with_summed_codes() -> list[str]:
    f = fix()
    return sorted(
        name for name in f.cases
        if not name.startswith("_") and f"{name}.output.summed_codes" in f.tensors and f"{name}.output.idx_packed" in f.tensors
    )


@pytest.mark.parametrize("name", _inference_cases_with_summed_codes())
def test_inference_summed_codes(name):
    """The scale loop's helpers rebuild the official summed codes from the sampled bits (incl. FastVAR's
    skipped last scales, where the last executed scale is still upsampled)."""
    f = fix()
    case = f.case(name)
    sizes = schedule_sizes(case["kwargs"]["scale_schedule"])
    executed = schedule_sizes(case.get("scales_run_through_transformer", case["kwargs"]["scale_schedule"]))
    assert executed == sizes[: len(executed)]
    d = f.config["infinity_derived"]["d_vae"]
    bits = unpack_bits(f.t(f"{name}.output.idx_packed"), d)
    B = bits.shape[0]
    summed, p = 0, 0
    for si, (h, w) in enumerate(executed):
        codes = bits_to_codes(bits[:, p : p + h * w].reshape(B, h, w, d))
        p += h * w
        summed = accumulate_codes(summed, codes, sizes[-1], last=si == len(sizes) - 1)
        if si + 1 < len(sizes):
            nxt = next_scale_input(summed, sizes[si + 1])
            assert nxt.shape == (B, d, *sizes[si + 1])
    assert p == bits.shape[1]
    assert summed.is_contiguous(memory_format=torch.channels_last_3d)  # the official layout (see bsq.py)
    assert _max_diff(summed.squeeze(2), f.t(f"{name}.output.summed_codes")) <= FEAT_TOL


def test_decode_inference_image_256():
    """The official image of a 256² generation is the VAE decode of its summed codes."""
    f = fix()
    with torch.no_grad():
        img = build_vae().decode(f.t("infer_greedy_256.output.summed_codes"))
    _assert_u8_close(_u8_bgr(img), f.t("infer_greedy_256.output.image_bgr_u8"))


def test_loader_reads_official_file_layout(tmp_path):
    """A .pth with top-level 'vae', plain Conv2d/GroupNorm names and one mask key loads to the same model."""
    f = fix()
    sd = f.weights_with_prefix("vae.")
    plain = {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
             .replace(".norm.weight", ".weight").replace(".norm.bias", ".bias"): v
             for k, v in sd.items() if k != "quantize.lfq.mask"}
    assert len(plain) == len(sd) - 1
    path = tmp_path / "vae.pth"
    torch.save({"vae": plain}, path)
    ref = build_vae()
    vae = load_bsq_vae_state(BSQVAE(ref.cfg), path)
    for k, v in ref.state_dict().items():
        assert torch.equal(vae.state_dict()[k], v), k


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in _inference_cases_with_summed_codes() if not n.endswith("_256")])
def test_decode_inference_image_1m(name):
    """Same at 1024² (~20 s per image on 2 CPU cores, hence slow): the stored stride-8 subsample."""
    f = fix()
    with torch.no_grad():
        img = build_vae().decode(f.t(f"{name}.output.summed_codes"))
    _assert_u8_close(_u8_bgr(img)[:, ::8, ::8], f.t(f"{name}.output.image_bgr_u8_stride8"))
