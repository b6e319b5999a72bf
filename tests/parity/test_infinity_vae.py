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

from .conftest import load_fixture, nonempty

PARITY_MODEL = "infinity"  # the fixture folder (conftest reads its thread count)

FEAT_TOL = 1e-5
IMG_TOL = 1e-4
U8_MAX_FRACTION = 1e-3


def fix():
    return load_fixture("infinity")


def _vae_prefix() -> str:
    """The weights prefix config.json gives the AutoEncoder state_dict."""
    found = [p for p, what in fix().config["weights"]["prefixes"].items() if what.startswith("AutoEncoder")]
    assert len(found) == 1, fix().config["weights"]["prefixes"]
    return found[0]


def the_case(pattern: str, kind: str = "output") -> str:
    """The one case storing a ``kind`` tensor named like ``pattern`` (case names are not hard-coded)."""
    found = fix().cases_storing(pattern, kind)
    assert len(found) == 1, f"expected one case storing {kind} {pattern!r}, found {found}"
    return found[0]


@cache
def build_vae() -> BSQVAE:
    f = fix()
    cfg = BSQVAEConfig.from_official_kwargs(f.config["vae_constructor_kwargs"], f.config["vae_namespace_overrides"])
    vae = BSQVAE(cfg).eval().requires_grad_(False)
    return load_bsq_vae_state(vae, f.weights_with_prefix(_vae_prefix()))


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


def _encode_case() -> str:
    return the_case("raw_features")  # README: vae_encode (vae.encode's raw features, z, bit labels)


def test_vae_encode():
    f = fix()
    name = _encode_case()
    case = f.case(name)
    x = f.t(f"{name}.input.image_u8").float().div(255)
    x = x.add(x).add_(-1)  # the fixture's input_preprocessing
    with torch.no_grad():
        enc = build_vae().encode(x, case["scale_schedule"])
    out = f"{name}.output"
    assert _max_diff(enc.h, f.t(f"{out}.raw_features")) <= FEAT_TOL
    assert _max_diff(enc.z, f.t(f"{out}.z")) <= FEAT_TOL
    bits = torch.cat(enc.bits, 1)
    assert bits.dtype == torch.int32
    assert torch.equal(bits.long(), f.t(f"{out}.bit_indices"))
    B, d = enc.h.shape[:2]
    var_input = torch.cat([v.reshape(B, d, -1).permute(0, 2, 1) for v in enc.var_input], 1)
    assert _max_diff(var_input, f.t(f"{out}.var_input")) <= FEAT_TOL


def test_vae_decode():
    f = fix()
    name = the_case("image")  # README: vae_decode (decode_from_indices: summed codes and the float image)
    case = f.case(name)
    sizes = schedule_sizes(case["scale_schedule"])
    bits = _split_bits(f.t(f"{name}.input.bit_indices"), sizes)
    with torch.no_grad():
        summed, img = build_vae().decode_from_bits(bits, case["scale_schedule"])
    assert _max_diff(summed, f.t(f"{name}.output.summed_codes")) <= FEAT_TOL
    assert _max_diff(img, f.t(f"{name}.output.image")) <= IMG_TOL
    # the fixture's own check (cases.json "check"): decoding the encoder's labels rebuilds the encoder's z exactly
    if torch.equal(f.t(f"{name}.input.bit_indices"), f.t(f"{_encode_case()}.output.bit_indices")):
        assert torch.equal(f.t(f"{name}.output.summed_codes").squeeze(2), f.t(f"{_encode_case()}.output.z"))


def _inference_cases_with_summed_codes() -> list[str]:
    f = fix()
    return nonempty(sorted(
        name for name in f.case_names()
        if f"{name}.output.summed_codes" in f.tensors and f"{name}.output.idx_packed" in f.tensors
    ), "inference case storing summed_codes")


def _decoded_image_cases(pattern: str) -> list[str]:
    """Inference cases storing their summed codes and a uint8 image named like ``pattern``."""
    f = fix()
    return nonempty([n for n in _inference_cases_with_summed_codes() if f.matching(n, pattern)], f"{pattern} image")


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


@pytest.mark.parametrize("name", _decoded_image_cases("image_bgr_u8"))
def test_decode_inference_image_full(name):
    """The official image of a generation (stored at full resolution) is the VAE decode of its summed codes."""
    f = fix()
    with torch.no_grad():
        img = build_vae().decode(f.t(f"{name}.output.summed_codes"))
    _assert_u8_close(_u8_bgr(img), f.t(f"{name}.output.image_bgr_u8"))


def test_loader_reads_official_file_layout(tmp_path):
    """A .pth with top-level 'vae', plain Conv2d/GroupNorm names and one mask key loads to the same model."""
    f = fix()
    sd = f.weights_with_prefix(_vae_prefix())
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
@pytest.mark.parametrize("name", _decoded_image_cases(r"image_bgr_u8_stride\d+"))
def test_decode_inference_image_strided(name):
    """Same for the large images stored only as a strided subsample (``image_bgr_u8_stride<s>`` =
    ``img[:, ::s, ::s]``; ~20 s per 1024² image on 2 CPU cores, hence slow)."""
    f = fix()
    (m,) = f.matching(name, r"image_bgr_u8_stride(\d+)")
    step = int(m.group(1))
    with torch.no_grad():
        img = build_vae().decode(f.t(f"{name}.output.summed_codes"))
    _assert_u8_close(_u8_bgr(img)[:, ::step, ::step], f.t(f"{name}.output.{m.group(0)}"))
