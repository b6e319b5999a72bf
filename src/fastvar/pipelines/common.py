"""What every family's pipeline shares: running a generation under a plan, stats, image output."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..accel import AccelPlan, make_hooks
from ..accel.hooks import IDENTITY, Hooks
from ..accel.pruning import PlanHooks
from ..accel.stats import dense_counts, generation_stats, peak_memory_mb


@dataclass
class GenerationResult:
    images: Tensor | None  # (N, 3, H, W) in [0, 1], float32, CPU (None when not decoded)
    seconds: float
    stats: dict = field(default_factory=dict)
    latent: Tensor | None = None


def with_defaults(defaults: dict, **given):
    """The sampling options of one call: what the caller gave, the pipeline's (official) default for None."""
    vals = tuple(defaults[k] if v is None else v for k, v in given.items())
    return vals if len(vals) > 1 else vals[0]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
    return table[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class PlanRunner:
    """Runs one generation of ``model`` with ``plan`` installed, restoring the previous hooks afterwards."""

    def __init__(self, model) -> None:
        self.model = model

    def run(self, fn, plan: AccelPlan | str | None, batch: int, sizes, record: bool = False):
        model = self.model
        prev: Hooks = model.hooks
        hooks = make_hooks(model, plan, record=record) if plan is not None else prev
        model.hooks = hooks
        dev = model.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        try:
            out = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        finally:
            model.hooks = prev
        secs = time.perf_counter() - t0
        dims = model.flop_dims()
        if isinstance(hooks, PlanHooks):
            counts, sizes, scale_s = hooks.counts, hooks.sizes, hooks.scale_seconds
        else:
            counts, scale_s = dense_counts(sizes, model.depth, dims.branches), {}
        stats = generation_stats(counts, sizes, dims, 2 * batch, scale_s, peak_memory_mb(dev))
        stats["plan"] = getattr(getattr(hooks, "plan", None), "name", "none") if hooks is not IDENTITY else "none"
        stats["seconds"] = secs
        return out, secs, stats, hooks


def to_uint8(images: Tensor) -> np.ndarray:
    return (images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def make_grid(images: Tensor, ncol: int | None = None, pad: int = 2) -> Tensor:
    n, c, h, w = images.shape
    ncol = ncol or min(n, 8)
    nrow = (n + ncol - 1) // ncol
    grid = images.new_ones(c, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return grid


def atomic_save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_images(images: Tensor, out_dir: Path, names: list[str], grid_name: str | None = "grid.png") -> list[Path]:
    """PNG per image plus a grid; each file appears complete or not at all."""
    arr = to_uint8(images)
    paths = []
    for a, name in zip(arr, names):
        p = Path(out_dir) / name
        atomic_save_png(a, p)
        paths.append(p)
    if grid_name:
        g = to_uint8(make_grid(images)[None])[0]
        p = Path(out_dir) / grid_name
        atomic_save_png(g, p)
        paths.append(p)
    return paths
