"""VAR's VQVAE: a taming-style conv autoencoder with a multi-scale residual quantizer.

Module names mirror the official ``vae_ch160v4096z32.pth`` key for key. The encoder/decoder and the
quantizer are generic in the number of levels (``ch_mult``) and in the scale schedule, so smaller
tokenizers (the embedded model, HART's) reuse the same classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    """Asymmetric zero pad (right/bottom) then a stride-2 conv, as the official encoder does."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with one fused 1x1 qkv conv."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.C = c
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)
        self.w_ratio = int(c) ** (-0.5)

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        C = self.C
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H, W).unbind(1)
        q = q.reshape(B, C, H * W).permute(0, 2, 1).contiguous()
        w = torch.bmm(q, k.reshape(B, C, H * W).contiguous()).mul_(self.w_ratio)
        w = F.softmax(w, dim=2).permute(0, 2, 1).contiguous()
        h = torch.bmm(v.reshape(B, C, H * W).contiguous(), w)
        return x + self.proj_out(h.view(B, C, H, W))


class _Mid(nn.Module):
    def __init__(self, c: int, using_sa: bool, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(c, c, dropout)
        self.attn_1 = AttnBlock(c) if using_sa else nn.Identity()
        self.block_2 = ResnetBlock(c, c, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, in_channels: int = 3,
                 using_sa: bool = True, using_mid_sa: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        cin = ch
        for i in range(n):
            cin, cout = ch * in_mult[i], ch * ch_mult[i]
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, dropout) for j in range(num_res_blocks))
            level.attn = nn.ModuleList(AttnBlock(cout) for _ in range(num_res_blocks)) if (using_sa and i == n - 1) \
                else nn.ModuleList()
            if i != n - 1:
                level.downsample = Downsample2x(cout)
            self.down.append(level)
        c = ch * ch_mult[-1]
        self.mid = _Mid(c, using_mid_sa, dropout)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, z_channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for j, blk in enumerate(level.block):
                h = blk(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, out_channels: int = 3,
                 using_sa: bool = True, using_mid_sa: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        n = len(ch_mult)
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, 1, 1)
        self.mid = _Mid(c, using_mid_sa, dropout)
        levels: list[nn.Module] = []
        for i in reversed(range(n)):
            cout = ch * ch_mult[i]
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(c if j == 0 else cout, cout, dropout) for j in range(num_res_blocks + 1))
            level.attn = nn.ModuleList(AttnBlock(cout) for _ in range(num_res_blocks + 1)) if (using_sa and i == n - 1) \
                else nn.ModuleList()
            if i != 0:
                level.upsample = Upsample2x(cout)
            c = cout
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # up[i] holds level i; applied from the coarsest level down
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, 1, 1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, blk in enumerate(level.block):
                h = blk(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """Residual refinement of an upsampled code map: (1 - r)·h + r·conv(h)."""

    def __init__(self, c: int, resi_ratio: float) -> None:
        super().__init__(c, c, 3, 1, 1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h: Tensor) -> Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


class PhiShared(nn.Module):
    """K Phi convs shared across scales; scale at position ``t`` in [0, 1] uses the nearest tick.

    The ticks are float64 ``np.linspace`` values: exact ties (e.g. 2/9 vs 13/36 - 1/12 …) are settled by
    their rounding, which is what the released checkpoints were trained with.
    """

    def __init__(self, c: int, resi_ratio: float, k: int) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(c, resi_ratio) for _ in range(k))
        self.ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)

    def index(self, si: int, sn: int) -> int:
        t = si / (sn - 1) if sn > 1 else 0.0
        return int(np.argmin(np.abs(self.ticks - t)).item())

    def at(self, si: int, sn: int) -> Phi:
        return self.qresi_ls[self.index(si, sn)]


