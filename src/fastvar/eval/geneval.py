"""GenEval's scoring rules behind a pluggable detector (and colour classifier).

The rules follow djghosh13/geneval ``evaluation/evaluate_images.py`` and ``summary_scores.py``
(re-implemented, not copied):

* detections of a class count when their confidence is **above** 0.3 (0.9 for the ``counting`` task),
  most confident first, at most 16 per class (optional NMS, off by default: max overlap 1.0);
* an ``include`` clause ``{class, count}`` needs at least ``count`` detections; only the ``count`` most
  confident ones are checked further; ``exclude`` clauses fail when ``count`` or more are detected;
* ``color``: a zero-shot colour classifier over 10 colour names on each checked object (the official
  one: CLIP ViT-L/14 on the object's mask composited onto a grey ``#999`` canvas and cropped to its box);
  at least ``count`` of them must have the asked colour;
* ``position`` ``[relation, group]``: every checked object against every object of the earlier clause
  ``group`` (which must itself have matched); box centres, the offset shrunk by a dead zone of
  0.1 × (sum of the two boxes' sizes) per axis, then normalised by the raw offset's length; a component
  beyond ±0.5 gives left of / right of / above / below;
* an image is correct when every clause holds; a task's score is the fraction of its images that are
  correct; the overall score is the mean over the tasks (GenEval's six: single_object, two_object,
  counting, colors, position, color_attr).

Detectors return :class:`Detection` lists: :class:`MMDetDetector` (the official Mask2Former through mmdet,
when installed) or :class:`fastvar.eval.detect_procedural.ProceduralDetector` (the built-in procedural
images, no learned model).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .prompts import GENEVAL_TASKS

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
NMS_THRESHOLD = 1.0
POSITION_THRESHOLD = 0.1
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
# GenEval's object_names.txt: the 80 COCO classes in detector index order, spelled as its prompts spell them.
COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
MASK2FORMER = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco"


@dataclass
class Detection:
    """One detected object: class name, confidence, box ``(x1, y1, x2, y2)`` in pixels, optional mask (H, W)
    bool and, for detectors that know it (the procedural one), its colour name."""

    class_name: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None
    colour: str | None = None


class Detector(Protocol):
    def __call__(self, image: np.ndarray) -> list[Detection]:
        """Detections in an (H, W, 3) uint8 RGB image."""


ColourFn = Callable[[np.ndarray, Sequence[Detection], str], list[str]]
"""``(image, objects, class name) -> colour name per object`` (one of :data:`COLORS`, or the detector's own)."""


@dataclass(frozen=True)
class Rules:
    """GenEval's tunables (its ``--options``), defaults as published."""

    threshold: float = THRESHOLD
    counting_threshold: float = COUNTING_THRESHOLD
    max_objects: int = MAX_OBJECTS
    nms_threshold: float = NMS_THRESHOLD
    position_threshold: float = POSITION_THRESHOLD


DEFAULT_RULES = Rules()


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive-pixel convention (+1 on each side length)."""
    def area(x):
        return max(x[2] - x[0] + 1, 0) * max(x[3] - x[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select_objects(detections: Sequence[Detection], tag: str, rules: Rules = DEFAULT_RULES) -> dict[str, list[Detection]]:
    """Per class: detections above the task's threshold, most confident first, at most ``max_objects``, NMS."""
    thr = rules.counting_threshold if tag == "counting" else rules.threshold
    by_class: dict[str, list[Detection]] = {}
    for d in detections:
        by_class.setdefault(d.class_name, []).append(d)
    out: dict[str, list[Detection]] = {}
    for name, dets in by_class.items():
        order = sorted((d for d in dets if d.score > thr), key=lambda d: -d.score)[: rules.max_objects]
        kept: list[Detection] = []
        while order:
            top = order.pop(0)
            kept.append(top)
            if rules.nms_threshold < 1:
                order = [d for d in order if box_iou(top.box, d.box) < rules.nms_threshold]
        if kept:
            out[name] = kept
    return out


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Where A is relative to B: a subset of {left of, right of, above, below} (empty inside the dead zone)."""
    a = np.asarray(box_a[:4], dtype=np.float64).reshape(2, 2)
    b = np.asarray(box_b[:4], dtype=np.float64).reshape(2, 2)
    offset = a.mean(axis=0) - b.mean(axis=0)
    dims = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def detector_colours(image: np.ndarray, objects: Sequence[Detection], class_name: str) -> list[str]:
    """The colour each detection already carries (procedural detector): no classifier needed."""
    return [str(o.colour) for o in objects]


def evaluate(image: np.ndarray, objects: dict[str, list[Detection]], metadata: dict[str, Any], colour_fn: ColourFn,
             rules: Rules = DEFAULT_RULES) -> tuple[bool, str]:
    """GenEval's per-image verdict: (correct, reasons) for ``objects`` from :func:`select_objects`.

    ``include`` clauses combine with AND and ``exclude`` with OR; colour and position are checked only on
    the ``count`` most confident objects of a clause.
    """
    correct = True
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        found = objects.get(name, [])[:count]
        matched = True
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colours = colour_fn(image, found, name)
                if colours.count(req["color"]) < count:
                    correct = matched = False
                    order = [c for c in COLORS if c in colours] + [c for c in dict.fromkeys(colours) if c not in COLORS]
                    seen = ", ".join(f"{colours.count(c)} {c}" for c in order)
                    reasons.append(f"expected {req['color']} {name}>={count}, found {colours.count(req['color'])} "
                                   f"{req['color']}; and {seen}")
            if "position" in req and matched:
                relation, target = req["position"]
                if groups[target] is None:
                    correct = matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        for tgt in groups[target]:
                            rels = relative_position(obj.box, tgt.box, rules.position_threshold)
                            if relation not in rels:
                                correct = matched = False
                                reasons.append(f"expected {name} {relation} target, found {' and '.join(sorted(rels))} target")
                                break
                        if not matched:
                            break
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        name, count = req["class"], req["count"]
        if len(objects.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(objects[name])}")
    return correct, "\n".join(reasons)


@dataclass
class ImageResult:
    filename: str
    tag: str
    prompt: str
    correct: bool
    reason: str
    metadata: str
    details: dict[str, list[list[float]]] = field(default_factory=dict)


def score_image(image: np.ndarray, metadata: dict[str, Any], detector: Detector, colour_fn: ColourFn,
                rules: Rules = DEFAULT_RULES, filename: str = "") -> ImageResult:
    """Detect, select, evaluate one image (what the official ``evaluate_image`` does per file)."""
    objects = select_objects(detector(image), metadata.get("tag", ""), rules)
    ok, reason = evaluate(image, objects, metadata, colour_fn, rules)
    return ImageResult(filename, metadata.get("tag", ""), metadata.get("prompt", ""), ok, reason,
                       json.dumps(metadata), {k: [list(map(float, d.box)) + [d.score] for d in v] for k, v in objects.items()})


def geneval_images(images_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(image path, metadata) for every ``<digits>/samples/<digits>.png`` of a GenEval-layout folder, sorted."""
    root = Path(images_dir)
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        meta_path = folder / "metadata.jsonl"
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text(encoding="utf-8").strip().splitlines()[0])
        samples = folder / "samples"
        if not samples.is_dir():
            continue
        for img in sorted(samples.iterdir()):
            if img.is_file() and re.fullmatch(r"\d+\.png", img.name):
                out.append((img, meta))
    return out


