"""``fastvar eval report``: runs side by side — every metric, its change against the baseline, the speedup.

A run is a generation folder (``fastvar eval generate --out DIR``): its ``manifest.json`` says what made
it, ``logs/rank-*.jsonl`` how long each image took, and ``scores/<metric>.json`` (written by each
``fastvar eval <metric>``) what it scored. Reading them from the folder, rather than from the command
line, keeps the table honest: a number appears next to the run whose images produced it.

Speed is the median transformer time per image (decoding excluded, as in ``fastvar bench``): each image is
generated alone with its own seed, so the per-image times of two runs compare the same work.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from ..errors import MissingInputError, UsageError
from .generate import MANIFEST, read_timings

SCORES = "scores"
# (score file, key in it, column name, higher is better)
METRICS: tuple[tuple[str, str, str, bool], ...] = (
    ("geneval", "overall", "GenEval", True),
    ("fid", "fid", "FID", False),
    ("fid", "category_mean", "FID (cat. mean)", False),
    ("clipscore", "clipscore", "CLIP", True),
    ("hps", "hps", "HPSv2.1", True),
    ("imagereward", "imagereward", "ImageReward", True),
    ("fidelity", "psnr", "PSNR", True),
    ("fidelity", "ssim", "SSIM", True),
    ("fidelity", "lpips", "LPIPS", False),
)


def scores_path(images_dir: Path, metric: str) -> Path:
    return Path(images_dir) / SCORES / f"{metric}.json"


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def load_run(name: str, folders: str | Path | list[str | Path]) -> dict[str, Any]:
    """One run's manifest, timing and scores (metrics it was not scored on are absent).

    ``folders``: one generation folder, or several of the same model and plan (e.g. its GenEval and its MJHQ
    generations, given as ``DIR1,DIR2``): their scores are merged (the first folder holding a metric wins)
    and their per-image times pooled, so one row carries GenEval, FID and CLIP score like the papers' tables.
    """
    if isinstance(folders, (str, Path)):
        folders = [f for f in str(folders).split(",") if f]
    paths = [Path(f).expanduser() for f in folders]
    for folder in paths:
        if not folder.is_dir():
            raise MissingInputError(f"--runs {name}={folder}: no such folder; pass a `fastvar eval generate` output folder")
    manifest: dict[str, Any] = {}
    times: list[float] = []
    values: dict[str, float | None] = {}
    for folder in paths:
        if (folder / MANIFEST).is_file():
            m = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            if manifest and (m.get("model"), m.get("plan")) != (manifest.get("model"), manifest.get("plan")):
                raise UsageError(f"--runs {name}: {folder} was made by another model or plan than {paths[0]}; "
                                 "one run's folders must share both")
            manifest = manifest or m
        times += [float(r["seconds"]) for r in read_timings(folder) if "seconds" in r]
        for file, key, col, _ in METRICS:
            p = scores_path(folder, file)
            if col not in values and p.is_file():
                data = json.loads(p.read_text(encoding="utf-8"))
                if key in data:
                    values[col] = _finite(data[key])
    plan = manifest.get("plan")
    plan_name = plan.get("name", "custom") if isinstance(plan, dict) else (plan or "none")
    return {"name": name, "folder": ",".join(map(str, paths)), "model": manifest.get("model"), "plan": plan_name,
            "images": len(times), "sec_per_image": statistics.median(times) if times else None, "metrics": values}


def build_report(runs: list[dict[str, Any]], baseline: str) -> dict[str, Any]:
    """Rows with each metric's value and delta against ``baseline``, and the speedup over it."""
    names = [r["name"] for r in runs]
    if baseline not in names:
        raise UsageError(f"--baseline {baseline}: not among the runs ({', '.join(names)}); name one of them")
    base = runs[names.index(baseline)]
    columns = [col for _, _, col, _ in METRICS if any(col in r["metrics"] for r in runs)]
    better = {col: hi for _, _, col, hi in METRICS}
    rows = []
    for r in runs:
        speed = None
        if r["sec_per_image"] and base["sec_per_image"]:
            speed = base["sec_per_image"] / r["sec_per_image"]
        row = {k: r[k] for k in ("name", "model", "plan", "images", "sec_per_image", "folder")}
        row["speedup"] = speed
        row["metrics"] = {}
        for col in columns:
            v, b = r["metrics"].get(col), base["metrics"].get(col)
            delta = None if v is None or b is None else v - b
            row["metrics"][col] = {"value": v, "delta": delta}
        rows.append(row)
    return {"baseline": baseline, "columns": columns, "higher_is_better": {c: better[c] for c in columns}, "rows": rows}


def _fmt(v: float | None, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}g}" if abs(v) >= 1000 else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"


def to_markdown(report: dict[str, Any]) -> str:
    """One markdown table: run, plan, images, s/image, speedup, then per metric ``value (Δ)``."""
    cols = report["columns"]
    arrows = {c: "↑" if report["higher_is_better"][c] else "↓" for c in cols}
    head = ["run", "plan", "images", "s/image", "speedup"] + [f"{c} {arrows[c]}" for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        cells = [r["name"], str(r["plan"]), str(r["images"]), _fmt(r["sec_per_image"], 3),
                 "–" if r["speedup"] is None else f"{r['speedup']:.2f}x"]
        for c in cols:
            m = r["metrics"][c]
            if m["value"] is None:
                cells.append("–")
            elif r["name"] == report["baseline"] or m["delta"] is None:
                cells.append(_fmt(m["value"]))
            else:
                cells.append(f"{_fmt(m['value'])} ({m['delta']:+.4f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Quality vs speedup: one panel per metric, one labelled point per run; PNG written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the quality-vs-speedup plot needs matplotlib: pip install 'fastvar-vision[plot]'") from None
    from ..checkpoints import atomic_output

    cols = [c for c in report["columns"] if any(r["metrics"][c]["value"] is not None and r["speedup"] for r in report["rows"])]
    if not cols:
        raise UsageError("nothing to plot: no run has both a speedup (generation logs) and a metric (scores/*.json)")
    fig, axes = plt.subplots(1, len(cols), figsize=(4.0 * len(cols), 3.6), squeeze=False)
    for ax, c in zip(axes[0], cols):
        for r in report["rows"]:
            v = r["metrics"][c]["value"]
            if v is None or not r["speedup"]:
                continue
            ax.scatter([r["speedup"]], [v], color="tab:red" if r["name"] == report["baseline"] else "tab:blue")
            ax.annotate(r["name"], (r["speedup"], v), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("speedup (x)")
        ax.set_ylabel(f"{c} ({'higher' if report['higher_is_better'][c] else 'lower'} is better)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_output(path) as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


__all__ = ["METRICS", "build_report", "load_run", "plot_report", "scores_path", "to_markdown"]
