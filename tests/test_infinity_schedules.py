"""Infinity's aspect-ratio / pixel-budget templates, the zero-shot 2K extension and the RoPE reference size."""

from __future__ import annotations

import json

import pytest
import torch

import fastvar.schedules_infinity as si
import fastvar.tokenizers.bsq as bsq
from fastvar.schedules import Schedule
from fastvar.schedules_infinity import (
    INFINITY_ASPECTS,
    INFINITY_PNS,
    aspect_to_h_div_w,
    infinity_image_size,
    infinity_schedule,
    nearest_aspect,
    rope_reference_hw,
    schedule_sizes,
    vae_schedule,
)

from .parity.conftest import load_fixture, manifest_files

OFFICIAL_PNS = ("0.06M", "0.25M", "0.60M", "1M")


def _fixture_aspect() -> float:
    (h_div_w,) = load_fixture("infinity").config["infinity_constructor_kwargs"]["train_h_div_w_list"]
    return h_div_w


def test_templates_reproduce_fixture_schedules():
    f = load_fixture("infinity")
    aspect = _fixture_aspect()
    for pn, sched in f.config["scale_schedules"].items():
        assert infinity_schedule(aspect, pn).sizes == schedule_sizes(sched), pn
    assert infinity_schedule(aspect, "0.06M").sizes == schedule_sizes(f.case("vae_encode")["scale_schedule"])


@pytest.mark.parametrize("name", list(INFINITY_ASPECTS))
def test_every_template_is_consistent(name):
    r = INFINITY_ASPECTS[name]
    lengths = []
    for pn in INFINITY_PNS:
        s = infinity_schedule(name, pn)
        assert isinstance(s, Schedule)
        lengths.append(len(s))
        h, w = s.last
        assert abs(h / w - r) < 0.02, (pn, s.last)  # the official check is 0.01 on its own budgets
        if pn in OFFICIAL_PNS:
            assert abs(h / w - r) < 0.01
        assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(s.sizes, s.sizes[1:]))
        assert infinity_image_size(name, pn) == (h * 16, w * 16)
        assert infinity_schedule(r, pn) == s  # float h_div_w form
    assert lengths == [7, 10, 12, 13, 15]
    one_m = infinity_schedule(name, "1M").sizes
    assert infinity_schedule(name, "2K").sizes[:13] == one_m
    assert infinity_schedule(name, "2K").last == (2 * one_m[-1][0], 2 * one_m[-1][1])


def test_aspect_names_cover_the_official_templates():
    assert len(INFINITY_ASPECTS) == 15  # 8 ratios h/w >= 1 and their 7 inverses
    assert len({infinity_schedule(a, "1M") for a in INFINITY_ASPECTS}) == 15
    for name, r in INFINITY_ASPECTS.items():
        w, h = (int(v) for v in name.split(":"))
        assert nearest_aspect(h / w) == r


def test_inverse_ratios_swap_h_and_w():
    for name, r in INFINITY_ASPECTS.items():
        if r > 1:
            w, h = name.split(":")
            inv = infinity_schedule(f"{h}:{w}", "1M")
            assert inv.sizes == tuple((b, a) for a, b in infinity_schedule(name, "1M").sizes)


def test_aspect_conventions_and_errors():
    assert aspect_to_h_div_w("4:3") == 0.75  # strings are W:H (landscape here)
    assert aspect_to_h_div_w(1.333) == 1.333  # floats are the official h_div_w
    h, w = infinity_schedule("4:3", "1M").last
    assert w > h
    assert infinity_schedule("1.333", "1M") == infinity_schedule("3:4", "1M") == infinity_schedule(4 / 3, "1M")
    assert infinity_schedule("2:3", "1M") == infinity_schedule(1.5, "1M")
    assert infinity_schedule("3:2", "1M") == infinity_schedule(2 / 3, "1M")
    with pytest.raises(ValueError, match="nearest_aspect"):
        infinity_schedule("16:9", "1M")
    assert nearest_aspect(9 / 16) == 0.571
    with pytest.raises(ValueError, match="0.06M"):
        infinity_schedule("1:1", "4K")


def test_2k_fits_the_level_embedding_of_every_released_transformer():
    longest = max(len(infinity_schedule(a, "2K")) for a in INFINITY_ASPECTS)
    for p in manifest_files("infinity"):
        man = json.loads(p.read_text())
        if man["kind"] != "transformer":
            continue
        rows = {k: s for k, s, _ in man["state_dict"]}["lvl_embed.weight"][0]
        assert longest <= rows, p.stem
    assert infinity_schedule("1:1", "2K").sizes[-3:] == ((64, 64), (96, 96), (128, 128))
    assert infinity_image_size("1:1", "2K") == (2048, 2048)


def test_rope_reference_matches_fixture_table():
    f = load_fixture("infinity")
    table = {int(k): v for k, v in f.config["rope2d_positions_mode2_1to1"].items() if k != "note"}
    for pn, sched in f.config["scale_schedules"].items():
        H, W = rope_reference_hw(sched)
        for h, w in schedule_sizes(sched):
            rows = (torch.arange(h) * (H / h)).round().int().tolist()
            cols = (torch.arange(w) * (W / w)).round().int().tolist()
            assert rows == table[h] and cols == table[w], (pn, h)
    assert rope_reference_hw(_fixture_aspect()) == schedule_sizes(f.config["scale_schedules"]["1M"])[-1]


def test_rope_reference_for_every_budget():
    for name in INFINITY_ASPECTS:
        ref = infinity_schedule(name, "1M").last
        assert rope_reference_hw(name) == ref
        for pn in INFINITY_PNS:
            assert rope_reference_hw(infinity_schedule(name, pn)) == ref, (name, pn)
    # custom schedules: the template nearest to the last scale's h/w
    assert rope_reference_hw(Schedule.square([1, 2, 3, 5, 8])) == (64, 64)
    assert rope_reference_hw([(1, 1), (2, 2), (3, 3)]) == (64, 64)
    assert rope_reference_hw([(1, 1), (2, 2), (9, 3)]) == (111, 37)


def test_vae_schedule_and_sizes_parsing():
    s = infinity_schedule("1:1", "0.06M")
    assert vae_schedule(s, False) == s
    assert vae_schedule(s, True).sizes == tuple((2 * h, 2 * w) for h, w in s.sizes)
    assert schedule_sizes([(1, 2, 3), (4, 5), 6]) == ((2, 3), (4, 5), (6, 6))
    with pytest.raises(ValueError, match="t=2"):
        schedule_sizes([(2, 4, 4)])


def test_codes_helpers_are_shared():
    assert si.bits_to_codes is bsq.bits_to_codes
    assert si.accumulate_codes is bsq.accumulate_codes
    assert si.next_scale_input is bsq.next_scale_input
    bits = torch.tensor([[[[1, 0, 1, 1]]]])  # (B, h, w, d)
    codes = bsq.bits_to_codes(bits)
    assert codes.shape == (1, 4, 1, 1, 1)
    torch.testing.assert_close(codes.flatten(), torch.tensor([0.5, -0.5, 0.5, 0.5]))
    assert torch.equal(bsq.unpack_bits(bsq.pack_bits(bits), 4), bits)
    assert bsq.pack_bits(bits).item() == 0b1011
