"""Infinity's JSONL training data: one file per aspect-ratio bucket, batches drawn one bucket at a time.

The format is the official one (Infinity's README, "Data Preparation"), so a dataset prepared for the
official trainer trains here unchanged:

* a folder of files named ``[h_div_w_template]_[num_examples].jsonl`` (e.g. ``1.000_000002500.jsonl``):
  the template is one of Infinity's aspect-ratio keys (height / width, 3 decimals), the number is how
  many examples the file holds;
* one JSON object a line: ``image_path`` (required), ``h_div_w`` (required, the image's own h / w),
  ``long_caption`` (required), ``long_caption_type``, ``text`` (a short caption) and
  ``short_caption_type`` (optional).

Why buckets: every image of a batch must have the same token-map sizes, so a batch comes from one
template, resized and centre-cropped to the template's pixel size for the pixel budget ``pn``, and the
transformer runs that template's schedule (:func:`fastvar.schedules_infinity.infinity_schedule`).
Buckets are visited as the official iterable dataset does: each epoch is a shuffled sequence holding
``max(1, n_examples // (world_size * batch_size))`` batches of every bucket (so a bucket's share of the
steps follows its size) and each bucket's examples are walked in a seeded permutation. Unlike the
official stream, batch ``step`` is a pure function of ``(seed, step, rank)``: a resumed run continues
exactly where it stopped, from the step number alone. All ranks of a step share the bucket (same
sequence lengths everywhere) and take disjoint examples.

Captions: the short caption ``text`` with probability ``short_prob`` when present (the official
default is 0.2), else the long one; anything after ``--`` in it (prompt parameters) is dropped, as
the official loader does.

Every problem with the files is found when the dataset is opened, before any model is built, and
reported as one line naming the file (and line): missing images, unknown buckets, empty files,
malformed lines, counts that disagree with the file name.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import MissingInputError, UsageError
from ..schedules import Schedule
from ..schedules_infinity import INFINITY_ASPECTS, INFINITY_PNS, VAE_STRIDE, infinity_schedule, nearest_aspect, schedule_sizes

_NAME = re.compile(r"^(\d+(?:\.\d+)?)_(\d+)\.jsonl$")
_TEMPLATE_TOL = 2e-3  # official keys are truncated to 3 decimals (0.666, 0.571)
DEFAULT_SHORT_PROB = 0.2


@dataclass(frozen=True)
class JsonlItem:
    """One parsed line: where it came from (for error messages) and what it says."""

    file: Path
    line: int
    image: Path
    h_div_w: float
    long_caption: str
    text: str | None


@dataclass
class Bucket:
    """The examples of one h_div_w template, with the schedule and pixel size they are trained at."""

    template: float
    files: list[Path]
    items: list[JsonlItem]
    schedule: Schedule
    pixel_size: tuple[int, int]  # (H, W)


def _known_templates(schedules: Mapping[float, Any] | None) -> list[float]:
    if schedules is not None:
        return sorted(float(k) for k in schedules)
    return sorted(set(INFINITY_ASPECTS.values()))


def _match_template(value: float, known: Sequence[float]) -> float | None:
    key = min(known, key=lambda k: abs(k - value))
    return key if abs(key - value) <= _TEMPLATE_TOL else None


def _list_files(root_or_files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(root_or_files, (str, os.PathLike)):
        root = Path(root_or_files).expanduser()
        if not root.exists():
            raise MissingInputError(f"--data {root}: does not exist; pass a folder of [h_div_w_template]_[num_examples].jsonl "
                                    "files (Infinity's format) or a list of such files")
        if root.is_file():
            return [root]
        files = sorted(p for p in root.glob("*.jsonl") if p.is_file())
        if not files:
            raise UsageError(f"--data {root}: holds no .jsonl files; put [h_div_w_template]_[num_examples].jsonl files "
                             "there (e.g. 1.000_000002500.jsonl), one per aspect-ratio bucket")
        return files
    files = [Path(p).expanduser() for p in root_or_files]
    if not files:
        raise UsageError("--data: an empty list of JSONL files; pass a folder or at least one .jsonl file")
    for p in files:
        if not p.is_file():
            raise MissingInputError(f"--data {p}: no such file; pass existing [h_div_w_template]_[num_examples].jsonl files")
    return files


def _resolve_image(raw: str, file: Path, image_root: Path | None) -> Path | None:
    """Where ``image_path`` is: absolute, or relative to ``image_root`` (default: the current folder, as the
    official loader reads it), else relative to the JSONL file's folder."""
    p = Path(raw).expanduser()
    if p.is_absolute():
        return p if p.is_file() else None
    for base in ([image_root] if image_root is not None else [Path.cwd()]) + [file.parent]:
        q = base / p
        if q.is_file():
            return q
    return None


