"""HART's hybrid tokenizer: VAR's VQVAE whose last scale keeps a continuous residual.

The encoder, decoder and multi-scale quantizer are VAR's (same module names), so this file only adds the
hybrid parts:

- encoding (``img_to_idxBl_and_frest``): the discrete scales as in VAR, except that the last scale is
  not Phi-refined, and the residual left *before* the last code map is subtracted is returned; the
  continuous target of the diffusion head is that residual minus the last code embeddings;
- decoding: discrete-only (VAR's ``embed_to_fhat``, which applies Phi at the last scale too, as the
  official ``idxBl_to_img`` does) or hybrid (last code embeddings plus the residual, no Phi, no resize:
  what HART's sampler builds).

Official folders store the wrapper ``HARTAutoEncoderWithDisc`` (``vae.*`` plus an unused GAN
discriminator ``disc.*``); :func:`load_hart_tokenizer` drops the discriminator on purpose.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from .vqvae import VQVAE, MultiScaleVQ

HART_PATCH_NUMS = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)

# HARTAutoEncoderConfig's constructor defaults (keys a config.json may omit).
OFFICIAL_TOKENIZER_DEFAULTS: dict[str, Any] = dict(
    vocab_size=4096, z_channels=32, ch=160, dropout=0.0, beta=0.25, using_znorm=False, quant_conv_ks=3,
    quant_resi=0.5, share_quant_resi=4, default_qresi_counts=0, v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    ch_mult=(1, 1, 2, 2, 4), quantizer_type="var", hybrid=False, disable_quant_resi=False, double_decoder=False,
)


class HybridQuantizer(MultiScaleVQ):
    """VAR's multi-scale quantizer plus the hybrid encode / decode of HART."""

    def encode_hybrid(self, f: Tensor, patch_nums: Sequence[int] | None = None) -> tuple[list[Tensor], Tensor]:
        """(per-scale indices (B, pn²), residual (B, P², Cvae) before the last code map is subtracted)."""
        pns = tuple(patch_nums or self.patch_nums)
        B, C, H, W = f.shape
        if (pns[-1], pns[-1]) != (H, W):
            raise ValueError(f"the last scale {pns[-1]} must equal the latent size {H}x{W}")
        f_rest = f.detach().float().clone()
        sn = len(pns)
        idx_list: list[Tensor] = []
        frest_last = f_rest
        for si, pn in enumerate(pns):
            last = si == sn - 1
            src = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
            idx = self.nearest(src.permute(0, 2, 3, 1).reshape(-1, C))
            idx_list.append(idx.reshape(B, pn * pn))
            if last:
                frest_last = f_rest.clone()
                break
            h = self.embedding(idx.view(B, pn, pn)).permute(0, 3, 1, 2)
            f_rest.sub_(self.phi(si, sn)(F.interpolate(h, size=(H, W), mode="bicubic").contiguous()))
        return idx_list, frest_last.permute(0, 2, 3, 1).reshape(B, H * W, C)

    def hybrid_fhat(self, idx_list: Sequence[Tensor], residual: Tensor) -> Tensor:
        """f_hat as HART's sampler builds it: discrete scales with Phi, then last codes + residual as is."""
        sn = len(idx_list)
        B, C = idx_list[0].shape[0], self.Cvae
        last = self.embedding(idx_list[-1])
        P = int(round(last.shape[1] ** 0.5))
        f_hat = last.new_zeros(B, C, P, P)
        for si in range(sn - 1):
            pn = int(round(idx_list[si].shape[1] ** 0.5))
            f_hat = self.add_scale_to_fhat(f_hat, self.embedding(idx_list[si]).transpose(1, 2).reshape(B, C, pn, pn), si, sn)
        tokens = last + residual.to(last.dtype)
        return f_hat + tokens.transpose(1, 2).reshape(B, C, P, P)


