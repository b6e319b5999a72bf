"""GPU benchmark driver behind ``benchmarks/gpu.sh``: full-size architectures, random weights, bf16.

Configurations (in this order, each under the plans ``none``, ``fastvar`` and ``turbo``):
Infinity-2B at 1M (1024²) and 2K (2048², our zero-shot schedule), VAR-d30 at 256², HART-0.7B at 1024².
Every configuration goes through the one run primitive (:func:`fastvar.eval.run.run_plans`: hooks built
and caching calibrated first, warm-up, interleaved timed repeats, one CUDA synchronisation per
generation), so its numbers are what ``fastvar bench`` would report. Per plan the JSON holds the median
transformer seconds, the speedup over ``none``, the FLOP ratio, the peak allocated device memory
(``torch.cuda.max_memory_allocated``, reset per generation) and the KV bytes the caches held (the
recorder's exact tensor sizes; ``none``: what the official caches hold).

``--smoke``: the same code path at tiny widths and short schedules on any device (the test suite runs it
on CPU, so this script is never dead code); its JSON says ``"smoke": true`` and regen_readme ignores it.
A time budget (``--budget-s``, default 450 s: gpu.sh must finish in 8 minutes with model construction)
stops before a configuration that would start past it; skipped ones are listed in the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

PLANS = ("none", "fastvar", "turbo")

# name, family, model, pixel budget (Infinity) / None, smoke budget
CONFIGS: tuple[tuple[str, str, str, str | None, str | None], ...] = (
    ("infinity-2b-1M", "infinity", "infinity-2b", "1M", "0.06M"),
    ("infinity-2b-2K", "infinity", "infinity-2b", "2K", "0.25M"),
    ("var-d30-256", "var", "var-d30", None, None),
    ("hart-0.7b-1024", "hart", "hart-0.7b", None, None),
)

SMOKE_INFINITY = dict(depth=2, embed_dim=64, num_heads=2, text_channels=64, text_tokens=8)
SMOKE_VAR = dict(depth=2, embed_dim=64, num_heads=2)
SMOKE_VAR_VAE = dict(vocab_size=4096, z_channels=32, ch=32, share_quant_resi=4)
SMOKE_HART = dict(depth=2, embed_dim=64, num_heads=2, text_tokens=8, text_channels=64, diff_width=32, diff_depth=1,
                  patch_nums=(1, 2, 3, 4, 5, 6, 8))


def build(family: str, model: str, pn: str | None, device: str, dtype: str, smoke: bool):
    """A random-init pipeline (full size, or the smoke size) and the conditions of one image."""
    if family == "infinity":
        from fastvar.pipelines.infinity import InfinityPipeline

        pipe = InfinityPipeline.random_init(model, device=device, dtype=dtype, pn=pn,
                                            **(SMOKE_INFINITY if smoke else {}))
        return pipe, ["a gpu benchmark prompt"]
    if family == "var":
        from fastvar.pipelines.var import VARPipeline, var_spec

        if not smoke:
            return VARPipeline.random_init(model, device=device, dtype=dtype), [0]
        spec = var_spec(model)
        spec = dataclasses.replace(spec, config={**spec.config, **SMOKE_VAR})
        return VARPipeline.from_spec(spec, device, dtype, vae_config={**SMOKE_VAR_VAE,
                                                                      "patch_nums": spec.config["patch_nums"]}), [0]
    from fastvar.pipelines.hart import HARTPipeline

    return HARTPipeline.random_init(model, device=device, dtype=dtype, **(SMOKE_HART if smoke else {})), \
        ["a gpu benchmark prompt"]


def measure(family: str, model: str, pn: str | None, device: str, dtype: str, smoke: bool, repeats: int,
            warmup: int, log) -> dict[str, Any]:
    from fastvar.eval.run import run_plans

    t0 = time.perf_counter()
    pipe, conds = build(family, model, pn, device, dtype, smoke)
    built = time.perf_counter() - t0
    sched = pipe.model.schedule
    results = run_plans(pipe, conds, [(p, p) for p in PLANS], repeats=repeats, warmup=warmup, seed=0, decode=False,
                        log=log)
    base = results[0]
    rows = []
    for r in results:
        st = r.stats
        rows.append({
            "plan": r.name,
            "seconds_median": r.median,
            "seconds_all": list(r.seconds),
            "speedup": base.median / r.median,
            "flop_ratio": st["total_flops"] / base.stats["total_flops"],
            "peak_mem_mb": st.get("peak_mem_mb"),
            "kv_bytes": st.get("kv_bytes"),
            "kv_peak_bytes": st.get("kv_peak_bytes"),
            "executed_scales": st.get("executed_scales"),
        })
    out = {"model": model, "family": family, "pn": pn, "depth": pipe.model.depth,
           "schedule": sched.describe() if sched is not None else None, "build_seconds": built,
           "total_seconds": time.perf_counter() - t0, "rows": rows}
    del pipe, results
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write (atomically)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--smoke", action="store_true", help="tiny widths and short schedules (CPU test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--budget-s", dest="budget_s", type=float, default=450.0)
    ap.add_argument("--only", nargs="*", default=None, help="configuration names to run (default: all)")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_bench: error: --device cuda but no CUDA device is visible; run on a GPU machine or pass "
              "--smoke --device cpu", file=sys.stderr)
        return 2
    names = [c[0] for c in CONFIGS]
    if args.only:
        bad = [n for n in args.only if n not in names]
        if bad:
            print(f"gpu_bench: error: --only {bad}: unknown; choose from {names}", file=sys.stderr)
            return 2

    def log(msg: str) -> None:
        print(f"[gpu_bench] {msg}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    configs, skipped = [], []
    for name, family, model, pn, smoke_pn in CONFIGS:
        if args.only and name not in args.only:
            continue
        if time.perf_counter() - start > args.budget_s:
            skipped.append(name)
            log(f"{name}: skipped (time budget {args.budget_s:.0f} s spent)")
            continue
        log(f"{name}: building")
        res = measure(family, model, smoke_pn if args.smoke else pn, device, args.dtype, args.smoke, args.repeats,
                      args.warmup, log)
        res["name"] = name
        configs.append(res)
        log(f"{name}: " + ", ".join(f"{r['plan']} {r['seconds_median']:.3f}s ({r['speedup']:.2f}x)"
                                    for r in res["rows"]))
    meta = {
        "what": "full-size architectures, random init, batch 1 (CFG doubles it): none / fastvar / turbo",
        "smoke": args.smoke, "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "dtype": args.dtype, "torch": torch.__version__, "repeats": args.repeats, "warmup": args.warmup,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "bash benchmarks/gpu.sh " + args.out, "total_seconds": time.perf_counter() - start,
        "skipped": skipped, "configs": configs,
    }
    from fastvar.checkpoints import atomic_output

    with atomic_output(Path(args.out), "w") as f:
        f.write(json.dumps(meta, indent=2))
    log(f"wrote {args.out} in {meta['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
