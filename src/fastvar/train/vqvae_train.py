"""VQVAE trainer: reconstruction + multi-scale residual VQ with a straight-through estimator.

The quantizer's own inference path (``img -> idx``) is not differentiable, so the training forward is
written here over the quantizer's modules: at every scale the residual is area-downsampled, snapped to
its nearest code, and the code map (upsampled, through the scale's Phi conv) is added to ``f_hat``.
The codebook and Phi learn from ``||f_hat - sg(f)||^2``, the encoder from the commitment term
``beta ||sg(f_hat) - f||^2`` and from the decoder through the straight-through copy
``f + sg(f_hat - f)``. Codes unused for a while are restarted on residual vectors of the current batch
(a common remedy for dead codes in small codebooks).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import LOOP_DEFAULTS, check_options, check_schedule, loop_config, merged, parse_ints
from .dist import cleanup, init_distributed
from .folder import BatchSource, Prefetcher, build_dataset
from .loop import Trainer

VQVAE_DEFAULTS: dict[str, Any] = dict(
    out=None,
    data="procedural",
    data_seed=0,
    image_size=128,
    vocab_size=512,
    z_channels=16,
    ch=32,
    ch_mult="1,1,2,2",
    num_res_blocks=1,
    patch_nums="1,2,3,4,5,6,8,10,13,16",
    share_quant_resi=4,
    quant_resi=0.5,
    beta=0.25,
    l1=1.0,
    l2=1.0,
    vq_weight=1.0,
    restart_every=100,
    **LOOP_DEFAULTS,
    warmup=200,
    weight_decay=0.0,
    ckpt_every=200,
)


def vqvae_model_config(d: dict[str, Any]) -> dict[str, Any]:
    """The VQVAE constructor kwargs (also the checkpoint fingerprint of the architecture)."""
    return dict(
        vocab_size=int(d["vocab_size"]),
        z_channels=int(d["z_channels"]),
        ch=int(d["ch"]),
        ch_mult=list(parse_ints(d["ch_mult"])),
        num_res_blocks=int(d["num_res_blocks"]),
        share_quant_resi=int(d["share_quant_resi"]),
        quant_resi=float(d["quant_resi"]),
        beta=float(d["beta"]),
        patch_nums=list(parse_ints(d["patch_nums"])),
    )


def build_vqvae(cfg: dict[str, Any]):
    from ..tokenizers.vqvae import VQVAE

    return VQVAE(**cfg)


def downsample_factor(cfg: dict[str, Any]) -> int:
    return 2 ** (len(cfg["ch_mult"]) - 1)


def quantize_st(
    vae, f: Tensor, patch_nums: tuple[int, ...], beta: float, rests: list[Tensor] | None = None
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Multi-scale residual quantisation for training: (straight-through f_hat, vq loss, per-scale codes).

    The codes are returned so that usage can be tracked; if ``rests`` is a list, the (N, C) residual
    vectors that were quantised at every scale are appended to it (the pool for dead-code restarts).
    """
    quant = vae.quantize
    emb = quant.embedding.weight
    B, C, H, W = f.shape
    SN = len(patch_nums)
    f_ng = f.detach()
    f_hat = torch.zeros_like(f_ng)
    idx_list: list[Tensor] = []
    loss = f.new_zeros(())
    for si, pn in enumerate(patch_nums):
        with torch.no_grad():
            rest = f_ng - f_hat.detach()
            r = F.interpolate(rest, size=(pn, pn), mode="area") if pn != H else rest
            r = r.permute(0, 2, 3, 1).reshape(-1, C).float()
            e = emb.detach().float()
            d = r.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1)[None] - 2 * r @ e.t()
            idx = d.argmin(1)
        if rests is not None:
            rests.append(r)
        idx_list.append(idx.view(B, pn * pn))
        h = quant.embedding(idx).view(B, pn, pn, C).permute(0, 3, 1, 2)
        if pn != H:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        f_hat = f_hat + quant.phi(si, SN)(h)  # out of place: every scale's f_hat is kept for backward
        loss = loss + F.mse_loss(f_hat, f_ng) + beta * F.mse_loss(f_hat.detach(), f)
    f_st = f + (f_hat - f).detach()
    return f_st, loss / SN, idx_list


