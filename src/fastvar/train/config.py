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


# Ranges of the trainers' numeric options: (lowest, highest, what the value means, an example); the lower
# bound is excluded for the options in _OPEN_LOW, the upper one for those in _OPEN_HIGH.
_RANGES: dict[str, tuple[float | None, float | None, str, str]] = {
    "lr": (0, None, "learning rate", "3e-4"),
    "min_lr_ratio": (0, 1, "final LR / peak LR", "0.1"),
    "weight_decay": (0, None, "AdamW weight decay", "0.05"),
    "grad_clip": (0, None, "0 = no clipping", "2.0"),
    "ema": (0, 1, "EMA decay, 0 = off, below 1", "0.999"),
    "max_shard_mb": (0, None, "checkpoint shard size", "24"),
    "time_limit": (0, None, "seconds, 0 = no limit", "3600"),
    "mlp_ratio": (0, None, "MLP width / embedding width", "4"),
    "cond_drop_rate": (0, 1, "fraction of labels dropped for CFG", "0.1"),
    "drop_path_rate": (0, 1, "stochastic depth rate", "0.1"),
    "label_smooth": (0, 1, "label smoothing", "0.1"),
    "pg": (0, 1, "fraction of the steps, 0 = off", "0.25"),
    "pgwp": (0, None, "steps", "100"),
    "beta": (0, None, "commitment loss weight", "0.25"),
    "l1": (0, None, "loss weight", "1.0"),
    "l2": (0, None, "loss weight", "1.0"),
    "vq_weight": (0, None, "loss weight", "1.0"),
    "quant_resi": (None, None, "residual ratio", "0.5"),
}
_OPEN_LOW = ("lr", "max_shard_mb", "mlp_ratio")
_OPEN_HIGH = ("ema", "cond_drop_rate", "drop_path_rate", "label_smooth")
_AT_LEAST: dict[str, tuple[int, str]] = {
    "steps": (1, "optimizer steps"), "batch_size": (1, "images per process"), "warmup": (0, "steps"),
    "ckpt_every": (1, "steps between checkpoints"), "log_every": (1, "steps between log lines"),
    "keep_last": (0, "checkpoints kept, 0 = all"), "threads": (0, "0 = torch's default"),
    "workers": (0, "0 = load in the training process"), "data_seed": (0, "dataset seed"),
    "image_size": (1, "pixels"), "num_classes": (0, "0 = from the dataset"), "depth": (1, "transformer blocks"),
    "embed_dim": (1, "embedding width"), "num_heads": (1, "attention heads"), "pg0": (0, "scale index"),
    "vocab_size": (2, "codebook entries"), "z_channels": (1, "latent channels"), "ch": (1, "base channels"),
    "num_res_blocks": (0, "residual blocks per level"), "share_quant_resi": (0, "shared residual convs"),
    "restart_every": (0, "steps, 0 = never restart dead codes"),
}
_CHOICES = {"amp": ("auto", "bf16", "fp16", "none"), "moments_dtype": ("bf16", "fp32")}


def check_options(d: dict[str, Any]) -> None:
    """Every trainer option of ``d`` (merged defaults + user values), checked before anything is built or read.

    Why: a bad value used to surface minutes later, or never (a negative EMA silently trained nonsense);
    each failure here is one :class:`~fastvar.errors.UsageError` line naming the flag and the fix.
    """
    from .. import validate
    from ..errors import MissingInputError, UsageError

    def flag(k: str) -> str:
        return "--" + k.replace("_", "-")

    if not d.get("out"):
        raise UsageError("--out: an output directory is required; e.g. --out runs/vqvae")
    validate.output_dir(d["out"], "--out")
    validate.seed(d.get("seed", 0), "--seed")
    for k, (lo, meaning) in _AT_LEAST.items():
        if k in d:
            validate.int_at_least(d[k], flag(k), lo, meaning)
    for k, (lo, hi, meaning, example) in _RANGES.items():
        if k in d:
            validate.number_in(d[k], flag(k), lo, hi, lo_open=k in _OPEN_LOW, hi_open=k in _OPEN_HIGH,
                               meaning=meaning, example=example)
    for k, choices in _CHOICES.items():
        if k in d and d[k] not in choices:
            raise validate.fail(flag(k), d[k], "unknown value", f"use one of {', '.join(choices)}")
    if "betas" in d:
        b = d["betas"]
        given = ",".join(map(str, b)) if isinstance(b, (list, tuple)) else b
        try:
            betas = [float(x) for x in (b.split(",") if isinstance(b, str) else b)]
        except (TypeError, ValueError):
            betas = []
        if len(betas) != 2 or not all(0 <= x < 1 for x in betas):
            raise validate.fail("--betas", given, "needs two AdamW betas in [0, 1)", "e.g. --betas 0.9,0.95")
    for k in ("ch_mult", "patch_nums"):
        if k in d:
            try:
                vals = parse_ints(d[k])
            except (TypeError, ValueError):
                vals = ()
            if not vals or min(vals) < 1:
                raise validate.fail(flag(k), d[k], "needs comma-separated whole numbers >= 1",
                                    f"e.g. {flag(k)} {'1,1,2,2' if k == 'ch_mult' else '1,2,3,4,5,6,8,10,13,16'}")
    if "embed_dim" in d and "num_heads" in d and int(d["embed_dim"]) % int(d["num_heads"]):
        raise UsageError(f"--embed-dim {d['embed_dim']}: not divisible by --num-heads {d['num_heads']}; give a "
                         f"multiple of the head count, e.g. --embed-dim {int(d['num_heads']) * 64}")
    if "device" in d:
        validate.device(d["device"], "--device", allow_auto=True)
    data = d.get("data")
    if data is not None and data not in ("procedural", "shapes"):
        from pathlib import Path

        p = Path(str(data)).expanduser()
        if not p.exists():
            raise MissingInputError(f"--data {data}: no such folder; pass 'procedural' or an ImageNet-style folder "
                                    "root/<class>/<image>")
        if not p.is_dir():
            raise UsageError(f"--data {data}: is a file; pass 'procedural' or an ImageNet-style folder "
                             "root/<class>/<image>")
    if "vqvae" in d and d["vqvae"]:
        from pathlib import Path

        p = Path(str(d["vqvae"])).expanduser()
        if not p.exists():
            raise MissingInputError(f"--vqvae {d['vqvae']}: does not exist; pass a VQVAE run directory or its "
                                    "exported .safetensors file (fastvar train vqvae --out DIR makes one)")
