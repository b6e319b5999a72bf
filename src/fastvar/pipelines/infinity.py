"""Infinity generation for benchmarks: full-size or reduced-width architectures with random weights and
seeded random text features (no T5 download), timing the transformer only (the VAE decode does not
depend on the plan)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..accel import AccelPlan
from ..accel.stats import FlopDims
from ..models.infinity import Infinity, build_infinity
from ..schedules_infinity import infinity_schedule
from ..text.condition import pack_text_features
from .common import GenerationResult, PlanRunner, default_device, resolve_dtype


class InfinityPipeline:
    family = "infinity"

    def __init__(self, model: Infinity, name: str, aspect: str = "1:1", pn: str = "1M", text_tokens: int = 24) -> None:
        self.model, self.name = model, name
        self.schedule = infinity_schedule(aspect, pn)
        self.text_tokens = text_tokens
        model.flop_dims = self._flop_dims  # stats need the dims; the backbone file stays method-agnostic
        model.schedule = self.schedule

    def _flop_dims(self) -> FlopDims:
        c = self.model.cfg
        return FlopDims(width=c.embed_dim, ffn_hidden=c.mlp_hidden, ffn_mats=2, vocab_out=c.vocab,
                        cross_len=self.text_tokens, branches=("attn", "cross", "ffn"))

    @classmethod
    def random_init(cls, name: str = "infinity-2b", device=None, dtype="fp32", seed: int = 0, aspect: str = "1:1",
                    pn: str = "1M", text_tokens: int = 24, **overrides) -> InfinityPipeline:
        device = torch.device(device) if device is not None else default_device()
        model = build_infinity(name, device=device, dtype=resolve_dtype(dtype), seed=seed, **overrides)
        return cls(model, name, aspect, pn, text_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def random_text(self, batch: int, seed: int) -> object:
        g = torch.Generator().manual_seed(seed)
        c = self.model.cfg
        feats = torch.randn(batch, self.text_tokens, c.text_channels, generator=g)
        mask = torch.ones(batch, self.text_tokens, dtype=torch.bool)
        dtype = next(self.model.parameters()).dtype
        return pack_text_features(feats.to(self.device, dtype), mask.to(self.device))

    def __call__(self, batch: int = 1, seed: int | None = 0, plan: AccelPlan | str | None = None, cfg: float = 3.0,
                 tau: float = 0.5, top_k: int = 900, top_p: float = 0.97, decode: bool = False,
                 record: bool = False) -> GenerationResult:
        text = self.random_text(batch, 0 if seed is None else seed)

        def run() -> Tensor:
            with torch.inference_mode():
                out = self.model.autoregressive_infer(text, self.schedule.sizes, cfg=cfg, tau=tau, top_k=top_k,
                                                      top_p=top_p, g_seed=seed)
            return out.summed_codes

        latent, secs, stats, hooks = PlanRunner(self.model).run(run, plan, batch, self.schedule.sizes, record)
        stats["hooks"] = hooks if record else None
        return GenerationResult(None, secs, stats, latent=latent)

    def decode(self, latent: Tensor) -> Tensor:
        """No VAE in random-init benchmarks: fidelity is measured on the summed codes mapped to [0, 1]."""
        x = latent.float()
        x = x[:, :3] if x.shape[1] >= 3 else x.repeat(1, 3, 1, 1)[:, :3]
        return ((x - x.amin()) / (x.amax() - x.amin() + 1e-8)).cpu()
