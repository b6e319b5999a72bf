"""BSQ-VAE trainer: Infinity's bitwise tokenizer (``fastvar.tokenizers.bsq.BSQVAE``) on images, CPU or GPU.

The training forward is the inference quantiser made differentiable, so what the decoder learns to
decode is exactly what the Infinity pipeline hands it: per scale the residual is area-downsampled,
L2-normalised and snapped to ``sign / sqrt(d)`` (straight-through), upsampled back with trilinear
interpolation and subtracted; the decoder sees the sum of all scales. There is no codebook to learn
(BSQ's codes are the hypercube corners), so the quantiser losses only shape the encoder:

* commitment ``||u - sg(q)||^2`` per scale (u: the normalised residual, q: its code), weight ``--beta``;
* BSQ's entropy term with the factorised per-bit code distribution
  ``p(bit_i = 1 | u) = sigmoid(4 u_i / (sqrt(d) tau))``: the per-token entropy is minimised (confident
  bits) and the entropy of the batch-mean distribution maximised (every bit used), weight ``--entropy``.

Reconstruction is L1 + L2 (no perceptual or GAN loss: nothing to download, fine for flat procedural scenes).
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import LOOP_DEFAULTS, check_options, loop_config, merged, parse_ints
from .dist import cleanup, init_distributed
from .loop import Trainer

BSQ_DEFAULTS: dict[str, Any] = dict(
    out=None,
    data="procedural-t2i",
    data_seed=0,
    image_size=128,
    codebook_dim=16,
    patch_size=8,
    base_ch=32,
    ch_mult="1,1,2,2",
    num_res_blocks=1,
    schedule="1,2,3,4,6,8,11,16",
    beta=0.25,
    entropy=0.05,
    entropy_temp=0.1,
    l1=1.0,
    l2=1.0,
    **LOOP_DEFAULTS,
    warmup=100,
    weight_decay=0.0,
    ckpt_every=100,
)

DATA_HELP = "'procedural-t2i' (built-in captioned scenes), 'procedural' (single shapes) or a JSONL folder"


# ----------------------------------------------------------------------------------------- data

def _fallback_caption(label: int) -> str:
    from .data import class_name

    return "a " + class_name(int(label))


class T2ISource:
    """``get(step, rank)`` -> (images (B, 3, S, S) in [-1, 1], captions): a pure function of (seed, step, rank).

    ``procedural-t2i`` uses :class:`fastvar.train.t2i_data.ProceduralT2I`; ``procedural`` the single-shape
    stream with captions "a red circle"; a folder goes through :class:`fastvar.train.jsonl_data.JsonlBuckets`.
    Why step-indexed: the training loop resumes from a step number alone, with no sampler state saved.
    """

    def __init__(self, data: str, image_size: int, batch_size: int, world_size: int = 1, seed: int = 0,
                 schedule: tuple[tuple[int, int], ...] | None = None, stride: int = 8) -> None:
        self.data, self.S, self.B, self.world, self.seed = str(data), int(image_size), int(batch_size), int(world_size), int(seed)
        self._jsonl = None
        if self.data == "procedural-t2i":
            from .t2i_data import ProceduralT2I

            self.ds = ProceduralT2I(seed=self.seed, size=self.S)
        elif self.data in ("procedural", "shapes"):
            from .data import ProceduralShapes

            self.ds = ProceduralShapes(seed=self.seed, image_size=self.S)
        else:
            self.ds = None
            sched = schedule or ((self.S // stride, self.S // stride),)
            self._jsonl = open_jsonl(self.data, self.B, self.world, self.seed, sched, stride)

    def get(self, step: int, rank: int = 0) -> tuple[Tensor, list[str]]:
        if self._jsonl is not None:
            return self._jsonl(step, rank)
        base = (step * self.world + rank) * self.B
        imgs, caps = [], []
        for j in range(self.B):
            item = self.ds[base + j]
            if isinstance(item, dict):
                imgs.append(item["image"])
                caps.append(str(item["caption"]))
            else:
                imgs.append(item[0])
                caps.append(_fallback_caption(item[1]))
        return torch.stack(imgs).float(), caps


def open_jsonl(root: str, batch_size: int, world: int, seed: int, schedule: tuple[tuple[int, int], ...], stride: int):
    """A (step, rank) -> (images, captions) function over an official-format JSONL folder.

    The models trained here use one square schedule, so only the 1:1 bucket is accepted (the loader
    names any other template in one line); images are resized to the schedule's last scale x ``stride``.
    """
    from .jsonl_data import JsonlBuckets

    buckets = JsonlBuckets(root, batch_size=batch_size, seed=seed, world_size=world, schedules={1.0: schedule},
                           vae_stride=stride)

    def get(step: int, rank: int) -> tuple[Tensor, list[str]]:
        batch = buckets.get(step, rank)
        return batch["image"].float(), list(batch["caption"])

    return get


def check_data(data: str) -> None:
    """``--data``: a built-in name or an existing folder (one line otherwise, before anything is built)."""
    from ..errors import MissingInputError, UsageError

    if data in ("procedural-t2i", "procedural", "shapes"):
        return
    p = Path(str(data)).expanduser()
    if not p.exists():
        raise MissingInputError(f"--data {data}: no such folder; pass {DATA_HELP}")
    if not p.is_dir():
        raise UsageError(f"--data {data}: is a file; pass {DATA_HELP} (a folder of *.jsonl files)")


# ----------------------------------------------------------------------------------------- model

def bsq_model_config(d: dict[str, Any]) -> dict[str, Any]:
    """BSQVAEConfig fields (also the checkpoint fingerprint of the architecture)."""
    mult = list(parse_ints(d["ch_mult"]))
    return dict(
        codebook_dim=int(d["codebook_dim"]), patch_size=int(d["patch_size"]), base_ch=int(d["base_ch"]),
        num_res_blocks=int(d["num_res_blocks"]), encoder_ch_mult=mult, decoder_ch_mult=mult,
    )


def build_bsq(cfg: dict[str, Any], for_training: bool = False):
    """A BSQVAE; ``for_training`` unregisters the official second quantiser name (``quantize``).

    Why: the official model registers one ``mask`` buffer under two keys, which safetensors refuses to
    save twice; the training checkpoints keep ``quantizer.lfq.mask`` only (the attribute still works).
    """
    from ..tokenizers.bsq import BSQVAE, BSQVAEConfig

    vae = BSQVAE(BSQVAEConfig(**cfg))
    if for_training:
        del vae._modules["quantize"]
        object.__setattr__(vae, "quantize", vae.quantizer)
    return vae


def schedule_from(value: Any) -> tuple[tuple[int, int], ...]:
    """Square scales from "1,2,3,...": the latent sides of the multi-scale quantiser (and the transformer)."""
    return tuple((s, s) for s in parse_ints(value))


def _binary_entropy(p: Tensor) -> Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log()) / math.log(2)


def bsq_quantize_train(
    h: Tensor, sizes: tuple[tuple[int, int], ...], inv_temp: float
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Multi-scale BSQ with straight-through: (summed codes (B, d, H, W), commitment, entropy loss, bits).

    Same arithmetic as the inference quantiser (area down, normalise, sign, trilinear up), with
    gradients: the encoder receives the decoder's gradient through ``u + sg(q - u)`` at every scale.
    """
    B, d, H, W = h.shape
    s = 1.0 / math.sqrt(d)
    x = h.float().unsqueeze(2)
    residual, out = x, x.new_zeros(())
    commit = x.new_zeros(())
    ent = x.new_zeros(())
    bits: list[Tensor] = []
    for ph, pw in sizes:
        full = (ph, pw) == (H, W)
        r = residual if full else F.interpolate(residual, size=(1, ph, pw), mode="area")
        u = F.normalize(r, dim=1)
        code = torch.where(u > 0, s, -s).detach()
        q = u + (code - u).detach()
        commit = commit + F.mse_loss(u, code, reduction="none").sum(1).mean()
        prob = torch.sigmoid(4 * s * u / inv_temp)  # P(bit = 1), factorised over the d bits
        per_token = _binary_entropy(prob).mean()
        batch_mean = _binary_entropy(prob.mean(dim=(0, 2, 3, 4))).mean()
        ent = ent + per_token - batch_mean
        bits.append((u > 0).flatten(2).transpose(1, 2))
        up = q if full else F.interpolate(q, size=(1, H, W), mode="trilinear")
        residual = residual - up
        out = out + up
    n = len(sizes)
    return out.squeeze(2), commit / n, ent / n, bits