def _parse_file(path: Path, template: float, declared: int, known: Sequence[float],
                image_root: Path | None) -> list[JsonlItem]:
    fix = ('each line must be a JSON object with "image_path", "h_div_w", "long_caption" (and optionally "text", '
           '"short_caption_type"), as in Infinity\'s README')
    items: list[JsonlItem] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot be read as UTF-8 text ({e.__class__.__name__}); {fix}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not valid JSON ({e.msg}); {fix}") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{where}: holds a {type(obj).__name__}, not a JSON object; {fix}")
        for key in ("image_path", "h_div_w", "long_caption"):
            if key not in obj:
                raise UsageError(f'{where}: no "{key}"; {fix}')
        raw, cap, short = obj["image_path"], obj["long_caption"], obj.get("text")
        if not isinstance(raw, str) or not raw.strip():
            raise UsageError(f'{where}: "image_path" must be a non-empty string; {fix}')
        if not isinstance(cap, str):
            raise UsageError(f'{where}: "long_caption" must be a string; {fix}')
        if short is not None and not isinstance(short, str):
            raise UsageError(f'{where}: "text" must be a string (the short caption) or absent; {fix}')
        try:
            hw = float(obj["h_div_w"])
        except (TypeError, ValueError):
            hw = float("nan")
        if not math.isfinite(hw) or hw <= 0 or isinstance(obj["h_div_w"], bool):
            raise UsageError(f'{where}: "h_div_w" {obj["h_div_w"]!r} must be a positive number (image height / width)')
        nearest = min(known, key=lambda k: abs(k - hw))
        if nearest != template:
            raise UsageError(f"{where}: h_div_w {hw:g} belongs to the {nearest:.3f} bucket, not this file's {template:.3f}; "
                             f"move the line to a {nearest:.3f}_<count>.jsonl file")
        img = _resolve_image(raw, path, image_root)
        if img is None:
            base = "the image root" if image_root is not None else "the current folder"
            raise MissingInputError(f"{where}: image {raw!r} not found (relative paths are read from {base} or the "
                                    "JSONL's folder); fix image_path or pass image_root")
        items.append(JsonlItem(path, lineno, img, hw, cap, short))
    if not items:
        raise UsageError(f"{path}: holds no examples; remove the file or fill it with one JSON object a line")
    if len(items) != declared:
        raise UsageError(f"{path}: holds {len(items)} examples but its name says {declared}; rename it "
                         f"{path.name.split('_')[0]}_{len(items):09d}.jsonl (the count weights the bucket)")
    return items


def process_short_text(text: str) -> str:
    """Drop prompt parameters after ``--`` ("a cat --ar 16:9" -> "a cat "), unless nothing would be left."""
    head = text.split("--", 1)[0]
    return head if head else text


