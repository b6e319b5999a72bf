"""The small VQVAE + VAR pair shipped inside the package (the offline default model).

Weights live in ``fastvar/assets/embedded_{vqvae,var}.safetensors`` (VQVAE float32, VAR float16 on disk
to stay well under the 25 MB budget; loaded back as float32) and their constructor configs plus sampling defaults in
``fastvar/assets/embedded.json``. Buffers that the constructors recompute (the attention mask, the
scale index of each token, the zero key bias) are not stored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import ckpt as ck

ASSETS = Path(__file__).resolve().parent.parent / "assets"
VQVAE_FILE, VAR_FILE, CONFIG_FILE = "embedded_vqvae.safetensors", "embedded_var.safetensors", "embedded.json"
_DERIVED_BUFFERS = ("attn_bias_for_masking", "lvl_1L", "zero_k_bias")
# Chosen on the step-6000 VAR with `fastvar check-embedded`-style runs (100 samples): cfg 3 with top-k 100 / top-p
# 0.95 gave 0.87 (seed 0); cfg 4-6 did not help; top-k 10 / top-p 0.6 gave 0.92 / 0.96 / 0.93 on seeds 0 / 1 / 2.
# A small model samples its classes more faithfully from the head of its distributions.
DEFAULT_SAMPLING = {"cfg": 3.0, "top_k": 10, "top_p": 0.6, "more_smooth": False}


class EmbeddedModelMissing(FileNotFoundError):
    """The package was installed without the embedded weights."""


def _derived(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _DERIVED_BUFFERS


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    ref = model.state_dict()
    sd = {k: v.to(ref[k].dtype) if k in ref and ref[k].is_floating_point() else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not _derived(k)]
    if missing or unexpected:
        raise RuntimeError(f"embedded {what} weights do not match its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def load_embedded(device: str | torch.device = "cpu", assets: Path | None = None) -> tuple[nn.Module, nn.Module, dict]:
    """(var, vae, config) of the shipped model, in eval mode on ``device``."""
    from ..checkpoints import read_state_dict
    from ..models.var import VAR
    from .vqvae_train import build_vqvae

    assets = Path(assets) if assets is not None else ASSETS
    files = [assets / n for n in (VQVAE_FILE, VAR_FILE, CONFIG_FILE)]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise EmbeddedModelMissing(f"embedded model files missing: {', '.join(absent)}")
    cfg = json.loads(files[2].read_text())
    vae = build_vqvae(cfg["vqvae"])
    fix = "reinstall fastvar (pip install --force-reinstall), or re-export the embedded model"
    _load_into(vae, read_state_dict(files[0], flag="assets", fix=fix), "VQVAE")
    var = VAR(**cfg["var"])
    _load_into(var, read_state_dict(files[1], flag="assets", fix=fix), "VAR")
    return var.eval().to(device), vae.eval().to(device), cfg


def _pick(groups: dict[str, dict], use_ema: bool) -> dict[str, torch.Tensor]:
    return groups["ema"] if use_ema and "ema" in groups else groups["model"]


def _vq_step(desc: dict[str, Any]) -> int | None:
    """Training step of the tokenizer, also through a frozen copy's provenance record."""
    while isinstance(desc, dict):
        if "step" in desc:
            return int(desc["step"])
        desc = desc.get("from")
    return None


def _save_atomic(sd: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp))
    tmp.replace(path)


def export_embedded(
    vqvae: str | Path,
    var_run: str | Path,
    assets: str | Path | None = None,
    sampling: dict[str, Any] | None = None,
    use_ema: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the embedded model: a VQVAE (run dir or frozen .safetensors) + the latest checkpoint of a VAR run."""
    assets = Path(assets) if assets is not None else ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    from .var_train import load_vqvae

    vae, vq_cfg, vq_desc = load_vqvae(vqvae, prefer_ema=use_ema)
    # the VQVAE stays float32 (small; reconstruction PSNR is a gate), the VAR goes to float16
    _save_atomic({k: v.contiguous() for k, v in vae.state_dict().items()}, assets / VQVAE_FILE)
    cdir = ck.find_latest(var_run)
    if cdir is None:
        raise FileNotFoundError(f"no checkpoint in {var_run}")
    meta, groups = ck.load_checkpoint(cdir)
    if meta.get("kind") != "var":
        raise ValueError(f"{cdir} is a {meta.get('kind')!r} checkpoint, expected a VAR one")
    if meta["vqvae_config"] != vq_cfg:
        raise ValueError(f"the VAR in {cdir} was trained on another VQVAE config than {vqvae}")
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous()
          for k, v in _pick(groups, use_ema).items() if not _derived(k)}
    _save_atomic(sd, assets / VAR_FILE)
    out: dict[str, Any] = {"vqvae": vq_cfg, "var": meta["var_config"], "vqvae_source": vq_desc, "var_step": meta["step"],
                           "vqvae_step": _vq_step(vq_desc)}
    out["image_size"] = int(meta["fingerprint"]["image_size"])
    out["sampling"] = dict(DEFAULT_SAMPLING, **(sampling or {}))
    out.update(extra or {})
    ck.write_json_atomic(assets / CONFIG_FILE, out)
    return out