class BSQForward(nn.Module):
    """The training forward (what DDP wraps): image -> (reconstruction, commitment, entropy, bits)."""

    def __init__(self, vae, sizes: tuple[tuple[int, int], ...], entropy_temp: float) -> None:
        super().__init__()
        self.vae, self.sizes, self.temp = vae, sizes, entropy_temp

    def forward(self, img: Tensor) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        h = self.vae.encoder(img)
        z, commit, ent, bits = bsq_quantize_train(h, self.sizes, self.temp)
        return self.vae.decoder(z.to(img.dtype)), commit, ent, bits


def psnr_from_mse(mse_pm1: float) -> float:
    return 10 * math.log10(4.0 / max(mse_pm1, 1e-12))


def check_bsq_options(d: dict[str, Any]) -> None:
    """Every BSQ-specific flag, checked before anything is built (one-line UsageError each)."""
    from .. import validate
    from ..errors import UsageError

    check_options({k: v for k, v in d.items() if k != "data"})
    check_data(d["data"])
    for k, lo in (("codebook_dim", 1), ("patch_size", 1), ("base_ch", 1)):
        validate.int_at_least(d[k], "--" + k.replace("_", "-"), lo, "")
    for k in ("entropy", "entropy_temp"):
        validate.number_in(d[k], "--" + k.replace("_", "-"), 0, None, lo_open=k == "entropy_temp", meaning="",
                           example="0.1")
    ps = int(d["patch_size"])
    if ps & (ps - 1):
        raise UsageError(f"--patch-size {ps}: must be a power of two (the VAE downsamples by 2 per level), e.g. 8")
    try:
        mult = parse_ints(d["ch_mult"])
    except (TypeError, ValueError):
        mult = ()
    if not mult or min(mult) < 1:
        raise UsageError(f"--ch-mult {d['ch_mult']}: needs comma-separated whole numbers >= 1, e.g. --ch-mult 1,1,2,2")
    levels = int(math.log2(ps))
    if len(mult) < levels + 1:
        raise UsageError(f"--ch-mult {d['ch_mult']}: {len(mult)} levels but --patch-size {ps} needs {levels + 1} "
                         f"(one per 2x downsampling plus one), e.g. --ch-mult {','.join(['1'] * (levels + 1))}")
    bad = [m for m in mult if (int(d["base_ch"]) * m) % 32 and (int(d["base_ch"]) * m) % 24]
    if bad:
        raise UsageError(f"--base-ch {d['base_ch']}: base_ch x ch_mult must be a multiple of 32 or 24 (GroupNorm), "
                         "e.g. --base-ch 32")
    check_square_schedule(d["schedule"], int(d["image_size"]), ps)


