"""Per-generation statistics: tokens forwarded per scale and layer, estimated FLOPs, time, memory.

FLOPs are estimated from the recorded token counts and the backbone's dimensions (2 FLOPs per
multiply-add), split into attention (QKᵀ and AV) and linear layers, so a plan's predicted speedup can
be compared with its measured one.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

Counts = dict[tuple[int, int, str], tuple[int, int]]


@dataclass(frozen=True)
class FlopDims:
    """What the FLOP estimate needs to know about a backbone."""

    width: int
    ffn_hidden: int
    ffn_mats: int = 2  # 2 for fc1/fc2, 3 for SwiGLU
    vocab_out: int = 0  # head output width
    cross_len: int = 0  # text tokens attended by cross-attention
    prefix_kv: int = 0  # tokens in every KV cache before scale 0 (e.g. HART's text prefix)
    branches: tuple[str, ...] = ("attn", "ffn")
    # FLOPs per (CFG-doubled) batch row that run once after the last scale's blocks, outside the hooks, so no
    # pruning plan changes them (HART's residual diffusion head: ~2/3 of a narrow model's time). Counted when
    # the last scale runs; leaving them out would overstate every plan's predicted speedup.
    tail_flops: float = 0.0


def dense_counts(sizes: Sequence[tuple[int, int]], depth: int, branches: Iterable[str], skip: Iterable[int] = ()) -> Counts:
    """Counts of a generation that forwards every token (the no-plan baseline)."""
    skip = set(skip)
    out: Counts = {}
    for si, (h, w) in enumerate(sizes):
        if si in skip:
            continue
        for layer in range(depth):
            for b in branches:
                out[(si, layer, b)] = (h * w, h * w)
    return out


def estimate_flops(counts: Counts, sizes: Sequence[tuple[int, int]], dims: FlopDims, batch: int = 1,
                   rows: Mapping[int, int] | None = None, kv_len: Mapping[tuple[int, int], int] | None = None) -> dict:
    """Attention, linear and total FLOPs of a generation, and per executed scale the FLOPs of its blocks
    (``scale_flops``, scale index -> FLOPs; the head and the tail run outside the blocks and are not in
    it): with the per-scale block times, the throughput that tells a plan's overhead from the hardware's.

    ``rows``: scale -> batch rows really forwarded where it differs from ``batch`` (a conditional-only
    scale forwards B of the 2B CFG rows: its FLOPs, head and tail included, are counted for B rows).
    ``kv_len``: (scale, layer) -> keys its self-attention really read (the recorder's, where a KV policy
    keeps fewer); otherwise every token appended so far."""
    rows = {} if rows is None else rows
    kv_len = {} if kv_len is None else kv_len
    C = dims.width
    attn = lin = 0.0
    per_scale: dict[int, float] = defaultdict(float)
    kv: dict[int, int] = defaultdict(lambda: dims.prefix_kv)
    for (si, layer, b) in sorted(counts, key=lambda k: (k[0], k[1])):
        n = counts[(si, layer, b)][1]
        a = f = 0.0
        if b == "attn":
            kv[layer] += n
            f = 2 * n * C * 4 * C
            a = 4 * n * kv_len.get((si, layer), kv[layer]) * C
        elif b == "cross":
            f = 2 * n * C * 2 * C
            a = 4 * n * dims.cross_len * C
        elif b == "ffn":
            f = 2 * n * C * dims.ffn_hidden * dims.ffn_mats
        r = rows.get(si, batch)
        attn += a * r
        lin += f * r
        per_scale[si] += (a + f) * r
    executed = {si for (si, _l, _b) in counts}
    for si in executed:
        h, w = sizes[si]
        lin += 2 * h * w * C * dims.vocab_out * rows.get(si, batch)
    last = len(sizes) - 1
    tail = dims.tail_flops * rows.get(last, batch) if last in executed else 0.0
    lin += tail
    return {"attn_flops": attn, "linear_flops": lin, "total_flops": attn + lin,
            "tail_flops": tail, "scale_flops": dict(sorted(per_scale.items()))}


def tokens_per_scale(counts: Counts) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = defaultdict(lambda: {"in": 0, "computed": 0})
    for (si, _l, _b), (n_in, n_c) in counts.items():
        out[si]["in"] += n_in
        out[si]["computed"] += n_c
    return dict(sorted(out.items()))


def current_rss_mb() -> float:
    """Resident memory of this process now (Linux), 0 where unavailable."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return current_rss_mb()