def vqvae_forward(vae, img: Tensor, patch_nums: tuple[int, ...], beta: float) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(reconstruction in [-1, 1] scale, vq loss, codes) for a training batch."""
    f = vae.quant_conv(vae.encoder(img))
    f_st, vq, idx = quantize_st(vae, f, patch_nums, beta)
    rec = vae.decoder(vae.post_quant_conv(f_st))
    return rec, vq, idx


def psnr_from_mse(mse_pm1: float) -> float:
    """PSNR in dB for images in [0, 1], given the MSE measured in [-1, 1] units."""
    return 10 * math.log10(4.0 / max(mse_pm1, 1e-12))


class STForward(nn.Module):
    """The training forward as a module, so DDP can wrap it while the VQVAE keeps its own ``forward``."""

    def __init__(self, vae, patch_nums: tuple[int, ...], beta: float) -> None:
        super().__init__()
        self.vae, self.patch_nums, self.beta = vae, patch_nums, beta

    def forward(self, img: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        return vqvae_forward(self.vae, img, self.patch_nums, self.beta)


class CodeUsage:
    """Counts code hits; every ``every`` steps replaces never-hit codes with random residual vectors."""

    def __init__(self, vocab: int, every: int, device: torch.device) -> None:
        self.hits = torch.zeros(vocab, device=device)
        self.every = every

    def update(self, idx: list[Tensor]) -> None:
        for i in idx:
            self.hits += torch.bincount(i.flatten(), minlength=self.hits.numel()).to(self.hits)

    @torch.no_grad()
    def maybe_restart(self, vae, img: Tensor, patch_nums: tuple[int, ...], step: int, distributed: bool,
                      generator_seed: int) -> int:
        """At steps that are multiples of ``every``, re-seed never-hit codes from ``img``'s residuals."""
        if self.every <= 0 or step == 0 or step % self.every:
            return 0
        hits = self.hits.clone()
        if distributed:
            tdist.all_reduce(hits)
        dead = (hits == 0).nonzero().flatten()
        self.hits.zero_()
        n = int(dead.numel())
        if n:
            rests: list[Tensor] = []
            quantize_st(vae, vae.quant_conv(vae.encoder(img)), patch_nums, 0.0, rests)
            pool = torch.cat(rests, 0)
            g = torch.Generator(device="cpu").manual_seed(generator_seed + step)
            pick = torch.randint(0, pool.shape[0], (n,), generator=g).to(pool.device)
            w = vae.quantize.embedding.weight
            w.data[dead] = pool[pick].to(w.dtype)
            if distributed:
                tdist.broadcast(w.data, 0)
        return n


def train_vqvae(config: Any) -> dict[str, float]:
    """Train (or resume) a VQVAE; ``config`` is an argparse namespace, dict or dataclass (see VQVAE_DEFAULTS)."""
    d = merged(VQVAE_DEFAULTS, config)
    check_options(d)
    if int(d["threads"]) > 0:
        torch.set_num_threads(int(d["threads"]))
    mcfg = vqvae_model_config(d)
    pn = tuple(mcfg["patch_nums"])
    check_schedule(int(d["image_size"]), downsample_factor(mcfg), pn)
    lcfg = loop_config(d)
    dataset = build_dataset(d["data"], int(d["image_size"]), seed=int(d["data_seed"]))
    info = init_distributed(d["device"])
    try:
        torch.manual_seed(lcfg.seed)
        vae = build_vqvae(mcfg).to(info.device)
        data_fp = d["data"] if d["data"] in ("procedural", "shapes") else "folder"
        fingerprint = {"kind": "vqvae", "model": mcfg, "image_size": int(d["image_size"]), "data": data_fp}
        meta = {"kind": "vqvae", "vqvae_config": mcfg, "image_size": int(d["image_size"])}
        beta = float(d["beta"])
        trainer = Trainer(vae, lcfg, info, fingerprint, meta, forward_module=STForward(vae, pn, beta))
        source = BatchSource(dataset, lcfg.batch_size, info.world_size, seed=lcfg.seed)
        loader = Prefetcher(source, info.rank, int(d["workers"]))
        usage = CodeUsage(mcfg["vocab_size"], int(d["restart_every"]), info.device)
        trainer.extra_state["code_hits"] = usage.hits
        l1w, l2w, vqw = float(d["l1"]), float(d["l2"]), float(d["vq_weight"])

        def step_fn(model, step: int):
            img, _ = loader.get(step)
            img = img.to(info.device, non_blocking=True)
            # dead-code restarts act between optimizer steps, on residuals of this step's batch
            n = usage.maybe_restart(vae, img, pn, step, info.distributed, lcfg.seed)
            rec, vq, idx = model(img)
            rec = rec.float()
            l2 = F.mse_loss(rec, img)
            l1 = F.l1_loss(rec, img)
            loss = l1w * l1 + l2w * l2 + vqw * vq
            l1, l2 = l1.detach(), l2.detach()
            usage.update(idx)
            metrics = {"l1": l1.item(), "l2": l2.item(), "vq": vq.item(), "psnr": psnr_from_mse(l2.item())}
            return loss, metrics | {"restarted": float(n)}

        return trainer.fit(step_fn)
    finally:
        cleanup(info)

