"""The tiny seeded VAR pipeline several test files share (random weights with every branch made to matter)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastvar.models.var import VAR
from fastvar.pipelines.var import VARPipeline
from fastvar.tokenizers.vqvae import VQVAE


def tiny_var_pipe(patch_nums: Sequence[int], embed_dim: int = 64) -> VARPipeline:
    torch.manual_seed(0)
    model = VAR(vocab_size=64, cvae=8, num_classes=5, depth=4, embed_dim=embed_dim, num_heads=2, patch_nums=patch_nums)
    model.init_weights()
    with torch.no_grad():  # the trainable init has near-zero AdaLN gains: make every branch matter
        for blk in model.blocks:
            blk.ada_lin[-1].weight.normal_(0, 0.05)
            blk.ada_lin[-1].bias.normal_(0, 0.3)
        model.head.weight.mul_(20)
    vae = VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1), patch_nums=patch_nums, using_sa=False,
                using_mid_sa=False)
    return VARPipeline(model.eval(), vae.eval(), "tiny", defaults=dict(cfg=2.0, top_k=10, top_p=0.9))
