"""HART text-to-image transformer (mit-han-lab/hart), state-dict compatible with the released checkpoints.

HART is VAR with three twists: the text (Qwen2 hidden states, projected) is a *prefix* of the token
sequence instead of a class embedding; attention uses RoPE (1-D on the text, an unusual "2-D" table on
the image tokens, see :func:`image_rope`); and the last 64x64 scale is completed by a small diffusion
head that samples the continuous residual the codebook cannot express (:mod:`.hart_diffusion`).

Module names follow ``HARTForT2I`` key for key (``blocks.i.attn.qkv_proj``, ``lvl_embed.mlp.0``,
``diffloss.net...``), so ``llm/`` weights and ``ema_model.bin`` load unchanged. The tokenizer is not a
submodule (the official model keeps it outside its state dict too); inference receives it as an
argument. Accelerations never live here: every residual branch goes through ``hooks.branch``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..accel.caching import CachingAPI
from ..accel.hooks import IDENTITY, Hooks
from ..layers.attention import KVCache, attend
from ..layers.norm import RMSNorm
from ..sampling import gumbel_softmax_smooth, make_generator, sample_top_k_top_p_
from ..schedules import Schedule
from .hart_diffusion import DiffLoss, TimestepEmbedder, diffusion_guidance
from .var import DropPath, var_guidance

HART_PATCH_NUMS = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)

TopK = int | Sequence[int] | Callable[[int], int] | None


def official_top_k(si: int) -> int:
    """The k the released sampler uses at scale ``si`` (it ignores its own ``top_k`` argument)."""
    return 600 if si < 7 else 300


# ---------------------------------------------------------------------------------------------- config
# HARTForT2IConfig's constructor defaults (they differ from the released model's values).
OFFICIAL_T2I_DEFAULTS: dict[str, Any] = dict(
    context_token=77, context_dim=768, depth=16, embed_dim=1024, num_heads=16, mlp_ratio=4.0, drop_path_rate=0.0,
    norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.1, attn_l2_norm=False, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    mlp_type="gpt2", attn_type="gpt2", disable_aln=False, use_timestep_embed=False, use_cross_attn=False,
    diff_width=1024, diff_depth=6, num_sampling_steps="8", diffusion_batch_mul=4, sampler="iddpm",
    use_context_norm=False,
)

@dataclass
class HARTConfig:
    """Constructor arguments of ``HARTForT2IConfig`` that change the module tree, plus tokenizer sizes.

    ``vocab_size`` and ``cvae`` come from the tokenizer (the official model reads them from it).
    Flags the released model fixes are validated, not silently ignored: a checkpoint with other values
    needs code that does not exist here.
    """

    context_token: int = 300
    context_dim: int = 1536
    depth: int = 24
    embed_dim: int = 1536
    num_heads: int = 24
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    patch_nums: tuple[int, ...] = HART_PATCH_NUMS
    diff_width: int = 1024
    diff_depth: int = 6
    num_sampling_steps: str = "8"
    diffusion_batch_mul: int = 4
    cond_drop_rate: float = 0.1
    drop_path_rate: float = 0.0
    use_timestep_embed: bool = True
    use_context_norm: bool = True
    vocab_size: int = 4096
    cvae: int = 32
    # fixed by the released model; other values are rejected with an explanation
    attn_type: str = "llama"
    mlp_type: str = "llama"
    disable_aln: bool = True
    shared_aln: bool = False
    use_cross_attn: bool = False
    attn_l2_norm: bool = False
    sampler: str = "iddpm"
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        self.num_sampling_steps = str(self.num_sampling_steps)
        want = dict(attn_type="llama", mlp_type="llama", disable_aln=True, shared_aln=False, use_cross_attn=False,
                    attn_l2_norm=False, sampler="iddpm")
        bad = {k: getattr(self, k) for k, v in want.items() if getattr(self, k) != v}
        if bad:
            raise ValueError(
                f"HART config {bad} is not supported: only the released HART-0.7B architecture ({want}) is "
                "implemented. Check the llm/config.json you passed."
            )
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"embed_dim {self.embed_dim} / num_heads {self.num_heads} must give a head_dim divisible by 4")

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> HARTConfig:
        """From an official ``llm/config.json`` (unknown keys such as ``vae_path`` are kept in ``extra``)."""
        d = {**d, **overrides}
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def from_official(cls, d: dict[str, Any], vocab_size: int, cvae: int) -> HARTConfig:
        """From ``llm/config.json``: keys it omits take ``HARTForT2IConfig``'s defaults, not ours."""
        return cls.from_dict({**OFFICIAL_T2I_DEFAULTS, **d}, vocab_size=vocab_size, cvae=cvae)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["patch_nums"] = list(self.patch_nums)
        return d