def load_image(path: Path, size: tuple[int, int], where: str = "") -> Tensor:
    """(3, H, W) float in [-1, 1]: resized (Lanczos) to cover ``size`` = (H, W) keeping the aspect, centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    th, tw = size
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = max(tw / w, th / h)
            nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
            im = im.resize((nw, nh), Image.LANCZOS)
            left, top = (nw - tw) // 2, (nh - th) // 2
            im = im.crop((left, top, left + tw, top + th))
            arr = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{where or path}: cannot read image {path} ({e.__class__.__name__}: {e}); "
                         "replace or remove it") from None
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


class JsonlBuckets:
    """Infinity's JSONL dataset as deterministic per-(step, rank) batches, one aspect-ratio bucket per step.

    ``root_or_files``: a folder of ``[h_div_w_template]_[num_examples].jsonl`` files (or one file, or a list).
    ``pn``: the pixel budget whose schedule each bucket trains at (:data:`fastvar.schedules_infinity.INFINITY_PNS`).
    ``schedules``: instead of the official tables, ``{template: schedule}`` for a custom model (e.g. the
    small embedded one); then only those templates are known. ``vae_stride``: pixels per token of the last
    scale (16 for the official VAEs; 8 for a model without spatial patchify on an 8x VAE).
    ``image_root``: where relative ``image_path`` values are read from (default: the current folder, then
    the JSONL's folder). ``short_prob``: how often the short caption ``text`` is used when present.
    """

    def __init__(self, root_or_files: str | os.PathLike | Sequence[str | os.PathLike], *, batch_size: int,
                 pn: str = "0.06M", seed: int = 0, world_size: int = 1,
                 short_prob: float = DEFAULT_SHORT_PROB, schedules: Mapping[float, Schedule | Sequence] | None = None,
                 vae_stride: int = VAE_STRIDE, image_root: str | os.PathLike | None = None) -> None:
        if int(batch_size) < 1 or int(world_size) < 1:
            raise UsageError(f"batch_size {batch_size} / world_size {world_size}: both must be >= 1")
        if not 0.0 <= float(short_prob) <= 1.0:
            raise UsageError(f"short_prob {short_prob}: must be in [0, 1] (the chance of training on the short caption)")
        if schedules is None and pn not in INFINITY_PNS:
            raise UsageError(f"pn {pn!r}: not an Infinity pixel budget; choose one of {', '.join(INFINITY_PNS)}")
        if int(vae_stride) < 1:
            raise UsageError(f"vae_stride {vae_stride}: must be >= 1 (pixels per token, 16 for Infinity's VAEs)")
        self.batch_size, self.world_size, self.seed = int(batch_size), int(world_size), int(seed)
        self.short_prob, self.pn, self.vae_stride = float(short_prob), pn, int(vae_stride)
        root = Path(image_root).expanduser() if image_root is not None else None
        if root is not None and not root.is_dir():
            raise MissingInputError(f"image_root {root}: no such folder; pass the folder relative image_path values start from")
        known = _known_templates(schedules)
        by_template: dict[float, Bucket] = {}
        for f in _list_files(root_or_files):
            m = _NAME.match(f.name)
            if not m:
                raise UsageError(f"{f}: the file name must be [h_div_w_template]_[num_examples].jsonl "
                                 "(e.g. 1.000_000002500.jsonl), Infinity's format")
            template = _match_template(float(m[1]), known)
            if template is None:
                raise UsageError(f"{f}: h_div_w template {m[1]} is not in the schedule table; known templates: "
                                 f"{', '.join(f'{k:.3f}' for k in known)}")
            items = _parse_file(f, template, int(m[2]), known, root)
            if template not in by_template:
                if schedules is not None:
                    sched = Schedule(schedule_sizes(schedules[min(schedules, key=lambda k: abs(float(k) - template))]))
                else:
                    sched = infinity_schedule(template, pn)
                h, w = sched.sizes[-1]
                by_template[template] = Bucket(template, [], [], sched, (h * self.vae_stride, w * self.vae_stride))
            by_template[template].files.append(f)
            by_template[template].items.extend(items)
        self.buckets = [by_template[k] for k in sorted(by_template)]
        per = self.world_size * self.batch_size
        self.batches_per_bucket = [max(1, len(b.items) // per) for b in self.buckets]
        self.steps_per_epoch = sum(self.batches_per_bucket)
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def __len__(self) -> int:
        """Number of examples over all buckets."""
        return sum(len(b.items) for b in self.buckets)

    @property
    def templates(self) -> list[float]:
        return [b.template for b in self.buckets]

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket index, batch number within that bucket) for every step of an epoch (cached)."""
        if self._epoch is None or self._epoch[0] != epoch:
            seq = np.repeat(np.arange(len(self.buckets)), self.batches_per_bucket)
            seq = np.random.default_rng([self.seed, epoch, 0xB0C]).permutation(seq)
            nth = np.zeros_like(seq)
            seen = np.zeros(len(self.buckets), dtype=np.int64)
            for i, b in enumerate(seq):
                nth[i] = seen[b]
                seen[b] += 1
            self._epoch = (epoch, seq, nth)
        return self._epoch[1], self._epoch[2]

    def _perm(self, bucket: int, epoch: int) -> np.ndarray:
        got = self._perms.get(bucket)
        if got is None or got[0] != epoch:
            n = len(self.buckets[bucket].items)
            got = (epoch, np.random.default_rng([self.seed, epoch, bucket, 0x1DE]).permutation(n))
            self._perms[bucket] = got
        return got[1]

    def bucket_at(self, step: int) -> Bucket:
        """The bucket of a step (the same for every rank)."""
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        seq, _ = self._epoch_plan(epoch)
        return self.buckets[int(seq[pos])]

    def indices(self, step: int, rank: int = 0) -> tuple[int, list[int]]:
        """(bucket index, example indices within it) of batch ``step`` on ``rank``."""
        if not 0 <= int(rank) < self.world_size:
            raise UsageError(f"rank {rank}: must be in [0, {self.world_size})")
        if int(step) < 0:
            raise UsageError(f"step {step}: must be >= 0")
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        seq, nth = self._epoch_plan(epoch)
        b = int(seq[pos])
        perm = self._perm(b, epoch)
        start = (int(nth[pos]) * self.world_size + int(rank)) * self.batch_size
        return b, [int(perm[(start + j) % len(perm)]) for j in range(self.batch_size)]

    def caption(self, item: JsonlItem, step: int, rank: int, j: int) -> str:
        """The caption trained on: the short one with probability ``short_prob`` when there is one."""
        if item.text and self.short_prob > 0:
            u = np.random.default_rng([self.seed, int(step), int(rank), int(j), 0xCA9]).random()
            if u < self.short_prob:
                return process_short_text(item.text)
        return item.long_caption

    def get(self, step: int, rank: int = 0) -> dict[str, Any]:
        """Batch ``step`` of ``rank``: ``{"image": (B, 3, H, W) in [-1, 1], "caption": [str], "h_div_w": [float],
        "template": float, "schedule": Schedule, "pixel_size": (H, W)}``; a pure function of (seed, step, rank)."""
        b, idx = self.indices(step, rank)
        bucket = self.buckets[b]
        items = [bucket.items[i] for i in idx]
        imgs = [load_image(it.image, bucket.pixel_size, f"{it.file}:{it.line}") for it in items]
        return {
            "image": torch.stack(imgs),
            "caption": [self.caption(it, step, rank, j) for j, it in enumerate(items)],
            "h_div_w": [it.h_div_w for it in items],
            "template": bucket.template,
            "schedule": bucket.schedule,
            "pixel_size": bucket.pixel_size,
        }


def nearest_template(h_div_w: float) -> float:
    """The official bucket of an image's h / w (where a line with this ``h_div_w`` belongs)."""
    return nearest_aspect(h_div_w)


__all__ = ["Bucket", "DEFAULT_SHORT_PROB", "JsonlBuckets", "JsonlItem", "load_image", "nearest_template",
           "process_short_text"]
