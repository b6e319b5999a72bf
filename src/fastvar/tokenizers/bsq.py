"""Infinity's BSQ-VAE: a conv autoencoder whose latent is quantised bit by bit, coarse to fine.

Module names equal the official checkpoints key for key (``encoder.down.<i>.block.<j>.conv1.conv.weight``,
``quantizer.lfq.mask`` twice because the official model registers its quantizer under two names), so
released ``infinity_vae_*.pth`` files load through :func:`load_bsq_vae_state` without conversion.

Bitwise Spherical Quantisation (BSQ) of a d-dim latent vector: L2-normalise it and keep the sign of each
channel; the code is ``sign/sqrt(d)`` (a corner of the hypercube on the unit sphere), so a d-bit token is a
code with no codebook table. The multi-scale quantizer takes, per scale, the area-downsampled residual,
quantises it, upsamples it back (trilinear) and subtracts it; the decoder sees the sum of all scales.

For float32 parity with the official code the op order and even memory layouts are kept: codes coming
out of the quantizer are channels-last-3d views, and CPU trilinear interpolation rounds differently on
those than on contiguous tensors (last ulp), so we never make them contiguous before resizing.

Inference helpers for the transformer's scale loop (plain functions, no module state):
:func:`bits_to_codes`, :func:`accumulate_codes`, :func:`next_scale_input`; bit packing:
:func:`pack_bits`, :func:`unpack_bits`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BSQ_VAE_MODELS", "BSQEncoding", "BSQVAE", "BSQVAEConfig", "accumulate_codes", "bits_to_codes",
    "bsq_vae_config", "load_bsq_vae_state", "next_scale_input", "pack_bits", "unpack_bits",
]


# ----------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class BSQVAEConfig:
    """Architecture of a BSQ-VAE (the fields of the official ``vae_model`` / ``AutoEncoder`` args that matter).

    ``patch_size`` is the spatial stride (log2 of it = number of down/up-sampling levels).
    ``spatial_patchify`` is not architecture: it records that the transformer paired with this VAE packs
    2x2 latent cells into one token (4·d bits), so pipelines know to double the schedule for the VAE.
    """

    codebook_dim: int
    patch_size: int = 16
    base_ch: int = 128
    num_res_blocks: int = 2
    encoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    in_channels: int = 3
    out_channels: int = 3
    spatial_patchify: bool = False

    def __post_init__(self):
        object.__setattr__(self, "encoder_ch_mult", tuple(int(v) for v in self.encoder_ch_mult))
        object.__setattr__(self, "decoder_ch_mult", tuple(int(v) for v in self.decoder_ch_mult))
        if self.patch_size < 1 or self.patch_size & (self.patch_size - 1):
            raise ValueError(f"patch_size must be a power of two, got {self.patch_size}")

    @property
    def num_down(self) -> int:
        return int(math.log2(self.patch_size))

    @classmethod
    def from_official_kwargs(
        cls, kwargs: Mapping[str, Any], namespace: Mapping[str, Any] | None = None, spatial_patchify: bool = False
    ) -> BSQVAEConfig:
        """From ``vae_model(...)`` keyword arguments plus optional overrides of its internal namespace.

        ``vae_model`` hard-codes ``base_ch=128, num_res_blocks=2``; ``namespace`` may override those (the
        parity fixture does). ``codebook_size`` must be ``2**codebook_dim`` (every released VAE): other
        sizes would add projection layers the official code never trained.
        """
        d = int(kwargs["codebook_dim"])
        size = kwargs.get("codebook_size")
        if size is not None and int(size) != 2**d:
            raise ValueError(f"codebook_size {size} != 2**codebook_dim ({2**d}); projected BSQ is not supported")
        mode = kwargs.get("schedule_mode", "dynamic")
        if mode != "dynamic":
            raise ValueError(f"schedule_mode {mode!r}: only the 'dynamic' (Infinity) mode is implemented")
        ns = dict(namespace or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in ns if k not in known and k not in _IGNORED_NAMESPACE)
        if unknown:
            raise ValueError(f"namespace overrides {unknown} are not supported by this BSQ-VAE")
        args = dict(
            codebook_dim=d,
            patch_size=int(kwargs.get("patch_size", 16)),
            encoder_ch_mult=tuple(kwargs.get("encoder_ch_mult", (1, 2, 4, 4, 4))),
            decoder_ch_mult=tuple(kwargs.get("decoder_ch_mult", (1, 2, 4, 4, 4))),
            spatial_patchify=bool(spatial_patchify),
        )
        args.update({k: v for k, v in ns.items() if k in known})
        return cls(**args)


# namespace fields the fixtures list that are implied by this implementation (must have these values)
_IGNORED_NAMESPACE = {
    "z_channels", "cnn_type", "cnn_attention", "norm_type", "cnn_norm_axis", "conv_in_out_2d", "conv_inner_2d",
    "res_conv_2d", "use_pxsf", "use_vae", "quantizer_type", "new_quant", "ln_before_quant", "use_decay_factor",
    "schedule_mode", "z_interplote_up", "z_interplote_down", "codebook_scale", "codebook_size",
}

_OFFICIAL_MULT = (1, 2, 4, 4, 4)

# released VAEs (file stem -> config); every one uses base_ch 128, 2 res blocks
BSQ_VAE_MODELS: dict[str, BSQVAEConfig] = {
    "infinity_vae_d16": BSQVAEConfig(16),
    "infinity_vae_d24": BSQVAEConfig(24),
    "infinity_vae_d32": BSQVAEConfig(32),
    "infinity_vae_d64": BSQVAEConfig(64),
    "infinity_vae_d32reg": BSQVAEConfig(32),
    "infinity_vae_d56_f8_14_patchify": BSQVAEConfig(
        14, patch_size=8, encoder_ch_mult=(1, 2, 4, 4), decoder_ch_mult=(1, 2, 4, 4), spatial_patchify=True
    ),
}


def bsq_vae_config(name: str, **overrides: Any) -> BSQVAEConfig:
    """Config of a released VAE by file stem (``infinity_vae_d32reg``; a ``.pth`` suffix is ignored)."""
    key = name.removesuffix(".pth")
    if key not in BSQ_VAE_MODELS:
        raise KeyError(f"unknown BSQ-VAE {name!r}; known: {', '.join(BSQ_VAE_MODELS)}")
    cfg = BSQ_VAE_MODELS[key]
    return BSQVAEConfig(**{**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, **overrides})


# ----------------------------------------------------------------------------------------- conv net

def _swish(x: Tensor) -> Tensor:
    # x * sigmoid(x), not F.silu: the official op order, which rounds differently in the last ulp
    return x * torch.sigmoid(x)


class _Conv(nn.Module):
    """``nn.Conv2d`` under ``.conv`` (the official wrapper's key layout)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Norm(nn.Module):
    """GroupNorm under ``.norm``: 32 groups, or 24 when channels are not a multiple of 32."""

    def __init__(self, ch: int):
        super().__init__()
        if ch % 32 == 0:
            groups = 32
        elif ch % 24 == 0:
            groups = 24
        else:
            raise ValueError(f"GroupNorm needs channels divisible by 32 or 24, got {ch}")
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _Norm(cin)
        self.conv1 = _Conv(cin, cout, 3, padding=1)
        self.norm2 = _Norm(cout)
        self.conv2 = _Conv(cout, cout, 3, padding=1)
        self.nin_shortcut = _Conv(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class _Downsample(nn.Module):
    """Right/bottom zero pad + 3x3 stride-2 conv (torch convs only pad symmetrically)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = _Conv(ch, ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = _Conv(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """Res blocks then an optional resampler, registered as ``downsample`` / ``upsample`` (official names)."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self._resample_name = name if resample is not None else None
        if resample is not None:
            self.add_module(name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for b in self.block:
            x = b(x)
        if self._resample_name is not None:
            x = getattr(self, self._resample_name)(x)
        return x


class _Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1 = _ResBlock(ch, ch)
        self.block_2 = _ResBlock(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.block_1(x))


class _Encoder(nn.Module):
    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        ch, mult = cfg.base_ch, cfg.encoder_ch_mult
        self.conv_in = _Conv(cfg.in_channels, ch, 3, padding=1)
        in_mult = (1, *mult)
        levels = []
        block_in = ch
        for i, m in enumerate(mult):
            block_in, block_out = ch * in_mult[i], ch * m
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(_ResBlock(block_in, block_out))
                block_in = block_out
            levels.append(_Level(blocks, _Downsample(block_in) if i < cfg.num_down else None, "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(block_in)
        self.norm_out = _Norm(block_in)
        self.conv_out = _Conv(block_in, cfg.codebook_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(_swish(self.norm_out(self.mid(h))))


class _Decoder(nn.Module):
    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        ch, mult = cfg.base_ch, cfg.decoder_ch_mult
        block_in = ch * mult[-1]
        self.conv_in = _Conv(cfg.codebook_dim, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        levels = []
        for i in reversed(range(len(mult))):  # built coarsest first so channel counts chain; stored by level
            block_out = ch * mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(_ResBlock(block_in, block_out))
                block_in = block_out
            levels.append(_Level(blocks, _Upsample(block_in) if 1 <= i <= cfg.num_down else None, "upsample"))
        self.up = nn.ModuleList(levels[::-1])
        self.norm_out = _Norm(block_in)
        self.conv_out = _Conv(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_swish(self.norm_out(h)))


# ----------------------------------------------------------------------------------------- quantizer

def _code_scale(d: int) -> float:
    # official: 1/np.sqrt(d) in float64; math.sqrt is correctly rounded too, so the value is identical
    return 1 / math.sqrt(d)


def bits_to_codes(bits: Tensor) -> Tensor:
    """Bit labels -> BSQ codes (B, d, 1, h, w), as a channels-last-3d view (the official layout).

    ``bits``: (B, h, w, d) or (B, 1, h, w, d), any int/bool/float dtype holding 0/1. The code of bit b is
    ``b·2s − s`` with ``s = 1/sqrt(d)``, then L2-normalised over d (a no-op up to rounding, kept because
    the official code does it). Result is float32.
    """
    if bits.dim() == 4:
        bits = bits.unsqueeze(1)
    if bits.dim() != 5 or bits.shape[1] != 1:
        raise ValueError(f"bits must be (B, h, w, d) or (B, 1, h, w, d), got {tuple(bits.shape)}")
    s = _code_scale(bits.shape[-1])
    codes = F.normalize(bits * s * 2 - s, dim=-1)
    return codes.permute(0, 4, 1, 2, 3)


def accumulate_codes(summed: Tensor | float, codes: Tensor, full_hw: tuple[int, int], last: bool) -> Tensor:
    """Add one scale's codes into the summed latent (B, d, 1, H, W) and return the new sum.

    Every scale but the last is resized to the full (H, W) with 5-D trilinear interpolation; the last
    scale (already full size) is added as is. ``summed`` starts as the number 0. Pass ``codes`` straight
    from :func:`bits_to_codes`: the sum then inherits their channels-last-3d layout like the official
    ``summed_codes``, which makes :func:`next_scale_input` round exactly like the official code.
    Not in place: a caller holding an earlier sum keeps it.
    """
    if last:
        add = codes
    else:
        add = F.interpolate(codes, size=(1, int(full_hw[0]), int(full_hw[1])), mode="trilinear")
    if isinstance(summed, Tensor):
        return summed + add
    return add + summed  # number + tensor keeps the tensor's layout


def next_scale_input(summed: Tensor, hw: tuple[int, int]) -> Tensor:
    """The next scale's transformer input: the summed latent resized (5-D trilinear, no antialias) to hw.

    Returns (B, d, h, w); the caller flattens it row-major to (B, h·w, d). Downsampling with trilinear
    (not area) is what the official inference does.
    """
    if summed.dim() == 4:
        summed = summed.unsqueeze(2)
    return F.interpolate(summed, size=(1, int(hw[0]), int(hw[1])), mode="trilinear").squeeze(-3)


def pack_bits(bits: Tensor) -> Tensor:
    """(..., d) 0/1 -> int64 (...,), bit 0 is the most significant (the official ``mask`` convention)."""
    d = bits.shape[-1]
    weights = 2 ** torch.arange(d - 1, -1, -1, device=bits.device, dtype=torch.int64)
    return (bits.to(torch.int64) * weights).sum(-1)


def unpack_bits(idx: Tensor, d: int) -> Tensor:
    """int64 (...,) -> (..., d) 0/1 int64, inverse of :func:`pack_bits`."""
    shifts = torch.arange(d - 1, -1, -1, device=idx.device, dtype=torch.int64)
    return (idx.to(torch.int64)[..., None] >> shifts) & 1


class _BSQ(nn.Module):
    """Single-scale BSQ. Holds the official ``mask`` buffer (2**(d-1) ... 1) so checkpoints load as is."""

    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.register_buffer("mask", 2 ** torch.arange(d - 1, -1, -1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, d, T, h, w) -> quantised codes (same shape, channels-last-3d view) and bits (B, T, h, w, d) int32."""
        B, d, T, h, w = x.shape
        z = F.normalize(x.permute(0, 2, 3, 4, 1).reshape(B, -1, d), dim=-1).float()
        zhat = torch.where(z > 0, torch.ones((), dtype=z.dtype, device=z.device), -torch.ones((), dtype=z.dtype, device=z.device))
        zhat = _code_scale(d) * zhat
        q = z + (zhat - z).detach()  # the official straight-through form; differs from zhat by rounding
        bits = (q > 0).int().reshape(B, T, h, w, d)
        return q.reshape(B, T, h, w, d).permute(0, 4, 1, 2, 3), bits


class _MultiScaleBSQ(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lfq = _BSQ(d)

    def forward(self, h: Tensor, sizes: Sequence[tuple[int, int]]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Residual quantisation over ``sizes``; returns z (B, d, H, W), bits per scale (B, 1, h, w, d), var inputs."""
        x = (h.unsqueeze(2) if h.dim() == 4 else h).float().contiguous()
        _, _, T, H, W = x.shape
        residual, out = x, 0.0
        bits_all, var_inputs = [], []
        n = len(sizes)
        for si, (ph, pw) in enumerate(sizes):
            full = (1, ph, pw) == (T, H, W)
            r = residual if full else F.interpolate(residual, size=(1, ph, pw), mode="area")
            q, bits = self.lfq(r)
            if not full:
                q = F.interpolate(q, size=(T, H, W), mode="trilinear").contiguous()
            residual = residual - q
            out = out + q
            bits_all.append(bits)
            if si != n - 1:
                var_inputs.append(F.interpolate(out, size=(1, *sizes[si + 1]), mode="area").contiguous())
        z = out.contiguous()
        return (z.squeeze(2) if T == 1 else z), bits_all, var_inputs


# ----------------------------------------------------------------------------------------- model

class BSQEncoding(NamedTuple):
    """What :meth:`BSQVAE.encode` returns (unpacks like the official tuple minus its empty entries).

    ``h``: encoder output (B, d, H, W) float32; ``z``: sum of the quantised scales (B, d, H, W);
    ``bits``: per scale (B, h·w, d) int32, row-major; ``var_input``: per scale after the first, the
    **area**-downsampled running sum (B, d, 1, h, w) — official, but not what Infinity trains on.
    """

    h: Tensor
    z: Tensor
    bits: list[Tensor]
    var_input: list[Tensor]


class BSQVAE(nn.Module):
    """Infinity's BSQ-VAE (official ``AutoEncoder`` with ``MultiScaleBSQ``), images only."""

    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = _Encoder(cfg)
        self.decoder = _Decoder(cfg)
        self.quantizer = _MultiScaleBSQ(cfg.codebook_dim)
        self.quantize = self.quantizer  # the official second name: its buffer appears twice in state_dict

    @property
    def codebook_dim(self) -> int:
        return self.cfg.codebook_dim

    @property
    def stride(self) -> int:
        return self.cfg.patch_size

    def _dtype(self, part: nn.Module) -> torch.dtype:
        return next(part.parameters()).dtype

    def encode_raw(self, img: Tensor) -> Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> continuous latent (B, d, H/stride, W/stride) float32."""
        return self.encoder(img.to(self._dtype(self.encoder))).float()

    def encode(self, img: Tensor, schedule: Any) -> BSQEncoding:
        """Encode and quantise over ``schedule`` (VAE latent sizes; the last must be the latent size)."""
        from ..schedules_infinity import schedule_sizes

        sizes = schedule_sizes(schedule)
        h = self.encode_raw(img)
        if tuple(sizes[-1]) != tuple(h.shape[-2:]):
            raise ValueError(f"the schedule ends at {sizes[-1]} but the latent is {tuple(h.shape[-2:])}")
        z, bits, var_input = self.quantizer(h, sizes)
        B, d = h.shape[:2]
        return BSQEncoding(h, z, [b.reshape(B, -1, d) for b in bits], var_input)

    def decode(self, z: Tensor) -> Tensor:
        """Summed codes (B, d, H, W) or (B, d, 1, H, W) -> image in [-1, 1] (B, 3, H·stride, W·stride).

        The input is run channels-last: official summed codes always are (see :func:`bits_to_codes`) and
        CPU convolutions round differently per layout (~5e-4 on the image, enough to move uint8 pixels),
        so a contiguous copy of the same codes (e.g. loaded from a file) decodes like the official one.
        """
        if z.dim() == 5:
            z = z.squeeze(2)
        z = z.to(self._dtype(self.decoder)).contiguous(memory_format=torch.channels_last)
        return self.decoder(z).clamp(-1, 1)

    def codes_from_bits(self, bits: Sequence[Tensor], schedule: Any) -> Tensor:
        """Per-scale bits -> summed codes (B, d, 1, H, W), every scale resized to the last size (official
        ``decode_from_indices``: the last scale goes through a same-size trilinear, an exact copy)."""
        from ..schedules_infinity import schedule_sizes

        sizes = schedule_sizes(schedule)
        if len(bits) != len(sizes):
            raise ValueError(f"{len(bits)} bit tensors for a schedule of {len(sizes)} scales")
        H, W = sizes[-1]
        summed: Tensor | float = 0
        for b, (h, w) in zip(bits, sizes):
            B, d = b.shape[0], b.shape[-1]
            codes = bits_to_codes(b.reshape(B, 1, h, w, d))
            summed = accumulate_codes(summed, codes, (H, W), last=False)
        assert isinstance(summed, Tensor)
        return summed

    def decode_from_bits(self, bits: Sequence[Tensor], schedule: Any) -> tuple[Tensor, Tensor]:
        """Per-scale bits ((B, h·w, d), (B, h, w, d) or (B, 1, h, w, d)) -> (summed codes, image in [-1, 1])."""
        summed = self.codes_from_bits(bits, schedule)
        return summed, self.decode(summed.squeeze(-3))


# ----------------------------------------------------------------------------------------- loading

_CONV_HINTS = ("conv", ".q.", ".k.", ".v.", ".proj_out.", ".nin_shortcut.")
_MASK_KEYS = ("quantizer.lfq.mask", "quantize.lfq.mask")


def _official_name(key: str, own: Mapping[str, Tensor]) -> str | None:
    """Where the official ``load_cnn`` puts a checkpoint key in our state dict (None: it would be ignored)."""
    if key in own:
        return key
    for suffix in (".weight", ".bias"):
        if not key.endswith(suffix):
            continue
        stem = key[: -len(suffix)]
        if any(h in key for h in _CONV_HINTS) and f"{stem}.conv{suffix}" in own:
            return f"{stem}.conv{suffix}"
        if "norm" in key and f"{stem}.norm{suffix}" in own:
            return f"{stem}.norm{suffix}"
    return None


def load_bsq_vae_state(
    model: BSQVAE, state_dict_or_path: Mapping[str, Tensor] | str | os.PathLike, *, strict: bool = True,
    use_ema: bool = False, assign: bool = False,
) -> BSQVAE:
    """Load an official VAE checkpoint (``.pth`` with top-level ``'vae'``, or a plain/safetensors state dict).

    Reproduces the official ``load_cnn`` conventions: keys already in our layout load as is; plain
    ``nn.Conv2d`` / ``nn.GroupNorm`` names (``x.weight``) go to ``x.conv.weight`` / ``x.norm.weight``; the
    ``quantizer.lfq.mask`` / ``quantize.lfq.mask`` buffer (one tensor, two keys) may appear once, twice or
    not at all (it is a constant). The official loader is non-strict and silently keeps random weights for
    anything missing; here any missing or unexpected key or shape mismatch raises a
    :class:`~fastvar.checkpoints.CheckpointError` naming the first ones (``strict=False``: only shape
    mismatches raise, for partial loads). ``use_ema`` reads the ``'ema'`` entry instead of ``'vae'``.
    """
    from ..checkpoints import mismatch_error, read_state_dict

    top = "ema" if use_ema else "vae"
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        sd = read_state_dict(state_dict_or_path, top_key=top, flag="--vae-weights")
    else:
        sd = dict(state_dict_or_path)
        if isinstance(sd.get(top), Mapping):
            sd = dict(sd[top])
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    unexpected = []
    for k, v in sd.items():
        name = _official_name(k, own)
        if name is None:
            unexpected.append(k)
        else:
            mapped[name] = v
    for mk in _MASK_KEYS:  # the constant buffer: fill whichever copy the file lacks
        if mk in own and mk not in mapped:
            other = [mapped[o] for o in _MASK_KEYS if o in mapped]
            mapped[mk] = other[0] if other else own[mk]
    missing = [k for k in own if k not in mapped]
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in mapped.items()
        if tuple(v.shape) != tuple(own[k].shape)
    ]
    if not strict:
        missing, unexpected = [], []
    if missing or unexpected or shapes:
        raise mismatch_error(f"this BSQ-VAE ({_describe(model.cfg)})", missing, unexpected, shapes, _guess(sd))
    model.load_state_dict(mapped, strict=strict, assign=assign)
    return model


def _describe(cfg: BSQVAEConfig) -> str:
    return (
        f"d={cfg.codebook_dim}, stride {cfg.patch_size}, base_ch {cfg.base_ch}, "
        f"{cfg.num_res_blocks} res blocks, ch_mult {list(cfg.encoder_ch_mult)}"
    )


def _guess(sd: Mapping[str, Tensor]) -> str:
    def get(name: str) -> Tensor | None:
        for k in (name, name.replace(".conv.weight", ".weight")):
            if k in sd:
                return sd[k]
        return None

    w_in, w_out = get("encoder.conv_in.conv.weight"), get("encoder.conv_out.conv.weight")
    if w_in is None or w_out is None:
        return "not a BSQ-VAE state dict (no encoder.conv_in / encoder.conv_out)"
    levels = {k.split(".")[2] for k in sd if k.startswith("encoder.down.")}
    downs = {k.split(".")[2] for k in sd if k.startswith("encoder.down.") and ".downsample." in k}
    names = [n for n, c in BSQ_VAE_MODELS.items() if c.codebook_dim == w_out.shape[0] and len(c.encoder_ch_mult) == len(levels)]
    return (
        f"d={w_out.shape[0]}, base_ch {w_in.shape[0]}, {len(levels)} levels, stride {2 ** len(downs)}"
        + (f" ({' / '.join(names)})" if names else "")
    )
