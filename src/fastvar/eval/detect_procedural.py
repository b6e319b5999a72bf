"""A detector for the built-in procedural images: GenEval's rules without a learned model.

Why: the embedded model draws coloured shapes on low-saturation backgrounds (fastvar.train.data), so
"is there a red circle, left of a blue square" can be answered exactly by segmentation: every saturated
connected component is one object, its shape is the best-matching template of ``fastvar.train.data``
(IoU of the component's box-normalised mask), its colour the palette colour nearest its mean RGB's hue
(default palette: the text-to-image scenes' red, yellow, green, blue of ``fastvar.train.t2i_data``, which
includes the class-conditional red and blue; ``palette=("red", "blue")`` is the class checker's own
``R > B`` rule). That lets the whole
GenEval pipeline (generation layout, thresholds, counting, colour, position, summary) run and be tested
offline on real generated images.

The score of a detection is its template IoU with a one-pixel tolerance (1.0: the component is exactly
the shape, up to how its edge pixels were rounded), so GenEval's confidence thresholds keep their meaning:
0.3 drops blobs that fit no shape, 0.9 (counting) keeps only cleanly drawn shapes. Why the tolerance: a
plain IoU of a thresholded, anti-aliased render loses up to one pixel on every edge, which for a thin
ring or a cross at 128 px costs ~0.1 IoU, so perfect renders scored 0.86-0.95 and failed counting's 0.9.
The shape itself is still the best match of the plain template IoU (:func:`fastvar.train.data.template_ious`,
the class checker's rule), so which shape a component is does not change.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from ..train.data import MIN_AREA_FRAC, SHAPES, _unit_mask, saturated, template_ious
from ..train.t2i_data import T2I_COLOURS, nearest_colour
from .geneval import Detection


@functools.lru_cache(maxsize=2048)
def _templates_at(h: int, w: int, supersample: int = 4) -> np.ndarray:
    """Binary masks (len(SHAPES), h, w) of every shape filling an h x w box (a pixel is in when half covered)."""
    ys = (np.arange(h * supersample) + 0.5) / (h * supersample)
    xs = (np.arange(w * supersample) + 0.5) / (w * supersample)
    v, u = np.meshgrid(ys, xs, indexing="ij")
    cover = [_unit_mask(s, u, v).astype(np.float32).reshape(h, supersample, w, supersample).mean(axis=(1, 3))
             for s in SHAPES]
    return np.stack(cover) >= 0.5


def tolerant_iou(comp: np.ndarray, shape: str, tol: int = 1) -> float:
    """IoU of a component mask with ``shape`` drawn in the component's box, pixels within ``tol`` of the
    template's edge not counted as disagreement (1.0 for any rounding of an exact render's edge)."""
    from scipy import ndimage

    ys, xs = np.nonzero(comp)
    crop = comp[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    t = _templates_at(*crop.shape)[SHAPES.index(shape)]
    band = ndimage.binary_dilation(t, iterations=tol) & ~ndimage.binary_erosion(t, iterations=tol)
    union = int((crop | t).sum())
    return 1.0 - int(((crop ^ t) & ~band).sum()) / max(union, 1)


class ProceduralDetector:
    """``detector(image) -> [Detection]`` for (H, W, 3) uint8 or float [0, 1] RGB images.

    ``min_area_frac``: components smaller than this fraction of the image are noise, not objects (the
    checker's own threshold by default). ``palette``: the colour names a detection may get (nearest hue).
    """

    def __init__(self, min_area_frac: float = MIN_AREA_FRAC, palette: Sequence[str] = T2I_COLOURS) -> None:
        self.min_area_frac = float(min_area_frac)
        self.palette = tuple(palette)
        nearest_colour((0.5, 0.5, 0.5), self.palette)  # an unknown colour name fails here, not per image

    def __call__(self, image: np.ndarray) -> list[Detection]:
        from scipy import ndimage

        a = np.asarray(image)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {a.shape}")
        a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else np.clip(a.astype(np.float32), 0.0, 1.0)
        labels, n = ndimage.label(saturated(a))
        dets: list[Detection] = []
        min_area = self.min_area_frac * a.shape[0] * a.shape[1]
        tol = max(1, round(min(a.shape[:2]) / 128))  # one pixel at 128 px
        for k, sl in enumerate(ndimage.find_objects(labels), 1):
            if sl is None:
                continue
            comp = labels == k
            if comp.sum() < min_area:
                continue
            shape = int(np.argmax(template_ious(comp)))
            box = (float(sl[1].start), float(sl[0].start), float(sl[1].stop), float(sl[0].stop))
            colour = nearest_colour(a[comp].mean(axis=0), self.palette)
            dets.append(Detection(SHAPES[shape], tolerant_iou(comp, SHAPES[shape], tol), box, comp, colour))
        return dets


__all__ = ["ProceduralDetector", "tolerant_iou"]