def summarize(results: Sequence[ImageResult]) -> dict[str, Any]:
    """GenEval's summary: per-task accuracy, overall = mean over the tasks present, image/prompt accuracy."""
    tasks: dict[str, list[bool]] = {}
    prompts: dict[str, list[bool]] = {}
    for r in results:
        tasks.setdefault(r.tag, []).append(r.correct)
        prompts.setdefault(r.metadata, []).append(r.correct)
    per_task = {t: float(np.mean(v)) for t, v in tasks.items()}
    return {
        "overall": float(np.mean(list(per_task.values()))) if per_task else float("nan"),
        "tasks": per_task,
        "task_counts": {t: [int(sum(v)), len(v)] for t, v in tasks.items()},
        "tasks_missing": [t for t in GENEVAL_TASKS if t not in per_task],
        "images": len(results),
        "prompts": len(prompts),
        "correct_images": float(np.mean([r.correct for r in results])) if results else float("nan"),
        "correct_prompts": float(np.mean([any(v) for v in prompts.values()])) if prompts else float("nan"),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'task':<16}{'accuracy':>10}{'correct':>12}"]
    for t, acc in summary["tasks"].items():
        c, n = summary["task_counts"][t]
        lines.append(f"{t:<16}{acc:>10.4f}{f'{c}/{n}':>12}")
    lines.append(f"{'overall':<16}{summary['overall']:>10.4f}{'':>12}  (mean over {len(summary['tasks'])} task(s))")
    if summary["tasks_missing"]:
        lines.append(f"tasks without images: {', '.join(summary['tasks_missing'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLIP colours
class ClipColourClassifier:
    """GenEval's colour check with a transformers CLIP (ViT-L/14 ``openai`` = open_clip's ``ViT-L-14/openai``).

    Per object: the image outside its mask is replaced by a ``#999`` grey canvas, the result cropped to the
    box, and classified zero-shot against the 10 colours; each colour's text embedding is the normalised
    mean of the three templates' normalised embeddings (clip_benchmark's zero-shot classifier).
    """

    def __init__(self, model, processor, device: str = "cpu", bgcolor: str = "#999", crop: bool = True) -> None:
        self.model, self.processor, self.device = model.eval().to(device), processor, device
        self.bgcolor, self.crop = bgcolor, crop
        self._classifiers: dict[str, Any] = {}

    def _classifier(self, class_name: str):
        import torch

        if class_name not in self._classifiers:
            weights = []
            for c in COLORS:
                texts = [t.format(c=c, cls=class_name) for t in COLOR_TEMPLATES]
                tok = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True, max_length=77)
                with torch.no_grad():
                    f = _features(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                               attention_mask=tok["attention_mask"].to(self.device)))
                f = f / f.norm(dim=-1, keepdim=True)
                m = f.mean(dim=0)
                weights.append(m / m.norm())
            self._classifiers[class_name] = torch.stack(weights, dim=1)
        return self._classifiers[class_name]

    def crops(self, image: np.ndarray, objects: Sequence[Detection]) -> list:
        from PIL import Image

        img = Image.fromarray(image).convert("RGB")
        blank = img.copy() if self.bgcolor == "original" else Image.new("RGB", img.size, color=self.bgcolor)
        out = []
        for o in objects:
            im = img
            if o.mask is not None:
                im = Image.composite(img, blank, Image.fromarray(np.asarray(o.mask).astype(np.uint8) * 255))
            if self.crop:
                im = im.crop(tuple(o.box[:4]))
            out.append(im)
        return out

    def __call__(self, image: np.ndarray, objects: Sequence[Detection], class_name: str) -> list[str]:
        import torch

        if not objects:
            return []
        clf = self._classifier(class_name)
        px = self.processor(images=self.crops(image, objects), return_tensors="pt")["pixel_values"].to(self.device)
        with torch.no_grad():
            f = _features(self.model.get_image_features(pixel_values=px))
        f = f / f.norm(dim=-1, keepdim=True)
        return [COLORS[i] for i in (100.0 * f @ clf).argmax(dim=1).tolist()]


