"""Infinity's resolution schedules: aspect-ratio templates, pixel budgets and the RoPE reference size.

Infinity does not use one schedule per image size like VAR: each supported aspect ratio has one list of
13 token-map sizes (16x VAE stride), and a pixel budget ("pn") is a prefix of it — 7 scales for
'0.06M' (~256²), 10 for '0.25M' (~512²), 12 for '0.60M', all 13 for '1M' (~1024²). The tables below
are the official templates (``infinity/utils/dynamic_resolution.py``), restated as data.

Conventions (both are what people already type, so they are kept rather than unified):

* a **float** aspect is the official ``h_div_w`` (height / width): 1.333 is a portrait 3:4 image;
* a **string** aspect is the usual photographic ``"W:H"``: ``"4:3"`` is landscape (h_div_w 0.75),
  ``"1:3"`` is a tall portrait (h_div_w 3.0). Official template keys as strings (``"1.333"``) also work.

'2K' is **our zero-shot extension**, not an official budget (the official code raises KeyError for it):
the 1M template plus two larger scales, 1.5x (rounded half up) and 2x the 1M last scale (1:1: ..., 48,
64, 96, 128 -> 2048²; other ratios get twice their 1M size per side, ~4.2 Mpixel). Two and not more
because the transformer's ``lvl_embed`` has 15 rows (13 + 2), so no scale index past 14 has a learned
level embedding; the last one is exactly 2x so the image is exactly twice the 1M size per side, and
the intermediate 1.5x keeps the per-scale growth ratio (<= 1.5) of the template's tail.
Released models were never trained at these sizes: quality is whatever the model extrapolates to.

The codes helpers used by the inference loop live in :mod:`fastvar.tokenizers.bsq` and are re-exported
here (``bits_to_codes``, ``accumulate_codes``, ``next_scale_input``) because the scale loop imports them
together with the schedule helpers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from .schedules import Schedule
from .tokenizers.bsq import accumulate_codes, bits_to_codes, next_scale_input

__all__ = [
    "INFINITY_ASPECTS", "INFINITY_PNS", "VAE_STRIDE", "accumulate_codes", "aspect_to_h_div_w", "bits_to_codes",
    "infinity_image_size", "infinity_schedule", "is_template_schedule", "nearest_aspect", "next_scale_input",
    "rope_reference_hw", "schedule_sizes", "vae_schedule",
]

VAE_STRIDE = 16

# Official templates for h_div_w >= 1: (h, w) of the 13 scales; the inverse ratios swap h and w.
_TEMPLATES_PORTRAIT: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: (
        (1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16),
        (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64),
    ),
    1.250: (
        (1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16),
        (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56),
    ),
    1.333: (
        (1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15),
        (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54),
    ),
    1.500: (
        (1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14),
        (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52),
    ),
    1.750: (
        (1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12),
        (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48),
    ),
    2.000: (
        (1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11),
        (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45),
    ),
    2.500: (
        (1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10),
        (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40),
    ),
    3.000: (
        (1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9),
        (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37),
    ),
}


def _build_templates() -> dict[float, tuple[tuple[int, int], ...]]:
    out = {}
    for r, hws in _TEMPLATES_PORTRAIT.items():
        out[r] = hws
        if r != 1.0:
            # the official key of the inverse ratio is 1/r truncated to 3 decimals (0.666, 0.571, ...)
            out[int(1 / r * 1000) / 1000] = tuple((w, h) for h, w in hws)
    return out


_TEMPLATES = _build_templates()

# number of template scales per official pixel budget
_PN_SCALES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
# 2K (ours): extra scales as multiples of the 1M last scale, see the module docstring
_EXTRA_2K = (Fraction(3, 2), Fraction(2))

INFINITY_PNS: tuple[str, ...] = (*_PN_SCALES, "2K")

# "W:H" names of the templates -> official h_div_w key
INFINITY_ASPECTS: dict[str, float] = {
    "1:1": 1.0, "4:5": 1.25, "3:4": 1.333, "2:3": 1.5, "4:7": 1.75, "1:2": 2.0, "2:5": 2.5, "1:3": 3.0,
    "5:4": 0.8, "4:3": 0.75, "3:2": 0.666, "7:4": 0.571, "2:1": 0.5, "5:2": 0.4, "3:1": 0.333,
}

# an aspect must be this close to a template (the official keys are truncated to 3 decimals)
_ASPECT_TOL = 2e-3


def aspect_to_h_div_w(aspect: str | float) -> float:
    """The h/w value of an aspect: float = h_div_w as is, ``"W:H"`` string, or a number as a string."""
    if isinstance(aspect, str):
        s = aspect.strip()
        if ":" in s:
            w, h = (float(v) for v in s.split(":"))
            if w <= 0 or h <= 0:
                raise ValueError(f"aspect {aspect!r}: width and height must be positive")
            return h / w
        return float(s)
    return float(aspect)


def nearest_aspect(h_div_w: float) -> float:
    """The official template key nearest to ``h_div_w`` (how the official scripts snap arbitrary sizes)."""
    return min(_TEMPLATES, key=lambda r: abs(r - float(h_div_w)))


def _template_key(aspect: str | float) -> float:
    if isinstance(aspect, str) and aspect.strip() in INFINITY_ASPECTS:
        return INFINITY_ASPECTS[aspect.strip()]
    r = aspect_to_h_div_w(aspect)
    key = nearest_aspect(r)
    if abs(key - r) > _ASPECT_TOL:
        names = ", ".join(f"{n} (h/w {v})" for n, v in INFINITY_ASPECTS.items())
        raise ValueError(
            f"aspect {aspect!r} (h/w {r:.4f}) is not an Infinity template; supported (strings are W:H, floats h/w): "
            f"{names}. Use nearest_aspect({r:.4f}) = {key} to snap to the closest one, as the official scripts do."
        )
    return key


def _sizes_for(key: float, pn: str) -> tuple[tuple[int, int], ...]:
    hws = _TEMPLATES[key]
    if pn in _PN_SCALES:
        return hws[: _PN_SCALES[pn]]
    if pn == "2K":
        h, w = hws[-1]
        half = Fraction(1, 2)  # round half up (exact), not Python's round-half-to-even
        extra = tuple((math.floor(h * f + half), math.floor(w * f + half)) for f in _EXTRA_2K)
        return hws + extra
    raise ValueError(f"pixel budget {pn!r} is not supported; choose one of {', '.join(INFINITY_PNS)}")


def infinity_schedule(aspect: str | float, pn: str) -> Schedule:
    """The (h, w) token-map sizes for an aspect ratio and a pixel budget (the official t=1 is dropped).

    ``aspect``: ``"W:H"`` string (``"1:1"``, ``"16:9"`` is rejected: not a template), official h_div_w
    float (``1.333``), or a template key string. ``pn``: one of :data:`INFINITY_PNS`.
    """
    return Schedule(_sizes_for(_template_key(aspect), pn))


def infinity_image_size(aspect: str | float, pn: str) -> tuple[int, int]:
    """(H, W) in pixels of the image a schedule decodes to (last scale x the 16x VAE stride)."""
    h, w = _sizes_for(_template_key(aspect), pn)[-1]
    return h * VAE_STRIDE, w * VAE_STRIDE


def is_template_schedule(schedule: Schedule | Sequence) -> bool:
    """Whether ``schedule`` is an official budget of an aspect template (or our 2K extension), as opposed
    to a custom schedule such as a small trained model's (presets treat the two differently)."""
    sizes = schedule_sizes(schedule)
    return any(sizes == _sizes_for(key, pn) for key in _TEMPLATES for pn in INFINITY_PNS)


