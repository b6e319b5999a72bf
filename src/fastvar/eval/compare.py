"""Side-by-side comparison of caching and pruning configurations against the baseline.

Each configuration runs on the same classes and seed as the baseline, repeats interleaved (baseline,
A, B, baseline, …) so machine noise spreads evenly. Cache configurations in inference mode without
similarity data are calibrated first on the same classes and seed (calibration output equals the
baseline, so this costs one extra generation and no fidelity), which makes the comparison
self-contained; pass configurations with ``sim_path`` to use held-out calibration instead.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ..accel import AccelPlan, CacheConfig, PlanError
from ..accel.caching import CachingHooks, SimilarityData
from ..accel.hooks import IDENTITY, Hooks
from .benchmark import psnr_ssim

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


def _needs_calibration(plan: AccelPlan) -> bool:
    c = plan.cache
    return c is not None and not c.calibration and c.sim_path is None and bool(c.skip_stages)


def _hooks_for(plan: AccelPlan | None, model, similarity: SimilarityData | None) -> Hooks:
    if plan is None:
        return IDENTITY
    if plan.cache is None:  # empty caching config: same computation as PlanHooks, but measures its cache
        plan = dataclasses.replace(plan, cache=CacheConfig())
    return CachingHooks(plan, model.depth, similarity=similarity)


def compare_configs(pipe, classes: Sequence[int], configs: Sequence[Config | tuple[str, Config]], seed: int = 0,
                    repeats: int = 1, warmup: int = 1, log: Callable[[str], None] | None = None) -> list[dict]:
    """Rows (baseline first): config, seconds, speedup, peak_mem_mb, cache_mem_mb, psnr, ssim, hit_rate.

    ``seconds`` is the median over ``repeats`` of the transformer time (decoding excluded: its cost does
    not depend on the config); psnr/ssim compare decoded images with the baseline's (psnr None when
    identical); cache_mem_mb is the peak memory held by the feature cache plus the pruning cache.
    """
    model = pipe.model
    entries: list[tuple[str, AccelPlan | None]] = [("baseline", None)]
    for c in configs:
        name, c = c if isinstance(c, tuple) else (c if isinstance(c, str) else getattr(c, "name", "custom"), c)
        entries.append((str(name), resolve_config(c, model)))
    hooks: list[Hooks] = []
    for name, plan in entries:
        sim = None
        if plan is not None and _needs_calibration(plan):
            cal = CachingHooks(dataclasses.replace(plan, cache=dataclasses.replace(plan.cache, calibration=True)),
                               model.depth)
            _run(pipe, cal, classes, seed)
            sim = cal.similarity
            if log:
                log(f"calibrated {name}: {len(sim)} (layer, stage, branch) similarities")
        hooks.append(_hooks_for(plan, model, sim))
    for _ in range(warmup):
        for h in hooks:
            _run(pipe, h, classes, seed)
    secs: list[list[float]] = [[] for _ in entries]
    results = [None] * len(entries)
    for rep in range(max(1, repeats)):
        for i, h in enumerate(hooks):
            res = _run(pipe, h, classes, seed)
            secs[i].append(res.seconds)
            if results[i] is None:
                results[i] = (res, dict(h.statistics()["memory"]) if isinstance(h, CachingHooks) else {})
            if log:
                log(f"repeat {rep + 1}/{repeats} {entries[i][0]}: {res.seconds:.3f}s")
    base_imgs = pipe.decode(results[0][0].latent)
    base_t = statistics.median(secs[0])
    rows = []
    for i, (name, _plan) in enumerate(entries):
        res, mem = results[i]
        imgs = base_imgs if i == 0 else pipe.decode(res.latent)
        psnr, ssim = psnr_ssim(imgs, base_imgs)
        t = statistics.median(secs[i])
        h = hooks[i]
        rows.append({
            "config": name,
            "seconds": t,
            "speedup": base_t / t,
            "peak_mem_mb": res.stats.get("peak_mem_mb"),
            "cache_mem_mb": (mem.get("cache_peak_bytes", 0) + mem.get("pruning_cache_peak_bytes", 0)) / 2**20,
            "psnr": None if psnr == float("inf") else psnr,
            "ssim": ssim,
            "hit_rate": h.statistics()["hit_rate"] if isinstance(h, CachingHooks) else 0.0,
            "tokens_forwarded": res.stats.get("tokens_forwarded"),
        })
    return rows


def _run(pipe, hooks: Hooks, classes, seed):
    """One generation with ``hooks`` installed (the pipeline's plan=None path uses the model's hooks)."""
    model = pipe.model
    prev = model.hooks
    model.hooks = hooks
    try:
        return pipe(list(classes), seed=seed, plan=None, decode=False)
    finally:
        model.hooks = prev


def format_compare(rows: list[dict]) -> str:
    lines = [f"{'config':<22}{'sec':>9}{'speedup':>9}{'peakMB':>9}{'cacheMB':>9}{'PSNR':>8}{'SSIM':>7}{'hits':>6}"]
    for r in rows:
        psnr = "inf" if r["psnr"] is None else f"{r['psnr']:.2f}"
        peak = "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(f"{r['config']:<22}{r['seconds']:>9.3f}{r['speedup']:>9.2f}{peak:>9}{r['cache_mem_mb']:>9.2f}"
                     f"{psnr:>8}{r['ssim']:>7.3f}{r['hit_rate']:>6.2f}")
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
