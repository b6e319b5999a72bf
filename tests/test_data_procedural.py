"""Procedural dataset, checker, image-folder dataset and batch sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastvar.train.config import check_schedule
from fastvar.train.data import COLOURS, NUM_CLASSES, SHAPES, ProceduralShapes, classify, render
from fastvar.train.folder import BatchSource, DatasetError, ImageFolder, build_dataset


def test_render_is_deterministic_and_in_range():
    a, la = render(5, 17)
    b, lb = render(5, 17)
    c, _ = render(5, 18)
    assert la == lb and np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (128, 128, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_dataset_tensor_range_and_labels():
    ds = ProceduralShapes(seed=1, image_size=64)
    x, y = ds[3]
    assert x.shape == (3, 64, 64) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert 0 <= y < NUM_CLASSES == len(SHAPES) * len(COLOURS)
    xb, yb = ds.batch([0, 1, 2])
    assert xb.shape == (3, 3, 64, 64) and yb.dtype == torch.long


def test_checker_accuracy_on_clean_images():
    n = 150
    hits = 0
    seen = set()
    for i in range(n):
        img, lab = render(12345, i)
        seen.add(lab)
        hits += classify(img)["label"] == lab
    assert seen == set(range(NUM_CLASSES))
    assert hits / n >= 0.98


def test_checker_every_class_and_deterministic():
    for lab in range(NUM_CLASSES):
        img, got = render(7, lab, label=lab)
        assert got == lab
        r1, r2 = classify(torch.from_numpy(img).permute(2, 0, 1)), classify(img)
        assert r1 == r2 and r1["label"] == lab


def test_checker_rejects_blank_and_bad_shapes():
    assert classify(np.full((64, 64, 3), 0.5, np.float32))["label"] == -1
    with pytest.raises(ValueError):
        classify(np.zeros((2, 3, 8, 8), np.float32))


def _write_images(folder, n, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i % 255, np.uint8)).save(folder / f"img{i}.JPEG")


def test_image_folder_layout_and_loading(tmp_path):
    _write_images(tmp_path / "train" / "a", 2)
    _write_images(tmp_path / "train" / "b", 3)
    ds = ImageFolder(tmp_path, 32)
    assert ds.classes == ["a", "b"] and len(ds) == 5
    x, y = ds[4]
    assert x.shape == (3, 32, 32) and y == 1
    src = BatchSource(ds, batch_size=2, world_size=2, seed=0)
    xb, yb = src.get(step=1, rank=1)
    assert xb.shape == (2, 3, 32, 32)
    assert torch.equal(src.get(3, 0)[1], BatchSource(ds, 2, 2, 0).get(3, 0)[1])  # resumable: pure function of step


@pytest.mark.parametrize("case", ["missing", "empty", "loose", "no_images"])
def test_image_folder_bad_input(tmp_path, case):
    root = tmp_path / "data"
    if case != "missing":
        root.mkdir()
    if case == "loose":
        _write_images(root, 2)
    if case == "no_images":
        (root / "cls").mkdir()
        (root / "cls" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError) as e:
        build_dataset(str(root), 32)
    assert str(root) in str(e.value)


def test_image_folder_corrupt_image(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = ImageFolder(tmp_path, 16)
    with pytest.raises(DatasetError, match="broken.jpg"):
        ds[0]


def test_schedule_size_errors():
    check_schedule(128, 8, (1, 2, 4, 8, 16))
    with pytest.raises(ValueError, match="too small"):
        check_schedule(64, 8, (1, 2, 4, 8, 16))
    with pytest.raises(ValueError, match="multiple"):
        check_schedule(100, 8, (1, 2, 4))


def test_prefetcher_workers_keep_step_order():
    from fastvar.train.folder import Prefetcher

    src = BatchSource(ProceduralShapes(seed=3, image_size=32), batch_size=2, world_size=2, seed=0)
    pf = Prefetcher(src, rank=1, workers=2)
    for step in (4, 5, 6, 9):  # a jump re-seeks
        x, y = pf.get(step)
        x0, y0 = src.get(step, 1)
        assert torch.equal(x, x0) and torch.equal(y, y0)
