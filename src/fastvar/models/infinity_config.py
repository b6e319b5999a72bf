"""Infinity architectures: the config dataclass, the released models' constructor table, checkpoint loading.

The table holds the official ``load_infinity`` kwargs of every released (and one documented but
unreleased) model, copied from the parity manifests; ``tests/test_infinity_manifest.py`` checks them
against ``../shared/parity/infinity/manifest/*.json`` so a drift fails CI.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .infinity import Infinity

# ----------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class InfinityConfig:
    """Architecture of an Infinity transformer (the official constructor's relevant kwargs).

    ``d_vae`` is the number of bits per transformer token: the BSQ codebook dim, times 4 when
    ``apply_spatial_patchify`` folds 2x2 latent pixels into one token (Infinity-8B).
    """

    embed_dim: int = 2048
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.0
    text_channels: int = 2048
    text_maxlen: int = 512
    d_vae: int = 32
    block_chunks: int = 1
    norm_eps: float = 1e-6
    pad_to_multiplier: int = 128
    add_lvl_embeding_only_first_block: bool = True
    rope2d_normalized_by_hw: int = 2
    rope_base: float = 10000.0
    rope_grid: int = 128
    apply_spatial_patchify: bool = False
    pn: str = "1M"
    cross_attn_layer_scale: float = -1.0
    cond_drop_rate: float = 0.1
    emulate_bf16_cross_attn: bool = True

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def vocab(self) -> int:
        return 2 * self.d_vae

    @classmethod
    def from_official_kwargs(cls, kwargs: dict[str, Any], d_vae: int) -> InfinityConfig:
        """Map ``infinity.models.infinity.Infinity(**kwargs)`` (as ``load_infinity`` builds it) to a config.

        Only the official inference configuration is implemented (shared AdaLN, fused norm, bit labels,
        RoPE in every self-attention); anything else raises instead of silently computing something else.
        """
        required = {"shared_aln": True, "fused_norm": True, "use_bit_label": 1, "rope2d_each_sa_layer": 1}
        for k, want in required.items():
            if k in kwargs and bool(kwargs[k]) != bool(want):
                raise ValueError(f"Infinity kwarg {k}={kwargs[k]!r} is not supported; only {k}={want!r} is implemented")
        for k, want in {"rms_norm": False, "swiglu": False, "nm0": False, "cos_attn": True, "head_aln": True}.items():
            if k in kwargs and bool(kwargs[k]) != want:
                raise ValueError(f"Infinity kwarg {k}={kwargs[k]!r} is not supported; only {k}={want!r} is implemented")
        if kwargs.get("head_depth", 1) != 1:
            raise ValueError("Infinity head_depth != 1 is not supported")
        m = {
            "embed_dim": "embed_dim", "depth": "depth", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio",
            "text_channels": "text_channels", "text_maxlen": "text_maxlen", "block_chunks": "block_chunks",
            "norm_eps": "norm_eps", "pad_to_multiplier": "pad_to_multiplier",
            "add_lvl_embeding_only_first_block": "add_lvl_embeding_only_first_block",
            "rope2d_normalized_by_hw": "rope2d_normalized_by_hw", "apply_spatial_patchify": "apply_spatial_patchify",
            "pn": "pn", "cross_attn_layer_scale": "cross_attn_layer_scale", "cond_drop_rate": "cond_drop_rate",
        }
        out = {ours: kwargs[theirs] for theirs, ours in m.items() if theirs in kwargs and kwargs[theirs] is not None}
        for b in ("add_lvl_embeding_only_first_block", "apply_spatial_patchify"):
            if b in out:
                out[b] = bool(out[b])
        out["block_chunks"] = int(out.get("block_chunks") or 1)
        out["pad_to_multiplier"] = max(1, int(out.get("pad_to_multiplier", 1)))
        return cls(d_vae=int(d_vae), **out)


# The released (and the one documented but unreleased) architectures with their official kwargs.
_COMMON_KW: dict[str, Any] = dict(
    text_channels=2048, text_maxlen=512, shared_aln=True, fused_norm=True, pad_to_multiplier=128,
    add_lvl_embeding_only_first_block=1, use_bit_label=1, rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2,
    mlp_ratio=4, drop_path_rate=0.1,
)
INFINITY_MODELS: dict[str, dict[str, Any]] = {
    "infinity-2b": dict(
        manifest="infinity_2b_reg", d_vae=32, vae="infinity_vae_d32reg",
        kwargs=dict(_COMMON_KW, depth=32, embed_dim=2048, num_heads=16, block_chunks=8, pn="1M",
                    apply_spatial_patchify=0),
    ),
    "infinity-8b": dict(
        manifest="infinity_8b_weights", d_vae=56, vae="infinity_vae_d56_f8_14_patchify",
        kwargs=dict(_COMMON_KW, depth=40, embed_dim=3584, num_heads=28, block_chunks=8, pn="1M",
                    apply_spatial_patchify=1),
    ),
    "infinity-8b-512": dict(
        manifest="infinity_8b_512x512_weights", d_vae=56, vae="infinity_vae_d56_f8_14_patchify",
        kwargs=dict(_COMMON_KW, depth=40, embed_dim=3584, num_heads=28, block_chunks=8, pn="0.25M",
                    apply_spatial_patchify=1),
    ),
    "infinity-layer12": dict(
        manifest="infinity_layer12_125M", d_vae=32, vae="infinity_vae_d32reg",
        kwargs=dict(_COMMON_KW, depth=12, embed_dim=768, num_heads=8, block_chunks=4, pn="0.06M",
                    apply_spatial_patchify=0),
    ),
}
INFINITY_MODELS["layer12"] = INFINITY_MODELS["infinity-layer12"]


def infinity_config(name: str, **overrides: Any) -> InfinityConfig:
    """Config of a named full-size Infinity ("infinity-2b", "infinity-8b", "infinity-8b-512", "infinity-layer12").

    Use it to build a randomly initialised model of the real size (benchmarks without weights)::

        with torch.device("cuda"):
            model = Infinity(infinity_config("infinity-2b")).to(torch.bfloat16).eval()

    ``overrides`` replace config fields (e.g. ``depth=4`` for a quick smoke run).
    """
    if name not in INFINITY_MODELS:
        raise KeyError(f"unknown Infinity model {name!r}; known: {', '.join(sorted(INFINITY_MODELS))}")
    spec = INFINITY_MODELS[name]
    return replace(InfinityConfig.from_official_kwargs(spec["kwargs"], spec["d_vae"]), **overrides)


# ----------------------------------------------------------------------------------------- checkpoints

_DROPPED_KEYS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")


def load_infinity_state(model: Infinity, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False) -> None:
    """Load an official (flat, un-prefixed) Infinity state dict, adapting it like the official loader.

    * ``cfg_uncond`` with fewer rows than the model's ``text_maxlen`` is completed with the model's own
      trailing rows; with more rows it is truncated (the official ``load_state_dict`` override);
    * the obsolete buffers ``lvl_1L``, ``attn_bias_for_masking``, ``Infinity_visible_kvlen``,
      ``Infinity_invisible_qlen`` are dropped.

    The official loader is non-strict and silently ignores anything else that does not fit; here any
    remaining missing/unexpected key or shape mismatch raises a ``CheckpointError`` naming them (pass
    ``strict=False`` to load a sharded checkpoint shard by shard: then only shape mismatches raise).
    """
    from ..checkpoints import diff_state_dict, mismatch_error

    sd = dict(state_dict)
    for k in list(sd):
        if "cfg_uncond" in k:
            old, new = sd[k], model.cfg_uncond.data
            if old.shape[0] <= new.shape[0]:
                tail = new[old.shape[0] :]
                sd[k] = torch.cat((old.to(device=tail.device, dtype=tail.dtype), tail)) if tail.numel() else old
            else:
                sd[k] = old[: new.shape[0]]
    for k in _DROPPED_KEYS:
        sd.pop(k, None)
    missing, unexpected, shapes = diff_state_dict(model, sd)
    if not strict:
        missing, unexpected = [], []
    if missing or unexpected or shapes:
        raise mismatch_error(f"this Infinity (depth {model.depth}, width {model.C}, d_vae {model.d_vae})", missing,
                             unexpected, shapes, guess_infinity_config(sd))
    model.load_state_dict(sd, strict=strict, assign=assign)


def guess_infinity_config(sd: dict[str, Tensor]) -> str:
    """A one-line description of the architecture a state dict was saved from (for error messages)."""
    try:
        C = sd["pos_start"].shape[-1]
        d = sd["word_embed.weight"].shape[1]
        depth = len({k.split(".ada_gss")[0] for k in sd if k.endswith("ada_gss")})
        heads = sd[next(k for k in sd if k.endswith("sa.scale_mul_1H11"))].shape[1]
        chunks = len({k.split(".")[1] for k in sd if k.startswith("block_chunks.")}) or 1
    except (KeyError, StopIteration, IndexError):
        return "not an Infinity transformer state dict (no pos_start / word_embed / blocks)"
    names = [
        n for n, s in INFINITY_MODELS.items()
        if s["kwargs"]["embed_dim"] == C and s["kwargs"]["depth"] == depth and s["d_vae"] == d
    ]
    return (
        f"embed_dim={C}, depth={depth}, num_heads={heads}, block_chunks={chunks}, d_vae={d}"
        + (f" ({' / '.join(sorted(set(names)))})" if names else "")
    )