def check_square_schedule(value: Any, image_size: int, patch_size: int) -> None:
    from ..errors import UsageError

    try:
        sides = parse_ints(value)
    except (TypeError, ValueError):
        sides = ()
    if not sides or min(sides) < 1:
        raise UsageError(f"--schedule {value}: needs increasing latent sides, e.g. --schedule 1,2,3,4,6,8,11,16")
    if list(sides) != sorted(set(sides)):
        raise UsageError(f"--schedule {value}: sides must be strictly increasing, e.g. 1,2,3,4,6,8,11,16")
    if len(sides) > 15:
        raise UsageError(f"--schedule {value}: at most 15 scales (Infinity's level embedding has 15 rows)")
    if image_size % patch_size or image_size // patch_size != sides[-1]:
        raise UsageError(f"--schedule {value}: the last side must equal --image-size / --patch-size "
                         f"({image_size} / {patch_size}); e.g. --image-size {sides[-1] * patch_size}")


# ----------------------------------------------------------------------------------------- training

def train_bsq(config: Any) -> dict[str, float]:
    """Train (or resume) a BSQ-VAE; ``config``: namespace, dict or dataclass (see BSQ_DEFAULTS)."""
    d = merged(BSQ_DEFAULTS, config)
    check_bsq_options(d)
    if int(d["threads"]) > 0:
        torch.set_num_threads(int(d["threads"]))
    mcfg = bsq_model_config(d)
    sizes = schedule_from(d["schedule"])
    lcfg = loop_config(d)
    info = init_distributed(d["device"])
    try:
        source = T2ISource(d["data"], int(d["image_size"]), lcfg.batch_size, info.world_size, int(d["data_seed"]),
                           sizes, int(d["patch_size"]))
        torch.manual_seed(lcfg.seed)
        vae = build_bsq(mcfg, for_training=True).to(info.device)
        data_fp = d["data"] if d["data"] in ("procedural-t2i", "procedural", "shapes") else "jsonl"
        fingerprint = {"kind": "bsq", "model": mcfg, "schedule": [list(s) for s in sizes],
                       "image_size": int(d["image_size"]), "data": data_fp}
        meta = {"kind": "bsq", "bsq_config": mcfg, "schedule": [list(s) for s in sizes],
                "image_size": int(d["image_size"])}
        fwd = BSQForward(vae, sizes, float(d["entropy_temp"]))
        trainer = Trainer(vae, lcfg, info, fingerprint, meta, forward_module=fwd)
        l1w, l2w, bw, ew = float(d["l1"]), float(d["l2"]), float(d["beta"]), float(d["entropy"])

        def step_fn(model, step: int):
            img, _ = source.get(step, info.rank)
            img = img.to(info.device, non_blocking=True)
            rec, commit, ent, bits = model(img)
            rec = rec.float()
            l2 = F.mse_loss(rec, img)
            l1 = F.l1_loss(rec, img)
            loss = l1w * l1 + l2w * l2 + bw * commit + ew * ent
            ones = torch.cat([b.float().mean((0, 1)) for b in bits]).mean()  # bit balance (0.5 is ideal)
            return loss, {"l1": l1.item(), "l2": l2.item(), "commit": commit.item(), "entropy": ent.item(),
                          "bit1": ones.item(), "psnr": psnr_from_mse(l2.item())}

        return trainer.fit(step_fn)
    finally:
        cleanup(info)


