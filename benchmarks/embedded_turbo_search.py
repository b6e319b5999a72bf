"""The search behind ``turbo`` on the embedded model: SSIM against the baseline on the tuning seeds 0/1 and a
speed estimate per candidate plan (machine load made interleaved timing of every candidate too noisy).

    OMP_NUM_THREADS=1 python benchmarks/embedded_turbo_search.py benchmarks/embedded_turbo_candidates.json

Estimate: the baseline's per-scale block seconds (``BASE_S``, one identity run at load ~16) times the plan's
FLOP share of each scale, plus the time outside the blocks (``OUTSIDE``). Caching candidates are calibrated on
the same seeds. Results are in ``benchmarks/embedded_turbo.json`` ("tuning").
"""
import dataclasses
import json
import sys

import torch

from fastvar.accel import AccelPlan, get_preset, plan_engine
from fastvar.accel.caching import CachePolicy
from fastvar.eval.benchmark import psnr_ssim
from fastvar.pipelines.var import VARPipeline

torch.set_num_threads(1)
pipe = VARPipeline.embedded("cpu")
model = pipe.model
CLASSES = list(range(10))
SEEDS = [0, 1]
BASE_S = {0: 0.171, 1: 0.26, 2: 0.368, 3: 0.52, 4: 0.771, 5: 1.182, 6: 1.994, 7: 3.509, 8: 5.69, 9: 10.621}
OUTSIDE = 3.2
BASE_TOTAL = OUTSIDE + sum(BASE_S.values())  # the baseline run these were measured in: 28.3 s

def engine_for(plan):
    sim = None
    if plan.cache is not None and plan.cache.skip_stages:
        cal = plan_engine(dataclasses.replace(plan, cache=dataclasses.replace(plan.cache, calibration=True)), model.depth)
        for s in SEEDS:
            pipe(CLASSES, seed=s, plan=cal, decode=False)
        sim = cal.policy(CachePolicy).similarity
    return plan_engine(plan, model.depth, similarity=sim)

base = {s: pipe(CLASSES, seed=s, plan=None, decode=False) for s in SEEDS}
bimg = {s: pipe.decode(r.latent) for s, r in base.items()}
bflops = {int(k): v for k, v in base[0].stats["scale_flops"].items()}
cands = json.loads(open(sys.argv[1]).read())
for name, d in cands.items():
    plan = AccelPlan.from_dict(d) if isinstance(d, dict) else get_preset(d, "var", depth=model.depth, schedule=model.schedule)
    h = engine_for(plan)
    ss, st = [], None
    for s in SEEDS:
        r = pipe(CLASSES, seed=s, plan=h, decode=False)
        ss.append(psnr_ssim(pipe.decode(r.latent), bimg[s])[1])
        st = st or r.stats
    pf = {int(k): v for k, v in st["scale_flops"].items()}
    est = OUTSIDE + sum(BASE_S[i] * pf.get(i, 0.0) / bflops[i] for i in BASE_S)
    hit = h.policy(CachePolicy).statistics()["hit_rate"] if h.policy(CachePolicy) else 0
    ratio = st["total_flops"] / base[0].stats["total_flops"]
    print(f"{name:<34} ssim {sum(ss)/len(ss):.3f}  est {BASE_TOTAL / est:.2f}x  flops {ratio:.3f} hit {hit:.2f}", flush=True)
