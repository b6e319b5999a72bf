"""ImageNet-style folder dataset (``root/<class>/*.JPEG``, or ``root/train/<class>/...``) and batch sources.

A batch source maps ``(step, rank)`` to that rank's batch, so a resumed run sees exactly the batches it
would have seen without the interruption, with no sampler state to save.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from .data import ProceduralShapes

IMG_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


class DatasetError(ValueError):
    """The dataset folder is missing, empty or not laid out as ``<root>/<class>/<image>``."""


class ImageFolder(Dataset):
    """Class-per-subfolder images, resized (shorter side) and centre-cropped to ``image_size``, in [-1, 1]."""

    infinite = False

    def __init__(self, root: str | Path, image_size: int, hflip: bool = True) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"dataset folder {root} does not exist")
        if (root / "train").is_dir():
            root = root / "train"
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            loose = [p for p in root.iterdir() if p.suffix.lower() in IMG_EXTS]
            hint = " (images must be inside one sub-folder per class)" if loose else ""
            raise DatasetError(f"no class sub-folders in {root}: expected {root}/<class>/<image>{hint}")
        self.samples: list[tuple[Path, int]] = []
        for ci, c in enumerate(classes):
            for p in sorted((root / c).rglob("*")):
                if p.suffix.lower() in IMG_EXTS and p.is_file():
                    self.samples.append((p, ci))
        if not self.samples:
            raise DatasetError(f"no images ({', '.join(sorted(IMG_EXTS))}) under {root}/<class>/")
        self.root, self.classes, self.num_classes = root, classes, len(classes)
        self.image_size, self.hflip = int(image_size), hflip

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, flip: bool = False) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"cannot read image {path}: {e}") from e
        s = self.image_size
        w, h = im.size
        scale = s / min(w, h)
        im = im.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if flip:
            x = x.flip(-1)
        return x.mul(2).sub(1), label

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.load(index)


class BatchSource:
    """Deterministic per-(step, rank) batches over a dataset.

    Finite datasets are walked epoch by epoch in a permutation seeded by ``(seed, epoch)``; the
    procedural dataset is infinite and already random per index, so it is walked in order.
    """

    def __init__(self, dataset: Dataset, batch_size: int, world_size: int = 1, seed: int = 0) -> None:
        self.ds, self.B, self.world, self.seed = dataset, int(batch_size), int(world_size), int(seed)
        self._perm: tuple[int, np.ndarray] | None = None

    def _index(self, pos: int) -> tuple[int, bool]:
        n = len(self.ds)
        if getattr(self.ds, "infinite", False):
            return pos % n, False
        epoch, off = divmod(pos, n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
        i = int(self._perm[1][off])
        flip = bool(getattr(self.ds, "hflip", False)) and bool((pos * 2654435761 + self.seed) >> 7 & 1)
        return i, flip

    def get(self, step: int, rank: int = 0) -> tuple[Tensor, Tensor]:
        base = (step * self.world + rank) * self.B
        xs, ys = [], []
        for j in range(self.B):
            i, flip = self._index(base + j)
            if isinstance(self.ds, ImageFolder):
                x, y = self.ds.load(i, flip)
            else:
                x, y = self.ds[i]
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def build_dataset(name: str, image_size: int, seed: int = 0) -> Dataset:
    """``procedural`` (built-in shapes) or a path to an ImageNet-style folder."""
    if name in ("procedural", "shapes"):
        return ProceduralShapes(seed=seed, image_size=image_size)
    return ImageFolder(name, image_size)


class _StepStream(torch.utils.data.IterableDataset):
    """Batches of steps ``start..end-1`` for one rank; DataLoader worker ``w`` makes every n-th step.

    A DataLoader reads its workers round-robin, so the batches arrive in step order.
    """

    def __init__(self, source: BatchSource, start: int, end: int, rank: int) -> None:
        self.source, self.start, self.end, self.rank = source, start, end, rank

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(self.start + wid, self.end, nw):
            x, y = self.source.get(step, self.rank)
            yield step, x, y


class Prefetcher:
    """Step-indexed batches, loaded by ``workers`` background processes (0 = in the training process)."""

    def __init__(self, source: BatchSource, rank: int, workers: int = 0) -> None:
        self.source, self.rank, self.workers = source, rank, int(workers)
        self._it = None
        self._next_step: int | None = None

    def get(self, step: int) -> tuple[Tensor, Tensor]:
        if self.workers <= 0:
            return self.source.get(step, self.rank)
        if self._it is None or self._next_step != step:
            stream = _StepStream(self.source, step, 1 << 62, self.rank)
            self._it = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.workers,
                                                        prefetch_factor=2, persistent_workers=False))
        s, x, y = next(self._it)
        assert s == step, (s, step)
        self._next_step = step + 1
        return x, y
