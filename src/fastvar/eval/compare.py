"""Side-by-side comparison of caching and pruning configurations against the baseline.

Each configuration runs on the same classes and seed as the baseline, repeats interleaved (baseline,
A, B, baseline, …) so machine noise spreads evenly. Cache configurations in inference mode without
similarity data are calibrated first on the same classes and seed (calibration output equals the
baseline, so this costs one extra generation and no fidelity), which makes the comparison
self-contained; pass configurations with ``sim_path`` to use held-out calibration instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from ..accel import AccelPlan, CacheConfig, PlanError
from ..accel.caching import CachePolicy
from .benchmark import psnr_ssim
from .run import run_plans

Config = str | CacheConfig | AccelPlan | None


def resolve_config(config: Config, model) -> AccelPlan | None:
    """A plan from a cache preset name, a pruning preset name, "pruning+cache" (e.g. "fastvar+original"),
    a plan JSON file, a CacheConfig or a plan."""
    from ..accel.cache_presets import CACHE_PRESETS, get_cache_preset
    from ..accel.presets import PRESETS, preset_for_model

    if config is None or isinstance(config, AccelPlan):
        return config
    if isinstance(config, CacheConfig):
        return AccelPlan(name="cache", cache=config)
    name = str(config)
    if name.endswith(".json"):
        return AccelPlan.from_json(name)
    if "+" in name:
        prune, cache = name.split("+", 1)
    else:
        prune, cache = (None, name) if name in CACHE_PRESETS else (name, None)
    if prune is not None and prune not in PRESETS:
        raise PlanError(f"unknown config {name!r}: {prune!r} is neither a cache preset ({', '.join(CACHE_PRESETS)}) "
                        f"nor a pruning preset ({', '.join(PRESETS)})")
    plan = preset_for_model(prune, model) if prune is not None else AccelPlan(name="cache")
    if cache is not None:
        plan = dataclasses.replace(plan, cache=get_cache_preset(cache))
    return dataclasses.replace(plan, name=name)


def compare_configs(pipe, classes: Sequence[int], configs: Sequence[Config | tuple[str, Config]], seed: int = 0,
                    repeats: int = 1, warmup: int = 1, log: Callable[[str], None] | None = None) -> list[dict]:
    """Rows (baseline first): config, seconds, speedup, peak_mem_mb, cache_mem_mb, psnr, ssim, hit_rate,
    tokens_forwarded, kv_mem_mb (most K/V bytes the attention caches held at once, exact tensor sizes).

    The runs are :func:`fastvar.eval.run.run_plans` (each plan's one engine, caching plans calibrated
    first). ``seconds`` is the median over ``repeats`` of the transformer time (decoding excluded: its
    cost does not depend on the config); psnr/ssim compare decoded images with the baseline's (psnr None
    when identical); cache_mem_mb is the peak memory held by the feature cache plus the pruning cache.
    """
    model = pipe.model
    entries: list[tuple[str, AccelPlan | None]] = [("baseline", None)]
    for c in configs:
        name, c = c if isinstance(c, tuple) else (c if isinstance(c, str) else getattr(c, "name", "custom"), c)
        entries.append((str(name), resolve_config(c, model)))
    results = run_plans(pipe, list(classes), entries, repeats=max(1, repeats), warmup=warmup, seed=seed,
                        calibrate=True, decode=True, log=log)
    base = results[0]
    rows = []
    for r in results:
        psnr, ssim = psnr_ssim(r.images, base.images)
        cache = r.policy(CachePolicy)
        rows.append({
            "config": r.name,
            "seconds": r.median,
            "speedup": base.median / r.median,
            "peak_mem_mb": r.stats.get("peak_mem_mb"),
            "cache_mem_mb": (r.memory["cache_peak_bytes"] + r.memory["pruning_cache_peak_bytes"]) / 2**20,
            "psnr": None if psnr == float("inf") else psnr,
            "ssim": ssim,
            "hit_rate": cache.statistics()["hit_rate"] if cache is not None else 0.0,
            "tokens_forwarded": r.stats.get("tokens_forwarded"),
            "kv_mem_mb": None if r.stats.get("kv_peak_bytes") is None else r.stats["kv_peak_bytes"] / 2**20,
        })
    return rows


def format_compare(rows: list[dict]) -> str:
    lines = [f"{'config':<22}{'sec':>9}{'speedup':>9}{'peakMB':>9}{'cacheMB':>9}{'PSNR':>8}{'SSIM':>7}{'hits':>6}"
             f"{'kvMB':>9}"]
    for r in rows:
        psnr = "inf" if r["psnr"] is None else f"{r['psnr']:.2f}"
        peak = "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(f"{r['config']:<22}{r['seconds']:>9.3f}{r['speedup']:>9.2f}{peak:>9}{r['cache_mem_mb']:>9.2f}"
                     f"{psnr:>8}{r['ssim']:>7.3f}{r['hit_rate']:>6.2f}"
                     f"{'' if r.get('kv_mem_mb') is None else format(r['kv_mem_mb'], '9.2f'):>9}")
    return "\n".join(lines)


def plot_compare(rows: list[dict], path: str | Path) -> Path:
    """Speedup, PSNR and cache memory per config as one PNG, written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the comparison chart needs matplotlib: pip install 'fastvar-vision[plot]'") from None

    names = [r["config"] for r in rows]
    finite = [r["psnr"] for r in rows if r["psnr"] is not None]
    top = (max(finite) if finite else 40.0) + 5.0  # identical images (PSNR inf) drawn at the top, labelled
    psnr = [top if r["psnr"] is None else r["psnr"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(max(9.0, 1.2 * len(rows) * 3), 3.8))
    panels = [("speedup (x)", [r["speedup"] for r in rows]), ("PSNR vs baseline (dB)", psnr),
              ("cache memory (MB)", [r["cache_mem_mb"] for r in rows])]
    for ax, (title, vals) in zip(axes, panels):
        ax.bar(range(len(names)), vals, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    for i, r in enumerate(rows):
        if r["psnr"] is None:
            axes[1].text(i, top, "∞", ha="center", va="bottom")
    fig.tight_layout()
    from ..checkpoints import atomic_output

    path = Path(path)
    try:
        with atomic_output(path) as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path
