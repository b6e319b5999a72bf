"""Token sampling shared by every family: top-k / top-p filtering, seeded multinomial, Gumbel smoothing.

The official samplers consume their generator in a fixed order (one exponential draw per logit for the
multinomial, then optional Gumbel noise); reproducing that order is what makes seeded outputs
token-exact, so every family goes through these functions rather than its own copy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def filter_top_k_top_p_(logits: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """Mask (in place, with -inf) what top-k and then top-p remove along the last dim.

    top-k keeps every logit >= the k-th largest (ties at the threshold survive). top-p sorts ascending,
    removes the prefix whose cumulative softmax mass is <= 1 - top_p, and never removes the largest.
    """
    V = logits.shape[-1]
    if top_k > 0:
        k = min(int(top_k), V)
        thresh = logits.topk(k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < thresh, -math.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(sorted_idx.ndim - 1, sorted_idx, remove_sorted)
        logits.masked_fill_(remove, -math.inf)
    return logits


def multinomial_sample(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """One index per row of ``logits[..., V]`` drawn with ``torch.multinomial`` (shape ``logits.shape[:-1]``)."""
    V = logits.shape[-1]
    probs = logits.softmax(dim=-1).reshape(-1, V)
    idx = torch.multinomial(probs, num_samples=1, replacement=True, generator=generator)
    return idx.view(logits.shape[:-1])


def sample_top_k_top_p_(
    logits: Tensor, top_k: int, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """Filter ``logits`` in place, then draw one index per row."""
    filter_top_k_top_p_(logits, top_k, top_p)
    return multinomial_sample(logits, generator)


def gumbel_softmax_smooth(
    filtered_logits: Tensor, ratio: float, generator: torch.Generator | None
) -> Tensor:
    """VAR's ``more_smooth`` soft assignment weights: softmax((l·(1+ratio) + G)/tau) with a falling tau."""
    tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
    gumbels = -torch.empty_like(filtered_logits).exponential_(generator=generator).log()
    return ((filtered_logits * (1 + ratio) + gumbels) / tau).softmax(dim=-1)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on the sampling device, seeded; ``None`` (global RNG) when no seed is given."""
    if seed is None:
        return None
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g