def schedule_sizes(schedule: Schedule | Sequence) -> tuple[tuple[int, int], ...]:
    """(h, w) per scale from a Schedule, (h, w) pairs, official (t, h, w) triples (t must be 1) or sides."""
    sizes = getattr(schedule, "sizes", schedule)
    out = []
    for s in sizes:
        if isinstance(s, int):
            out.append((s, s))
            continue
        s = tuple(int(v) for v in s)
        if len(s) == 3:
            if s[0] != 1:
                raise ValueError(f"scale {s} has t={s[0]}; only images (t=1) are supported")
            s = s[1:]
        if len(s) != 2:
            raise ValueError(f"scale {s} is neither (h, w) nor (t, h, w)")
        out.append(s)
    if not out:
        raise ValueError("empty schedule")
    return tuple(out)


def vae_schedule(schedule: Schedule | Sequence, spatial_patchify: bool) -> Schedule:
    """The schedule the VAE sees: doubled when the transformer packs 2x2 latent cells into one token.

    With ``apply_spatial_patchify`` (the 8x VAE ``infinity_vae_d56_f8_14_patchify``) a transformer token
    of scale (h, w) carries the 4·d bits of a 2x2 block of the (2h, 2w) latent map.
    """
    sizes = schedule_sizes(schedule)
    return Schedule(tuple((2 * h, 2 * w) for h, w in sizes) if spatial_patchify else sizes)


def rope_reference_hw(schedule_or_aspect: Schedule | Sequence | str | float) -> tuple[int, int]:
    """(H_last, W_last) of the **1M** schedule with the same aspect ratio (``rope2d_normalized_by_hw=2``).

    Infinity stretches every scale's grid onto this size for its RoPE positions, at every pixel budget
    (the official table is built from the 1M schedule and shared by all budgets of the ratio), so a
    0.06M 1:1 schedule still uses 64x64. A schedule's ratio is the template nearest to its last scale's
    h/w: every official budget ends within 0.01 of its template (the official table asserts it) and the
    templates are >= 0.05 apart, so this finds the official table's ratio, and it also serves custom
    schedules (the official code only knows its exact template schedules). For the zero-shot '2K'
    schedules this stays the 1M size, so their two extra scales reuse positions (a 128-side scale maps
    onto the 64 positions of the 1M grid, two neighbouring tokens per position).
    """
    if isinstance(schedule_or_aspect, (str, float, int)) and not isinstance(schedule_or_aspect, bool):
        return _TEMPLATES[_template_key(schedule_or_aspect)][-1]
    h, w = schedule_sizes(schedule_or_aspect)[-1]
    return _TEMPLATES[nearest_aspect(h / w)][-1]
