"""Procedural text-to-image scenes: determinism, captions, layout guarantees; detector and GenEval on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastvar.errors import UsageError
from fastvar.eval.geneval import relative_position
from fastvar.train.t2i_data import (
    CATEGORIES,
    HELDOUT_SEED,
    T2I_COLOURS,
    T2I_SHAPES,
    ProceduralT2I,
    nearest_colour,
    render_scene,
    t2i_vocabulary,
)


def test_scene_is_a_pure_function_of_seed_and_index():
    a, b, c = render_scene(3, 11), render_scene(3, 11), render_scene(4, 11)
    assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"] and a["objects"] == b["objects"]
    assert not np.array_equal(a["image"], c["image"])
    ds = ProceduralT2I(seed=3, size=64)
    x = ds[11]
    assert x["image"].shape == (3, 64, 64) and x["image"].dtype == torch.float32
    assert -1.0 <= float(x["image"].min()) and float(x["image"].max()) <= 1.0
    assert torch.equal(x["image"], ProceduralT2I(seed=3, size=64)[11]["image"])
    imgs, caps = ds.batch([0, 1, 2])
    assert imgs.shape == (3, 3, 64, 64) and len(caps) == 3 and caps[0] == ds[0]["caption"]


def _caption_ok(scene) -> None:
    """The caption names exactly the objects drawn (shapes, counts, colours it mentions, relation)."""
    spec, objs = scene["spec"], scene["objects"]
    assert [o[0] for o in objs] == [s for s, _ in spec.objects]
    for (_, said), (_, drawn, _) in zip(spec.objects, objs):
        assert said is None or said == drawn
    words = scene["caption"].split()
    if scene["tag"] == "counting":
        assert {2: "two", 3: "three", 4: "four"}[len(objs)] == words[0] and len({o[1] for o in objs}) == 1
    if scene["tag"] in ("two_object", "color_attr", "position"):
        assert objs[0][0] != objs[1][0]
    if scene["tag"] == "color_attr":
        assert objs[0][1] != objs[1][1]


def test_captions_vocabulary_layout_and_every_category():
    vocab = set(t2i_vocabulary())
    seen, sizes = set(), []
    for i in range(400):
        s = render_scene(0, i, image=False)
        seen.add(s["tag"])
        assert set(s["caption"].split()) <= vocab
        assert 1 <= len(s["objects"]) <= 4
        _caption_ok(s)
        boxes = [o[2] for o in s["objects"]]
        for j, a in enumerate(boxes):
            assert 0 <= a[0] < a[2] <= 128 and 0 <= a[1] < a[3] <= 128
            sizes.append(min(a[2] - a[0], a[3] - a[1]))
            for b in boxes[j + 1:]:  # no overlap, with a gap of several pixels
                gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                assert gap >= 8
        if s["tag"] == "position":
            rel = s["spec"].relation
            assert relative_position(boxes[0], boxes[1]) == {rel}
            assert relative_position(boxes[1], boxes[0]) != {rel}
    assert seen == set(CATEGORIES)
    assert min(sizes) >= 24  # large enough for the shape templates


def test_category_mixture_and_bad_mixtures():
    only = ProceduralT2I(seed=1, categories=["position"])
    assert {only[i]["tag"] for i in range(3)} == {"position"}
    assert {render_scene(1, i, categories="position", image=False)["tag"] for i in range(50)} == {"position"}
    tags = [render_scene(1, i, categories={"colors": 3.0, "counting": 1.0}, image=False)["tag"] for i in range(400)]
    assert set(tags) == {"colors", "counting"} and 0.65 < tags.count("colors") / 400 < 0.85
    # the scene drawn is the scene decided without drawing
    assert render_scene(1, 5)["objects"] == render_scene(1, 5, image=False)["objects"]
    with pytest.raises(UsageError, match="unknown"):
        ProceduralT2I(categories=["colours"])
    with pytest.raises(UsageError, match="positive sum"):
        ProceduralT2I(categories={"colors": 0.0})
    with pytest.raises(UsageError, match="multiple of 8"):
        ProceduralT2I(size=100)


def test_vocabulary_covers_the_grammar():
    vocab = t2i_vocabulary()
    assert vocab == sorted(set(vocab))
    for w in (*T2I_SHAPES, *T2I_COLOURS, "rings", "crosses", "two", "four", "left", "right", "above", "below", "and"):
        assert w in vocab


def test_nearest_colour_keeps_var_rule_and_separates_t2i_palette():
    assert nearest_colour((0.5, 0.9, 0.1), ("red", "blue")) == "red"  # the class-conditional R > B rule
    assert nearest_colour((0.86, 0.14, 0.12)) == "red" and nearest_colour((0.12, 0.26, 0.88)) == "blue"
    assert nearest_colour((0.92, 0.80, 0.12)) == "yellow" and nearest_colour((0.12, 0.70, 0.18)) == "green"
    # blurred into a grey background the hue survives
    grey = np.array([0.5, 0.5, 0.5])
    for c, rgb in (("yellow", (0.92, 0.80, 0.12)), ("green", (0.12, 0.70, 0.18))):
        assert nearest_colour(0.5 * np.array(rgb) + 0.5 * grey) == c
    with pytest.raises(UsageError, match="unknown"):
        nearest_colour((1, 0, 0), ("red", "magenta"))


# ---------------------------------------------------------------------------------------------- detector + GenEval
def _uint8(img: np.ndarray) -> np.ndarray:
    return (img * 255).round().astype(np.uint8)


def _check_detections(scene, dets) -> None:
    """Every drawn object found once, with its shape, colour and box (within 2 px), and nothing else."""
    assert len(dets) == len(scene["objects"]), (scene["caption"], [(d.class_name, d.box) for d in dets])
    left = list(dets)
    for shape, colour, box in scene["objects"]:
        d = min(left, key=lambda d: sum(abs(u - v) for u, v in zip(d.box, box)))
        left.remove(d)
        assert (d.class_name, d.colour) == (shape, colour), scene["caption"]
        assert max(abs(u - v) for u, v in zip(d.box, box)) <= 2.0
        assert d.score > 0.95  # above GenEval's counting threshold with room to spare


def _swapped(spec):
    """A caption of the same category that the scene does NOT satisfy."""
    from fastvar.train.t2i_data import SceneSpec

    o, tag = spec.objects, spec.tag
    absent = next(s for s in T2I_SHAPES if s not in {x[0] for x in o})
    if tag == "single_object":
        return SceneSpec(tag, ((absent, None),))
    if tag == "colors":
        return SceneSpec(tag, ((o[0][0], next(c for c in T2I_COLOURS if c != o[0][1])),))
    if tag == "two_object":
        return SceneSpec(tag, (o[0], (absent, None)))
    if tag == "counting":
        k = len(o) + 1 if len(o) < 4 else len(o) - 1  # more than drawn, or fewer (then the exclude clause fails)
        return SceneSpec(tag, (o[0],) * k)
    if tag == "position":
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        return SceneSpec(tag, o, opposite[spec.relation])
    return SceneSpec(tag, ((o[0][0], o[1][1]), (o[1][0], o[0][1])))  # color_attr: colours exchanged


def _geneval_on_scenes(per_category: int, seed: int) -> dict[str, list[int]]:
    from fastvar.eval.detect_procedural import ProceduralDetector
    from fastvar.eval.geneval import detector_colours, score_image

    det = ProceduralDetector()
    tally: dict[str, list[int]] = {}
    for tag in CATEGORIES:
        right = wrong = 0
        for i in range(per_category):
            s = render_scene(seed, i, categories=[tag])
            img = _uint8(s["image"])
            dets = det(img)
            _check_detections(s, dets)

            def once(_img, dets=dets):  # the detector already ran on this image
                return dets

            meta = s["spec"].metadata()
            if tag in ("counting", "position", "two_object", "single_object"):  # also with the drawn colours named
                coloured = s["spec"].__class__(tag, tuple((sh, c) for sh, c, _ in s["objects"]), s["spec"].relation)
                assert score_image(img, coloured.metadata(), once, detector_colours).correct
            right += score_image(img, meta, once, detector_colours).correct
            wrong += score_image(img, _swapped(s["spec"]).metadata(), once, detector_colours).correct
        tally[tag] = [right, wrong]
    return tally


def test_detector_exact_and_geneval_scores_rendered_scenes():
    tally = _geneval_on_scenes(per_category=6, seed=11)
    assert tally == {t: [6, 0] for t in CATEGORIES}


@pytest.mark.slow
def test_detector_exact_and_geneval_scores_many_rendered_scenes():
    n = 300
    tally = _geneval_on_scenes(per_category=n, seed=HELDOUT_SEED)
    assert tally == {t: [n, 0] for t in CATEGORIES}


def test_detector_palette_argument():
    from fastvar.eval.detect_procedural import ProceduralDetector

    scenes = (render_scene(5, i, categories=["color_attr"]) for i in range(50))
    s = next(s for s in scenes if {o[1] for o in s["objects"]} & {"yellow", "green"})
    img = _uint8(s["image"])
    assert sorted(d.colour for d in ProceduralDetector()(img)) == sorted(o[1] for o in s["objects"])
    assert {d.colour for d in ProceduralDetector(palette=("red", "blue"))(img)} <= {"red", "blue"}
    with pytest.raises(UsageError, match="unknown"):
        ProceduralDetector(palette=("red", "cyan"))


# ---------------------------------------------------------------------------------------------- prompt file
def test_shipped_prompt_file_parses_is_balanced_reproducible_and_in_the_grammar():
    import json
    from collections import Counter

    from fastvar.eval.prompts import load_prompts
    from fastvar.train.t2i_data import PROMPT_FILE, geneval_prompts, parse_caption

    items = load_prompts(PROMPT_FILE)
    lines = [json.loads(ln) for ln in PROMPT_FILE.read_text(encoding="utf-8").splitlines()]
    assert lines == geneval_prompts()  # the shipped file is exactly what the committed function writes
    counts = Counter(it.metadata["tag"] for it in items)
    assert set(counts) == set(CATEGORIES) and len(set(counts.values())) == 1 and 10 <= counts["colors"] <= 20
    vocab = set(t2i_vocabulary())
    for it in items:
        assert set(it.prompt.split()) <= vocab
        spec = parse_caption(it.prompt)  # in the training grammar ...
        assert spec.tag == it.metadata["tag"] and spec.metadata() == it.metadata  # ... and its clauses check it
    # every shape asked for in every task; distinct prompts wherever the task has enough captions
    for tag in CATEGORIES:
        prompts = [it.prompt for it in items if it.metadata["tag"] == tag]
        assert {s for s in T2I_SHAPES if any(s in p for p in prompts)} == set(T2I_SHAPES) or tag == "counting"
        if tag != "single_object":
            assert len(set(prompts)) == len(prompts)


def test_parse_caption_round_trips_the_training_stream_and_rejects_other_text():
    from fastvar.train.t2i_data import parse_caption

    for i in range(300):
        s = render_scene(2, i, image=False)
        assert parse_caption(s["caption"]) == s["spec"]
    assert parse_caption("Two  RED circles").metadata()["include"] == [{"class": "circle", "count": 2, "color": "red"}]
    for bad in ("a purple circle", "five rings", "a circle and a circle", "a red circle and a red square",
                "a red circle to the left of a square", "one circle", ""):
        with pytest.raises(UsageError, match="not in the procedural t2i grammar"):
            parse_caption(bad)


def test_prompt_file_is_package_data():
    import fnmatch
    import json
    import re
    from pathlib import Path

    from fastvar.train.t2i_data import PROMPT_FILE

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()  # (tomllib is 3.11+)
    section = pyproject.split("[tool.setuptools.package-data]", 1)[1]
    patterns = json.loads(re.search(r"^fastvar\s*=\s*(\[.*?\])", section, re.M | re.S)[1])
    rel = PROMPT_FILE.relative_to(PROMPT_FILE.parents[1]).as_posix()
    assert any(fnmatch.fnmatch(rel, p) for p in patterns)