class HARTTokenizer(VQVAE):
    """``HARTAutoEncoder`` (the ``vae.*`` part of the official tokenizer folder)."""

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), patch_nums: Sequence[int] = HART_PATCH_NUMS,
                 share_quant_resi: int = 4, quant_resi: float = 0.5, beta: float = 0.25, dropout: float = 0.0) -> None:
        super().__init__(vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=2,
                         patch_nums=patch_nums, share_quant_resi=share_quant_resi, quant_resi=quant_resi, beta=beta,
                         dropout=dropout)
        # Re-registered last: the official module order is encoder, decoder, quant_conv, post_quant_conv, quantize.
        del self.quantize
        self.quantize = HybridQuantizer(vocab_size, z_channels, patch_nums, quant_resi, share_quant_resi, beta)
        self._official = dict(vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=list(ch_mult),
                              v_patch_nums=list(patch_nums), share_quant_resi=share_quant_resi, quant_resi=quant_resi,
                              beta=beta, dropout=dropout, quantizer_type="var_hybrid", hybrid=True)

    @property
    def vocab_size(self) -> int:
        return self.V

    @classmethod
    def from_official_config(cls, cfg: Mapping[str, Any]) -> HARTTokenizer:
        """From ``tokenizer/config.json`` (``HARTAutoEncoderWithDiscConfig``); unsupported variants are refused."""
        c = {**OFFICIAL_TOKENIZER_DEFAULTS, **dict(cfg)}
        bad = {k: c[k] for k, ok in (("using_znorm", False), ("quant_conv_ks", 3), ("default_qresi_counts", 0),
                                      ("disable_quant_resi", False), ("double_decoder", False)) if c[k] != ok}
        if c["quantizer_type"] != "var_hybrid":
            bad["quantizer_type"] = c["quantizer_type"]
        if int(c["share_quant_resi"]) < 2:
            bad["share_quant_resi"] = c["share_quant_resi"]
        if bad:
            raise ValueError(f"tokenizer config {bad} is not supported (only the released HART hybrid tokenizer is)")
        return cls(vocab_size=int(c["vocab_size"]), z_channels=int(c["z_channels"]), ch=int(c["ch"]),
                   ch_mult=tuple(c["ch_mult"]), patch_nums=tuple(c["v_patch_nums"]),
                   share_quant_resi=int(c["share_quant_resi"]), quant_resi=float(c["quant_resi"]),
                   beta=float(c["beta"]), dropout=float(c["dropout"]))

    def official_config(self) -> dict[str, Any]:
        """The ``config.json`` fields that rebuild this tokenizer."""
        return dict(self._official)

    # -------------------------------------------------------------------------------- encode
    def img_to_idxBl_and_frest(self, img: Tensor, patch_nums: Sequence[int] | None = None) -> tuple[list[Tensor], Tensor]:
        """(indices of every scale, residual (B, P², Cvae) before the last discrete scale is subtracted).

        The official function returns the same values as one list ``[idx_0, ..., idx_last, frest]``.
        """
        return self.quantize.encode_hybrid(self.img_to_f(img), patch_nums)

    def continuous_target(self, idx_last: Tensor, frest_last: Tensor) -> Tensor:
        """What the diffusion head learns to sample: the residual minus the last code embeddings."""
        return frest_last - self.quantize.embedding(idx_last)

    # -------------------------------------------------------------------------------- decode
    def decode_discrete(self, idx_list: Sequence[Tensor]) -> Tensor:
        """Image in [-1, 1] from the indices alone (official ``idxBl_to_img(..., last_one=True)``)."""
        return self.idx_to_img(idx_list, last_one=True)

    def decode_hybrid(self, idx_list: Sequence[Tensor], residual: Tensor) -> Tensor:
        """Image in [-1, 1] from the indices plus the continuous residual of the last scale."""
        return self.fhat_to_img(self.quantize.hybrid_fhat(idx_list, residual))


def split_tokenizer_state(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """(``vae.*`` weights with the prefix stripped, the dropped ``disc.*`` keys); anything else is an error."""
    vae = {k[4:]: v for k, v in sd.items() if k.startswith("vae.")}
    disc = [k for k in sd if k.startswith("disc.")]
    other = [k for k in sd if not k.startswith(("vae.", "disc."))]
    if other:
        raise ValueError(
            f"unexpected tokenizer keys {other[:5]}: expected the HARTAutoEncoderWithDisc layout (vae.* and disc.*)"
        )
    return vae, disc


def load_hart_tokenizer(folder: str | Path) -> HARTTokenizer:
    """The tokenizer of an official folder (``tokenizer/config.json`` + weights); the discriminator is dropped."""
    from ..models.hart import read_hf_weights

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no HART tokenizer at {folder}: expected {folder}/config.json and its weights (the tokenizer/ folder "
            "of https://huggingface.co/mit-han-lab/hart-0.7b-1024px)"
        )
    tok = HARTTokenizer.from_official_config(json.loads((folder / "config.json").read_text()))
    vae_sd, _ = split_tokenizer_state(read_hf_weights(folder, flag="--vae-weights"))
    tok.load_official(vae_sd)
    return tok.eval()


__all__ = ["HARTTokenizer", "HybridQuantizer", "OFFICIAL_TOKENIZER_DEFAULTS", "load_hart_tokenizer", "split_tokenizer_state"]
