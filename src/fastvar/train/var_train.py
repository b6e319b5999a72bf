"""VAR trainer: teacher forcing on the token maps of a frozen VQVAE, with the optional progressive schedule.

Progressive training (the official ``--pg`` option) grows the trained prefix of the scale schedule:
during the first ``pg`` fraction of the steps only the first scales are trained (starting from scale
``pg0``), and each newly added scale's loss weight ramps up over ``pgwp`` of an "epoch" of steps. The
VAR is block-causal, so training a prefix is just a shorter input; every parameter still gets gradients.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ckpt as ck
from .config import LOOP_DEFAULTS, check_options, check_schedule, loop_config, merged
from .dist import cleanup, init_distributed
from .folder import BatchSource, Prefetcher, build_dataset
from .loop import Trainer
from .vqvae_train import build_vqvae, downsample_factor

VAR_DEFAULTS: dict[str, Any] = dict(
    out=None,
    vqvae=None,  # a VQVAE run directory (its latest checkpoint) or a .safetensors file + its json config
    vqvae_ema=True,  # use the VQVAE's EMA weights when its checkpoint has them
    data="procedural",
    data_seed=0,
    image_size=128,
    num_classes=0,  # 0 = from the dataset
    depth=6,
    embed_dim=256,
    num_heads=4,
    mlp_ratio=4.0,
    shared_aln=False,
    cond_drop_rate=0.1,
    drop_path_rate=0.0,
    label_smooth=0.0,
    pg=0.0,  # fraction of the steps with progressive training (0 = off)
    pg0=4,  # first progressive stage: train scales [0, pg0]
    pgwp=0.0,  # ramp of a new scale's loss weight, in steps (0 = immediate)
    **LOOP_DEFAULTS,
    warmup=300,
    weight_decay=0.05,
    ckpt_every=100,
)


def var_model_config(d: dict[str, Any], vq: dict[str, Any], num_classes: int) -> dict[str, Any]:
    return dict(
        vocab_size=int(vq["vocab_size"]),
        cvae=int(vq["z_channels"]),
        num_classes=int(num_classes),
        depth=int(d["depth"]),
        embed_dim=int(d["embed_dim"]),
        num_heads=int(d["num_heads"]),
        patch_nums=list(vq["patch_nums"]),
        mlp_ratio=float(d["mlp_ratio"]),
        shared_aln=bool(d["shared_aln"]),
        cond_drop_rate=float(d["cond_drop_rate"]),
        drop_path_rate=float(d["drop_path_rate"]),
    )


def load_vqvae(source: str | Path, prefer_ema: bool = True) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """A frozen VQVAE from a trainer run directory / checkpoint directory, or a ``.safetensors`` file.

    Returns (vae, vqvae config, description). A ``.safetensors`` file needs its config next to it
    (``<file>.json`` or an ``embedded.json`` with a ``vqvae`` entry).
    """
    from ..checkpoints import read_state_dict

    p = Path(source)
    if p.is_dir():
        cdir = ck.find_latest(p) if not (p / "meta.json").is_file() else p
        if cdir is None:
            raise FileNotFoundError(f"no VQVAE checkpoint in {p} (train one with `fastvar train vqvae --out {p}`)")
        meta, groups = ck.load_checkpoint(cdir)
        if meta.get("kind") != "vqvae":
            raise ValueError(f"{cdir} is a {meta.get('kind')!r} checkpoint, not a VQVAE one")
        cfg = meta["vqvae_config"]
        sd = groups["ema"] if (prefer_ema and "ema" in groups) else groups["model"]
        desc = {"source": str(cdir), "step": meta["step"], "ema": prefer_ema and "ema" in groups}
    elif p.is_file():
        cfg_file = p.with_suffix(".json")
        if not cfg_file.is_file():
            cfg_file = p.parent / "embedded.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no config json for {p} (expected {p.with_suffix('.json')})")
        cj = json.loads(cfg_file.read_text())
        cfg = cj.get("vqvae", cj)
        sd = read_state_dict(p, flag="--vqvae")
        desc = {"source": str(p), "from": cj.get("source")}
    else:
        raise FileNotFoundError(f"VQVAE {p} does not exist")
    vae = build_vqvae(cfg)
    vae.load_state_dict(sd, strict=True)
    vae.eval().requires_grad_(False)
    return vae, cfg, desc


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict: a VAR run must keep training on the very same tokenizer."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_vqvae(run: str | Path, path: str | Path, prefer_ema: bool = True) -> Path:
    """Freeze a VQVAE run's latest weights as ``path`` (.safetensors, float32) + ``path.json`` (its config)."""
    from safetensors.torch import save_file

    vae, cfg, desc = load_vqvae(run, prefer_ema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    ck.write_json_atomic(path.with_suffix(".json"), {"vqvae": cfg, "source": desc})
    return path


def prog_stage(step: int, total: int, n_scales: int, pg: float, pg0: int) -> int:
    """Index of the last trained scale at ``step`` (n_scales - 1 = the whole schedule)."""
    if pg <= 0:
        return n_scales - 1
    end = max(int(total * pg), 1)
    if step >= end:
        return n_scales - 1
    lo = min(max(pg0, 0), n_scales - 1)
    return lo + int(round((n_scales - 1 - lo) * step / end))


class TeacherForcing(nn.Module):
    """VAR + frozen VQVAE -> per-token cross-entropy (what DDP wraps)."""

    def __init__(self, var: nn.Module, vae: nn.Module, label_smooth: float) -> None:
        super().__init__()
        self.var = var
        self._vae = (vae,)  # not a submodule: frozen, never saved or synchronised
        self.ls = label_smooth

    def forward(self, img: Tensor, label: Tensor, ed: int, new_bg: int, new_w: float) -> tuple[Tensor, Tensor]:
        vae = self._vae[0]
        with torch.no_grad():
            idx = vae.img_to_idx(img)
            gt = torch.cat(idx, 1)[:, :ed]
            x = vae.quantize.idx_to_var_input(idx)[:, : ed - self.var.first_l]
        logits = self.var(label, x)
        V = logits.shape[-1]
        ce = F.cross_entropy(logits.float().reshape(-1, V), gt.reshape(-1), label_smoothing=self.ls, reduction="none")
        ce = ce.view(gt.shape)
        w = torch.ones_like(ce)
        if new_w < 1.0:
            w[:, new_bg:] = new_w
        loss = (ce * w).sum(1).mean() / ed
        acc = (logits.argmax(-1) == gt).float().mean()
        return loss, acc


def train_var(config: Any) -> dict[str, float]:
    """Train (or resume) a class-conditional VAR on a frozen VQVAE (see VAR_DEFAULTS for the options)."""
    from ..models.var import VAR

    d = merged(VAR_DEFAULTS, config)
    check_options(d)
    if int(d["threads"]) > 0:
        torch.set_num_threads(int(d["threads"]))
    if not d["vqvae"]:
        raise ValueError("--vqvae is required: a VQVAE run directory or a .safetensors file")
    lcfg = loop_config(d)
    info = init_distributed(d["device"])
    try:
        vae, vq, vdesc = load_vqvae(d["vqvae"], bool(d["vqvae_ema"]))
        vae = vae.to(info.device)
        pn = tuple(int(p) for p in vq["patch_nums"])
        check_schedule(int(d["image_size"]), downsample_factor(vq), pn)
        dataset = build_dataset(d["data"], int(d["image_size"]), seed=int(d["data_seed"]))
        ncls = int(d["num_classes"]) or int(dataset.num_classes)
        mcfg = var_model_config(d, vq, ncls)
        torch.manual_seed(lcfg.seed)
        var = VAR(**mcfg)
        var.init_weights()
        var = var.to(info.device)
        data_fp = d["data"] if d["data"] in ("procedural", "shapes") else "folder"
        fingerprint = {"kind": "var", "model": mcfg, "vqvae": vq, "vqvae_sha256": weights_digest(vae),
                       "image_size": int(d["image_size"]), "data": data_fp}
        meta = {"kind": "var", "var_config": mcfg, "vqvae_config": vq, "vqvae_source": vdesc}
        fwd = TeacherForcing(var, vae, float(d["label_smooth"]))
        trainer = Trainer(var, lcfg, info, fingerprint, meta, forward_module=fwd)
        source = BatchSource(dataset, lcfg.batch_size, info.world_size, seed=lcfg.seed)
        loader = Prefetcher(source, info.rank, int(d["workers"]))
        be = var.schedule.begin_ends
        SN = len(pn)
        pg, pg0, pgwp = float(d["pg"]), int(d["pg0"]), float(d["pgwp"])

        def stage_weight(step: int) -> tuple[int, float]:
            si = prog_stage(step, lcfg.steps, SN, pg, pg0)
            if pgwp <= 0 or si == prog_stage(0, lcfg.steps, SN, pg, pg0):
                return si, 1.0
            first = step  # first step of this stage
            while first > 0 and prog_stage(first - 1, lcfg.steps, SN, pg, pg0) == si:
                first -= 1
            return si, max(min((step - first + 1) / pgwp, 1.0), 0.01)

        def step_fn(model, step: int):
            img, label = loader.get(step)
            if int(label.max()) >= ncls:
                raise ValueError(f"dataset label {int(label.max())} >= num_classes {ncls}")
            si, w = stage_weight(step)
            bg, ed = be[si]
            loss, acc = model(img.to(info.device), label.to(info.device), ed, bg, w)
            return loss, {"acc": acc.item(), "stage": float(si)}

        return trainer.fit(step_fn)
    finally:
        cleanup(info)
