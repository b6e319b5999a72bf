"""Built-in procedural dataset (coloured shapes on textured backgrounds) and its model-free checker.

The shipped offline model is trained on this data, and its quality gate is measured by the checker:
a generated image is classified by colour segmentation + template matching, so "did the model draw a
red triangle for class 2" is answered without any learned classifier. Images are a pure function of
``(seed, index)`` so the training stream is reproducible, resumable from a step number alone, and a
held-out set is just another seed.

Classes: ``label = colour * len(SHAPES) + shape`` (5 shapes x 2 colours = 10 classes). The shape is
axis-aligned (no rotation) so matching the segmented blob's bounding box against a template is enough;
backgrounds are low-saturation patterns (stripes, checks, blobs, gradients) with fine detail, so the
last scales of the schedule still carry information, while the foreground is the only saturated region.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = ("red", "blue")
NUM_CLASSES = len(SHAPES) * len(COLOURS)
_BASE_RGB = {"red": (0.86, 0.14, 0.12), "blue": (0.12, 0.26, 0.88)}
_RING_INNER = 0.55  # inner / outer radius of the ring
_CROSS_HALF = 0.18  # half arm width of the cross, relative to its bounding box
HELDOUT_SEED = 1_000_003  # seed of the held-out set used for recon PSNR (training uses other seeds)
_SUPERSAMPLE = 2


def class_name(label: int) -> str:
    return f"{COLOURS[label // len(SHAPES)]} {SHAPES[label % len(SHAPES)]}"


def _unit_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape membership for coordinates normalised to the shape's bounding box ([0,1]^2, v down)."""
    du, dv = u - 0.5, v - 0.5
    if shape == "circle":
        return du * du + dv * dv <= 0.25
    if shape == "square":
        return (np.abs(du) <= 0.5) & (np.abs(dv) <= 0.5)
    if shape == "triangle":  # apex at the top centre, base at the bottom
        return (v >= 0) & (v <= 1) & (np.abs(du) <= 0.5 * v)
    if shape == "cross":
        inside = (np.abs(du) <= 0.5) & (np.abs(dv) <= 0.5)
        return inside & ((np.abs(du) <= _CROSS_HALF) | (np.abs(dv) <= _CROSS_HALF))
    if shape == "ring":
        r2 = du * du + dv * dv
        return (r2 <= 0.25) & (r2 >= 0.25 * _RING_INNER**2)
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """A low-saturation textured background (n, n, 3) in [0, 1].

    Pattern lengths are given for a 128-px image (and scale with ``n``); the finest period is about one
    latent token (8 px), so a 16x16-token tokenizer can represent the detail, yet it only appears at
    the last scales of the schedule.
    """
    u = n / 128.0
    yy, xx = np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32), indexing="ij")
    grey = rng.uniform(0.3, 0.75)
    tint = rng.uniform(-0.05, 0.05, size=3)
    ang = rng.uniform(0, 2 * math.pi)
    grad = rng.uniform(-0.12, 0.12) * ((xx * math.cos(ang) + yy * math.sin(ang)) / n)
    kind = int(rng.integers(0, 4))
    amp = rng.uniform(0.03, 0.08)
    if kind == 0:  # stripes at a random angle
        period = rng.uniform(8, 18) * u
        a = rng.uniform(0, math.pi)
        pat = np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period + rng.uniform(0, 6.3))
    elif kind == 1:  # checkerboard
        cell = rng.uniform(8, 16) * u
        pat = np.where((np.floor(xx / cell) + np.floor(yy / cell)) % 2 == 0, 1.0, -1.0)
    elif kind == 2:  # soft blobs
        pat = np.zeros_like(xx)
        for _ in range(int(rng.integers(3, 7))):
            cx, cy, s = rng.uniform(0, n), rng.uniform(0, n), rng.uniform(6, 20) * u
            pat += rng.choice([-1.0, 1.0]) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
        pat = np.clip(pat, -1, 1)
    else:  # dot grid
        cell = rng.uniform(10, 18) * u
        fx, fy = (xx % cell) / cell - 0.5, (yy % cell) / cell - 0.5
        pat = np.where(fx * fx + fy * fy < 0.09, 1.0, -0.3)
    lum = grey + grad + amp * pat
    img = lum[..., None] + tint[None, None, :]
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def render(seed: int, index: int, size: int = 128, label: int | None = None) -> tuple[np.ndarray, int]:
    """Render image ``index`` of the stream ``seed``: (H, W, 3) float32 in [0, 1] and its label."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, 0x5EED])
    lab = int(rng.integers(0, NUM_CLASSES))
    if label is not None:
        lab = int(label)
    shape, colour = SHAPES[lab % len(SHAPES)], COLOURS[lab // len(SHAPES)]
    n = size * _SUPERSAMPLE
    bg = _background(rng, n)
    side = rng.uniform(0.36, 0.64) * n  # bounding-box side of the shape
    w = side * (0.86 if shape == "square" else 1.0)
    h = w if shape != "triangle" else side * 0.92
    margin = 0.05 * n
    x0 = rng.uniform(margin, n - margin - w)
    y0 = rng.uniform(margin, n - margin - h)
    yy, xx = np.meshgrid(np.arange(n, dtype=np.float32) + 0.5, np.arange(n, dtype=np.float32) + 0.5, indexing="ij")
    mask = _unit_mask(shape, (xx - x0) / w, (yy - y0) / h).astype(np.float32)
    base = np.asarray(_BASE_RGB[colour], dtype=np.float32) + rng.uniform(-0.06, 0.06, size=3).astype(np.float32)
    shade = 1.0 + rng.uniform(-0.12, 0.12) * ((yy - y0) / max(h, 1.0) - 0.5)  # soft top-down lighting
    fg = np.clip(base[None, None, :] * shade[..., None], 0.0, 1.0)
    img = bg * (1 - mask[..., None]) + fg * mask[..., None]
    img = img.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))  # anti-aliasing
    return img.astype(np.float32), lab


class ProceduralShapes(Dataset):
    """Map-style view of the procedural stream; ``__getitem__`` returns (CHW float in [-1, 1], label).

    ``length`` only bounds indexing (the stream is effectively infinite); images are generated on the
    fly, so the dataset costs no disk and every index is reproducible from ``seed``.
    """

    infinite = True

    def __init__(self, seed: int = 0, length: int = 1 << 30, image_size: int = 128) -> None:
        self.seed, self.length, self.image_size = int(seed), int(length), int(image_size)
        self.num_classes = NUM_CLASSES

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        img, lab = render(self.seed, index, self.image_size)
        return torch.from_numpy(img).permute(2, 0, 1).mul(2).sub(1), lab

    def batch(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        items = [self[i] for i in indices]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


# ----------------------------------------------------------------------------------------------- checker
_TEMPLATE_RES = 32
_MIN_SAT = 0.3  # foreground: max(rgb) - min(rgb) above this (backgrounds stay below ~0.12)
_MIN_AREA_FRAC = 0.01  # smaller blobs than this fraction of the image count as "no shape"
MIN_AREA_FRAC = _MIN_AREA_FRAC


def _templates() -> np.ndarray:
    c = (np.arange(_TEMPLATE_RES, dtype=np.float32) + 0.5) / _TEMPLATE_RES
    v, u = np.meshgrid(c, c, indexing="ij")
    return np.stack([_unit_mask(s, u, v).astype(np.float32) for s in SHAPES])


_TEMPLATES = _templates()


def saturated(a: np.ndarray) -> np.ndarray:
    """Foreground pixels of an (H, W, 3) image in [0, 1]: saturation above the threshold backgrounds stay under."""
    return (a.max(axis=2) - a.min(axis=2)) > _MIN_SAT


def component_colour(a: np.ndarray, comp: np.ndarray) -> int:
    """Colour index (into COLOURS) of the pixels ``comp`` of an (H, W, 3) image: red when R > B, else blue."""
    r, _, b = (a[..., ch][comp].mean() for ch in range(3))
    return 0 if r > b else 1


def template_ious(comp: np.ndarray) -> np.ndarray:
    """IoU of a component mask (cropped to its bounding box, resized) with each shape template, in SHAPES order.

    The ring's hole is not part of the component, so the crop is the component only (never filled).
    """
    ys, xs = np.nonzero(comp)
    crop = comp[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
    t = F.interpolate(torch.from_numpy(crop)[None, None], size=(_TEMPLATE_RES, _TEMPLATE_RES), mode="area")
    m = t[0, 0].numpy()
    inter = np.minimum(_TEMPLATES, m[None]).sum(axis=(1, 2))
    union = np.maximum(_TEMPLATES, m[None]).sum(axis=(1, 2))
    return inter / np.maximum(union, 1e-6)


def classify(img: Tensor | np.ndarray) -> dict:
    """Classify one image (CHW or HWC, float in [0, 1]) as (shape, colour) without a learned model.

    The foreground is the largest connected region of saturated pixels; its colour decides red/blue
    and its mask, cropped to its bounding box and resized, is matched to each shape template by IoU.
    Returns ``{"label": int or -1, "shape": str|None, "colour": str|None, "iou": float}``.
    """
    from scipy import ndimage

    a = img.detach().float().cpu().numpy() if isinstance(img, Tensor) else np.asarray(img, dtype=np.float32)
    if a.ndim != 3:
        raise ValueError(f"classify expects one image (3 dims), got shape {a.shape}")
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    a = np.clip(a, 0.0, 1.0)
    sat = a.max(axis=2) - a.min(axis=2)
    lab, n = ndimage.label(saturated(a))
    none = {"label": -1, "shape": None, "colour": None, "iou": 0.0}
    if n == 0:
        return none
    areas = ndimage.sum_labels(np.ones_like(sat), lab, index=np.arange(1, n + 1))
    k = int(np.argmax(areas)) + 1
    if areas[k - 1] < _MIN_AREA_FRAC * sat.size:
        return none
    comp = lab == k
    colour = component_colour(a, comp)
    iou = template_ious(comp)
    shape = int(np.argmax(iou))
    return {
        "label": colour * len(SHAPES) + shape,
        "shape": SHAPES[shape],
        "colour": COLOURS[colour],
        "iou": float(iou[shape]),
    }


def classify_batch(imgs: Tensor) -> list[int]:
    """Labels (-1 = nothing recognisable) for a (B, 3, H, W) batch in [0, 1]."""
    return [classify(x)["label"] for x in imgs]
