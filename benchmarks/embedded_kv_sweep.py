"""KV budgets on the embedded model: held KV bytes and SSIM against the no-plan images, per config.

The sweep behind benchmarks/embedded_kv.json (``sweep_seeds_0_1``), on the tuning seeds::

    OMP_NUM_THREADS=1 python benchmarks/embedded_kv_sweep.py configs.json --seeds 0 1

``configs.json`` maps a name to a plan ``kv`` field (see ``fastvar.accel.plan.KVConfig``). With
``--shares`` it prints instead every block's share of attention on earlier scales per scale (the
measurement behind kv-compress's drafter choice) and the drafters ``calibrate_drafters`` picks.
All 10 classes per seed, the pipeline's default sampling, one generation per (config, seed).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="?", help="JSON file: name -> kv field")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--shares", action="store_true", help="print attention shares on earlier scales and exit")
    ap.add_argument("--drafters", type=int, default=1, help="with --shares: drafters per scale to pick")
    args = ap.parse_args(argv)
    if not args.shares and not args.configs:
        ap.error("give a configs JSON file or --shares")
    torch.set_num_threads(1)
    from fastvar.accel import AccelPlan
    from fastvar.accel.kv import calibrate_drafters, history_shares
    from fastvar.eval.benchmark import psnr_ssim
    from fastvar.pipelines.var import VARPipeline

    pipe = VARPipeline.embedded(device="cpu")
    conds = list(range(10))
    if args.shares:
        seed = args.seeds[0]
        sh = history_shares(lambda e: pipe(conds, seed=seed, plan=e, decode=False))
        depth = pipe.model.depth
        for si in sorted({s for s, _ in sh}):
            print(f"#{si}", " ".join(f"{sh.get((si, layer), float('nan')):.3f}" for layer in range(depth)))
        print(calibrate_drafters(lambda e: pipe(conds, seed=seed, plan=e, decode=False), args.drafters))
        return 0
    with open(args.configs) as f:
        configs = json.load(f)
    base = {s: pipe(conds, seed=s) for s in args.seeds}
    rows = []
    for name, kv in configs.items():
        plan = AccelPlan(name=name, kv=kv)
        row = {"config": name, "kv": kv}
        for s in args.seeds:
            r = pipe(conds, seed=s, plan=plan)
            row[f"ssim_seed{s}"] = round(psnr_ssim(r.images, base[s].images)[1], 4)
            row["kv_reduction"] = round(base[s].stats["kv_peak_bytes"] / r.stats["kv_peak_bytes"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