HART_0_7B = HARTConfig()
"""hart-0.7b-1024px: the manifest's constructor kwargs with the tokenizer's vocab 4096 / Cvae 32."""


def hart_config(name: str = "hart-0.7b", **overrides: Any) -> HARTConfig:
    """Full-size configurations by name (for ``fastvar bench --model hart-0.7b --random-init``)."""
    if name not in ("hart-0.7b", "hart-0.7b-1024px", "hart"):
        raise KeyError(f"unknown HART model {name!r}; known: hart-0.7b")
    return HARTConfig.from_dict(HART_0_7B.to_dict(), **overrides)


# ---------------------------------------------------------------------------------------------- layers
def rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def context_rope(position_ids: Tensor, head_dim: int, base: int = 10000) -> tuple[Tensor, Tensor]:
    """Standard 1-D Llama RoPE of the text tokens: cos/sin (B, L, head_dim) of ``[f, f]``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float().to(position_ids.device) / head_dim))
    f = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((f, f), dim=-1)
    return emb.cos(), emb.sin()


def image_positions(pn: int, last: int, device: torch.device | None = None) -> Tensor:
    """(pn², 2) float32 (row, col) of a pn×pn scale stretched onto the last scale: ``(i/pn)·last``."""
    ar = torch.arange(pn, device=device)
    grid = torch.stack(torch.meshgrid(ar, ar, indexing="ij"), dim=-1)
    return (grid / pn * last).reshape(-1, 2)


def image_rope(positions: Tensor, head_dim: int, base: int = 10000) -> tuple[Tensor, Tensor]:
    """HART's image RoPE table: cos/sin (B, L, head_dim) of ``[a, a, b, b]``, a = row·f, b = col·f.

    ``f`` has head_dim/4 frequencies. Applied with the plain 1-D formula over the full head, dim d
    (a row angle) is paired with d + head_dim/2 (a column angle): this is *not* a rotation and not two
    1-D RoPEs, but it is what the released weights were trained with.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 4, dtype=torch.int64).float().to(positions.device) / head_dim))
    f = positions.float()[..., None] * inv_freq  # (B, L, 2, hd/4)
    emb = torch.cat((f, f), dim=-1).flatten(-2)  # (B, L, hd): [row, row, col, col]
    return emb.cos(), emb.sin()


class HARTAttention(nn.Module):
    """Self-attention with q/v biases, RoPE on q and k, scale 0.25/sqrt(head_dim), and a KV cache."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = 0.25 / math.sqrt(self.head_dim)
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv_proj.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, c)
        cos, sin = cos.unsqueeze(1).to(v.dtype), sin.unsqueeze(1).to(v.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.kv_cache is not None:
            k, v = self.kv_cache.append(k, v, q, self.scale)
        out = attend(q, k, v, scale=self.scale, mask=attn_bias)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class SwiGLU(nn.Module):
    """Llama MLP ``down(silu(gate(x))·up(x))`` (no biases)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    return int((dim * mlp_ratio * 2) / 3 + 255) // 256 * 256


def _gather_rows(t: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(t, 1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


class HARTBlock(nn.Module):
    """``x += attn(rms(x)); x += ffn(rms(x))`` with ONE shared RMSNorm (the released ``disable_aln`` block)."""

    def __init__(self, layer_idx: int, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float, drop_path: float):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn = HARTAttention(dim, num_heads)
        self.ffn = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))
        self.ln_wo_grad = RMSNorm(dim, norm_eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], attn_bias: Tensor | None, hooks: Hooks = IDENTITY) -> Tensor:
        def attn_branch(t: Tensor, idx: Tensor | None) -> Tensor:
            cos, sin = rope if idx is None else (_gather_rows(rope[0], idx), _gather_rows(rope[1], idx))
            return self.attn(self.ln_wo_grad(t), cos, sin, attn_bias)

        def ffn_branch(t: Tensor, idx: Tensor | None) -> Tensor:
            return self.ffn(self.ln_wo_grad(t))

        x = x + self.drop_path(hooks.branch(self.layer_idx, "attn", x, attn_branch))
        x = x + self.drop_path(hooks.branch(self.layer_idx, "ffn", x, ffn_branch))
        return x


