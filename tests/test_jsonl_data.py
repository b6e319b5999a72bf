"""Infinity's JSONL data format: aspect-ratio buckets, deterministic batches, one-line errors."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from fastvar.errors import MissingInputError, UsageError
from fastvar.schedules_infinity import infinity_image_size, infinity_schedule
from fastvar.train.jsonl_data import JsonlBuckets, load_image, process_short_text


def _png(path, w, h, colour):
    Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(path)
    return path


def _dataset(tmp_path, n_square=12, n_tall=4):
    """Two buckets: 1.000 (square images) and 2.000 (h = 2w), captions naming their bucket and index."""
    img = tmp_path / "img"
    img.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    sq = [_png(img / f"sq{i}.png", 40 + i, 40 + i, (i * 10, 0, 0)) for i in range(n_square)]
    tall = [_png(img / f"tall{i}.png", 20, 41, (0, i * 10, 0)) for i in range(n_tall)]
    lines_sq = [{"image_path": str(p), "h_div_w": 1.0, "long_caption": f"square {i} long", "text": f"square {i} --ar 1:1",
                 "short_caption_type": "user prompt"} for i, p in enumerate(sq)]
    lines_tall = [{"image_path": f"../img/{p.name}", "h_div_w": 41 / 20, "long_caption": f"tall {i} long"}
                  for i, p in enumerate(tall)]
    (data / f"1.000_{n_square:09d}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines_sq))
    (data / f"2.000_{n_tall:09d}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines_tall))
    return data


def test_batches_come_from_one_bucket_with_its_schedule_and_size(tmp_path):
    data = _dataset(tmp_path)
    ds = JsonlBuckets(data, batch_size=2, pn="0.06M", seed=3, short_prob=0.0)
    assert ds.templates == [1.0, 2.0] and len(ds) == 16
    assert ds.batches_per_bucket == [6, 2] and ds.steps_per_epoch == 8
    seen = Counter()
    for step in range(16):
        b = ds.get(step)
        t = b["template"]
        seen[t] += 1
        assert all(c.startswith("square" if t == 1.0 else "tall") for c in b["caption"])
        assert all(abs(hw - t) < 0.06 for hw in b["h_div_w"])
        assert b["schedule"] == infinity_schedule(t, "0.06M")
        assert tuple(b["image"].shape) == (2, 3, *infinity_image_size(t, "0.06M")) == (2, 3, *b["pixel_size"])
        assert b["image"].dtype == torch.float32 and -1.0 <= float(b["image"].min()) <= float(b["image"].max()) <= 1.0
    assert seen == {1.0: 12, 2.0: 4}  # two epochs: each bucket's share of steps is its share of batches


def test_epoch_walks_every_example_once_and_is_deterministic(tmp_path):
    data = _dataset(tmp_path)
    ds = JsonlBuckets(data, batch_size=2, seed=5)
    walked = Counter()
    for step in range(ds.steps_per_epoch):
        b, idx = ds.indices(step)
        walked.update((b, i) for i in idx)
    assert set(walked) == {(0, i) for i in range(12)} | {(1, i) for i in range(4)} and set(walked.values()) == {1}
    again = JsonlBuckets(data, batch_size=2, seed=5)
    for step in (7, 0, 13, 3):  # any order: a pure function of (seed, step, rank)
        x, y = ds.get(step), again.get(step)
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"]
    other = JsonlBuckets(data, batch_size=2, seed=6)
    assert [other.indices(s) for s in range(8)] != [ds.indices(s) for s in range(8)]


def test_ranks_share_the_bucket_and_take_disjoint_examples(tmp_path):
    data = _dataset(tmp_path, n_square=16, n_tall=8)
    ds = JsonlBuckets(data, batch_size=2, world_size=2, seed=1)
    for step in range(ds.steps_per_epoch):
        (b0, i0), (b1, i1) = ds.indices(step, 0), ds.indices(step, 1)
        assert b0 == b1 and not set(i0) & set(i1)
    with pytest.raises(UsageError, match="rank 2"):
        ds.indices(0, 2)


def test_bucket_frequencies_follow_sizes(tmp_path):
    data = _dataset(tmp_path, n_square=30, n_tall=10)
    ds = JsonlBuckets(data, batch_size=1, seed=0)
    total = Counter(ds.bucket_at(s).template for s in range(400))
    assert total == {1.0: 300, 2.0: 100}  # exactly 3:1 over whole epochs
    orders = {tuple(ds.bucket_at(s).template for s in range(e * 40, e * 40 + 40)) for e in range(4)}
    assert len(orders) > 1  # each epoch reshuffles the bucket order


def test_short_captions_and_custom_schedule(tmp_path):
    data = _dataset(tmp_path)
    always = JsonlBuckets(data, batch_size=4, short_prob=1.0, seed=0)
    caps = [c for s in range(8) for c in always.get(s)["caption"]]
    assert {c for c in caps if c.startswith("square")} == {f"square {i} " for i in range(12)}  # '--ar' dropped
    assert all(c.endswith("long") for c in caps if c.startswith("tall"))  # no short caption -> long one
    assert process_short_text("a cat --ar 16:9") == "a cat " and process_short_text("--x") == "--x"
    custom = JsonlBuckets(data / "1.000_000000012.jsonl", batch_size=3, schedules={1.0: (1, 2, 4, 8, 16)},
                          vae_stride=8)
    b = custom.get(0)
    assert b["pixel_size"] == (128, 128) and b["image"].shape == (3, 3, 128, 128)
    assert b["schedule"].sizes[-1] == (16, 16)


def test_resize_covers_then_centre_crops(tmp_path):
    a = np.zeros((30, 90, 3), np.uint8)
    a[:, 30:60] = 255  # white middle third of a wide image
    x = load_image(_save(tmp_path / "w.png", a), (32, 32))
    assert x.shape == (3, 32, 32) and float(x.mean()) > 0.9  # the crop is the white centre


def _save(path, arr):
    Image.fromarray(arr).save(path)
    return path


def _write(folder, name, lines):
    folder.mkdir(exist_ok=True)
    p = folder / name
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return p


def test_each_error_has_its_one_line_message(tmp_path):
    img = _png(tmp_path / "a.png", 32, 32, (9, 9, 9))
    ok = {"image_path": str(img), "h_div_w": 1.0, "long_caption": "c"}
    cases = [
        ("1.000_000000001.jsonl", [{**ok, "image_path": str(tmp_path / "gone.png")}], MissingInputError,
         r"1\.000_000000001\.jsonl:1: image .*gone\.png.* not found"),
        ("1.100_000000001.jsonl", [ok], UsageError, r"h_div_w template 1\.100 is not in the schedule table"),
        ("1.000_000000000.jsonl", [], UsageError, "holds no examples"),
        ("1.000_000000002.jsonl", [ok, "{not json"], UsageError, r"1\.000_000000002\.jsonl:2: not valid JSON"),
        ("1.000_000000002.jsonl", [ok, {"image_path": str(img), "h_div_w": 1.0}], UsageError, r':2: no "long_caption"'),
        ("1.000_000000001.jsonl", [{**ok, "h_div_w": "tall"}], UsageError, r'"h_div_w" .* must be a positive number'),
        ("1.000_000000001.jsonl", [{**ok, "h_div_w": 2.0}], UsageError, r"belongs to the 2\.000 bucket"),
        ("1.000_000000003.jsonl", [ok], UsageError, r"holds 1 examples but its name says 3"),
        ("square.jsonl", [ok], UsageError, r"must be \[h_div_w_template\]_\[num_examples\]\.jsonl"),
    ]
    for k, (name, lines, exc, msg) in enumerate(cases):
        folder = tmp_path / f"case{k}"
        _write(folder, name, lines)
        with pytest.raises(exc, match=msg) as e:
            JsonlBuckets(folder, batch_size=1)
        assert "\n" not in str(e.value)
    with pytest.raises(MissingInputError, match="does not exist"):
        JsonlBuckets(tmp_path / "nowhere", batch_size=1)
    with pytest.raises(UsageError, match="holds no .jsonl files"):
        JsonlBuckets(_empty(tmp_path), batch_size=1)
    with pytest.raises(UsageError, match="pn '2M'"):
        JsonlBuckets(tmp_path / "case1", batch_size=1, pn="2M")
    bad = _write(tmp_path / "bad_img", "1.000_000000001.jsonl", [{**ok, "image_path": str(_garbage(tmp_path))}])
    ds = JsonlBuckets(bad, batch_size=1)
    with pytest.raises(UsageError, match=r"1\.000_000000001\.jsonl:1: cannot read image"):
        ds.get(0)


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def _garbage(tmp_path):
    p = tmp_path / "broken.png"
    p.write_bytes(b"not a png")
    return p
