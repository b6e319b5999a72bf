"""What every family's pipeline shares: running a generation under a plan, stats, image output."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import validate
from ..accel import AccelPlan, make_hooks
from ..accel.engine import Engine
from ..accel.hooks import IDENTITY, Hooks
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


def resolve_dtype(dtype: str | torch.dtype, name: str = "dtype") -> torch.dtype:
    """The torch dtype of "fp32"/"bf16"/"fp16" (or their torch spellings); a one-line UsageError otherwise."""
    return validate.dtype(dtype, name)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_load_args(device: Any = None, dtype: Any = "fp32", seed: Any = 0) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for a ``from_pretrained``/``random_init`` call, checked before anything is built.

    Why first: torch reports an unusable device with an AssertionError from inside ``.to()``, after the
    model was built (and the weights read); this names the argument and the fix before any of that.
    """
    dev = validate.device(device, "device")
    dt = validate.dtype(dtype, "dtype")
    validate.seed(seed, "seed")
    return (dev if dev is not None else default_device()), dt


def check_arch(**sizes: Any) -> None:
    """Architecture overrides (``depth=2, embed_dim=64`` ...): whole numbers >= 1, None meaning "the default";
    ``embed_dim`` must split evenly into ``num_heads`` heads when both are given."""
    for k, v in sizes.items():
        if v is not None:
            validate.int_at_least(v, k, 1)
    e, h = sizes.get("embed_dim"), sizes.get("num_heads")
    if e is not None and h is not None and e % h:
        raise validate.fail("embed_dim", e, f"not divisible by num_heads={h}",
                            f"give a multiple of the head count, e.g. embed_dim={h * max(1, e // h)}")


def check_sampling_args(seed: Any, plan: Any, cfg: Any, top_k: Any, top_p: Any, *, record: Any = False,
                        decode: Any = True, cfg_per_scale: bool = False, top_k_schedule: bool = False) -> None:
    """The options every pipeline call shares, checked before any text is encoded or token sampled."""
    validate.seed(seed, "seed")
    validate.plan(plan, "plan")
    validate.guidance(cfg, "cfg", per_scale=cfg_per_scale)
    validate.top_k(top_k, "top_k", allow_schedule=top_k_schedule)
    validate.top_p(top_p, "top_p")
    validate.flag_bool(record, "record")
    validate.flag_bool(decode, "decode")


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
        cuda = dev.type == "cuda"
        if cuda:  # events bracket the generation on the device: one synchronisation, at the end
            torch.cuda.reset_peak_memory_stats(dev)
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        try:
            out = fn()
            if cuda:
                stop.record()
                stop.synchronize()
        finally:
            model.hooks = prev
        secs = start.elapsed_time(stop) / 1000.0 if cuda else time.perf_counter() - t0
        dims = model.flop_dims()
        if isinstance(hooks, Engine):
            rec = hooks.recorder
            counts, sizes, scale_s = rec.counts, rec.sizes, rec.scale_seconds
            kv, kv_len = rec.kv_summary(), rec.kv_len
            rows = rec.rows  # B instead of 2B rows at conditional-only scales
        else:
            counts, scale_s = dense_counts(sizes, model.depth, dims.branches), {}
            kv, rows, kv_len = dense_kv(model, sizes, 2 * batch), None, None
        stats = generation_stats(counts, sizes, dims, 2 * batch, scale_s, peak_memory_mb(dev), rows, kv_len)
        stats["plan"] = getattr(getattr(hooks, "plan", None), "name", "none") if hooks is not IDENTITY else "none"
        stats["seconds"] = secs
        stats.update(kv)  # kv_bytes: K/V held by the caches at the end; kv_peak_bytes: most held at once
        return out, secs, stats, hooks


def dense_kv(model, sizes, rows: int) -> dict:
    """K/V bytes the official code's caches hold with no plan: every token of every scale, every layer
    (HART: plus its text prefix), both CFG halves, at the model's parameter dtype (exact for fp32/bf16
    weights; a hooks engine counts the real tensors instead)."""
    dims = model.flop_dims()
    tokens = sum(h * w for h, w in sizes) + max(dims.prefix_kv - 1, 0)
    p = next(model.parameters(), None)
    elsize = p.element_size() if p is not None else 4
    per_layer = 2 * rows * tokens * dims.width * elsize
    held, per_scale = 0, {}
    for si, (h, w) in enumerate(sizes):
        held += 2 * rows * (h * w + (max(dims.prefix_kv - 1, 0) if si == 0 else 0)) * dims.width * elsize * model.depth
        per_scale[str(si)] = held
    return {"kv_bytes": per_layer * model.depth, "kv_peak_bytes": per_layer * model.depth,
            "kv_bytes_per_scale": per_scale, "kv_bytes_per_layer": {str(i): per_layer for i in range(model.depth)},
            "kv_attended_peak_bytes": per_layer}


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
    """A PNG that appears complete or not at all (one atomic writer: ``checkpoints.atomic_output``)."""
    from PIL import Image

    from ..checkpoints import atomic_output

    with atomic_output(path) as f:
        Image.fromarray(array).save(f, format="PNG")


def atomic_write_text(text: str, path: Path) -> None:
    """Text that appears complete or not at all (one atomic writer: ``checkpoints.atomic_output``)."""
    from ..checkpoints import atomic_output

    with atomic_output(path, "w") as f:
        f.write(text)


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