def generation_stats(counts: Counts, sizes: Sequence[tuple[int, int]], dims: FlopDims, batch: int,
                     scale_seconds: dict[int, float] | None = None, peak_mem_mb: float | None = None,
                     rows: Mapping[int, int] | None = None, kv_len: Mapping[tuple[int, int], int] | None = None) -> dict:
    """Everything a user asks after a generation, as one JSON-able dict.

    Token counts are per sequence (a plan's token budget); ``rows_per_scale`` says how many batch rows
    each executed scale really forwarded and ``row_tokens_forwarded`` / ``row_tokens_total`` weigh the
    computed tokens by them (against ``batch`` rows everywhere), so a conditional-only scale counts half.
    """
    rows = {} if rows is None else dict(rows)
    per_scale = tokens_per_scale(counts)
    total_in = sum(v["in"] for v in per_scale.values())
    total_c = sum(v["computed"] for v in per_scale.values())
    flops = estimate_flops(counts, sizes, dims, batch, rows, kv_len)
    row_c = sum(v["computed"] * rows.get(si, batch) for si, v in per_scale.items())
    return {
        "sizes": [list(s) for s in sizes],
        "tokens_per_scale": {str(k): v for k, v in per_scale.items()},
        "tokens_per_scale_layer": {f"{si}/{layer}/{b}": list(v) for (si, layer, b), v in sorted(counts.items())},
        "tokens_forwarded": total_c,
        "tokens_total": total_in,
        "rows_per_scale": {str(si): rows.get(si, batch) for si in per_scale},
        "row_tokens_forwarded": row_c,
        "row_tokens_total": total_in * batch,
        **{k: v for k, v in flops.items() if k != "scale_flops"},
        "scale_flops": {str(k): v for k, v in flops["scale_flops"].items()},
        "scale_seconds": {str(k): v for k, v in (scale_seconds or {}).items()},
        "peak_mem_mb": peak_mem_mb,
    }


def format_table(stats: dict) -> str:
    """A small text table: scale, size, tokens in / computed, seconds."""
    rows = ["scale  size      tokens_in  computed  ratio   seconds"]
    secs = stats.get("scale_seconds", {})
    for si, v in stats["tokens_per_scale"].items():
        h, w = stats["sizes"][int(si)]
        r = v["computed"] / max(v["in"], 1)
        t = secs.get(si)
        rows.append(f"{si:>5}  {h:>3}x{w:<4} {v['in']:>10} {v['computed']:>9}  {r:5.2f}  {'' if t is None else f'{t:8.3f}'}")
    skipped = [str(i) for i in range(len(stats["sizes"])) if str(i) not in stats["tokens_per_scale"]]
    if skipped:
        rows.append(f"skipped scales: {', '.join(skipped)}")
    rows.append(
        f"GFLOPs: attention {stats['attn_flops'] / 1e9:.2f}, linear {stats['linear_flops'] / 1e9:.2f}, "
        f"total {stats['total_flops'] / 1e9:.2f}"
    )
    if stats.get("kv_peak_bytes") is not None:
        rows.append(f"KV cache: {stats['kv_peak_bytes'] / 2**20:.2f} MiB held at peak, {stats['kv_bytes'] / 2**20:.2f} MiB "
                    f"at the end (largest K/V one attention read: {stats['kv_attended_peak_bytes'] / 2**20:.2f} MiB)")
    return "\n".join(rows)