class MultiScaleVQ(nn.Module):
    """The multi-scale residual quantizer: per scale, quantize the area-downsampled residual and subtract
    its bicubic-upsampled, Phi-refined reconstruction."""

    def __init__(self, vocab_size: int, cvae: int, patch_nums: Sequence[int], quant_resi: float = 0.5,
                 share_quant_resi: int = 4, beta: float = 0.25) -> None:
        super().__init__()
        if share_quant_resi < 2:
            raise ValueError("only partially shared Phi (share_quant_resi >= 2) is supported, as in every release")
        self.V, self.Cvae, self.beta = vocab_size, cvae, beta
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.quant_resi = PhiShared(cvae, quant_resi, share_quant_resi)
        self.register_buffer("ema_vocab_hit_SV", torch.full((len(self.patch_nums), vocab_size), 0.0))
        self.embedding = nn.Embedding(vocab_size, cvae)

    def phi(self, si: int, sn: int) -> Phi:
        return self.quant_resi.at(si, sn)

    # -------------------------------------------------------------------------------- encoding
    def nearest(self, z_NC: Tensor) -> Tensor:
        """argmin_k |z - e_k|² computed as |z|² + |e|² - 2 z·e (float32), ties to the first index."""
        e = self.embedding.weight.data.float()
        d = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(e.square(), dim=1, keepdim=False)
        d.addmm_(z_NC, e.T, alpha=-2, beta=1)
        return torch.argmin(d, dim=1)

    def encode(self, f: Tensor, patch_nums: Sequence[int] | None = None, to_fhat: bool = False) -> list[Tensor]:
        """Per-scale indices (B, pn²) — or, with ``to_fhat``, the cumulative f_hat after each scale."""
        pns = tuple(patch_nums or self.patch_nums)
        B, C, H, W = f.shape
        f_rest = f.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        sn = len(pns)
        out = []
        for si, pn in enumerate(pns):
            last = si == sn - 1
            src = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
            idx = self.nearest(src.permute(0, 2, 3, 1).reshape(-1, C))
            h = self.embedding(idx.view(B, pn, pn)).permute(0, 3, 1, 2)
            h = h.contiguous() if last else F.interpolate(h, size=(H, W), mode="bicubic").contiguous()
            h = self.phi(si, sn)(h)
            f_hat.add_(h)
            f_rest.sub_(h)
            out.append(f_hat.clone() if to_fhat else idx.reshape(B, pn * pn))
        return out

    # -------------------------------------------------------------------------------- decoding side
    def idx_to_var_input(self, idx_list: Sequence[Tensor], patch_nums: Sequence[int] | None = None) -> Tensor:
        """Teacher-forcing input (B, L - first_l, Cvae): the *cumulative* f_hat area-resized to each next scale."""
        pns = tuple(patch_nums or self.patch_nums)
        B, C, P, sn = idx_list[0].shape[0], self.Cvae, pns[-1], len(pns)
        f_hat = idx_list[0].new_zeros(B, C, P, P, dtype=torch.float32)
        nxt = []
        for si in range(sn - 1):
            pn = pns[si]
            h = self.embedding(idx_list[si]).transpose(1, 2).reshape(B, C, pn, pn)
            f_hat.add_(self.phi(si, sn)(F.interpolate(h, size=(P, P), mode="bicubic")))
            pn_next = pns[si + 1]
            nxt.append(F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").view(B, C, -1).transpose(1, 2))
        return torch.cat(nxt, dim=1)

    def embed_to_fhat(self, ms_h: Sequence[Tensor], last_one: bool = False,
                      patch_nums: Sequence[int] | None = None) -> Tensor | list[Tensor]:
        """Sum of per-scale code maps, each bicubic-upsampled to full size (except the last) and Phi-refined."""
        pns = tuple(patch_nums or self.patch_nums)
        B, P, sn = ms_h[0].shape[0], pns[-1], len(pns)
        f_hat = ms_h[0].new_zeros(B, self.Cvae, P, P, dtype=torch.float32)
        out = []
        for si in range(sn):
            h = ms_h[si]
            if si < sn - 1:
                h = F.interpolate(h, size=(P, P), mode="bicubic")
            f_hat.add_(self.phi(si, sn)(h))
            if not last_one:
                out.append(f_hat.clone())
        return f_hat if last_one else out

    def add_scale_to_fhat(self, f_hat: Tensor, h: Tensor, si: int, sn: int) -> Tensor:
        """Inference step: f_hat += Phi(bicubic(h, full size)) (no resize at the last scale). In place."""
        P = f_hat.shape[-1]
        if si != sn - 1:
            h = F.interpolate(h, size=(P, P), mode="bicubic")
        return f_hat.add_(self.phi(si, sn)(h))

    def next_autoregressive_input(self, si: int, sn: int, f_hat: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """``add_scale_to_fhat`` plus the next scale's input (f_hat area-resized; f_hat itself at the end)."""
        f_hat = self.add_scale_to_fhat(f_hat, h, si, sn)
        if si == sn - 1:
            return f_hat, f_hat
        pn = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")


class VQVAE(nn.Module):
    """Encoder → quant_conv → multi-scale VQ → post_quant_conv → decoder."""

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), share_quant_resi: int = 4,
                 quant_resi: float = 0.5, beta: float = 0.25, using_sa: bool = True, using_mid_sa: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.V, self.Cvae = vocab_size, z_channels
        self.ch_mult = tuple(ch_mult)
        self.downsample = 2 ** (len(self.ch_mult) - 1)
        kw = dict(using_sa=using_sa, using_mid_sa=using_mid_sa, dropout=dropout)
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels, **kw)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels, **kw)
        self.quantize = MultiScaleVQ(vocab_size, z_channels, patch_nums, quant_resi, share_quant_resi, beta)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.quantize.patch_nums

    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    def img_to_f(self, img: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(img))

    def img_to_idx(self, img: Tensor, patch_nums: Sequence[int] | None = None) -> list[Tensor]:
        return self.quantize.encode(self.img_to_f(img), patch_nums)

    def fhat_to_img(self, f_hat: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def idx_to_fhat(self, idx_list: Sequence[Tensor], last_one: bool = True):
        B = idx_list[0].shape[0]
        ms_h = []
        for idx, pn in zip(idx_list, self.patch_nums):
            ms_h.append(self.quantize.embedding(idx).transpose(1, 2).reshape(B, self.Cvae, pn, pn))
        return self.quantize.embed_to_fhat(ms_h, last_one=last_one)

    def idx_to_img(self, idx_list: Sequence[Tensor], last_one: bool = True):
        fh = self.idx_to_fhat(idx_list, last_one)
        return self.fhat_to_img(fh) if last_one else [self.fhat_to_img(f) for f in fh]

    def img_to_reconstructed_img(self, img: Tensor, last_one: bool = True):
        fhats = self.quantize.encode(self.img_to_f(img), to_fhat=True)
        return self.fhat_to_img(fhats[-1]) if last_one else [self.fhat_to_img(f) for f in fhats]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Keeps the model's own ``ema_vocab_hit_SV`` when the file's has another number of scales (a training
        statistic; the same VQVAE file serves the 256 and 512 schedules), as the official loader does."""
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape[0] != self.quantize.ema_vocab_hit_SV.shape[0]:
            state_dict = dict(state_dict)
            state_dict[key] = self.quantize.ema_vocab_hit_SV
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def load_official(self, state_dict) -> None:
        """Strict load with an explanatory error (see :func:`fastvar.checkpoints.load_checked`)."""
        from ..checkpoints import CheckpointError, diff_state_dict

        missing, unexpected, shapes = diff_state_dict(self, state_dict)
        shapes = [s for s in shapes if not s.startswith("quantize.ema_vocab_hit_SV")]
        if missing or unexpected or shapes:
            raise CheckpointError(
                "checkpoint does not match the VQVAE: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {shapes[:5]} "
                "(is this the transformer file? pass the VQVAE with --vae-weights)"
            )
        self.load_state_dict(state_dict, strict=True)
