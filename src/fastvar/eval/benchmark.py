"""Baseline vs plans in one run (``fastvar bench``): speed, tokens, FLOPs, memory and fidelity per plan.

The runs are :func:`fastvar.eval.run.run_plans` (same weights and seeds, interleaved repeats after a
warm-up, transformer time only); this module turns them into rows. Fidelity is measured on decoded
images against the baseline's images from the same seed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .run import PlanResult, RunPlan, run_plans


def psnr_ssim(images: Tensor, ref: Tensor) -> tuple[float, float]:
    """PSNR (dB) and SSIM of images in [0, 1] against reference images (torchmetrics)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    images, ref = images.float().clamp(0, 1), ref.float().clamp(0, 1)
    if torch.equal(images, ref):
        return float("inf"), 1.0
    psnr = float(peak_signal_noise_ratio(images, ref, data_range=1.0))
    ssim = float(structural_similarity_index_measure(images, ref, data_range=1.0))
    return psnr, ssim


def run_benchmark(pipe, conditions: Sequence, plans: Sequence[tuple[str, RunPlan]], repeats: int = 3,
                  warmup: int = 1, seed: int | None = 0, sampling: Mapping[str, Any] | None = None,
                  log: Callable[[str], None] | None = None, clock: str = "wall") -> list[dict]:
    """``fastvar bench``: :func:`fastvar.eval.run.run_plans`, then :func:`benchmark_rows` (the first plan is the
    baseline). ``clock``: "wall" or "cpu" (process CPU seconds: for a shared, loaded machine)."""
    results = run_plans(pipe, conditions, plans, repeats=repeats, warmup=warmup, seed=seed, sampling=sampling,
                        decode=True, log=log, clock=clock)
    return benchmark_rows(results)


def benchmark_rows(results: Sequence[PlanResult]) -> list[dict]:
    """One row per plan against the first (the baseline): time, speedup, token/FLOP ratios, fidelity, and
    the throughput ceiling against an ``identity`` plan when one ran."""
    base = results[0]
    base_t = base.median
    out = []
    for r in results:
        t = r.median
        psnr, ssim = psnr_ssim(r.images, base.images)
        flop_ratio = r.stats["total_flops"] / base.stats["total_flops"]
        row = {
            "plan": r.name,
            "seconds_median": t,
            "seconds_all": r.seconds,
            "seconds_spread": (max(r.seconds) - min(r.seconds)) if r.seconds else 0.0,
            "speedup": base_t / t,
            "token_ratio": r.stats["tokens_forwarded"] / base.stats["tokens_forwarded"],
            "flop_ratio": flop_ratio,
            "attn_flop_ratio": r.stats["attn_flops"] / max(base.stats["attn_flops"], 1.0),
            "flop_predicted_speedup": 1.0 / flop_ratio,
            "efficiency": (base_t / t) * flop_ratio,
            "peak_mem_mb": r.stats.get("peak_mem_mb"),
            "psnr": None if psnr == float("inf") else psnr,
            "ssim": ssim,
            "scale_seconds": _median_scales(r.scale_seconds),
            "scale_flops": r.stats.get("scale_flops", {}),
        }
        out.append(row)
    dense = next((row for row in out if row["plan"] == "identity"), None)
    for row in out:
        if dense is not None and row is not dense and row["scale_seconds"]:
            row.update(throughput_ceiling(dense["scale_seconds"], dense["scale_flops"], dense["seconds_median"],
                                          row["scale_seconds"], row["scale_flops"], row["flop_ratio"],
                                          row["seconds_median"]))
    return out


def _median_scales(per_repeat: list[dict[str, float]]) -> dict[str, float]:
    if not per_repeat:
        return {}
    keys = per_repeat[0].keys()
    return {k: statistics.median(d[k] for d in per_repeat if k in d) for k in keys}


def throughput_ceiling(dense_secs: dict[str, float], dense_flops: dict[str, float], dense_total: float,
                       plan_secs: dict[str, float], plan_flops: dict[str, float], flop_ratio: float,
                       plan_total: float) -> dict[str, float]:
    """The efficiency a plan would reach if the blocks of every scale it runs ran at the FLOP rate the dense
    computation (the ``identity`` plan) reaches at that scale.

    ``*_secs`` / ``*_flops``: per-scale block seconds and block FLOPs (``scale_seconds`` / ``scale_flops``
    of :func:`fastvar.accel.stats.generation_stats`).

    The FLOP-predicted speedup assumes every FLOP costs the same, but small scales run at a lower rate
    than large ones (small GEMMs, per-op and weight-streaming costs), and a plan that removes the large
    scales' FLOPs spends most of its time on small ones. ``ceiling_seconds`` is each scale's dense block
    time scaled by the plan's FLOPs at that scale, plus the plan's own time outside the blocks (sampling,
    embedding); ``ceiling_efficiency`` is the efficiency that time gives; ``of_ceiling`` (ceiling /
    measured time) says how close the implementation comes to that limit (1.0: no overhead at all).
    """
    blocks = 0.0
    for si, secs in dense_secs.items():
        if dense_flops.get(si, 0.0) > 0:
            blocks += secs * plan_flops.get(si, 0.0) / dense_flops[si]
        elif si in plan_secs:  # blocks no plan touches (HART's text prefill): as long as in the dense run
            blocks += secs
    ceiling = blocks + max(plan_total - sum(plan_secs.values()), 0.0)
    return {"ceiling_seconds": ceiling, "ceiling_efficiency": dense_total / ceiling * flop_ratio,
            "of_ceiling": ceiling / plan_total}


def format_results(rows: list[dict]) -> str:
    """The table ``fastvar bench`` prints; ``ceil.`` (with an ``identity`` plan) is :func:`throughput_ceiling`."""
    head = (f"{'plan':<16}{'sec(med)':>10}{'speedup':>9}{'tokens':>8}{'FLOPs':>8}{'eff.':>7}{'ceil.':>7}"
            f"{'PSNR':>8}{'SSIM':>7}{'peakMB':>9}")
    lines = [head]
    for r in rows:
        psnr = "inf" if r["psnr"] is None else f"{r['psnr']:.2f}"
        mem = "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        ceil = f"{r['ceiling_efficiency']:.2f}" if "ceiling_efficiency" in r else ""
        lines.append(
            f"{r['plan']:<16}{r['seconds_median']:>10.3f}{r['speedup']:>9.2f}{r['token_ratio']:>8.3f}"
            f"{r['flop_ratio']:>8.3f}{r['efficiency']:>7.2f}{ceil:>7}{psnr:>8}{r['ssim']:>7.3f}{mem:>9}"
        )
    return "\n".join(lines)
