"""Class-conditional VAR transformer (FoundationVision/VAR), state-dict compatible with the released checkpoints.

The module tree mirrors the official one key for key (``blocks.i.attn.mat_qkv``, ``head_nm.ada_lin.1``,
``shared_ada_lin.1`` …) so ``var_d*.pth`` loads with no conversion. The VQVAE is *not* a submodule (the
official model keeps it outside its state dict too); inference receives it as an argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..accel.caching import CachingAPI
from ..accel.hooks import IDENTITY, Hooks
from ..layers.attention import KVCache, attend
from ..sampling import gumbel_softmax_smooth, sample_top_k_top_p_
from ..schedules import Schedule

# ln(100) as the official code computes it (float32 log, then .item()).
MAX_SCALE_MUL = float(torch.log(torch.tensor(100.0)).item())


class DropPath(nn.Module):
    """Stochastic depth; identity in eval, so inference never depends on it."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class SelfAttention(nn.Module):
    """Cosine attention with a learnable per-head temperature (``attn_l2_norm``) and a KV cache over scales."""

    def __init__(self, dim: int, num_heads: int, attn_l2_norm: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, attn_bias: Tensor | None) -> Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp())
            k = F.normalize(k, dim=-1)
        if self.kv_cache is not None:
            k, v = self.kv_cache.append(k, v, q, self.scale)
        out = attend(q, k, v, scale=self.scale, mask=attn_bias)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AdaLNSelfAttn(nn.Module):
    """One VAR block: AdaLN-modulated attention and FFN, each wrapped in the engine's branch hook."""

    def __init__(
        self,
        layer_idx: int,
        dim: int,
        cond_dim: int,
        num_heads: int,
        mlp_ratio: float,
        norm_eps: float,
        shared_aln: bool,
        attn_l2_norm: bool,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.layer_idx, self.C, self.shared_aln = layer_idx, dim, shared_aln
        self.attn = SelfAttention(dim, num_heads, attn_l2_norm)
        self.ffn = FFN(dim, round(dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x: Tensor, cond: Tensor, attn_bias: Tensor | None, hooks: Hooks = IDENTITY) -> Tensor:
        if self.shared_aln:
            ada = self.ada_gss + cond
        else:
            ada = self.ada_lin(cond).view(-1, 1, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)

        def attn_branch(t: Tensor, idx: Tensor | None) -> Tensor:
            return self.attn(self.ln_wo_grad(t).mul(scale1.add(1)).add_(shift1), attn_bias).mul_(gamma1)

        def ffn_branch(t: Tensor, idx: Tensor | None) -> Tensor:
            return self.ffn(self.ln_wo_grad(t).mul(scale2.add(1)).add_(shift2)).mul(gamma2)

        x = x + self.drop_path(hooks.branch(self.layer_idx, "attn", x, attn_branch))
        x = x + self.drop_path(hooks.branch(self.layer_idx, "ffn", x, ffn_branch))
        return x


class AdaLNBeforeHead(nn.Module):
    def __init__(self, dim: int, cond_dim: int, norm_eps: float) -> None:
        super().__init__()
        self.C = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    def forward(self, cond: Tensor) -> Tensor:
        return super().forward(cond).view(-1, 1, 6, self.out_features // 6)


def block_causal_bias(patch_nums: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(lvl_1L, attn_bias): the scale index of every token and the 0/-inf mask "attend to scales <= mine"."""
    lvl = torch.cat([torch.full((pn * pn,), i, dtype=torch.long) for i, pn in enumerate(patch_nums)]).view(1, -1)
    d = lvl.view(1, -1, 1)
    bias = torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, lvl.shape[1], lvl.shape[1])
    return lvl, bias.contiguous()


def var_guidance(cond: Tensor, uncond: Tensor, t: float) -> Tensor:
    """VAR's (and HART's) CFG arithmetic, op for op as the official code: (1 + t)·cond − t·uncond."""
    return (1 + t) * cond - t * uncond


class VAR(CachingAPI, nn.Module):
    """The VAR transformer. Defaults follow ``build_vae_var`` for the 256 px d16 model."""

    family = "var"

    def __init__(
        self,
        vocab_size: int = 4096,
        cvae: int = 32,
        num_classes: int = 1000,
        depth: int = 16,
        embed_dim: int = 1024,
        num_heads: int = 16,
        patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        mlp_ratio: float = 4.0,
        shared_aln: bool = False,
        cond_drop_rate: float = 0.1,
        norm_eps: float = 1e-6,
        attn_l2_norm: bool = True,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.V, self.Cvae, self.num_classes = vocab_size, cvae, num_classes
        self.depth, self.C, self.num_heads = depth, embed_dim, num_heads
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.schedule = Schedule.square(self.patch_nums)
        self.L = self.schedule.total_tokens
        self.first_l = self.patch_nums[0] ** 2
        self.shared_aln, self.cond_drop_rate = shared_aln, cond_drop_rate
        self.hooks: Hooks = IDENTITY
        C = embed_dim

        self.word_embed = nn.Linear(cvae, C)
        self.class_emb = nn.Embedding(num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        self.shared_ada_lin = (
            nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(C, 6 * C)) if shared_aln else nn.Identity()
        )
        dpr = [drop_path_rate * i / (depth - 1) for i in range(depth)] if depth > 1 else [drop_path_rate]
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(i, C, C, num_heads, mlp_ratio, norm_eps, shared_aln, attn_l2_norm, dpr[i])
            for i in range(depth)
        )
        lvl, bias = block_causal_bias(self.patch_nums)
        self.register_buffer("lvl_1L", lvl)
        self.register_buffer("attn_bias_for_masking", bias)
        self.head_nm = AdaLNBeforeHead(C, C, norm_eps)
        self.head = nn.Linear(C, vocab_size)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def init_weights(self, std: float = 0.02, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5) -> None:
        """A trainable initialisation in the spirit of the official one (truncated normal, small AdaLN gains)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        for blk in self.blocks:
            blk.attn.proj.weight.data.div_(math.sqrt(2 * self.depth))
            blk.ffn.fc2.weight.data.div_(math.sqrt(2 * self.depth))
            if not self.shared_aln:
                w = blk.ada_lin[-1].weight.data
                w[2 * self.C :].mul_(init_adaln)
                w[: 2 * self.C].mul_(init_adaln_gamma)
        self.head.weight.data.mul_(0.02 / std)
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)

    def flop_dims(self):
        from ..accel.stats import FlopDims

        return FlopDims(width=self.C, ffn_hidden=self.blocks[0].ffn.fc1.out_features, ffn_mats=2,
                        vocab_out=self.V, branches=("attn", "ffn"))

    def _set_kv_cache(self, on: bool) -> None:
        sizes = self.schedule.sizes
        for i, blk in enumerate(self.blocks):
            blk.attn.kv_cache = KVCache(self.hooks.kv_tokens(sizes, i), i, self.hooks) if on else None

    def _lvl_pos(self) -> Tensor:
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def get_logits(self, h: Tensor, cond: Tensor) -> Tensor:
        return self.head(self.head_nm(h.float(), cond).float()).float()

    # ------------------------------------------------------------------ training
    def forward(self, label_B: Tensor, x_BLCv_wo_first_l: Tensor, hooks: Hooks = IDENTITY) -> Tensor:
        """Teacher forcing: logits (B, L, V) for every token given the ground-truth coarser scales.

        Class dropout (label -> the unconditional class) is applied only in training mode; the official
        code also applies it in eval mode, which makes evaluation non-deterministic for no benefit.
        """
        B = label_B.shape[0]
        ed = x_BLCv_wo_first_l.shape[1] + self.first_l
        if self.training and self.cond_drop_rate > 0:
            drop = torch.rand(B, device=label_B.device) < self.cond_drop_rate
            label_B = torch.where(drop, self.num_classes, label_B)
        cond = self.class_emb(label_B)
        sos = cond.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
        x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
        x = x + self._lvl_pos()[:, :ed]
        bias = self.attn_bias_for_masking[:, :, :ed, :ed]
        cond_in = self.shared_ada_lin(cond)
        for blk in self.blocks:
            x = blk(x, cond_in, bias, hooks)
        return self.get_logits(x, cond)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def autoregressive_infer(
        self,
        vae,
        B: int,
        label_B: Tensor | int | None = None,
        cfg: float = 1.5,
        top_k: int = 0,
        top_p: float = 0.0,
        g_seed: int | None = None,
        more_smooth: bool = False,
        generator: torch.Generator | None = None,
        return_fhat: bool = False,
        trace: dict | None = None,
        decode: bool = True,
    ):
        """Next-scale sampling with the linear CFG ramp; returns images in [0, 1].

        Follows the official draw order on ``generator`` (labels if not given, then per scale one
        exponential per logit for the multinomial, then Gumbel noise if ``more_smooth``). Acceleration
        plans act only through ``self.hooks``. ``trace`` (a dict) collects per-scale intermediates for
        parity checks. ``decode=False`` returns the final f_hat instead of images (benchmarks time the
        transformer alone; the decoder's cost does not depend on the plan).
        """
        dev = self.device
        if generator is None and g_seed is not None:
            generator = torch.Generator(device=dev)
            generator.manual_seed(int(g_seed))
        if label_B is None:
            probs = torch.full((1, self.num_classes), 1.0 / self.num_classes, device=dev)
            label_B = torch.multinomial(probs, num_samples=B, replacement=True, generator=generator).reshape(B)
        elif isinstance(label_B, int):
            label_B = torch.full((B,), label_B, dtype=torch.long, device=dev)
        label_B = label_B.to(dev)
        if trace is not None:
            trace["label_B"] = label_B.clone()
        if int(label_B.min()) < 0 or int(label_B.max()) >= self.num_classes + 1:
            raise ValueError(f"class ids must be in [0, {self.num_classes}] ({self.num_classes} = unconditional)")

        quant = vae.quantize
        SN = len(self.patch_nums)
        P = self.patch_nums[-1]
        hooks = self.hooks
        cond = self.class_emb(torch.cat((label_B, torch.full_like(label_B, self.num_classes))))
        cond_in = self.shared_ada_lin(cond)
        lvl_pos = self._lvl_pos()
        f_hat = cond.new_zeros(B, self.Cvae, P, P)
        begin_ends = self.schedule.begin_ends

        hooks.begin(self.schedule.sizes, 2 * B, dev)
        self._set_kv_cache(True)
        try:
            rows = 2 * B  # B from the first conditional-only scale on (hooks.cond_only)
            for si, pn in enumerate(self.patch_nums):
                if hooks.skip_scale(si):
                    continue
                if rows == 2 * B and hooks.cond_only(si):
                    rows, cond, cond_in = B, cond[:B], cond_in[:B]
                    for blk in self.blocks:
                        blk.attn.kv_cache.keep_rows(B)
                bg, ed = begin_ends[si]
                if si == 0:
                    x = (
                        cond.unsqueeze(1).expand(rows, self.first_l, -1)
                        + self.pos_start.expand(rows, self.first_l, -1)
                        + lvl_pos[:, : self.first_l]
                    )
                else:
                    nxt = F.interpolate(f_hat, size=(pn, pn), mode="area") if pn != P else f_hat
                    x = self.word_embed(nxt.view(B, self.Cvae, -1).transpose(1, 2)) + lvl_pos[:, bg:ed]
                    if rows == 2 * B:
                        x = x.repeat(2, 1, 1)
                hooks.begin_scale(si, (pn, pn))
                for blk in self.blocks:
                    x = blk(x, cond_in, None, hooks)
                hooks.end_scale(si)
                logits = self.get_logits(x, cond)
                ratio = si / (SN - 1) if SN > 1 else 0.0
                t = cfg * ratio
                if rows == 2 * B:
                    guided = hooks.guidance(si, logits[:B], logits[B:], t, var_guidance)
                else:
                    guided = hooks.guidance(si, logits, None, t, var_guidance)
                if trace is not None:
                    trace.setdefault("raw_logits", []).append(logits)
                    trace.setdefault("guided_logits", []).append(guided.clone())
                idx = sample_top_k_top_p_(guided, top_k, top_p, generator)
                if trace is not None:
                    trace.setdefault("filtered_logits", []).append(guided.clone())
                    trace.setdefault("idx", []).append(idx)
                if more_smooth:
                    w = gumbel_softmax_smooth(guided, ratio, generator)
                    h = w @ quant.embedding.weight.unsqueeze(0)
                else:
                    h = quant.embedding(idx)
                h = h.transpose(1, 2).reshape(B, self.Cvae, pn, pn)
                f_hat = quant.add_scale_to_fhat(f_hat, h, si, SN)
        finally:
            self._set_kv_cache(False)
            hooks.end()
        if not decode:
            return f_hat
        img = vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
        if trace is not None:
            trace["fhat"] = f_hat
        return (img, f_hat) if return_fhat else img
