"""Turning args-like objects (argparse namespaces, dicts, dataclasses) into the trainers' settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .loop import LoopConfig

# Loop settings shared by every trainer (each trainer overrides what differs, e.g. warm-up and weight decay).
LOOP_DEFAULTS: dict[str, Any] = dict(
    threads=0,
    workers=0,  # data-loading processes (0 = load in the training process)
    device="auto",
    steps=20000,
    batch_size=16,
    lr=4e-4,
    grad_clip=2.0,
    ema=0.0,
)


def as_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return {k: v for k, v in vars(cfg).items() if not k.startswith("_")}


def parse_ints(v: str | Sequence[int]) -> tuple[int, ...]:
    if isinstance(v, str):
        return tuple(int(x) for x in v.replace(" ", "").split(",") if x)
    return tuple(int(x) for x in v)


def merged(defaults: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """Defaults overridden by the non-None entries of ``cfg``; unknown dict keys are an error (typos)."""
    given = {k.replace("-", "_"): v for k, v in as_dict(cfg).items()}
    given = {k: v for k, v in given.items() if k not in ("func", "command", "train_command", "cmd")}
    loop_keys = {f.name for f in dataclasses.fields(LoopConfig)}
    unknown = sorted(set(given) - set(defaults) - loop_keys)
    if unknown and isinstance(cfg, Mapping):  # namespaces may carry the host CLI's own options
        raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
    out = dict(defaults)
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def loop_config(d: dict[str, Any]) -> LoopConfig:
    names = {f.name for f in dataclasses.fields(LoopConfig)}
    kw = {k: v for k, v in d.items() if k in names}
    if "betas" in kw:
        kw["betas"] = tuple(float(b) for b in (kw["betas"].split(",") if isinstance(kw["betas"], str) else kw["betas"]))
    if not kw.get("out"):
        raise ValueError("an output directory (--out) is required")
    return LoopConfig(**kw)


def check_schedule(image_size: int, downsample: int, patch_nums: Sequence[int]) -> None:
    """Image size, tokenizer downsampling and scale schedule must agree (last scale = latent side)."""
    if image_size % downsample:
        raise ValueError(f"image size {image_size} is not a multiple of the tokenizer's downsampling ({downsample}x)")
    side = image_size // downsample
    if side < max(patch_nums):
        raise ValueError(
            f"image size {image_size} is too small for the schedule {tuple(patch_nums)}: a {downsample}x tokenizer "
            f"gives a {side}x{side} latent but the last scale needs {max(patch_nums)}x{max(patch_nums)} "
            f"(use --image-size {max(patch_nums) * downsample})"
        )
    if side != patch_nums[-1]:
        raise ValueError(
            f"the last scale of {tuple(patch_nums)} must equal the latent side {side} (image {image_size} / {downsample})"
        )
    if list(patch_nums) != sorted(patch_nums):
        raise ValueError(f"scale schedule {tuple(patch_nums)} must be increasing")