def _features(out):
    """CLIP features whether ``get_*_features`` returns a tensor (transformers 4) or an output (5)."""
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ------------------------------------------------------------------------------------------------ Mask2Former
class MMDetDetector:
    """The official GenEval detector: Mask2Former Swin-S (COCO) through mmdet (2.x API; 3.x also read).

    ``config``: mmdet's ``configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py``;
    ``checkpoint``: ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth`` (GenEval's download_models.sh).
    """

    def __init__(self, config: str | None, checkpoint: str, device: str = "cuda") -> None:
        try:
            import mmdet
            from mmdet.apis import inference_detector, init_detector
        except ImportError:
            raise ImportError("the GenEval detector needs mmdet 2.x + mmcv-full (see GenEval's environment.yml); "
                              "or use --detector procedural for the built-in procedural images") from None
        if config is None:
            config = str(Path(mmdet.__file__).parent / ".." / "configs" / "mask2former" / f"{MASK2FORMER}.py")
        self._infer = inference_detector
        self.model = init_detector(config, checkpoint, device=device)

    def __call__(self, image: np.ndarray) -> list[Detection]:
        result = self._infer(self.model, image[..., ::-1].copy())  # mmdet expects BGR arrays
        dets: list[Detection] = []
        if hasattr(result, "pred_instances"):  # mmdet 3.x DetDataSample
            inst = result.pred_instances
            masks = inst.masks.cpu().numpy() if hasattr(inst, "masks") else None
            for i, (box, label, score) in enumerate(zip(inst.bboxes.cpu().numpy(), inst.labels.cpu().numpy(),
                                                        inst.scores.cpu().numpy())):
                dets.append(Detection(COCO_NAMES[int(label)], float(score), tuple(map(float, box[:4])),
                                      None if masks is None else masks[i]))
            return dets
        bbox = result[0] if isinstance(result, tuple) else result
        segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
        for ci, name in enumerate(COCO_NAMES):
            for j, row in enumerate(bbox[ci]):
                dets.append(Detection(name, float(row[4]), tuple(map(float, row[:4])),
                                      None if segm is None else np.asarray(segm[ci][j])))
        return dets


__all__ = ["COCO_NAMES", "COLORS", "ClipColourClassifier", "Detection", "Detector", "ImageResult", "MMDetDetector",
           "Rules", "box_iou", "detector_colours", "evaluate", "format_summary", "geneval_images", "relative_position",
           "score_image", "select_objects", "summarize"]
