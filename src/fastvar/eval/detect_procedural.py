"""A detector for the built-in procedural images: GenEval's rules without a learned model.

Why: the embedded model draws coloured shapes on low-saturation backgrounds (fastvar.train.data), so
"is there a red circle, left of a blue square" can be answered exactly by segmentation: every saturated
connected component is one object, its shape is the best-matching template of ``fastvar.train.data``
(IoU of the component's box-normalised mask), its colour red or blue by its mean RGB. That lets the whole
GenEval pipeline (generation layout, thresholds, counting, colour, position, summary) run and be tested
offline on real generated images.

The score of a detection is its template IoU (1.0: the component is exactly the shape), so GenEval's
confidence thresholds keep their meaning: 0.3 drops blobs that fit no shape, 0.9 (counting) keeps only
cleanly drawn shapes.
"""

from __future__ import annotations

import numpy as np

from ..train.data import COLOURS, MIN_AREA_FRAC, SHAPES, component_colour, saturated, template_ious
from .geneval import Detection


class ProceduralDetector:
    """``detector(image) -> [Detection]`` for (H, W, 3) uint8 or float [0, 1] RGB images.

    ``min_area_frac``: components smaller than this fraction of the image are noise, not objects (the
    checker's own threshold by default).
    """

    def __init__(self, min_area_frac: float = MIN_AREA_FRAC) -> None:
        self.min_area_frac = float(min_area_frac)

    def __call__(self, image: np.ndarray) -> list[Detection]:
        from scipy import ndimage

        a = np.asarray(image)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {a.shape}")
        a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else np.clip(a.astype(np.float32), 0.0, 1.0)
        labels, n = ndimage.label(saturated(a))
        dets: list[Detection] = []
        min_area = self.min_area_frac * a.shape[0] * a.shape[1]
        for k, sl in enumerate(ndimage.find_objects(labels), 1):
            if sl is None:
                continue
            comp = labels == k
            if comp.sum() < min_area:
                continue
            iou = template_ious(comp)
            shape = int(np.argmax(iou))
            box = (float(sl[1].start), float(sl[0].start), float(sl[1].stop), float(sl[0].stop))
            dets.append(Detection(SHAPES[shape], float(iou[shape]), box, comp, COLOURS[component_colour(a, comp)]))
        return dets


__all__ = ["ProceduralDetector"]
