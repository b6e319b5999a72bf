"""``fastvar`` command line: parse, build a pipeline and a plan, call the library, report.

Every check that can fail without the model (unknown names, bad ranges, bad plan files) runs before
any weights are read, and nothing is written to the output folder unless the whole job succeeded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from . import __version__


class CLIError(Exception):
    """A user error: printed as one clear message, exit status 2."""


# ---------------------------------------------------------------------------------------------- helpers
def _add_model_args(p: argparse.ArgumentParser, default_model: str | None) -> None:
    p.add_argument("--model", default=default_model, help="model name (see `fastvar models`)")
    p.add_argument("--weights", "--model-path", "--model_path", dest="weights", default=None,
                   help="transformer checkpoint: local file/folder or hub id owner/repo[:file]")
    p.add_argument("--vae-weights", "--tokenizer-path", "--tokenizer_path", dest="vae_weights", default=None,
                   help="tokenizer (VAE) checkpoint: local file/folder or hub id")
    p.add_argument("--random-init", action="store_true", help="full-size architecture with random weights (speed only)")
    p.add_argument("--resolution", type=int, default=None, help="VAR: use the 256 or 512 schedule")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="acceleration preset (see `fastvar plan --list`)")
    p.add_argument("--plan", default=None, help="acceleration plan JSON file")


def _load_plan(args):
    from .accel import AccelPlan, PlanError
    from .accel.presets import PRESETS

    if args.preset and args.plan:
        raise CLIError("give either --preset or --plan, not both")
    if args.plan:
        if not Path(args.plan).is_file():
            raise CLIError(f"plan file {args.plan} does not exist")
        try:
            return AccelPlan.from_json(args.plan)
        except (PlanError, TypeError) as e:
            raise CLIError(f"invalid plan {args.plan}: {e}") from None
    if args.preset:
        if args.preset not in PRESETS:
            raise CLIError(f"unknown preset {args.preset!r}; known presets: {', '.join(sorted(PRESETS))}")
        return args.preset
    return None


def _cache_config(args):
    """A CacheConfig from the caching flags (None when caching is not asked for); validated here, before
    any model is loaded."""
    from dataclasses import replace

    from .accel import PlanError
    from .accel.cache_presets import CACHE_PRESETS, get_cache_preset

    preset = args.cache_preset or ("original" if args.use_cache or args.calibration else None)
    custom = any(v is not None for v in (args.cache_skip_stages, args.cache_cache_stages, args.cache_threshold))
    if preset is None and not custom:
        if args.sim_path:
            raise CLIError("--sim-path is only used with caching; add --cache-preset or --use-cache")
        return None
    if preset is not None and preset not in CACHE_PRESETS:
        raise CLIError(f"unknown cache preset {preset!r}; known: {', '.join(sorted(CACHE_PRESETS))}")
    try:
        cfg = get_cache_preset(preset or "original")
        over = {}
        if args.cache_skip_stages is not None:
            over["skip_stages"] = tuple(args.cache_skip_stages)
        if args.cache_cache_stages is not None:
            over["cache_stages"] = tuple(args.cache_cache_stages)
        thr = args.cache_threshold if args.cache_threshold is not None else args.threshold
        if thr is not None:
            if not 0.0 <= thr <= 1.0:
                raise CLIError(f"cache threshold {thr} is outside [0, 1] (1.0 reuses nothing)")
            over["threshold"] = thr
        for flag, field in (("cache_attn", "enable_attn_cache"), ("cache_mlp", "enable_mlp_cache"),
                            ("cache_adaptive_threshold", "adaptive_threshold"),
                            ("cache_interpolation_mode", "interpolation_mode")):
            if getattr(args, flag) is not None:
                over[field] = getattr(args, flag)
        over["calibration"] = bool(args.calibration)
        if args.sim_path:
            over["sim_path"] = args.sim_path
        cfg = replace(cfg, **over)
        cfg.validate()
    except PlanError as e:
        raise CLIError(str(e)) from None
    if not cfg.calibration and cfg.sim_path and not Path(cfg.sim_path).is_file():
        raise CLIError(f"--sim-path {cfg.sim_path} does not exist; run once with --calibration --sim-path to record it")
    return cfg


def _spec_for(args):
    from .models.registry import MODELS, get_spec
    from .schedules import VAR_PATCH_NUMS

    try:
        spec = get_spec(args.model)
    except KeyError:
        raise CLIError(f"unknown model {args.model!r}; known models: {', '.join(sorted(MODELS))}") from None
    if args.resolution is not None and spec.family == "var":
        if args.resolution not in VAR_PATCH_NUMS:
            raise CLIError(f"VAR resolution must be one of {sorted(VAR_PATCH_NUMS)}, got {args.resolution}")
        from dataclasses import replace

        spec = replace(spec, config={**spec.config, "patch_nums": VAR_PATCH_NUMS[args.resolution]},
                       resolution=args.resolution)
    return spec


def _build_pipeline(args, spec):
    from .pipelines import load_pipeline

    return load_pipeline(spec, weights=args.weights, vae_weights=args.vae_weights, random_init=args.random_init,
                         device=args.device, dtype=args.dtype)


# ---------------------------------------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    from .accel import PlanError
    from .pipelines.common import save_images

    spec = _spec_for(args)
    plan = _load_plan(args)
    cache = _cache_config(args)
    if cache is not None:
        from dataclasses import replace

        from .accel import AccelPlan, preset_for_model

        if isinstance(plan, str):
            class _M:  # presets only need the family, schedule and depth; resolved again at generation time
                family = spec.family
                depth = spec.config.get("depth", 16)
                schedule = None

            plan = preset_for_model(plan, _M) if plan != "none" else AccelPlan(name="none")
        plan = replace(plan or AccelPlan(name="cache"), cache=cache)
        if cache.calibration and not cache.sim_path:
            raise CLIError("--calibration needs --sim-path FILE to store the similarity data")
        if "patch_nums" in spec.config:  # stage refs are checked against the schedule before loading weights
            from .accel import PlanError
            from .schedules import Schedule

            try:
                cache.resolve_stages(Schedule.square(spec.config["patch_nums"]))
            except PlanError as e:
                raise CLIError(str(e)) from None
    if spec.family == "var":
        classes = list(args.classes) if args.classes else list(range(min(spec.config["num_classes"], 10)))
        n_cls = spec.config["num_classes"]
        bad = [c for c in classes if not 0 <= c < n_cls]
        if bad:
            raise CLIError(f"class id(s) {bad} out of range for {spec.name}: valid ids are 0..{n_cls - 1}")
        if args.num_samples:
            classes = [classes[i % len(classes)] for i in range(args.num_samples)]
    else:
        raise CLIError(f"`generate` for the {spec.family} family is not available yet")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError("--batch-size must be >= 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")

    if args.compare_configs is not None:
        return _compare_configs(args, spec, classes)
    pipe = _build_pipeline(args, spec)
    bs = args.batch_size or len(classes)
    chunks = [classes[i:i + bs] for i in range(0, len(classes), bs)]
    import torch

    def run(p):
        imgs, secs, stats = [], 0.0, []
        for ci, chunk in enumerate(tqdm(chunks, desc=f"generate ({p if isinstance(p, str) else getattr(p, 'name', 'none')})",
                                        disable=args.quiet or len(chunks) == 1 and args.quiet)):
            res = pipe(chunk, seed=None if args.seed is None else args.seed + ci, plan=p, cfg=args.cfg,
                       top_k=args.top_k, top_p=args.top_p)
            imgs.append(res.images)
            secs += res.seconds
            stats.append(res.stats)
        return torch.cat(imgs), secs, stats

    try:
        if args.compare and plan is not None:
            base_imgs, base_s, _ = run(None)
            imgs, secs, stats = run(plan)
        else:
            imgs, secs, stats = run(plan)
    except PlanError as e:
        raise CLIError(str(e)) from None

    names = [f"{i:04d}_class{c}.png" for i, c in enumerate(classes)]
    report = {"model": spec.name, "plan": stats[0].get("plan"), "seconds": secs, "images": len(classes)}
    if args.compare and plan is not None:
        from .eval.benchmark import psnr_ssim

        psnr, ssim = psnr_ssim(imgs, base_imgs)
        report.update(baseline_seconds=base_s, speedup=base_s / secs, psnr_vs_baseline=psnr, ssim_vs_baseline=ssim)
        save_images(base_imgs, out / "baseline", names)
        save_images(imgs, out / str(report["plan"]), names)
        print(f"baseline {base_s:.2f}s | {report['plan']} {secs:.2f}s | speedup {base_s / secs:.2f}x | "
              f"PSNR {psnr:.2f} dB | SSIM {ssim:.4f}")
    elif args.save_images:
        save_images(imgs, out, names)
    if args.stats:
        from .accel.stats import format_table

        print(format_table(stats[0]))
    from .pipelines.common import atomic_write_text

    atomic_write_text(json.dumps(report, indent=2, default=str), out / "report.json")
    print(f"wrote {len(classes)} image(s) and a grid to {out}/ in {secs:.2f}s")
    return 0


def _compare_configs(args, spec, classes) -> int:
    from .accel.cache_presets import CACHE_PRESETS
    from .eval.compare import compare_configs, format_compare, plot_compare
    from .pipelines.common import atomic_write_text

    configs = args.compare_configs or sorted(CACHE_PRESETS)
    pipe = _build_pipeline(args, spec)
    rows = compare_configs(pipe, classes, configs, seed=args.seed, repeats=1, warmup=1,
                           log=None if args.quiet else (lambda m: print(m, file=sys.stderr)))
    print(format_compare(rows))
    out = Path(args.out)
    plot_compare(rows, out / "compare.png")
    if args.json:
        atomic_write_text(json.dumps(rows, indent=2, default=str), Path(args.json))
    print(f"wrote {out / 'compare.png'}")
    return 0


def cmd_bench(args) -> int:
    from .eval.benchmark import format_results, run_benchmark

    spec = _spec_for(args)
    plans = [("none", None)]
    for name in args.plans:
        if name == "none":
            continue
        if name.endswith(".json"):
            from .accel import AccelPlan

            p = AccelPlan.from_json(name)
            plans.append((p.name, p))
        else:
            from .accel.presets import PRESETS

            if name not in PRESETS:
                raise CLIError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
            plans.append((name, name))
    if spec.family == "var":
        n = spec.config["num_classes"]
        classes = [int(c) % n for c in (args.classes or list(range(args.batch)))]
        pipe = _build_pipeline(args, spec)

        def gen(plan):
            return pipe(classes, seed=args.seed, plan=plan, decode=False)
    elif spec.family == "infinity":
        if not args.random_init:
            raise CLIError("Infinity benchmarks run on random weights for now: add --random-init")
        from .pipelines.infinity import InfinityPipeline

        over = {k: v for k, v in (("depth", args.depth), ("embed_dim", args.width), ("num_heads", args.heads),
                                  ("text_channels", args.text_width)) if v is not None}
        if "depth" in over:
            over["block_chunks"] = 1
        try:
            pipe = InfinityPipeline.random_init(spec.name if spec.name != "infinity" else "infinity-2b",
                                                device=args.device, dtype=args.dtype, aspect=args.aspect, pn=args.pn,
                                                text_tokens=args.text_tokens, **over)
        except (ValueError, KeyError) as e:
            raise CLIError(str(e)) from None

        def gen(plan):
            return pipe(args.batch, seed=args.seed, plan=plan, decode=False)
    else:
        raise CLIError(f"`bench` for the {spec.family} family is not available yet")

    rows = run_benchmark(gen, pipe.decode, plans, repeats=args.repeats, warmup=args.warmup,
                         log=None if args.quiet else (lambda s: print(s, file=sys.stderr)))
    print(format_results(rows))
    if args.json:
        from .pipelines.common import atomic_write_text

        meta = {"model": spec.name, "resolution": spec.resolution, "random_init": args.random_init,
                "device": str(pipe.device), "dtype": args.dtype, "batch": args.batch if spec.family != "var" else len(classes),
                "repeats": args.repeats}
        atomic_write_text(json.dumps([{**r, **meta} for r in rows], indent=2), Path(args.json))
    return 0


def cmd_plan(args) -> int:
    from .accel.presets import PRESETS, get_preset

    if args.list:
        for name, fn in PRESETS.items():
            print(f"{name:<16}{fn(args.family, args.last_side, args.depth).description}")
        return 0
    print(get_preset(args.name, args.family, args.last_side, args.depth).to_json())
    return 0


def cmd_check_embedded(args) -> int:
    from .pipelines.common import atomic_write_text
    from .train.check import check_embedded

    if args.samples <= 0:
        raise CLIError("--samples must be positive")
    res = check_embedded(samples=args.samples, seed=args.seed, device=args.device or "cpu")
    print(f"accuracy {res['accuracy']:.3f} (gate 0.90) | recon PSNR {res['recon_psnr']:.2f} dB (gate 24) | "
          f"{'PASSED' if res['passed'] else 'FAILED'}")
    if args.json:
        atomic_write_text(json.dumps(res, indent=2, default=str), Path(args.json))
    return 0


def cmd_models(args) -> int:
    from .models.registry import MODELS

    for name, spec in sorted(MODELS.items()):
        print(f"{name:<14}{spec.family:<10}{spec.resolution}px  weights: {spec.weights or 'embedded'}")
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastvar", description="VAR-family image generation with training-free acceleration")
    p.add_argument("--version", action="version", version=f"fastvar {__version__}")
    sub = p.add_subparsers(dest="command", metavar="command")

    g = sub.add_parser("generate", help="generate images (class ids for VAR)")
    _add_model_args(g, default_model="embedded")
    _add_plan_args(g)
    g.add_argument("--classes", type=int, nargs="+", default=None)
    g.add_argument("--num-samples", "--num_samples", dest="num_samples", type=int, default=None)
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cfg", type=float, default=None)
    g.add_argument("--top-k", dest="top_k", type=int, default=None)
    g.add_argument("--top-p", dest="top_p", type=float, default=None)
    g.add_argument("--compare", action="store_true", help="also run without the plan; print speedup and fidelity")
    g.add_argument("--save-images", "--save_images", dest="save_images", action="store_true", default=True)
    g.add_argument("--no-save-images", dest="save_images", action="store_false")
    g.add_argument("--stats", action="store_true", help="print tokens/FLOPs/time per scale")
    g.add_argument("--out", default="outputs")
    g.add_argument("--quiet", action="store_true")
    g.add_argument("--json", default=None, help="with --compare-configs: write the table as JSON")
    c = g.add_argument_group("feature caching")
    c.add_argument("--cache-preset", "--cache_preset", dest="cache_preset", default=None)
    c.add_argument("--cache-skip-stages", "--cache_skip_stages", dest="cache_skip_stages", nargs="+", default=None,
                   help="stages (token counts, e.g. 169 256, or #index) that may reuse cached outputs")
    c.add_argument("--cache-cache-stages", "--cache_cache_stages", dest="cache_cache_stages", nargs="+", default=None)
    c.add_argument("--cache-enable-attn", dest="cache_attn", action="store_true", default=None)
    c.add_argument("--cache-disable-attn", dest="cache_attn", action="store_false")
    c.add_argument("--cache-enable-mlp", dest="cache_mlp", action="store_true", default=None)
    c.add_argument("--cache-disable-mlp", dest="cache_mlp", action="store_false")
    c.add_argument("--cache-threshold", "--cache_threshold", dest="cache_threshold", type=float, default=None)
    c.add_argument("--cache-adaptive-threshold", "--cache_adaptive_threshold", dest="cache_adaptive_threshold",
                   action="store_true", default=None)
    c.add_argument("--cache-interpolation-mode", "--cache_interpolation_mode", dest="cache_interpolation_mode",
                   choices=["bilinear", "nearest", "bicubic", "area"], default=None)
    c.add_argument("--use-cache", "--use_cache", dest="use_cache", action="store_true", help="legacy: the original preset")
    c.add_argument("--calibration", action="store_true", help="record similarities (needs --sim-path)")
    c.add_argument("--sim-path", "--sim_path", dest="sim_path", default=None)
    c.add_argument("--threshold", type=float, default=None, help="legacy alias of --cache-threshold")
    c.add_argument("--compare-configs", "--compare_configs", dest="compare_configs", nargs="*", default=None,
                   help="baseline and every cache preset (or the given configs) side by side; table, PNG, --json")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="baseline vs plans: speed, tokens, FLOPs, memory, fidelity (JSON)")
    _add_model_args(b, default_model="var-d16")
    b.add_argument("--plans", nargs="+", default=["fastvar"], help="preset names or plan JSON files")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--batch", type=int, default=1, help="images per generation (CFG doubles it)")
    b.add_argument("--classes", type=int, nargs="+", default=None)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", default=None, help="write results as a JSON list (baseline first)")
    t = b.add_argument_group("text-to-image architecture overrides (random init)")
    t.add_argument("--depth", type=int, default=None)
    t.add_argument("--width", type=int, default=None)
    t.add_argument("--heads", type=int, default=None)
    t.add_argument("--text-width", dest="text_width", type=int, default=None)
    t.add_argument("--text-tokens", dest="text_tokens", type=int, default=24)
    t.add_argument("--pn", default="1M", help="Infinity pixel budget: 0.06M 0.25M 0.60M 1M 2K")
    t.add_argument("--aspect", default="1:1", help="Infinity aspect ratio W:H")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

    pl = sub.add_parser("plan", help="print a preset as JSON (a starting point for --plan files)")
    pl.add_argument("name", nargs="?", default="fastvar")
    pl.add_argument("--family", default="var", choices=["var", "infinity", "hart"])
    pl.add_argument("--last-side", dest="last_side", type=int, default=16)
    pl.add_argument("--depth", type=int, default=16)
    pl.add_argument("--list", action="store_true")
    pl.set_defaults(func=cmd_plan)

    ce = sub.add_parser("check-embedded", help="quality gates of the embedded model (checker accuracy, recon PSNR)")
    ce.add_argument("--samples", type=int, default=100)
    ce.add_argument("--seed", type=int, default=0)
    ce.add_argument("--device", default=None)
    ce.add_argument("--json", default=None)
    ce.set_defaults(func=cmd_check_embedded)

    m = sub.add_parser("models", help="list known model names")
    m.set_defaults(func=cmd_models)

    try:
        from .train.cli import add_train_subparsers
    except ImportError:
        add_train_subparsers = None
    if add_train_subparsers is not None:
        add_train_subparsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"fastvar: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ConnectionError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"fastvar: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