def load_bsq(source: str | Path, prefer_ema: bool = True) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """A frozen BSQ-VAE from a run directory / checkpoint directory, or a ``.safetensors`` + ``.json`` pair.

    Returns (vae, {"bsq": config, "schedule": [[h, w], ...], "image_size": S}, description).
    """
    from ..checkpoints import read_state_dict
    from . import ckpt as ck

    p = Path(source)
    if p.is_dir():
        cdir = ck.find_latest(p) if not (p / "meta.json").is_file() else p
        if cdir is None:
            raise FileNotFoundError(f"no BSQ-VAE checkpoint in {p} (train one with `fastvar train bsq --out {p}`)")
        meta, groups = ck.load_checkpoint(cdir)
        if meta.get("kind") != "bsq":
            raise ValueError(f"{cdir} is a {meta.get('kind')!r} checkpoint, not a BSQ-VAE one")
        info = {"bsq": meta["bsq_config"], "schedule": meta["schedule"], "image_size": meta["image_size"]}
        use_ema = prefer_ema and "ema" in groups
        sd = groups["ema"] if use_ema else groups["model"]
        desc = {"source": str(cdir), "step": meta["step"], "ema": use_ema}
    elif p.is_file():
        cfg_file = p.with_suffix(".json")
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no config json for {p} (expected {cfg_file})")
        info = json.loads(cfg_file.read_text())
        sd = read_state_dict(p, flag="--bsq")
        desc = {"source": str(p), "from": info.get("source")}
    else:
        raise FileNotFoundError(f"BSQ-VAE {p} does not exist")
    from ..tokenizers.bsq import load_bsq_vae_state

    vae = build_bsq(info["bsq"])
    load_bsq_vae_state(vae, {k: v.float() for k, v in sd.items()})
    vae.eval().requires_grad_(False)
    return vae, info, desc


def export_bsq(run: str | Path, path: str | Path, prefer_ema: bool = True) -> Path:
    """Freeze a BSQ run's latest weights: ``path`` (.safetensors, float32) + ``path.json`` (config, schedule)."""
    from safetensors.torch import save_file

    from . import ckpt as ck

    vae, info, desc = load_bsq(run, prefer_ema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.clone().contiguous() for k, v in vae.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    ck.write_json_atomic(path.with_suffix(".json"), {**info, "source": desc})
    return path


@torch.no_grad()
def recon_images(vae, imgs: Tensor, sizes: tuple[tuple[int, int], ...]) -> Tensor:
    """Reconstructions through the inference path (encode -> bits -> summed codes -> decode), in [-1, 1]."""
    enc = vae.encode(imgs, sizes)
    _, rec = vae.decode_from_bits(enc.bits, sizes)
    return rec


@torch.no_grad()
def recon_report(vae, sizes: tuple[tuple[int, int], ...], n: int = 32, seed: int = 1_000_003, size: int = 128,
                 data: str = "procedural-t2i") -> dict[str, float]:
    """Held-out reconstruction PSNR and, on captioned scenes, whether the procedural detector still sees them.

    ``detected`` is the fraction of reconstructions whose detections match the scene's objects
    (shape and colour multiset) — the gate for "good enough for the transformer to learn from".
    """
    src = T2ISource(data, size, n, 1, seed)
    random.seed(0)
    img, _ = src.get(0)
    rec = recon_images(vae, img, sizes)
    mse = F.mse_loss(rec.float(), img).item()
    out = {"psnr": psnr_from_mse(mse), "n": float(n)}
    if data == "procedural-t2i":
        from ..eval.detect_procedural import ProceduralDetector

        det = ProceduralDetector()
        hit = 0
        for i, r in enumerate(rec):
            u8 = ((r.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            got = sorted((o.class_name, o.colour) for o in det(u8) if o.score >= 0.3)
            want = sorted((str(o[0]), str(o[1])) for o in src.ds[i]["objects"])
            hit += got == want
        out["detected"] = hit / n
    return out
