"""Infinity (FoundationVision/Infinity): text-to-image next-scale transformer over bitwise (BSQ) tokens.

Module names and shapes equal the official checkpoints key for key (blocks under
``block_chunks.<c>.module.<j>.`` when ``block_chunks > 1``), so released ``.pth`` files load unchanged
through :func:`load_infinity_state`. In float32 the teacher-forcing logits and the seeded generation
reproduce the official code on CPU bit for bit; the details that matter for that are kept on purpose:

* cross-attention (blocks and the text pool) rounds q, k, v and its output through bfloat16 in float32
  mode, because the official path always goes through flash-attn's bf16 varlen kernel;
* RoPE-2D positions follow the official "normalized by hw" tables (``rope2d_normalized_by_hw=2``), built
  from the 1M schedule of the aspect ratio even at lower resolutions;
* the summed codes keep the memory layout the official accumulation produces (see
  :mod:`fastvar.schedules_infinity`), which decides the last ulp of the trilinear resizes.

Accelerations never live here: every residual branch goes through ``self.hooks.branch`` and the scale
loop calls the hooks' ``begin / skip_scale / begin_scale / end_scale / end`` (see
:mod:`fastvar.accel.hooks`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..accel.caching import CachingAPI
from ..accel.hooks import IDENTITY, Hooks
from ..layers.attention import KVCache
from ..layers.norm import RMSNorm
from ..sampling import make_generator, sample_top_k_top_p_
from ..schedules_infinity import accumulate_codes, bits_to_codes, next_scale_input
from ..schedules_infinity import schedule_sizes as scale_sizes
from ..text.condition import TextCondition, as_text_condition
from .infinity_config import (
    INFINITY_MODELS,
    InfinityConfig,
    guess_infinity_config,
    infinity_config,
    load_infinity_state,
)
from .infinity_layers import (
    AdaLNBeforeHead,
    BlockChunk,
    InfinityBlock,
    SharedAdaLin,
    StepContext,
    TextAttentivePool,
    TextKV,
    rope_pair_tables,
)
from .infinity_rope import rope2d_table

__all__ = [
    "INFINITY_MODELS", "Infinity", "InfinityConfig", "InfinityOutput", "build_infinity", "guess_infinity_config",
    "infinity_config", "load_infinity_state",
]


# ----------------------------------------------------------------------------------------- outputs


@dataclass
class InfinityOutput:
    """Result of :meth:`Infinity.autoregressive_infer`.

    ``bits[si]`` is (B, h, w, d) int64 for every executed scale and ``None`` for a skipped one (in the
    latent's layout: after un-patchifying for 8B). ``summed_codes`` is the (B, d, H, W) latent handed to
    the VAE decoder. ``image`` (with a ``vae``) is (B, H, W, 3) uint8 **RGB** (the official function
    returns the same pixels channel-flipped to BGR for cv2). ``logits[si]`` (with ``return_logits``) is the
    sampler input (B, h·w·d, 2): after 1/tau and CFG, before top-k/top-p.
    """

    bits: list[Tensor | None]
    summed_codes: Tensor
    image: Tensor | None = None
    logits: list[Tensor | None] | None = None
    executed: list[int] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- the model


def infinity_guidance(cond: Tensor, uncond: Tensor, c: float) -> Tensor:
    """Infinity's CFG arithmetic, op for op as the official code: c·cond + (1 − c)·uncond."""
    return c * cond + (1 - c) * uncond


class Infinity(CachingAPI, nn.Module):
    """The Infinity transformer. ``forward`` = teacher forcing; ``autoregressive_infer`` = generation."""

    family = "infinity"

    def __init__(self, cfg: InfinityConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C, D, Ct5 = cfg.embed_dim, cfg.embed_dim, cfg.text_channels
        if cfg.embed_dim % cfg.num_heads or cfg.depth % cfg.block_chunks:
            raise ValueError(
                f"embed_dim {cfg.embed_dim} must divide by num_heads {cfg.num_heads} and depth {cfg.depth} by "
                f"block_chunks {cfg.block_chunks}"
            )
        self.depth, self.C, self.d_vae, self.V = cfg.depth, C, cfg.d_vae, cfg.vocab
        self.hooks: Hooks = IDENTITY
        self.schedule = None  # the default schedule is chosen by the pipeline (aspect ratio, pn)

        # registration order = the official state_dict order
        self.cfg_uncond = nn.Parameter(torch.empty(cfg.text_maxlen, Ct5))
        self.pos_start = nn.Parameter(torch.empty(1, 1, C))
        self.text_norm = RMSNorm(Ct5, eps=cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(Ct5, D, cfg.emulate_bf16_cross_attn)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct5, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.lvl_embed = nn.Embedding(15, C)
        self.word_embed = nn.Linear(cfg.d_vae, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(D, 6 * C))
        self.head_nm = AdaLNBeforeHead(C, D, cfg.norm_eps)
        self.head = nn.Linear(C, self.V)
        blocks = [InfinityBlock(i, cfg) for i in range(cfg.depth)]
        if cfg.block_chunks > 1:
            n = cfg.depth // cfg.block_chunks
            self.block_chunks = nn.ModuleList(BlockChunk(blocks[i * n : (i + 1) * n]) for i in range(cfg.block_chunks))
            self._chunks = [list(c.module) for c in self.block_chunks]
        else:
            self.blocks = nn.ModuleList(blocks)
            self._chunks = [list(self.blocks)]
        self._rope_cache: dict[Any, tuple[Tensor, Tensor]] = {}
        if not self.pos_start.is_meta:
            self.reset_parameters()

    # ------------------------------------------------------------------ init / helpers
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init for benchmarks and tests without weights (not the official training init)."""
        C, Ct5 = self.C, self.cfg.text_channels
        std = math.sqrt(1 / C / 3)
        g = torch.Generator(device="cpu").manual_seed(0)
        u = torch.empty(self.cfg_uncond.shape, device="cpu")
        nn.init.trunc_normal_(u, std=1.2, generator=g)
        self.cfg_uncond.copy_(u / Ct5**0.5)
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=std)
        nn.init.trunc_normal_(self.text_proj_for_sos.ca.mat_q, std=math.sqrt(1 / C / 3))
        for b in self.layers:
            b.ada_gss.copy_(torch.randn(b.ada_gss.shape) / C**0.5)

    @property
    def layers(self) -> list[InfinityBlock]:
        return [b for c in self._chunks for b in c]

    @property
    def device(self) -> torch.device:
        return self.pos_start.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_start.dtype

    def _rope(self, sizes: tuple[tuple[int, int], ...], ref_hw: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
        """(L, head_dim) cos/sin tables of the whole schedule in the layout apply_rope2d takes (cached)."""
        key = (sizes, ref_hw, self.device)
        if key not in self._rope_cache:
            table = rope2d_table(
                sizes, self.cfg.head_dim, mode=self.cfg.rope2d_normalized_by_hw, ref_hw=ref_hw,
                base=self.cfg.rope_base, grid=self.cfg.rope_grid,
            ).to(self.device)
            self._rope_cache = {key: rope_pair_tables(table[0], table[1])}
        return self._rope_cache[key]

    def get_logits(self, h: Tensor, cond: Tensor) -> Tensor:
        """(B, L, C) hidden states -> (B, L, 2d) bit logits; pair (2i, 2i+1) scores bit i = 0 / 1."""
        dt = self.head.weight.dtype  # fp32 models: exactly the official fp32 head
        return self.head(self.head_nm(h.to(dt), cond.to(dt))).float()

    def prepare_text(
        self, text: TextCondition | tuple, cfg_batch: bool = False, negative: TextCondition | tuple | None = None,
        drop_rate: float = 0.0,
    ) -> tuple[Tensor, TextKV]:
        """(sos/cond vector (B', D), cross-attention text state); with ``cfg_batch`` the batch is [cond, uncond].

        The unconditional caption of length ``le`` is ``cfg_uncond[:le]`` (or the negative prompt), and it
        goes through the same RMSNorm as the prompt. ``drop_rate`` replaces whole captions by the learned
        unconditional rows (training-time condition dropout; the official ``forward`` applies it even in
        eval mode, we only when asked).
        """
        text = as_text_condition(text).to(self.device)
        kv, lens, cu = text.kv_compact.to(self.dtype), text.lens, text.cu_seqlens_k
        if drop_rate > 0:
            kv, total = kv.clone(), 0
            for le in lens:
                if random.random() < drop_rate:
                    kv[total : total + le] = self.cfg_uncond[:le]
                total += le
        if cfg_batch:
            if negative is None:
                kv_un, total = kv.clone(), 0
                for le in lens:
                    kv_un[total : total + le] = self.cfg_uncond[:le]
                    total += le
                cu_un = cu
            else:
                neg = as_text_condition(negative).to(self.device)
                if neg.batch != text.batch:
                    raise ValueError(f"negative prompt batch {neg.batch} != prompt batch {text.batch}")
                kv_un, cu_un = neg.kv_compact.to(kv), neg.cu_seqlens_k.to(cu.device)
            kv = torch.cat((kv, kv_un), dim=0)
            cu = torch.cat((cu, cu_un[1:] + cu[-1]), dim=0)
        bounds = cu.tolist()
        segments = list(zip(bounds[:-1], bounds[1:]))
        kv = self.text_norm(kv)
        sos = self.text_proj_for_sos(TextKV(kv, segments))
        ca = self.text_proj_for_ca(kv)
        return sos, TextKV(ca, segments)

    # ------------------------------------------------------------------ teacher forcing
    def forward(
        self, text: TextCondition | tuple, x_BLC_wo_prefix: Tensor, scale_schedule: Sequence, hooks: Hooks | None = None,
        rope_ref_hw: tuple[int, int] | None = None,
    ) -> Tensor:
        """Logits (B, L, 2d) of every token given the ground-truth inputs of scales 1.. (teacher forcing).

        The sequence is padded to a multiple of ``pad_to_multiplier`` and attends block-causally (full
        attention inside a scale), as the official training forward does; padding keeps the float
        results identical to the official ones.
        """
        hooks = IDENTITY if hooks is None else hooks
        sizes = scale_sizes(scale_schedule)
        B = x_BLC_wo_prefix.shape[0]
        sos, txt = self.prepare_text(text, drop_rate=self.cfg.cond_drop_rate if self.training else 0.0)
        gss = self.shared_ada_lin(sos).contiguous()
        first = sos.unsqueeze(1).expand(B, 1, -1) + self.pos_start.expand(B, 1, -1)
        x = torch.cat((first, self.word_embed(x_BLC_wo_prefix.to(self.dtype))), dim=1)
        l_end = x.shape[1]
        counts = [h * w for h, w in sizes]
        if sum(counts) != l_end:
            raise ValueError(f"x_BLC_wo_prefix has {l_end - 1} tokens but the schedule needs {sum(counts) - 1}")
        m = self.cfg.pad_to_multiplier
        pad = (l_end + m - 1) // m * m - l_end
        scale_id = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)]).view(1, l_end, 1)
        mask = torch.where(scale_id >= scale_id.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, l_end, l_end)
        cos, sin = self._rope(sizes, rope_ref_hw)
        if pad:
            mask = F.pad(mask, (0, pad, 0, pad), value=-torch.inf)
            mask[0, 0, l_end:, 0] = 0
            x = F.pad(x, (0, 0, 0, pad))
            zeros = cos.new_zeros(pad, cos.shape[1])
            cos, sin = torch.cat((cos, zeros)), torch.cat((sin, zeros))
        mask = mask.to(device=x.device, dtype=x.dtype)
        lvl = self.lvl_embed(scale_id.view(-1).to(x.device))
        lvl = F.pad(lvl, (0, 0, 0, pad))
        step = StepContext(cos=cos, sin=sin, mask=mask)
        for ci, chunk in enumerate(self._chunks):
            if ci == 0 or not self.cfg.add_lvl_embeding_only_first_block:
                x = x + lvl
            for blk in chunk:
                x = blk(x, gss, txt, step, hooks)
        return self.get_logits(x[:, :l_end], sos)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def autoregressive_infer(
        self,
        text: TextCondition | tuple,
        scale_schedule: Sequence,
        *,
        cfg: float | Sequence[float] = 3.0,
        tau: float | Sequence[float] = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        g_seed: int | None = None,
        generator: torch.Generator | None = None,
        cfg_insertion_layer: int | Sequence[int] = (0,),
        negative_text: TextCondition | tuple | None = None,
        vae: Any = None,
        return_logits: bool = False,
        rope_ref_hw: tuple[int, int] | None = None,
    ) -> InfinityOutput:
        """Generate bitwise tokens scale by scale (KV cache, CFG, tau, top-k/top-p over the two bit values).

        ``cfg_insertion_layer``: 0 mixes cond/uncond logits (official default); a negative k mixes the
        hidden states after block ``depth + k`` instead. ``g_seed`` seeds a generator on the model's
        device that draws exactly one multinomial per executed scale (greedy ``top_k=1`` draws too).
        With a ``vae`` (anything with ``decode((B, d, H, W)) -> [-1, 1]`` images) the image is decoded.
        """
        sizes = scale_sizes(scale_schedule)
        n = len(sizes)
        cfgs, taus = _per_scale(cfg, n, "cfg"), _per_scale(tau, n, "tau")
        text = as_text_condition(text)
        B = text.batch
        use_cfg = any(c != 1 for c in cfgs)
        bs = 2 * B if use_cfg else B
        layers = [cfg_insertion_layer] if isinstance(cfg_insertion_layer, int) else list(cfg_insertion_layer)
        on_logits = 0 in layers
        mix_after = set()
        for item in layers:
            if item < 0:
                if self.depth + item <= 0:
                    raise ValueError(f"cfg_insertion_layer {item} is outside a model of depth {self.depth}")
                mix_after.add(self.depth + item)
            elif item not in (0, 1):
                raise ValueError(f"cfg_insertion_layer {item}: use 0 (logits) or a negative block offset")

        sos, txt = self.prepare_text(text, cfg_batch=use_cfg, negative=negative_text)
        gss = self.shared_ada_lin(sos).contiguous()
        rng = generator if generator is not None else make_generator(g_seed, self.device)
        cos_all, sin_all = self._rope(sizes, rope_ref_hw)
        starts = [0]
        for h, w in sizes:
            starts.append(starts[-1] + h * w)
        patchify = self.cfg.apply_spatial_patchify
        full_hw = (sizes[-1][0] * 2, sizes[-1][1] * 2) if patchify else sizes[-1]
        hooks = self.hooks
        bits_out: list[Tensor | None] = [None] * n
        logits_out: list[Tensor | None] | None = [None] * n if return_logits else None
        executed: list[int] = []
        summed: Tensor | int = 0
        hooks.begin(sizes, bs, self.device)
        caches = [KVCache(hooks.kv_tokens(sizes, i), i, hooks) for i in range(self.depth)]
        memo: dict = {}
        try:
            for si, (h, w) in enumerate(sizes):
                if hooks.skip_scale(si):
                    continue
                if use_cfg and bs == 2 * B and hooks.cond_only(si):  # from here on the conditional half only
                    sos, gss, txt = sos[:B], gss[:B], txt.narrow(B)
                    memo = {i: k.narrow(B, bs) for i, k in memo.items()}
                    for cache in caches:
                        cache.keep_rows(B)
                    bs = B
                if si == 0:
                    x = sos.unsqueeze(1).expand(bs, 1, -1) + self.pos_start.expand(bs, 1, -1)
                else:
                    lat_hw = (2 * h, 2 * w) if patchify else (h, w)
                    inp = next_scale_input(summed, lat_hw)  # (B, d, h, w) latent at this scale's size
                    if patchify:
                        inp = F.pixel_unshuffle(inp, 2)
                    inp = inp.reshape(*inp.shape[:2], -1).permute(0, 2, 1)
                    x = self.word_embed(inp.to(self.dtype)).repeat(bs // B, 1, 1)
                hooks.begin_scale(si, (h, w))
                rows = slice(starts[si], starts[si + 1])
                step = StepContext(cos=cos_all[rows], sin=sin_all[rows], caches=caches, memo=memo)
                for ci, chunk in enumerate(self._chunks):
                    if ci == 0 or not self.cfg.add_lvl_embeding_only_first_block:
                        x = x + self.lvl_embed.weight[si]
                    for blk in chunk:
                        x = blk(x, gss, txt, step, hooks)
                        if cfgs[si] != 1 and blk.layer_idx in mix_after:
                            site = f"hidden:{blk.layer_idx}"
                            if bs == 2 * B:
                                x = hooks.guidance(si, x[:B], x[B:], cfgs[si], infinity_guidance, where=site)
                                x = torch.cat((x, x), 0)
                            else:
                                x = hooks.guidance(si, x, None, cfgs[si], infinity_guidance, where=site)
                hooks.end_scale(si)

                c = cfgs[si]
                if c != 1 and on_logits:
                    logits = self.get_logits(x, sos).mul(1 / taus[si])
                    if bs == 2 * B:
                        logits = hooks.guidance(si, logits[:B], logits[B:], c, infinity_guidance)
                    else:
                        logits = hooks.guidance(si, logits, None, c, infinity_guidance)
                else:
                    logits = self.get_logits(x[:B], sos[:B]).mul(1 / taus[si])
                logits = logits.reshape(B, -1, 2)
                if logits_out is not None:
                    logits_out[si] = logits.clone()
                bits = sample_top_k_top_p_(logits, top_k, top_p, rng).reshape(B, h, w, -1)
                if patchify:  # (B, h, w, 4d) -> (B, 2h, 2w, d)
                    bits = F.pixel_shuffle(bits.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
                bits_out[si] = bits
                executed.append(si)
                codes = bits_to_codes(bits)
                summed = accumulate_codes(summed, codes, full_hw, last=si == n - 1)
        finally:
            hooks.end()
        if not executed:
            raise ValueError("every scale was skipped; the first scale must run")
        summed_codes = summed.squeeze(-3)
        image = self.decode_image(vae, summed_codes) if vae is not None else None
        return InfinityOutput(bits_out, summed_codes, image, logits_out, executed)

    @staticmethod
    @torch.no_grad()
    def decode_image(vae: Any, summed_codes: Tensor) -> Tensor:
        """Summed codes -> (B, H, W, 3) uint8 RGB, with the official rounding (truncation after ·255)."""
        img = vae.decode(summed_codes).float().clamp(-1, 1)
        return ((img + 1) / 2).permute(0, 2, 3, 1).mul_(255).to(torch.uint8)


def _per_scale(v: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(v, (int, float)):
        return [float(v)] * n
    v = [float(t) for t in v]
    if len(v) < n:
        raise ValueError(f"{name} has {len(v)} values but the schedule has {n} scales")
    return v[:n]


def build_infinity(
    name_or_cfg: str | InfinityConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    seed: int = 0, **overrides: Any,
) -> Infinity:
    """A randomly initialised Infinity of a named size, allocated directly on ``device`` in ``dtype``.

    For speed/memory benchmarks without weights (``fastvar bench --model infinity-2b --random-init``):
    the model is built on the meta device and materialised once, so an 8B model in bf16 never exists in
    fp32 anywhere. Weights are N(0, 0.02) (norm gains 1, biases 0, attention scale log 4): enough for
    realistic timings, not a trained model. ``overrides`` change config fields (e.g. ``depth=4``).
    """
    cfg = infinity_config(name_or_cfg, **overrides) if isinstance(name_or_cfg, str) else replace(name_or_cfg, **overrides)
    with torch.device("meta"):
        model = Infinity(cfg)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("bias"):
                t.zero_()
            elif name.endswith("norm.weight"):
                t.fill_(1.0)
            elif name.endswith("scale_mul_1H11"):
                t.fill_(math.log(4.0))
            else:
                t.normal_(0.0, 0.02, generator=g)
    return model.eval()