class AdaLNBeforeHead(nn.Module):
    """RMSNorm modulated by the max-pooled text condition (all slots, padding included)."""

    def __init__(self, dim: int, cond_dim: int, norm_eps: float) -> None:
        super().__init__()
        self.C = dim
        self.ln_wo_grad = RMSNorm(dim, norm_eps)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        if cond.ndim == 3 and cond.shape[1] > 1:
            cond = cond.max(dim=1, keepdim=True).values
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


def level_ids(patch_nums: Sequence[int], context_token: int) -> Tensor:
    """(1, ctx + L - 1): 0 for the text prefix, k for the tokens of scale k >= 1."""
    parts = [torch.zeros(context_token, dtype=torch.long)]
    parts += [torch.full((pn * pn,), i + 1, dtype=torch.long) for i, pn in enumerate(patch_nums[1:])]
    return torch.cat(parts).view(1, -1)


def block_causal_bias(lvl: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(1, 1, N, N): 0 where level(query) >= level(key), -inf elsewhere (teacher forcing only)."""
    d = lvl.view(1, -1, 1)
    return torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).to(dtype).unsqueeze(1)


# ---------------------------------------------------------------------------------------------- model
class HART(CachingAPI, nn.Module):
    """The HART transformer + diffusion head (``HARTForT2I``)."""

    family = "hart"

    def __init__(self, config: HARTConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        cfg = config if config is not None else HARTConfig(**kwargs)
        self.config = cfg
        C = cfg.embed_dim
        self.C, self.depth, self.num_heads = C, cfg.depth, cfg.num_heads
        self.head_dim = C // cfg.num_heads
        self.V, self.Cvae = cfg.vocab_size, cfg.cvae
        self.context_token = cfg.context_token
        self.patch_nums = cfg.patch_nums
        self.schedule = Schedule.square(self.patch_nums)
        self.L = self.schedule.total_tokens
        self.cond_drop_rate = cfg.cond_drop_rate
        self.diffusion_batch_mul = cfg.diffusion_batch_mul
        self.hooks: Hooks = IDENTITY
        # Token ranges in the (ctx + L - 1)-long training sequence: the prefix, then scales 1..SN-1.
        be, cur = [(0, cfg.context_token)], cfg.context_token
        for pn in self.patch_nums[1:]:
            be.append((cur, cur + pn * pn))
            cur += pn * pn
        self.begin_ends = tuple(be)

        self.word_embed = nn.Linear(cfg.cvae, C)
        self.context_embed = nn.Linear(cfg.context_dim, C)
        self.context_norm = RMSNorm(cfg.context_dim, cfg.norm_eps) if cfg.use_context_norm else nn.Identity()
        self.lvl_embed = TimestepEmbedder(C) if cfg.use_timestep_embed else nn.Embedding(len(self.patch_nums), C)
        dpr = [cfg.drop_path_rate * i / (cfg.depth - 1) for i in range(cfg.depth)] if cfg.depth > 1 else [cfg.drop_path_rate]
        self.blocks = nn.ModuleList(
            HARTBlock(i, C, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, dpr[i]) for i in range(cfg.depth)
        )
        self.register_buffer("lvl_1L", level_ids(self.patch_nums, cfg.context_token))
        self.head_nm = AdaLNBeforeHead(C, C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        self.decoder_norm = RMSNorm(C, cfg.norm_eps)
        self.diffloss = DiffLoss(cfg.cvae, C, cfg.diff_depth, cfg.diff_width, cfg.num_sampling_steps)
        # The official model also stores the (N, N) 0/-inf mask (380 MB at full size) as a persistent
        # buffer. It is a function of lvl_1L, so we expose it in state_dict() (key-compatible files) and
        # drop it on load instead of holding it in memory.
        self.register_state_dict_post_hook(_add_mask_to_state_dict)
        self.register_load_state_dict_pre_hook(_drop_mask_from_state_dict)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def attn_bias_for_masking(self) -> Tensor:
        return block_causal_bias(self.lvl_1L, self.head.weight.dtype)

    def flop_dims(self):
        from ..accel.stats import FlopDims

        # After the last scale every one of its P² tokens (both CFG rows) gets word_embed(code) and the
        # diffusion sampler: plan-independent work that dominates narrow models, so it is counted too.
        n_last = self.patch_nums[-1] ** 2
        tail = n_last * (self.diffloss.sample_flops_per_row() + 2 * self.Cvae * self.C)
        return FlopDims(width=self.C, ffn_hidden=self.blocks[0].ffn.gate_proj.out_features, ffn_mats=3,
                        vocab_out=self.V, prefix_kv=self.context_token, branches=("attn", "ffn"), tail_flops=tail)

    def _set_kv_cache(self, on: bool) -> None:
        sizes = self.schedule.sizes
        for i, blk in enumerate(self.blocks):
            blk.attn.kv_cache = (KVCache(self.hooks.kv_tokens(sizes, i) + self.context_token - 1, i, self.hooks)
                                 if on else None)

    def _lvl_pos(self) -> Tensor:
        return self.lvl_embed(self.lvl_1L)

    def _image_rope(self, si: int, offset: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE of scale si >= 1 for rows whose text prefix ends at position ``offset`` (B,)."""
        pos = image_positions(self.patch_nums[si], self.patch_nums[-1], offset.device)
        return image_rope(pos.unsqueeze(0) + offset.view(-1, 1, 1), self.head_dim)

    def get_logits(self, h: Tensor, cond: Tensor) -> Tensor:
        dt = self.head.weight.dtype
        return self.head(self.head_nm(h.float().to(dt), cond.to(dt))).float()

    def embed_context(self, context: Tensor) -> Tensor:
        return self.context_embed(self.context_norm(context))

    # ------------------------------------------------------------------ training
    def forward(
        self,
        context: Tensor,
        x_BLCv_wo_first_l: Tensor,
        context_position_ids: Tensor,
        context_mask: Tensor | None = None,
        last_layer_gt: Tensor | None = None,
        vae=None,
        hooks: Hooks = IDENTITY,
        generator: torch.Generator | None = None,
        trace: dict | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Teacher forcing: logits (B, L, V) (position j predicts token j) and the diffusion loss.

        The diffusion target uses a last-scale index *sampled* from the predicted logits (``generator``,
        top-k 600, top-p 0.96), as the official code does; the loss needs ``last_layer_gt`` (the
        tokenizer's residual before the last discrete scale) and ``vae`` (for the code embeddings).
        Unlike the official code this forward applies no MAR masking of the last scale and no
        condition dropout (both are training-recipe choices; drop the context before calling).
        ``context_mask`` is accepted for API parity: the released model does not use it.
        """
        B, ctx = context.shape[0], self.context_token
        ed = ctx + x_BLCv_wo_first_l.shape[1]
        cond = self.embed_context(context)
        x = torch.cat((cond, self.word_embed(x_BLCv_wo_first_l.to(cond.dtype))), dim=1)
        x = x + self._lvl_pos()[:, :ed]
        lvl = self.lvl_1L[:, :ed]
        bias = block_causal_bias(lvl, x.dtype)
        offset = context_position_ids[:, -1]
        img_pos = [image_positions(pn, self.patch_nums[-1], x.device) for pn in self.patch_nums[1:]]
        img_pos = torch.cat(img_pos)[: ed - ctx].unsqueeze(0) + offset.view(-1, 1, 1)
        ci, si_ = context_rope(context_position_ids, self.head_dim), image_rope(img_pos, self.head_dim)
        rope = (torch.cat([ci[0], si_[0]], 1), torch.cat([ci[1], si_[1]], 1))
        if trace is not None:
            trace["blocks_input"] = x
        for i, blk in enumerate(self.blocks):
            x = blk(x, rope, bias, hooks)
            if trace is not None and i == 0:
                trace["block0_output"] = x
        if trace is not None:
            trace["hidden"] = x
        logits = self.get_logits(x, cond)
        diff_loss = None
        n_last = self.patch_nums[-1] ** 2
        if last_layer_gt is not None and ed == ctx + self.L - 1:
            if vae is None:
                raise ValueError("the diffusion loss needs the tokenizer: pass vae=<HART tokenizer>")
            with torch.no_grad():
                idx = sample_top_k_top_p_(logits[:, -n_last:].clone(), 600, 0.96, generator)
            emb = vae.quantize.embedding(idx)
            z = self.decoder_norm(x[:, -n_last:] + self.word_embed(emb.to(x.dtype)))
            target = last_layer_gt - emb
            if trace is not None:
                trace["idx_last_sampled"], trace["diffusion_cond"] = idx, z
            m = self.diffusion_batch_mul
            diff_loss = self.diffloss(target.reshape(B * n_last, -1).repeat(m, 1), z.reshape(B * n_last, -1).repeat(m, 1))
        return logits[:, ctx - 1 :], diff_loss

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def autoregressive_infer(
        self,
        vae,
        context: Tensor,
        context_position_ids: Tensor,
        context_mask: Tensor | None = None,
        cfg: float = 4.5,
        top_k: TopK = None,
        top_p: float = 0.0,
        g_seed: int | None = None,
        more_smooth: bool = False,
        generator: torch.Generator | None = None,
        diffusion_generator: torch.Generator | None = None,
        residual_diffusion: bool = True,
        trace: dict | None = None,
        return_fhat: bool = False,
        decode: bool = True,
    ):
        """Next-scale sampling with CFG; returns images (B, 3, H, W) in [0, 1] (``(img, f_hat)`` with
        ``return_fhat``; only the latent f_hat (B, Cvae, P, P) with ``decode=False``).

        ``context`` (B, context_token, context_dim) are the Qwen2 features and ``context_position_ids``
        their positions (``cumsum(mask) - 1``, see :mod:`fastvar.text.qwen2`); the unconditional rows use
        zeros for both. ``top_k``: ``None`` = the released schedule (600 for scales 0-6, 300 after,
        :func:`official_top_k`; the official function ignores its ``top_k`` argument), an int = that k at
        every scale (1 = greedy, 0 = no filtering), a sequence = one k per scale, or a callable si -> k.

        RNG: ``generator`` (or a generator seeded with ``g_seed``; else the global RNG) gets, per scale,
        the multinomial draw and then, with ``more_smooth``, the Gumbel draw. The diffusion residual
        draws from ``diffusion_generator`` or, by default, the global RNG (official order). The last
        scale reuses the CFG ratio of the previous one (t = cfg·(SN-2)/(SN-1)), as the released code
        does, for both the logits and the diffusion head. ``residual_diffusion=False`` keeps only the
        discrete tokens. Acceleration plans act only through ``self.hooks``.
        """
        B = context.shape[0]
        if context.shape[1] != self.context_token:
            raise ValueError(f"context has {context.shape[1]} tokens; this model expects {self.context_token} (pad/truncate)")
        dev = self.device
        if generator is None and g_seed is not None:
            generator = make_generator(g_seed, dev)
        SN, P, ctx = len(self.patch_nums), self.patch_nums[-1], self.context_token
        emb = vae.quantize.embedding
        cond = self.embed_context(torch.cat((context, torch.zeros_like(context))).to(dev, self.head.weight.dtype))
        pos2 = torch.cat((context_position_ids, torch.zeros_like(context_position_ids))).to(dev)
        offset = pos2[:, -1]
        lvl_pos = self._lvl_pos()
        f_hat = emb.weight.new_zeros(B, self.Cvae, P, P)
        hooks = self.hooks

        hooks.begin(self.schedule.sizes, 2 * B, dev)
        self._set_kv_cache(True)
        try:
            rows = 2 * B  # B from the first conditional-only scale on (hooks.cond_only)
            for si, pn in enumerate(self.patch_nums):
                if hooks.skip_scale(si):
                    continue
                if rows == 2 * B and hooks.cond_only(si):
                    rows, cond, pos2, offset = B, cond[:B], pos2[:B], offset[:B]
                    for blk in self.blocks:
                        blk.attn.kv_cache.keep_rows(B)
                last = si == SN - 1
                ratio = (si if not last else SN - 2) / (SN - 1) if SN > 1 else 0.0
                if si == 0:
                    x = cond + lvl_pos[:, :ctx]
                    rope = context_rope(pos2, self.head_dim)
                else:
                    bg, ed = self.begin_ends[si]
                    nxt = F.interpolate(f_hat, size=(pn, pn), mode="area") if pn != P else f_hat
                    x = self.word_embed(nxt.view(B, self.Cvae, -1).transpose(1, 2).to(cond.dtype)) + lvl_pos[:, bg:ed]
                    if rows == 2 * B:
                        x = x.repeat(2, 1, 1)
                    rope = self._image_rope(si, offset)
                hooks.begin_scale(si, (pn, pn))
                # The text prefill is not a token map: accelerations only see image scales.
                blk_hooks = hooks if si > 0 else IDENTITY
                for blk in self.blocks:
                    x = blk(x, rope, None, blk_hooks)
                hooks.end_scale(si)
                t = cfg * ratio
                logits = self.get_logits(x, cond)
                if rows == 2 * B:
                    logits = hooks.guidance(si, logits[:B], logits[B:], t, var_guidance)
                else:
                    logits = hooks.guidance(si, logits, None, t, var_guidance)
                if si == 0:
                    logits = logits[:, [-1], :]
                if trace is not None:
                    trace.setdefault("cfg_logits", []).append(logits.clone())
                idx = sample_top_k_top_p_(logits, _resolve_top_k(top_k, si), top_p, generator)
                if trace is not None:
                    trace.setdefault("idx", []).append(idx)
                if more_smooth:
                    h = gumbel_softmax_smooth(logits, ratio, generator) @ emb.weight.unsqueeze(0)
                else:
                    h = emb(idx)
                if not last:
                    f_hat = vae.quantize.add_scale_to_fhat(f_hat, h.transpose(1, 2).reshape(B, self.Cvae, pn, pn), si, SN)
                    continue
                if residual_diffusion:
                    d = self.word_embed(emb(idx).to(x.dtype))
                    z = self.decoder_norm(x + torch.cat((d, d)) if rows == 2 * B else x + d)

                    def guide(c: Tensor, u: Tensor | None, w: float, si: int = si) -> Tensor:
                        return hooks.guidance(si, c, u, w, diffusion_guidance, where="diffusion")

                    res = self.diffloss.sample(z.reshape(rows * pn * pn, -1), 1.0, t, diffusion_generator,
                                               guide=guide, cond_only=rows == B)
                    res = res.reshape(rows, pn * pn, -1)[:B].to(h.dtype)
                    if trace is not None:
                        trace["diffusion_cfg"], trace["diffusion_cond"], trace["residual"] = t, z[:B], res
                    h = h + res
                f_hat = f_hat + h.transpose(1, 2).reshape(B, self.Cvae, P, P)
        finally:
            self._set_kv_cache(False)
            hooks.end()
        if trace is not None:
            trace["f_hat"] = f_hat
        if not decode:
            return f_hat
        img = vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
        return (img, f_hat) if return_fhat else img


def _resolve_top_k(top_k: TopK, si: int) -> int:
    if top_k is None:
        return official_top_k(si)
    if callable(top_k):
        return int(top_k(si))
    if isinstance(top_k, int):
        return top_k
    return int(top_k[si])


def _add_mask_to_state_dict(module: HART, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """Insert ``attn_bias_for_masking`` right after ``lvl_1L`` (the official key order)."""
    items = list(state_dict.items())
    state_dict.clear()
    for k, v in items:
        state_dict[k] = v
        if k == prefix + "lvl_1L":
            state_dict[prefix + "attn_bias_for_masking"] = module.attn_bias_for_masking


def _drop_mask_from_state_dict(module: HART, state_dict: dict, prefix: str, *args: Any) -> None:
    key = prefix + "attn_bias_for_masking"
    if key in state_dict:
        n = module.lvl_1L.shape[1]
        if tuple(state_dict[key].shape) != (1, 1, n, n):
            raise ValueError(
                f"{key} has shape {tuple(state_dict[key].shape)}, expected (1, 1, {n}, {n}): the checkpoint was made "
                "with another context_token or patch_nums"
            )
        del state_dict[key]


# ---------------------------------------------------------------------------------------------- loading
def guess_hart_config(sd: dict[str, Tensor]) -> str:
    """A short description of what a state dict looks like (for mismatch errors)."""
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    w = sd.get("word_embed.weight")
    ctx = sd.get("context_embed.weight")
    parts = [f"depth {depth}"]
    if w is not None:
        parts.append(f"width {w.shape[0]}, Cvae {w.shape[1]}")
    if ctx is not None:
        parts.append(f"context_dim {ctx.shape[1]}")
    if "head.weight" in sd:
        parts.append(f"vocab {sd['head.weight'].shape[0]}")
    parts.append("timestep level embedding" if "lvl_embed.mlp.0.weight" in sd else "table level embedding")
    if "blocks.0.ffn.fc1.weight" in sd:
        parts.append("gpt2 MLP (unsupported)")
    if "blocks.0.ada_lin.1.weight" in sd:
        parts.append("AdaLN blocks (unsupported)")
    return ", ".join(parts)


def load_hart_state(model: HART, sd: dict[str, Tensor], what: str = "the HART transformer") -> None:
    """Strict load that tolerates a missing ``attn_bias_for_masking`` (it is rebuilt from the config)."""
    from ..checkpoints import mismatch_error

    own = {k: v for k, v in [*model.named_parameters(), *model.named_buffers()]}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and k != "attn_bias_for_masking"]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise mismatch_error(f"{what} ({guess_hart_config(dict(own))})", missing, unexpected, shapes,
                             guess_hart_config(sd))
    model.load_state_dict(sd, strict=True)


def read_hf_weights(folder: str | Path, flag: str = "--weights") -> dict[str, Tensor]:
    """The weights of a ``save_pretrained`` folder: single or sharded safetensors / pytorch_model.bin.

    ``flag`` is the option a damaged file is reported under (``--weights``, ``--vae-weights`` for the tokenizer).
    """
    from ..checkpoints import read_state_dict

    folder = Path(folder)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return read_state_dict(folder / name, flag=flag)
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / name).is_file():
            files = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
            sd: dict[str, Tensor] = {}
            for f in files:
                sd.update(read_state_dict(folder / f, flag=flag))
            return sd
    raise FileNotFoundError(
        f"no weights in {folder}: expected model.safetensors, pytorch_model.bin or a sharded *.index.json "
        "(the layout `save_pretrained` writes)"
    )


def load_hart_folder(
    root: str | Path, use_ema: bool = True, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
    tokenizer_dir: str | Path | None = None,
):
    """(model, tokenizer) from the official folder (``hart-0.7b-1024px/``, or its ``llm/`` subfolder).

    Layout: ``llm/config.json`` + HF weights (+ ``llm/ema_model.bin``, loaded over them when
    ``use_ema``, as sample.py/app.py do by default) and ``tokenizer/`` (config + weights with ``vae.*``
    and ``disc.*`` keys; the discriminator is dropped). Files are read with ``weights_only=True`` or as
    safetensors; nothing is unpickled.
    """
    from ..tokenizers.hart_tokenizer import load_hart_tokenizer

    root = Path(root).expanduser()
    llm = root / "llm" if (root / "llm" / "config.json").is_file() else root
    if not (llm / "config.json").is_file():
        raise FileNotFoundError(
            f"{root} is not a HART checkpoint folder: expected {root}/llm/config.json (clone of "
            "https://huggingface.co/mit-han-lab/hart-0.7b-1024px, or its llm/ subfolder)"
        )
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else llm.parent / "tokenizer"
    tokenizer = load_hart_tokenizer(tok_dir)
    cfg = HARTConfig.from_official(json.loads((llm / "config.json").read_text()),
                                   vocab_size=tokenizer.vocab_size, cvae=tokenizer.Cvae)
    model = HART(cfg)
    load_hart_state(model, read_hf_weights(llm), f"the HART transformer of {llm}")
    if use_ema:
        ema = llm / "ema_model.bin"
        if ema.is_file():
            from ..checkpoints import read_state_dict

            load_hart_state(model, read_state_dict(ema, flag="--weights"), f"the EMA weights {ema}")
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), tokenizer.to(device).eval()


__all__ = [
    "HART", "HARTConfig", "HART_0_7B", "HART_PATCH_NUMS", "OFFICIAL_T2I_DEFAULTS", "block_causal_bias", "context_rope",
    "hart_config", "image_positions", "image_rope", "load_hart_folder", "load_hart_state", "official_top_k",
    "read_hf_weights",
]
