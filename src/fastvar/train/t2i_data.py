"""Procedural text-to-image data: captioned scenes of 1-4 coloured shapes, in GenEval's six categories.

Why procedural: the shipped text-to-image model (``embedded-t2i``) must be trainable offline and its
GenEval score measurable without a learned detector. Every scene is drawn from the same shapes and
backgrounds as the class-conditional dataset (:mod:`fastvar.train.data`), so the procedural detector
(:mod:`fastvar.eval.detect_procedural`) recovers each object's shape, colour and box exactly, and
GenEval's rules (:mod:`fastvar.eval.geneval`) score a generated image against its caption.

A scene is a pure function of ``(seed, index)``: the training stream resumes from a step number alone
and a held-out set is another seed. Captions follow GenEval's categories (its ``tag``):

* ``single_object``: "a circle" (the colour is free, as GenEval's "a photo of a bench");
* ``two_object``: "a circle and a square" (two different shapes);
* ``counting``: "three rings" or "three blue rings" (2-4 objects of one shape and one colour);
* ``colors``: "a green square";
* ``position``: "a circle to the left of a square" or "a red circle to the left of a blue square"
  (left/right/above/below; placed so that GenEval's position rule sees that relation and no other,
  with margin to spare for a blurry model);
* ``color_attr``: "a red circle and a blue square" (different shapes, different colours).

Objects never overlap and keep a gap of about one latent token, so they stay separate connected
components after a blurry tokenizer; they are at least ~30 px at 128 px so the shape templates still
tell them apart. The t2i palette (red, yellow, green, blue) is spread over the hue circle so a colour
survives a blurry VAE: the detector assigns the nearest hue (see :func:`nearest_colour`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import UsageError
from .data import COLOURS as VAR_COLOURS
from .data import SHAPES, _background, _unit_mask

T2I_SHAPES = SHAPES
T2I_COLOURS = ("red", "yellow", "green", "blue")
T2I_RGB = {
    "red": (0.86, 0.14, 0.12),
    "yellow": (0.92, 0.80, 0.12),
    "green": (0.12, 0.70, 0.18),
    "blue": (0.12, 0.26, 0.88),
}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {2: "two", 3: "three", 4: "four"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses", "ring": "rings"}
_RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
# Side of an object's box as a fraction of the image, by number of objects in the scene (bigger when alone).
_SIDE_RANGE = {1: (0.36, 0.60), 2: (0.28, 0.42), 3: (0.26, 0.36), 4: (0.24, 0.32)}
_GAP = 0.07  # minimum gap between two objects' boxes (fraction of the image): ~1 latent token at 128 px
_EDGE = 0.04  # minimum distance from the image border
_POS_RATIO = 0.35  # position scenes: |secondary offset| <= this * |primary offset| of the box centres
_SUPERSAMPLE = 2
_COLOUR_JITTER = 0.04
DEFAULT_SEED = 0
HELDOUT_SEED = 2_000_003  # seed of held-out scenes (training runs use other seeds)


# ------------------------------------------------------------------------------------------------ colours
def _hue(rgb: Sequence[float]) -> float:
    """Hue angle in degrees of an RGB triple (HSV hue; 0 for greys)."""
    r, g, b = (float(c) for c in rgb)
    mx, mn = max(r, g, b), min(r, g, b)
    d = mx - mn
    if d <= 1e-8:
        return 0.0
    if mx == r:
        h = ((g - b) / d) % 6.0
    elif mx == g:
        h = (b - r) / d + 2.0
    else:
        h = (r - g) / d + 4.0
    return 60.0 * h


_T2I_HUES = {c: _hue(rgb) for c, rgb in T2I_RGB.items()}


def nearest_colour(rgb: Sequence[float], palette: Sequence[str] = T2I_COLOURS) -> str:
    """Name of the palette colour nearest in hue to a (mean) RGB colour.

    Why hue: blur mixes an object with the near-grey background, which lowers saturation and shifts
    brightness but keeps the hue. For the class-conditional palette (red, blue) the rule stays the
    checker's own ``R > B`` (:func:`fastvar.train.data.component_colour`), so its scores do not move.
    """
    palette = tuple(palette)
    if palette == VAR_COLOURS:
        return "red" if float(rgb[0]) > float(rgb[2]) else "blue"
    unknown = [c for c in palette if c not in _T2I_HUES]
    if unknown:
        raise UsageError(f"palette colour(s) {unknown} unknown; use colours of {list(T2I_COLOURS)}")
    h = _hue(rgb)
    return min(palette, key=lambda c: min(abs(h - _T2I_HUES[c]), 360.0 - abs(h - _T2I_HUES[c])))


# ------------------------------------------------------------------------------------------------ scenes
@dataclass(frozen=True)
class SceneSpec:
    """What a caption says: objects as (shape, colour or None when the caption leaves it free).

    ``position`` scenes hold two objects, ``relation`` saying where the first is relative to the second;
    ``counting`` scenes hold ``count`` copies of one (shape, colour).
    """

    tag: str
    objects: tuple[tuple[str, str | None], ...]
    relation: str | None = None

    def caption(self) -> str:
        def np_(shape: str, colour: str | None) -> str:
            return f"a {colour} {shape}" if colour else f"a {shape}"

        o = self.objects
        if self.tag in ("single_object", "colors"):
            return np_(*o[0])
        if self.tag in ("two_object", "color_attr"):
            return f"{np_(*o[0])} and {np_(*o[1])}"
        if self.tag == "counting":
            shape, colour = o[0]
            words = [NUMBERS[len(o)]] + ([colour] if colour else []) + [PLURALS[shape]]
            return " ".join(words)
        if self.tag == "position":
            return f"{np_(*o[0])} {_RELATION_WORDS[str(self.relation)]} {np_(*o[1])}"
        raise ValueError(f"unknown tag {self.tag!r}")

    def metadata(self) -> dict[str, Any]:
        """GenEval metadata (``tag``, ``include``, ``exclude``?, ``prompt``) that checks this caption."""
        def clause(shape: str, colour: str | None, count: int = 1) -> dict[str, Any]:
            c: dict[str, Any] = {"class": shape, "count": count}
            if colour:
                c["color"] = colour
            return c

        o = self.objects
        meta: dict[str, Any] = {"tag": self.tag}
        if self.tag == "counting":
            meta["include"] = [clause(o[0][0], o[0][1], len(o))]
            meta["exclude"] = [{"class": o[0][0], "count": len(o) + 1}]
        elif self.tag == "position":  # GenEval: the target first, the positioned object refers to group 0
            meta["include"] = [clause(*o[1]), {**clause(*o[0]), "position": [self.relation, 0]}]
        else:
            meta["include"] = [clause(*x) for x in o]
        meta["prompt"] = self.caption()
        return meta


_NP = rf"a (?:({'|'.join(T2I_COLOURS)}) )?({'|'.join(T2I_SHAPES)})"


def parse_caption(caption: str) -> SceneSpec:
    """The scene a caption of the grammar describes (inverse of :meth:`SceneSpec.caption`).

    Why: the prompt file and any user prompt can be checked against what the model was trained on, and a
    caption's GenEval metadata follows from it. Raises :class:`UsageError` for text outside the grammar.
    """
    import re

    text = " ".join(str(caption).lower().split())
    plural_of = {p: s for s, p in PLURALS.items()}
    number_of = {w: k for k, w in NUMBERS.items()}
    numbers, colours, plurals = "|".join(number_of), "|".join(T2I_COLOURS), "|".join(plural_of)
    m = re.fullmatch(rf"({numbers}) (?:({colours}) )?({plurals})", text)
    if m:
        return SceneSpec("counting", ((plural_of[m[3]], m[2]),) * number_of[m[1]])
    rels = {w: r for r, w in _RELATION_WORDS.items()}
    relations = "|".join(rels)
    m = re.fullmatch(rf"{_NP} ({relations}) {_NP}", text)
    if m and m[2] != m[5] and (m[1] is None) == (m[4] is None):
        return SceneSpec("position", ((m[2], m[1]), (m[5], m[4])), rels[m[3]])
    m = re.fullmatch(rf"{_NP} and {_NP}", text)
    if m and m[2] != m[4]:
        if m[1] is None and m[3] is None:
            return SceneSpec("two_object", ((m[2], None), (m[4], None)))
        if m[1] is not None and m[3] is not None and m[1] != m[3]:
            return SceneSpec("color_attr", ((m[2], m[1]), (m[4], m[3])))
    m = re.fullmatch(_NP, text)
    if m:
        return SceneSpec("colors" if m[1] else "single_object", ((m[2], m[1]),))
    raise UsageError(f"caption {caption!r} is not in the procedural t2i grammar; use e.g. 'a red circle', "
                     "'two blue rings', 'a circle and a square', 'a red circle to the left of a blue square'")


def t2i_vocabulary() -> list[str]:
    """Every word a caption can use, sorted (for the word-level tokenizer's vocabulary)."""
    words = {"a", "and"} | set(T2I_SHAPES) | set(T2I_COLOURS) | set(PLURALS.values()) | set(NUMBERS.values())
    for r in _RELATION_WORDS.values():
        words.update(r.split())
    return sorted(words)


def _weights(categories: Mapping[str, float] | Sequence[str] | None) -> np.ndarray:
    if categories is None:
        return np.full(len(CATEGORIES), 1.0 / len(CATEGORIES))
    if isinstance(categories, str):
        categories = [categories]
    items = dict(categories) if isinstance(categories, Mapping) else {c: 1.0 for c in categories}
    unknown = [c for c in items if c not in CATEGORIES]
    if unknown:
        raise UsageError(f"categories: unknown {unknown}; use some of {list(CATEGORIES)}")
    w = np.array([float(items.get(c, 0.0)) for c in CATEGORIES])
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise UsageError(f"categories: weights {items} must be >= 0 with a positive sum")
    return w / w.sum()


def sample_spec(rng: np.random.Generator, weights: np.ndarray) -> SceneSpec:
    """One random caption of a category drawn with ``weights`` (in :data:`CATEGORIES` order)."""
    tag = CATEGORIES[int(rng.choice(len(CATEGORIES), p=weights))]
    ns, nc = len(T2I_SHAPES), len(T2I_COLOURS)

    def shapes2() -> tuple[str, str]:
        a, b = rng.choice(ns, size=2, replace=False)
        return T2I_SHAPES[int(a)], T2I_SHAPES[int(b)]

    if tag in ("single_object", "colors"):
        colour = T2I_COLOURS[int(rng.integers(nc))] if tag == "colors" else None
        return SceneSpec(tag, ((T2I_SHAPES[int(rng.integers(ns))], colour),))
    if tag == "two_object":
        s1, s2 = shapes2()
        return SceneSpec(tag, ((s1, None), (s2, None)))
    if tag == "color_attr":
        s1, s2 = shapes2()
        c1, c2 = rng.choice(nc, size=2, replace=False)
        return SceneSpec(tag, ((s1, T2I_COLOURS[int(c1)]), (s2, T2I_COLOURS[int(c2)])))
    if tag == "counting":
        n = int(rng.integers(2, 5))
        shape = T2I_SHAPES[int(rng.integers(ns))]
        colour = T2I_COLOURS[int(rng.integers(nc))] if rng.random() < 0.5 else None
        return SceneSpec(tag, ((shape, colour),) * n)
    s1, s2 = shapes2()  # position
    rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
    if rng.random() < 0.5:
        c1, c2 = (T2I_COLOURS[int(c)] for c in rng.integers(nc, size=2))
        return SceneSpec(tag, ((s1, c1), (s2, c2)), rel)
    return SceneSpec(tag, ((s1, None), (s2, None)), rel)


def _box_size(shape: str, side: float) -> tuple[float, float]:
    """(w, h) of a shape's box: the class-conditional renderer's aspect ratios (narrow square, flat triangle)."""
    w = side * (0.86 if shape == "square" else 1.0)
    h = side * 0.92 if shape == "triangle" else w
    return w, h


def _apart(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    """Boxes (x0, y0, w, h) separated by at least ``gap`` along some axis."""
    return (a[0] + a[2] + gap <= b[0] or b[0] + b[2] + gap <= a[0]
            or a[1] + a[3] + gap <= b[1] or b[1] + b[3] + gap <= a[1])


def relation_holds(a: tuple[float, ...], b: tuple[float, ...], relation: str, ratio: float = _POS_RATIO) -> bool:
    """Box ``a`` (x0, y0, w, h) is clearly ``relation`` box ``b``: separated along the relation's axis, and the
    centres' offset across it at most ``ratio`` times the offset along it.

    With ratio <= 0.5 GenEval's rule (dead zone 0.1 x the summed sizes, then a normalised component
    beyond 0.5) reports exactly this relation: the primary component stays >= 0.8 / sqrt(1 + ratio**2).
    """
    dx = (a[0] + a[2] / 2) - (b[0] + b[2] / 2)
    dy = (a[1] + a[3] / 2) - (b[1] + b[3] / 2)
    if relation in ("left of", "right of"):
        sep = a[0] + a[2] <= b[0] if relation == "left of" else b[0] + b[2] <= a[0]
        return sep and abs(dy) <= ratio * abs(dx)
    sep = a[1] + a[3] <= b[1] if relation == "above" else b[1] + b[3] <= a[1]
    return sep and abs(dx) <= ratio * abs(dy)


def _layout(rng: np.random.Generator, spec: SceneSpec, n: float) -> list[tuple[float, float, float, float]]:
    """Non-overlapping boxes (x0, y0, w, h) in pixels of an ``n``-px image, one per object of ``spec``.

    Rejection sampling, all from ``rng`` (so deterministic); after too many misses the sizes shrink a
    little and it starts again, so it always ends.
    """
    k = len(spec.objects)
    lo, hi = _SIDE_RANGE[k]
    sides = rng.uniform(lo, hi, size=k) * n
    edge, gap = _EDGE * n, _GAP * n
    for _ in range(50):
        sizes = [_box_size(s, side) for (s, _), side in zip(spec.objects, sides)]
        boxes: list[tuple[float, float, float, float]] = []
        for _tries in range(400):
            boxes = []
            for w, h in sizes:
                for _obj in range(60):
                    b = (rng.uniform(edge, n - edge - w), rng.uniform(edge, n - edge - h), w, h)
                    if all(_apart(b, o, gap) for o in boxes):
                        boxes.append(b)
                        break
                else:
                    break
            if len(boxes) == k and (spec.relation is None or relation_holds(boxes[0], boxes[1], spec.relation)):
                return boxes
        sides = sides * 0.92
    raise RuntimeError(f"could not lay out {spec}")  # unreachable in practice: sizes shrink every round


def render_scene(seed: int, index: int, size: int = 128,
                 categories: Mapping[str, float] | Sequence[str] | None = None, image: bool = True) -> dict[str, Any]:
    """Scene ``index`` of the stream ``seed``: image (H, W, 3) float32 in [0, 1], caption, objects, tag, spec.

    ``objects``: ``[(shape, colour, (x1, y1, x2, y2))]`` in output pixels (caption order; for counting
    scenes every copy). A pure function of its arguments. ``image=False`` skips drawing (the layout and
    caption are decided first, so they are the same either way).
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, 0x7217])
    spec = sample_spec(rng, _weights(categories))
    # colours left free by the caption: a counting scene keeps one colour for all its copies
    free = T2I_COLOURS[int(rng.integers(len(T2I_COLOURS)))]
    colours = [c if c else (free if spec.tag == "counting" else T2I_COLOURS[int(rng.integers(len(T2I_COLOURS)))])
               for _, c in spec.objects]
    n = size * _SUPERSAMPLE
    boxes = _layout(rng, spec, float(n))
    s = float(_SUPERSAMPLE)
    objects = [(shape, colour, (float(x0) / s, float(y0) / s, float(x0 + w) / s, float(y0 + h) / s))
               for (shape, _), colour, (x0, y0, w, h) in zip(spec.objects, colours, boxes)]
    out: dict[str, Any] = {"caption": spec.caption(), "objects": objects, "tag": spec.tag, "spec": spec}
    if not image:
        return out
    img = _background(rng, n)
    for (shape, _), colour, (x0, y0, w, h) in zip(spec.objects, colours, boxes):
        # only the box's pixels can change: draw there (same result as over the whole image, much cheaper)
        r0, r1 = max(int(math.floor(y0)) - 1, 0), min(int(math.ceil(y0 + h)) + 1, n)
        c0, c1 = max(int(math.floor(x0)) - 1, 0), min(int(math.ceil(x0 + w)) + 1, n)
        yy, xx = np.meshgrid(np.arange(r0, r1, dtype=np.float32) + 0.5, np.arange(c0, c1, dtype=np.float32) + 0.5,
                             indexing="ij")
        mask = _unit_mask(shape, (xx - x0) / w, (yy - y0) / h).astype(np.float32)[..., None]
        base = np.asarray(T2I_RGB[colour], np.float32) + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, 3).astype(np.float32)
        shade = 1.0 + rng.uniform(-0.12, 0.12) * ((yy - y0) / max(h, 1.0) - 0.5)
        fg = np.clip(base[None, None, :] * shade[..., None], 0.0, 1.0)
        img[r0:r1, c0:c1] = img[r0:r1, c0:c1] * (1 - mask) + fg * mask
    out["image"] = img.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3)).astype(np.float32)
    return out


class ProceduralT2I(Dataset):
    """Map-style view of the captioned stream: ``ds[i]`` -> ``{"image": (3, size, size) in [-1, 1],
    "caption", "objects", "tag"}``.

    ``categories``: the mixture of GenEval categories (names, or a mapping name -> weight; default all
    six equally). ``length`` only bounds indexing: scenes are made on the fly from ``(seed, index)``.
    """

    infinite = True

    def __init__(self, seed: int = DEFAULT_SEED, size: int = 128,
                 categories: Mapping[str, float] | Sequence[str] | None = None, length: int = 1 << 30) -> None:
        if int(size) < 32 or int(size) % 8:
            raise UsageError(f"size {size}: procedural t2i scenes need a multiple of 8, at least 32 (e.g. 128)")
        self.seed, self.size, self.length = int(seed), int(size), int(length)
        self.categories = categories
        self.weights = _weights(categories)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        s = render_scene(self.seed, index, self.size, self.categories)
        x = torch.from_numpy(s["image"]).permute(2, 0, 1).mul(2).sub(1)
        return {"image": x, "caption": s["caption"], "objects": s["objects"], "tag": s["tag"]}

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, list[str]]:
        """(B, 3, size, size) images in [-1, 1] and their captions."""
        items = [self[int(i)] for i in indices]
        return torch.stack([it["image"] for it in items]), [it["caption"] for it in items]


# ------------------------------------------------------------------------------------------------ prompt file
PROMPT_FILE = Path(__file__).resolve().parent.parent / "assets" / "geneval_procedural_t2i.jsonl"


def _all_specs(tag: str) -> list[SceneSpec]:
    """Every caption of a category in GenEval's own style (colour only where GenEval's template has one)."""
    S, C = T2I_SHAPES, T2I_COLOURS
    pairs = [(a, b) for a in S for b in S if a != b]
    if tag == "single_object":
        return [SceneSpec(tag, ((s, None),)) for s in S]
    if tag == "colors":
        return [SceneSpec(tag, ((s, c),)) for s in S for c in C]
    if tag == "two_object":
        return [SceneSpec(tag, ((a, None), (b, None))) for a, b in pairs]
    if tag == "counting":
        return [SceneSpec(tag, ((s, None),) * k) for k in NUMBERS for s in S]
    if tag == "position":
        return [SceneSpec(tag, ((a, None), (b, None)), r) for r in RELATIONS for a, b in pairs]
    if tag == "color_attr":
        return [SceneSpec(tag, ((a, ca), (b, cb))) for a, b in pairs for ca in C for cb in C if ca != cb]
    raise ValueError(tag)


def geneval_prompts(per_category: int = 15, seed: int = 0) -> list[dict[str, Any]]:
    """GenEval metadata lines for the procedural t2i model: ``per_category`` prompts of each of the six tasks.

    Distinct prompts where the category has enough (a fixed shuffle of all captions, seeded); categories
    with fewer captions (single_object has one per shape) cycle through all of them, so every task weighs
    the same in the overall score and every shape appears about equally often.
    """
    if per_category < 1:
        raise UsageError(f"per_category {per_category}: must be >= 1")
    rng = np.random.default_rng([int(seed), 0x6E7A])
    out = []
    for tag in CATEGORIES:
        specs = _all_specs(tag)
        order = [specs[int(i)] for i in rng.permutation(len(specs))]
        if len(order) >= per_category:
            # spread over shapes: take the shuffled captions round-robin by their first shape
            by_shape: dict[str, list[SceneSpec]] = {}
            for sp in order:
                by_shape.setdefault(sp.objects[0][0], []).append(sp)
            picked: list[SceneSpec] = []
            while len(picked) < per_category:
                for s in T2I_SHAPES:
                    if by_shape.get(s) and len(picked) < per_category:
                        picked.append(by_shape[s].pop(0))
        else:
            picked = [order[i % len(order)] for i in range(per_category)]
        out.extend(sp.metadata() for sp in picked)
    return out


def write_prompt_file(path: str | Path = PROMPT_FILE, per_category: int = 15, seed: int = 0) -> Path:
    """Write :func:`geneval_prompts` as GenEval JSONL (one object a line), atomically."""
    from ..checkpoints import atomic_output

    text = "".join(json.dumps(m) + "\n" for m in geneval_prompts(per_category, seed))
    p = Path(path)
    with atomic_output(p, "w") as f:
        f.write(text)
    return p


__all__ = ["CATEGORIES", "HELDOUT_SEED", "PROMPT_FILE", "ProceduralT2I", "RELATIONS", "SceneSpec", "T2I_COLOURS",
           "T2I_RGB", "T2I_SHAPES", "geneval_prompts", "nearest_colour", "parse_caption", "relation_holds", "render_scene",
           "sample_spec", "t2i_vocabulary", "write_prompt_file"]


if __name__ == "__main__":  # regenerate the shipped prompt file: python -m fastvar.train.t2i_data
    print(write_prompt_file())
