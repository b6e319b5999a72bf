"""Quality gates of the embedded model, measured without any learned judge.

* accuracy: class-conditional samples (default CFG, seeded) are classified by the procedural checker;
  the fraction whose recognised (shape, colour) equals the requested class.
* recon_psnr: mean PSNR (images in [0, 1]) of VQVAE reconstructions of held-out procedural images
  (a seed never used for training).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .data import HELDOUT_SEED, NUM_CLASSES, ProceduralShapes, classify


@torch.no_grad()
def reconstruct(vae, img: Tensor) -> Tensor:
    """Encode -> multi-scale quantise -> decode, in [-1, 1]; uses the tokenizer's own inference path."""
    return vae.img_to_reconstructed_img(img, last_one=True)


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR in dB of two (B, 3, H, W) batches in [0, 1]."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


@torch.no_grad()
def recon_psnr(vae, n: int = 64, image_size: int = 128, batch: int = 16, seed: int = HELDOUT_SEED) -> float:
    ds = ProceduralShapes(seed=seed, image_size=image_size)
    dev = next(vae.parameters()).device
    vals = []
    for i in range(0, n, batch):
        x, _ = ds.batch(list(range(i, min(i + batch, n))))
        x = x.to(dev)
        rec = reconstruct(vae, x).clamp(-1, 1)
        vals.append(psnr(rec.add(1).div(2), x.add(1).div(2)).cpu())
    return float(torch.cat(vals).mean())


@torch.no_grad()
def sample_accuracy(var, vae, samples: int, seed: int, sampling: dict[str, Any], batch: int = 16) -> dict[str, Any]:
    """Generate ``samples`` images (classes cycled 0..9) and score them with the procedural checker."""
    from ..sampling import make_generator

    dev = var.device
    gen = make_generator(seed, dev)
    labels = [i % NUM_CLASSES for i in range(samples)]
    preds: list[int] = []
    for i in range(0, samples, batch):
        lab = torch.tensor(labels[i : i + batch], device=dev)
        imgs = var.autoregressive_infer(
            vae, lab.numel(), lab, cfg=sampling["cfg"], top_k=sampling["top_k"], top_p=sampling["top_p"],
            more_smooth=sampling.get("more_smooth", False), generator=gen,
        )
        preds += [classify(x)["label"] for x in imgs.float().cpu()]
    correct = [int(p == t) for p, t in zip(preds, labels)]
    per_class = {c: sum(ok for ok, t in zip(correct, labels) if t == c) / max(labels.count(c), 1)
                 for c in range(NUM_CLASSES)}
    return {"accuracy": sum(correct) / max(len(correct), 1), "per_class": per_class, "labels": labels,
            "predictions": preds}


CALIBRATION_SEEDS = (0, 1)
"""Seeds (classes 0-9 each) a caching plan (``turbo``) is calibrated on before a check: the tuning seeds, so a
held-out seed's check never sees its own data."""


def _calibrated(var, vae, plan: Any, sampling: dict[str, Any]) -> Any:
    """``plan``, or for a plan with feature caching but no similarity data its engine calibrated on
    :data:`CALIBRATION_SEEDS` (the same sampling as the check)."""
    from ..accel import AccelPlan, preset_for_model
    from ..eval.run import needs_calibration, prepare_hooks
    from ..sampling import make_generator

    resolved = preset_for_model(plan, var) if isinstance(plan, str) and plan != "none" else plan
    if not isinstance(resolved, AccelPlan) or not needs_calibration(resolved):
        return plan

    @torch.no_grad()
    def calibrate(hooks) -> None:
        prev, var.hooks = var.hooks, hooks
        try:
            for s in CALIBRATION_SEEDS:
                lab = torch.arange(NUM_CLASSES, device=var.device)
                var.autoregressive_infer(vae, NUM_CLASSES, lab, cfg=sampling["cfg"], top_k=sampling["top_k"],
                                         top_p=sampling["top_p"], more_smooth=sampling.get("more_smooth", False),
                                         generator=make_generator(s, var.device))
        finally:
            var.hooks = prev

    return prepare_hooks(var, resolved, calibrate=calibrate)


def check_embedded(samples: int = 100, seed: int = 0, device: str = "cpu", recon_images: int = 64,
                   assets: str | Path | None = None, plan: Any = None) -> dict[str, Any]:
    """Both quality gates of the shipped model: ``{"accuracy", "recon_psnr", ...}``.

    ``plan`` (a preset name, an AccelPlan or None): the samples are generated under it, so a plan's
    effect on checker accuracy is measured with the same seeds as the baseline's.
    """
    from .. import validate
    from .embedded import load_embedded

    validate.int_at_least(samples, "--samples", 1, "generated images", 100)
    validate.seed(seed, "--seed")
    validate.device(device, "--device")
    var, vae, cfg = load_embedded(device, assets)
    from ..accel import apply, remove

    plan = _calibrated(var, vae, plan, cfg["sampling"])
    torch.manual_seed(seed)
    hooks = apply(var, plan)
    try:
        acc = sample_accuracy(var, vae, samples, seed, cfg["sampling"])
    finally:
        remove(var)
    rp = recon_psnr(vae, n=recon_images, image_size=int(cfg["image_size"]))
    return {
        "accuracy": acc["accuracy"],
        "recon_psnr": rp if math.isfinite(rp) else None,
        "samples": samples,
        "seed": seed,
        "per_class_accuracy": acc["per_class"],
        "sampling": cfg["sampling"],
        "gates": {"accuracy": 0.9, "recon_psnr": 24.0},
        "passed": acc["accuracy"] >= 0.9 and rp >= 24.0,
        "vqvae_step": cfg.get("vqvae_step"),
        "var_step": cfg.get("var_step"),
        "plan": getattr(getattr(hooks, "plan", None), "name", None) if plan is not None else "none",
    }
