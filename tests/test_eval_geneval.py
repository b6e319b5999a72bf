"""GenEval's rules on synthetic detections (every rule), the procedural detector on rendered scenes, and the
CLIP colour classifier with a tiny random-weight CLIP."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastvar.eval.detect_procedural import ProceduralDetector
from fastvar.eval.geneval import (
    COLORS,
    ClipColourClassifier,
    Detection,
    ImageResult,
    Rules,
    box_iou,
    detector_colours,
    evaluate,
    relative_position,
    score_image,
    select_objects,
    summarize,
)

from ._tiny_clip import tiny_clip_pair

pytestmark = pytest.mark.usefixtures("one_thread")

IMG = np.zeros((100, 100, 3), dtype=np.uint8)


def det(name: str, score: float = 0.95, box=(0, 0, 10, 10), colour: str | None = "red") -> Detection:
    return Detection(name, score, tuple(float(v) for v in box), None, colour)


def verdict(dets, meta, rules=Rules(), /) -> tuple[bool, str]:  # noqa: B008 - frozen dataclass
    return evaluate(IMG, select_objects(dets, meta.get("tag", ""), rules), meta, detector_colours, rules)


# ---------------------------------------------------------------------------------------------- selection
def test_threshold_is_strict_and_counting_uses_its_own():
    dets = [det("cat", 0.3), det("cat", 0.31), det("cat", 0.89), det("cat", 0.95)]
    assert [d.score for d in select_objects(dets, "single_object")["cat"]] == [0.95, 0.89, 0.31]  # > 0.3, sorted
    assert [d.score for d in select_objects(dets, "counting")["cat"]] == [0.95]  # > 0.9 for counting
    assert select_objects([det("cat", 0.2)], "single_object") == {}  # a class with nothing left is absent


def test_at_most_max_objects_per_class_and_optional_nms():
    many = [det("cup", 0.5 + i / 100) for i in range(20)]
    assert len(select_objects(many, "counting", Rules(counting_threshold=0.3))["cup"]) == 16
    overlapping = [det("cup", 0.9, (0, 0, 10, 10)), det("cup", 0.8, (1, 1, 11, 11)), det("cup", 0.7, (50, 50, 60, 60))]
    assert len(select_objects(overlapping, "two_object")["cup"]) == 3  # NMS off by default (max overlap 1.0)
    kept = select_objects(overlapping, "two_object", Rules(nms_threshold=0.5))["cup"]
    assert [d.score for d in kept] == [0.9, 0.7]


def test_box_iou_inclusive_pixels():
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert box_iou((0, 0, 9, 9), (10, 10, 19, 19)) == 0.0
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)


# ---------------------------------------------------------------------------------------------- clauses
def test_include_needs_the_count_and_exclude_fails_at_the_count():
    two = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]}
    assert verdict([det("clock"), det("clock")], two)[0]
    ok, reason = verdict([det("clock")], two)
    assert not ok and "expected clock>=2, found 1" in reason
    ok, reason = verdict([det("clock")] * 3, two)
    assert not ok and "expected clock<3, found 3" in reason
    # counting ignores detections between 0.3 and 0.9
    assert not verdict([det("clock"), det("clock", 0.5)], two)[0]
    two_obj = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    assert verdict([det("cat"), det("dog")], two_obj)[0]
    assert not verdict([det("cat")], two_obj)[0]


def test_colour_is_checked_on_the_most_confident_objects_only():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert verdict([det("car", 0.9, colour="red")], meta)[0]
    ok, reason = verdict([det("car", 0.95, colour="blue"), det("car", 0.9, colour="red")], meta)
    assert not ok and "expected red car>=1, found 0 red; and 1 blue" in reason
    attr = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "cup", "count": 1, "color": "blue"}]}
    assert verdict([det("car", colour="red"), det("cup", colour="blue")], attr)[0]
    assert not verdict([det("car", colour="red"), det("cup", colour="red")], attr)[0]


def test_relative_position_dead_zone_and_directions():
    a, b = (0, 0, 10, 10), (30, 0, 40, 10)  # centres 25 px apart horizontally, sizes 10 + 10
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    assert relative_position((0, 0, 10, 10), (0, 30, 10, 40)) == {"above"}
    assert relative_position((0, 30, 10, 40), (0, 0, 10, 10)) == {"below"}
    # inside the dead zone: offset 1.5 px < 0.1 * (10 + 10)
    assert relative_position((0, 0, 10, 10), (1.5, 0, 11.5, 10)) == set()
    # diagonal at 45 degrees: each normalised component ~0.7 > 0.5, both relations hold
    assert relative_position((0, 0, 10, 10), (50, 50, 60, 60)) == {"left of", "above"}
    # mostly horizontal: the vertical component after the dead zone is under 0.5
    assert relative_position((0, 0, 10, 10), (50, 8, 60, 18)) == {"left of"}
    # a larger threshold widens the dead zone
    assert relative_position(a, b, threshold=2.0) == set()


def test_position_clause_against_its_target_group():
    meta = {"tag": "position", "include": [{"class": "kite", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    kite, dog_right, dog_left = det("kite", box=(0, 0, 10, 10)), det("dog", box=(50, 0, 60, 10)), det("dog", box=(0, 80, 1, 81))
    assert verdict([kite, dog_right], meta)[0]
    ok, reason = verdict([kite, det("dog", box=(-60, 0, -50, 10))], meta)
    assert not ok and "expected dog right of target, found left of target" in reason
    ok, reason = verdict([dog_right], meta)  # the target group did not match
    assert not ok and "no target for dog to be right of" in reason
    assert dog_left.class_name == "dog"
    # only the most confident dog is checked: a second, wrongly placed dog with lower score is ignored
    assert verdict([kite, dog_right, det("dog", 0.5, box=(-60, 0, -50, 10))], meta)[0]


def test_summary_overall_is_the_mean_of_task_accuracies():
    def r(tag, ok, prompt="p"):
        return ImageResult("f", tag, prompt, ok, "", json.dumps({"tag": tag, "prompt": prompt}))

    results = [r("single_object", True), r("single_object", True), r("counting", False, "c"), r("counting", True, "c"),
               r("colors", False, "x"), r("colors", False, "x")]
    s = summarize(results)
    assert s["tasks"] == {"single_object": 1.0, "counting": 0.5, "colors": 0.0}
    assert s["overall"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3, not the image accuracy 0.5 by chance:
    assert s["correct_images"] == pytest.approx(3 / 6)
    assert s["correct_prompts"] == pytest.approx(2 / 3)  # a prompt counts when any of its images is correct
    assert s["tasks_missing"] == ["two_object", "position", "color_attr"]
    unbalanced = summarize([r("single_object", True)] * 3 + [r("counting", False, "c")])
    assert unbalanced["overall"] == pytest.approx(0.5) and unbalanced["correct_images"] == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------------- procedural detector
def _scene(objects, size=128) -> np.ndarray:
    """Grey background with axis-aligned shapes drawn from the procedural templates."""
    from fastvar.train.data import _BASE_RGB, _unit_mask

    yy, xx = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    img = np.full((size, size, 3), 0.5, dtype=np.float32)
    for shape, colour, (x0, y0, w) in objects:
        m = _unit_mask(shape, (xx - x0) / w, (yy - y0) / w)
        img[m] = _BASE_RGB[colour]
    return (img * 255).round().astype(np.uint8)


def test_procedural_detector_finds_each_object_with_class_colour_box():
    img = _scene([("circle", "red", (8, 40, 40)), ("square", "blue", (78, 44, 36))])
    dets = sorted(ProceduralDetector()(img), key=lambda d: d.box[0])
    assert [(d.class_name, d.colour) for d in dets] == [("circle", "red"), ("square", "blue")]
    assert all(d.score > 0.9 for d in dets) and dets[0].mask.shape == img.shape[:2]
    x1, y1, x2, y2 = dets[1].box
    assert abs(x1 - 78) <= 1 and abs(x2 - 114) <= 1 and abs(y1 - 44) <= 1
    meta = {"tag": "position", "include": [{"class": "square", "count": 1},
                                           {"class": "circle", "count": 1, "position": ["left of", 0]}],
            "prompt": "a photo of a circle left of a square"}
    assert score_image(img, meta, ProceduralDetector(), detector_colours).correct
    meta["include"][1]["position"] = ["right of", 0]
    assert not score_image(img, meta, ProceduralDetector(), detector_colours).correct
    count = {"tag": "counting", "include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}]}
    two = _scene([("circle", "red", (8, 8, 40)), ("circle", "blue", (70, 70, 40))])
    assert score_image(two, count, ProceduralDetector(), detector_colours).correct
    assert ProceduralDetector()(np.full((64, 64, 3), 128, np.uint8)) == []


# ---------------------------------------------------------------------------------------------- CLIP colours
def test_clip_colour_classifier_masks_crops_and_returns_colour_names():
    model, processor = tiny_clip_pair()
    clf = ClipColourClassifier(model, processor)
    img = _scene([("circle", "red", (8, 40, 40))])
    mask = np.zeros(img.shape[:2], bool)
    mask[40:80, 8:48] = True
    obj = Detection("circle", 0.9, (8.0, 40.0, 48.0, 80.0), mask)
    crop = clf.crops(img, [obj])[0]
    assert crop.size == (40, 40)
    outside = np.asarray(clf.crops(img, [Detection("circle", 0.9, (0.0, 0.0, 60.0, 90.0), mask)])[0])
    assert tuple(outside[5, 5]) == (0x99, 0x99, 0x99)  # outside the mask: GenEval's #999 canvas
    colours = clf(img, [obj, obj], "circle")
    assert len(colours) == 2 and all(c in COLORS for c in colours) and colours[0] == colours[1]
    # the zero-shot weights: one unit vector per colour
    import torch

    w = clf._classifier("circle")
    assert w.shape[1] == len(COLORS) and torch.allclose(w.norm(dim=0), torch.ones(len(COLORS)), atol=1e-5)
