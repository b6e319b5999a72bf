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

from . import __version__, validate
from .errors import MissingInputError, UsageError
from .validate import cli_float, cli_int

CLIError = UsageError
"""A user error: printed by :func:`main` as one line, exit status 2 (the library's :class:`UsageError`)."""


# ---------------------------------------------------------------------------------------------- helpers
def _add_model_args(p: argparse.ArgumentParser, default_model: str | None) -> None:
    p.add_argument("--model", default=default_model, help="model name (see `fastvar models`)")
    p.add_argument("--weights", "--model-path", "--model_path", dest="weights", default=None,
                   help="transformer checkpoint: local file/folder or hub id owner/repo[:file]")
    p.add_argument("--vae-weights", "--tokenizer-path", "--tokenizer_path", dest="vae_weights", default=None,
                   help="tokenizer (VAE) checkpoint: local file/folder or hub id")
    p.add_argument("--random-init", action="store_true", help="full-size architecture with random weights (speed only)")
    p.add_argument("--resolution", type=cli_int, default=None, help="VAR: use the 256 or 512 schedule")
    p.add_argument("--text-encoder", "--text_encoder", dest="text_encoder", default=None,
                   help="text models: text encoder folder or hub id (Infinity: Flan-T5, HART: Qwen2)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    t = p.add_argument_group("text-to-image schedule and architecture overrides (overrides: --random-init only)")
    t.add_argument("--pn", default=None, help="Infinity pixel budget: 0.06M 0.25M 0.60M 1M 2K (default 1M)")
    t.add_argument("--aspect", default=None, help="Infinity aspect ratio W:H, e.g. 1:1, 16:9 (default 1:1)")
    t.add_argument("--depth", type=cli_int, default=None)
    t.add_argument("--width", type=cli_int, default=None)
    t.add_argument("--heads", type=cli_int, default=None)
    t.add_argument("--text-width", dest="text_width", type=cli_int, default=None)
    t.add_argument("--text-tokens", dest="text_tokens", type=cli_int, default=None,
                   help="random text features: tokens per prompt (default 24)")
    t.add_argument("--diff-width", dest="diff_width", type=cli_int, default=None,
                   help="HART: width of the residual diffusion head (released: 1024)")
    t.add_argument("--diff-depth", dest="diff_depth", type=cli_int, default=None,
                   help="HART: residual blocks of the diffusion head (released: 6)")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="acceleration preset (see `fastvar plan --list`)")
    p.add_argument("--plan", default=None, help="acceleration plan JSON file")


def _load_plan(args):
    """The plan of --preset (a name) or --plan (a file, read and checked here, before any model is built)."""
    from .accel.presets import PRESETS

    if args.preset and args.plan:
        raise CLIError("--preset and --plan both given; give one of them")
    if args.plan:
        return validate.plan_file(args.plan, "--plan")
    if args.preset:
        if args.preset not in PRESETS:
            raise CLIError(f"--preset {args.preset}: unknown preset; known presets: {', '.join(sorted(PRESETS))}")
        return args.preset
    return None


_ARCH_FLAGS = (("depth", "--depth", "transformer blocks"), ("width", "--width", "embedding width"),
               ("heads", "--heads", "attention heads"), ("text_width", "--text-width", "text feature width"),
               ("text_tokens", "--text-tokens", "tokens per prompt"), ("diff_width", "--diff-width", "diffusion width"),
               ("diff_depth", "--diff-depth", "diffusion blocks"))


def _check_source(ref: str | None, flag: str, want: str) -> None:
    """A --weights/--vae-weights/--text-encoder reference before anything is loaded: a local file must be a
    readable, intact checkpoint; a path that cannot be a hub id must exist. ``want``: "file" or "folder"."""
    import os

    from .checkpoints import check_checkpoint_file, looks_local

    if ref is None:
        return
    p = Path(ref).expanduser()
    if p.is_file():
        if want == "folder":
            raise CLIError(f"{flag} {ref}: is a file; pass the folder that holds it")
        check_checkpoint_file(p, flag)
    elif p.is_dir():
        if not os.access(p, os.R_OK | os.X_OK):
            raise CLIError(f"{flag} {ref}: permission denied (the folder is not readable by this user); "
                           f"make it readable (chmod a+rx {p}) or pass a readable copy")
    elif looks_local(ref):
        raise MissingInputError(f"{flag} {ref}: no such {want}; pass the local path of the downloaded {want} "
                                "(or a hub id owner/repo:name)")


def _check_model_args(args, spec) -> None:
    """Every model flag that can be checked without the model: device, sizes, resolution, local files."""
    validate.device(args.device, "--device")
    for dest, flag, meaning in _ARCH_FLAGS:
        if getattr(args, dest, None) is not None:
            validate.int_at_least(getattr(args, dest), flag, 1, meaning)
    if args.width is not None and args.heads is not None and args.width % args.heads:
        raise CLIError(f"--width {args.width}: not divisible by --heads {args.heads}; give a width that is a "
                       f"multiple of the head count, e.g. --width {args.heads * max(1, args.width // args.heads)}")
    if args.resolution is not None:
        if spec.family != "var":
            fixed = spec.family != "infinity" or "patch_nums" in spec.config  # embedded-t2i: one schedule
            alt = f"{spec.name} has one resolution" if fixed else "use --pn for the pixel budget"
            raise CLIError(f"--resolution {args.resolution}: applies to VAR models only; drop it ({alt})")
        if spec.name == "embedded" and args.resolution != spec.resolution:
            raise CLIError(f"--resolution {args.resolution}: the embedded model generates {spec.resolution}px only; "
                           "drop --resolution")
    hart = spec.family == "hart"
    _check_source(args.weights, "--weights", "folder" if hart else "file")
    _check_source(args.vae_weights, "--vae-weights", "folder" if hart else "file")
    _check_source(args.text_encoder, "--text-encoder", "folder")


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
                flag = "--cache-threshold" if args.cache_threshold is not None else "--threshold"
                raise CLIError(f"{flag} {thr}: outside [0, 1] (a cosine-similarity threshold; 1.0 reuses nothing); "
                               f"e.g. {flag} 0.9")
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
    if not cfg.calibration and cfg.sim_path:
        validate.input_file(cfg.sim_path, "--sim-path", "the similarity file a --calibration run recorded")
    if cfg.calibration and cfg.sim_path:
        validate.output_file(cfg.sim_path, "--sim-path")
    return cfg


def _spec_for(args):
    from .models.registry import MODELS, get_spec
    from .schedules import VAR_PATCH_NUMS

    try:
        spec = get_spec(args.model)
    except KeyError:
        raise CLIError(f"--model {args.model}: unknown model {args.model!r}; known models: "
                       f"{', '.join(sorted(MODELS))}") from None
    _check_model_args(args, spec)
    if args.resolution is not None and spec.family == "var" and spec.name != "embedded":
        if args.resolution not in VAR_PATCH_NUMS:
            raise CLIError(f"--resolution {args.resolution}: VAR has schedules for "
                           f"{' and '.join(map(str, sorted(VAR_PATCH_NUMS)))} px only; use one of those")
        from dataclasses import replace

        spec = replace(spec, config={**spec.config, "patch_nums": VAR_PATCH_NUMS[args.resolution]},
                       resolution=args.resolution)
    return spec


def _family_kwargs(args, spec) -> dict:
    """Schedule and architecture options for text-to-image families (only those the user gave)."""
    names = {"pn": "pn", "aspect": "aspect", "text_tokens": "text_tokens", "depth": "depth", "width": "embed_dim",
             "heads": "num_heads", "text_width": "text_channels", "diff_width": "diff_width", "diff_depth": "diff_depth"}
    given = {dst: getattr(args, src) for src, dst in names.items() if getattr(args, src, None) is not None}
    if spec.family == "var":
        if given:
            flags = ", ".join(f"--{k.replace('_', '-')}" for k, v in vars(args).items() if k in names and v is not None)
            raise CLIError(f"{flags} only apply to text-to-image models (infinity, hart); VAR uses --resolution")
        return {}
    if spec.name == "embedded-t2i" and given:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k, v in vars(args).items() if k in names and v is not None)
        raise CLIError(f"{flags}: embedded-t2i has one architecture and schedule ({spec.resolution} px); drop them")
    arch = {k for k in given if k in ("depth", "embed_dim", "num_heads", "text_channels", "diff_width", "diff_depth")}
    if arch and not args.random_init:
        raise CLIError("--depth/--width/--heads/--text-width/--diff-width/--diff-depth change the architecture: "
                       "use them with --random-init")
    if spec.family != "hart" and ("diff_width" in given or "diff_depth" in given):
        raise CLIError(f"--diff-width/--diff-depth size HART's diffusion head; {spec.name} has none")
    if spec.family != "infinity" and ("pn" in given or "aspect" in given):
        raise CLIError(f"--pn/--aspect are Infinity schedule options; {spec.name} has a fixed schedule")
    return given


def _schedule_for(spec, args):
    """The scale schedule a generation will use, known before any weights are read (None if unknown)."""
    from .schedules import Schedule

    if "patch_nums" in spec.config:
        return Schedule.square(spec.config["patch_nums"])
    if spec.family == "infinity":
        from .pipelines.infinity import resolve_aspect, resolve_pn
        from .schedules_infinity import infinity_schedule

        try:
            key = resolve_aspect(args.aspect or "1:1")
        except ValueError as e:
            raise CLIError(f"--aspect {args.aspect}: {e}") from None
        try:
            pn = resolve_pn(args.pn or "1M")
        except ValueError as e:
            raise CLIError(f"--pn {args.pn}: {e}") from None
        return infinity_schedule(key, pn)
    return None


def _build_pipeline(args, spec):
    from .pipelines import load_pipeline

    return load_pipeline(spec, weights=args.weights, vae_weights=args.vae_weights, text_encoder=args.text_encoder,
                         random_init=args.random_init, device=args.device, dtype=args.dtype,
                         **_family_kwargs(args, spec))


DEFAULT_PROMPTS = (
    "a photo of a red fox in the snow",
    "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen on a wooden table, studio lighting",
    "an astronaut riding a horse on the moon",
)


# Default prompts of models with a closed vocabulary (the photo prompts above would be mostly <unk> to them).
MODEL_PROMPTS = {"embedded-t2i": ("two red circles", "a blue square to the left of a yellow triangle",
                                  "three green rings", "a red cross above a blue circle")}


def _conditions(args, spec) -> list:
    """Class ids (class-conditional models) or prompts (text-to-image models), repeated to --num-samples."""
    text = spec.family != "var"
    if text and getattr(args, "classes", None):
        raise CLIError(f"--classes: {spec.name} is a text-to-image model; give --prompts, not --classes")
    if not text and getattr(args, "prompts", None):
        raise CLIError(f"--prompts: {spec.name} is class-conditional; give --classes, not --prompts")
    if text:
        default = MODEL_PROMPTS.get(spec.name, DEFAULT_PROMPTS)
        conds = validate.prompts(args.prompts if args.prompts else list(default), "--prompts", spec.name)
    else:
        n_cls = spec.config["num_classes"]
        conds = validate.class_ids(args.classes if args.classes else list(range(min(n_cls, 10))), n_cls, "--classes",
                                   spec.name)
    if getattr(args, "num_samples", None) is not None:
        validate.int_at_least(args.num_samples, "--num-samples", 1, "images to generate", 4)
        conds = [conds[i % len(conds)] for i in range(args.num_samples)]
    return conds


def _check_compare_configs(names: list[str]) -> None:
    """--compare-configs entries: cache presets, pruning presets, "pruning+cache" or plan files."""
    from .accel.cache_presets import CACHE_PRESETS
    from .accel.presets import PRESETS

    for name in names:
        if name.endswith(".json"):
            validate.plan_file(name, "--compare-configs")
            continue
        if "+" in name:
            prune, cache = name.split("+", 1)
        else:
            prune, cache = (None, name) if name in CACHE_PRESETS else (name, None)
        if (prune is not None and prune not in PRESETS) or (cache is not None and cache not in CACHE_PRESETS):
            raise CLIError(f"--compare-configs {name}: unknown config; use a cache preset "
                           f"({', '.join(sorted(CACHE_PRESETS))}), a pruning preset ({', '.join(sorted(PRESETS))}), "
                           "pruning+cache, or a plan .json file")


def _check_generate(args, spec) -> None:
    """Sampling, size and output flags of `generate`, all before any model is built."""
    validate.seed(args.seed, "--seed")
    validate.guidance(args.cfg, "--cfg")
    validate.top_k(args.top_k, "--top-k")
    validate.top_p(args.top_p, "--top-p")
    if args.batch_size is not None:
        validate.int_at_least(args.batch_size, "--batch-size", 1, "images per forward pass", 4)
    if args.benchmark is not None:
        validate.int_at_least(args.benchmark, "--benchmark", 1, "timed runs, N >= 1", 5)
    if args.benchmark is not None and (args.compare or args.compare_configs is not None):
        raise CLIError("--benchmark times one configuration; drop --compare/--compare-configs")
    if args.json is not None:
        if args.benchmark is None and args.compare_configs is None:
            raise CLIError(f"--json {args.json}: only --benchmark and --compare-configs write JSON (the images' "
                           "report is --out/report.json); drop --json or add one of those")
        validate.output_file(args.json, "--json")
    if args.compare_configs is not None:
        _check_compare_configs(args.compare_configs)
    if args.benchmark is None:  # a benchmark writes nothing to --out
        validate.output_dir(args.out, "--out")


def _image_names(conds: list) -> list[str]:
    import re

    names = []
    for i, c in enumerate(conds):
        tag = f"class{c}" if isinstance(c, int) else re.sub(r"[^A-Za-z0-9]+", "_", c).strip("_")[:40] or "prompt"
        names.append(f"{i:04d}_{tag}.png")
    return names


# ---------------------------------------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    from .accel import PlanError
    from .pipelines.common import save_images

    spec = _spec_for(args)
    _check_generate(args, spec)
    plan = _load_plan(args)
    cache = _cache_config(args)
    schedule = _schedule_for(spec, args)
    _family_kwargs(args, spec)  # flag checks before anything is loaded
    if cache is not None:
        from dataclasses import replace

        from .accel import AccelPlan, preset_for_model

        if isinstance(plan, str):
            class _M:  # presets only need the family, schedule and depth; resolved again at generation time
                family = spec.family
                depth = spec.config.get("depth", 16)

            _M.schedule = schedule
            plan = preset_for_model(plan, _M) if plan != "none" else AccelPlan(name="none")
        plan = replace(plan or AccelPlan(name="cache"), cache=cache)
        if cache.calibration and not cache.sim_path:
            raise CLIError("--calibration needs --sim-path FILE to store the similarity data")
        if schedule is not None:  # stage refs are checked against the schedule before loading weights
            try:
                cache.resolve_stages(schedule)
            except PlanError as e:
                raise CLIError(str(e)) from None
    if args.compare and plan is None:
        raise CLIError("--compare: compares a plan with the baseline, but no plan is given; add --preset NAME, "
                       "--plan FILE or a caching flag")
    conds = _conditions(args, spec)
    out = Path(args.out)

    if args.compare_configs is not None:
        return _compare_configs(args, spec, conds)
    pipe = _build_pipeline(args, spec)
    bs = args.batch_size or len(conds)
    chunks = [conds[i:i + bs] for i in range(0, len(conds), bs)]
    import torch

    def run(p, decode: bool = True):
        imgs, secs, stats = [], 0.0, []
        label = p if isinstance(p, str) else getattr(p, "name", "none")
        for ci, chunk in enumerate(tqdm(chunks, desc=f"generate ({label})", disable=args.quiet or len(chunks) == 1)):
            res = pipe(chunk, seed=None if args.seed is None else args.seed + ci, plan=p, cfg=args.cfg,
                       top_k=args.top_k, top_p=args.top_p, decode=decode)
            imgs.append(res.images)
            secs += res.seconds
            stats.append(res.stats)
        return (torch.cat(imgs) if decode else None), secs, stats

    try:
        if isinstance(plan, str) and plan != "none" and args.benchmark is None:
            # a preset with feature caching (turbo) has no similarity data: calibrate it on these conditions
            # first, as --compare-configs does (the calibration run's output equals the uncached plan's)
            from .accel import preset_for_model
            from .eval.run import needs_calibration, prepare_hooks

            if needs_calibration(preset_for_model(plan, pipe.model)):
                plan = prepare_hooks(pipe.model, plan, calibrate=lambda h: run(h, decode=False), name=plan,
                                     log=None if args.quiet else (lambda m: print(m, file=sys.stderr)))
        if args.benchmark is not None:
            return _benchmark(args, spec, pipe, plan, conds)
        if args.compare and plan is not None:
            base_imgs, base_s, base_stats = run(None)
            imgs, secs, stats = run(plan)
        else:
            imgs, secs, stats = run(plan)
    except PlanError as e:
        raise CLIError(str(e)) from None

    names = _image_names(conds)
    report = {"model": spec.name, "plan": stats[0].get("plan"), "seconds": secs, "images": len(conds),
              "conditions": conds, "kv_peak_bytes": _kv_peak(stats)}
    if args.compare and plan is not None:
        from .eval.benchmark import psnr_ssim

        psnr, ssim = psnr_ssim(imgs, base_imgs)
        report.update(baseline_seconds=base_s, speedup=base_s / secs, psnr_vs_baseline=psnr, ssim_vs_baseline=ssim)
        save_images(base_imgs, out / "baseline", names)
        save_images(imgs, out / str(report["plan"]), names)
        kv_base = _kv_peak(base_stats)
        kv_line = ""
        if kv_base and report["kv_peak_bytes"]:
            report.update(baseline_kv_peak_bytes=kv_base, kv_reduction=kv_base / report["kv_peak_bytes"])
            kv_line = (f" | KV held {kv_base / 2**20:.2f} -> {report['kv_peak_bytes'] / 2**20:.2f} MiB "
                       f"({report['kv_reduction']:.2f}x)")
        print(f"baseline {base_s:.2f}s | {report['plan']} {secs:.2f}s | speedup {base_s / secs:.2f}x | "
              f"PSNR {psnr:.2f} dB | SSIM {ssim:.4f}{kv_line}")
    elif args.save_images:
        save_images(imgs, out, names)
    if args.stats:
        from .accel.stats import format_table

        print(format_table(stats[0]))
    from .pipelines.common import atomic_write_text

    atomic_write_text(json.dumps(report, indent=2, default=str), out / "report.json")
    print(f"wrote {len(conds)} image(s) and a grid to {out}/ in {secs:.2f}s")
    return 0


def _kv_peak(stats: list[dict]) -> int | None:
    """Most K/V bytes the caches held at once over a run's generations (exact tensor sizes, the recorder's)."""
    vals = [s.get("kv_peak_bytes") for s in stats if s.get("kv_peak_bytes") is not None]
    return max(vals) if vals else None


def _benchmark(args, spec, pipe, plan, conds: list) -> int:
    """Repeated timed runs of one configuration (after one warm-up): median and spread, optional JSON."""
    import statistics

    from .eval.run import run_plans

    (res,) = run_plans(pipe, conds, [("plan", plan)], repeats=args.benchmark, warmup=1, seed=args.seed,
                       sampling=dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p), decode=False,
                       batch_size=args.batch_size, log=None if args.quiet else (lambda m: print(m, file=sys.stderr)))
    times, stats, n_images = res.seconds, res.stats, len(conds)
    med = res.median
    row = {"model": spec.name, "config": stats.get("plan"), "images": n_images, "runs": len(times),
           "seconds_median": med, "seconds_min": min(times), "seconds_max": max(times),
           "seconds_stdev": statistics.stdev(times) if len(times) > 1 else 0.0, "seconds_all": times,
           "images_per_second": n_images / med, "peak_mem_mb": stats.get("peak_mem_mb"),
           "total_flops": stats.get("total_flops")}
    print(f"{row['config']}: median {med:.3f}s (min {row['seconds_min']:.3f}, max {row['seconds_max']:.3f}, "
          f"stdev {row['seconds_stdev']:.3f}) over {len(times)} runs | {row['images_per_second']:.2f} images/s")
    if args.json:
        from .pipelines.common import atomic_write_text

        atomic_write_text(json.dumps(row, indent=2, default=str), Path(args.json))
    return 0


def _compare_configs(args, spec, conds) -> int:
    from .accel.cache_presets import CACHE_PRESETS
    from .eval.compare import compare_configs, format_compare, plot_compare
    from .pipelines.common import atomic_write_text

    configs = args.compare_configs or sorted(CACHE_PRESETS)
    pipe = _build_pipeline(args, spec)
    rows = compare_configs(pipe, conds, configs, seed=args.seed, repeats=1, warmup=1,
                           log=None if args.quiet else (lambda m: print(m, file=sys.stderr)))
    print(format_compare(rows))
    out = Path(args.out)
    plot_compare(rows, out / "compare.png")
    if args.json:
        atomic_write_text(json.dumps(rows, indent=2, default=str), Path(args.json))
    print(f"wrote {out / 'compare.png'}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from .eval.benchmark import format_results, run_benchmark

    spec = _spec_for(args)
    validate.seed(args.seed, "--seed")
    validate.int_at_least(args.repeats, "--repeats", 1, "timed runs per plan", 3)
    validate.int_at_least(args.warmup, "--warmup", 0, "untimed runs first")
    validate.int_at_least(args.batch, "--batch", 1, "images per generation")
    if args.threads is not None:
        validate.int_at_least(args.threads, "--threads", 1, "CPU threads", 4)
    if args.json is not None:
        validate.output_file(args.json, "--json")
    plans = [("none", None)]
    for name in args.plans:
        if name == "none":
            continue
        if name.endswith(".json"):
            p = validate.plan_file(name, "--plans")
            plans.append((p.name, p))
        else:
            from .accel.presets import PRESETS

            if name not in PRESETS:
                raise CLIError(f"--plans {name}: unknown preset; known presets: {', '.join(sorted(PRESETS))} "
                               "(or a plan .json file)")
            plans.append((name, name))
    if spec.family == "var":
        n = spec.config["num_classes"]
        conds = (validate.class_ids(args.classes, n, "--classes", spec.name) if args.classes
                 else [i % n for i in range(args.batch)])
    else:
        if args.classes:
            raise CLIError(f"--classes: {spec.name} is a text-to-image model; drop --classes (use --batch)")
        own = MODEL_PROMPTS.get(spec.name)
        conds = [own[i % len(own)] if own else f"benchmark prompt {i}" for i in range(args.batch)]
    _family_kwargs(args, spec)
    _schedule_for(spec, args)  # --pn/--aspect before anything is built
    try:
        pipe = _build_pipeline(args, spec)
    except (ValueError, KeyError) as e:
        raise CLIError(str(e.args[0] if isinstance(e, KeyError) and e.args else e)) from None

    prev_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        threads = torch.get_num_threads()
        rows = run_benchmark(pipe, conds, plans, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                             log=None if args.quiet else (lambda s: print(s, file=sys.stderr)), clock=args.clock)
    finally:
        torch.set_num_threads(prev_threads)  # in-process callers (tests, notebooks) keep their setting
    print(format_results(rows))
    if args.json:
        from .pipelines.common import atomic_write_text

        meta = {"model": spec.name, "resolution": spec.resolution, "random_init": args.random_init,
                "device": str(pipe.device), "dtype": args.dtype, "batch": len(conds), "threads": threads,
                "repeats": args.repeats, "clock": args.clock}
        atomic_write_text(json.dumps([{**r, **meta} for r in rows], indent=2), Path(args.json))
    return 0


def cmd_plan(args) -> int:
    from .accel.plan import PlanError
    from .accel.presets import PRESETS, get_preset

    if args.last_side is not None:
        validate.int_at_least(args.last_side, "--last-side", 1, "side of the last scale in tokens", 16)
    validate.int_at_least(args.depth, "--depth", 1, "transformer blocks", 16)
    if not args.list and args.name not in PRESETS:
        raise CLIError(f"plan {args.name}: unknown preset; known presets: {', '.join(sorted(PRESETS))}")
    try:
        if args.list:
            for name in PRESETS:
                print(f"{name:<16}{get_preset(name, args.family, args.last_side, args.depth).description}")
            return 0
        print(get_preset(args.name, args.family, args.last_side, args.depth).to_json())
    except PlanError as e:
        raise CLIError(str(e)) from None
    return 0


def cmd_check_embedded(args) -> int:
    from .pipelines.common import atomic_write_text
    from .train.check import check_embedded

    validate.int_at_least(args.samples, "--samples", 1, "generated images", 100)
    validate.seed(args.seed, "--seed")
    validate.device(args.device, "--device")
    if args.json is not None:
        validate.output_file(args.json, "--json")
    from .accel import PlanError

    plan = _load_plan(args)
    try:
        res = check_embedded(samples=args.samples, seed=args.seed, device=args.device or "cpu", plan=plan)
    except PlanError as e:
        raise CLIError(str(e)) from None
    prefix = "" if plan is None else f"plan {res['plan']} | "
    print(f"{prefix}accuracy {res['accuracy']:.3f} (gate 0.90) | recon PSNR {res['recon_psnr']:.2f} dB (gate 24) | "
          f"{'PASSED' if res['passed'] else 'FAILED'}")
    if args.json:
        atomic_write_text(json.dumps(res, indent=2, default=str), Path(args.json))
    return 0


def cmd_demo(args) -> int:
    from .demo import serve_from_args  # imports gradio lazily (one-line message when it is missing)

    return serve_from_args(args)


def cmd_models(args) -> int:
    from .models.registry import MODELS

    for name, spec in sorted(MODELS.items()):
        print(f"{name:<14}{spec.family:<10}{spec.resolution}px  weights: {spec.weights or 'embedded'}")
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = validate.UsageParser(prog="fastvar", description="VAR-family image generation with training-free acceleration")
    p.add_argument("--version", action="version", version=f"fastvar {__version__}")
    sub = p.add_subparsers(dest="command", metavar="command")

    g = sub.add_parser("generate", help="generate images (class ids for VAR)")
    _add_model_args(g, default_model="embedded")
    _add_plan_args(g)
    g.add_argument("--classes", type=cli_int, nargs="+", default=None, help="class ids (class-conditional models)")
    g.add_argument("--prompts", nargs="+", default=None, help="prompts (text-to-image models), one image each")
    g.add_argument("--num-samples", "--num_samples", dest="num_samples", type=cli_int, default=None)
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", type=cli_int, default=None)
    g.add_argument("--seed", type=cli_int, default=0)
    g.add_argument("--cfg", type=cli_float, default=None)
    g.add_argument("--top-k", dest="top_k", type=cli_int, default=None)
    g.add_argument("--top-p", dest="top_p", type=cli_float, default=None)
    g.add_argument("--compare", action="store_true", help="also run without the plan; print speedup and fidelity")
    g.add_argument("--save-images", "--save_images", dest="save_images", action="store_true", default=True)
    g.add_argument("--no-save-images", dest="save_images", action="store_false")
    g.add_argument("--stats", action="store_true", help="print tokens/FLOPs/time per scale")
    g.add_argument("--out", default="outputs")
    g.add_argument("--quiet", action="store_true")
    g.add_argument("--benchmark", type=cli_int, nargs="?", const=5, default=None, metavar="N",
                   help="time N runs (default 5, after a warm-up) of this configuration: median and spread")
    g.add_argument("--json", default=None, help="with --compare-configs / --benchmark: write the results as JSON")
    c = g.add_argument_group("feature caching")
    c.add_argument("--cache-preset", "--cache_preset", dest="cache_preset", default=None)
    c.add_argument("--cache-skip-stages", "--cache_skip_stages", dest="cache_skip_stages", nargs="+", default=None,
                   help="stages (token counts, e.g. 169 256, or #index) that may reuse cached outputs")
    c.add_argument("--cache-cache-stages", "--cache_cache_stages", dest="cache_cache_stages", nargs="+", default=None)
    c.add_argument("--cache-enable-attn", dest="cache_attn", action="store_true", default=None)
    c.add_argument("--cache-disable-attn", dest="cache_attn", action="store_false")
    c.add_argument("--cache-enable-mlp", dest="cache_mlp", action="store_true", default=None)
    c.add_argument("--cache-disable-mlp", dest="cache_mlp", action="store_false")
    c.add_argument("--cache-threshold", "--cache_threshold", dest="cache_threshold", type=cli_float, default=None)
    c.add_argument("--cache-adaptive-threshold", "--cache_adaptive_threshold", dest="cache_adaptive_threshold",
                   action="store_true", default=None)
    c.add_argument("--cache-interpolation-mode", "--cache_interpolation_mode", dest="cache_interpolation_mode",
                   choices=["bilinear", "nearest", "bicubic", "area"], default=None)
    c.add_argument("--use-cache", "--use_cache", dest="use_cache", action="store_true", help="legacy: the original preset")
    c.add_argument("--calibration", action="store_true", help="record similarities (needs --sim-path)")
    c.add_argument("--sim-path", "--sim_path", dest="sim_path", default=None)
    c.add_argument("--threshold", type=cli_float, default=None, help="legacy alias of --cache-threshold")
    c.add_argument("--compare-configs", "--compare_configs", dest="compare_configs", nargs="*", default=None,
                   help="baseline and every cache preset (or the given configs) side by side; table, PNG, --json")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="baseline vs plans: speed, tokens, FLOPs, memory, fidelity (JSON)")
    _add_model_args(b, default_model="var-d16")
    b.add_argument("--plans", nargs="+", default=["fastvar"], help="preset names or plan JSON files")
    b.add_argument("--repeats", type=cli_int, default=3)
    b.add_argument("--warmup", type=cli_int, default=1)
    b.add_argument("--batch", type=cli_int, default=1, help="images per generation (CFG doubles it)")
    b.add_argument("--classes", type=cli_int, nargs="+", default=None)
    b.add_argument("--seed", type=cli_int, default=0)
    b.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time per generation: wall (default) or this process's CPU seconds (a shared, loaded machine)")
    b.add_argument("--threads", type=cli_int, default=None,
                   help="CPU threads for the run (default: torch's, usually every core); recorded in the JSON")
    b.add_argument("--json", default=None, help="write results as a JSON list (baseline first)")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

    pl = sub.add_parser("plan", help="print a preset as JSON (a starting point for --plan files)")
    pl.add_argument("name", nargs="?", default="fastvar")
    pl.add_argument("--family", default="var", choices=["var", "infinity", "hart"])
    pl.add_argument("--last-side", dest="last_side", type=cli_int, default=None,
                    help="last scale's side: VAR 16/32, Infinity 16/32/48/64/128 (1:1 budgets), HART 64 "
                         "(default: VAR 256, Infinity 1M, HART 1024)")
    pl.add_argument("--depth", type=cli_int, default=16)
    pl.add_argument("--list", action="store_true")
    pl.set_defaults(func=cmd_plan)

    ce = sub.add_parser("check-embedded", help="quality gates of the embedded model (checker accuracy, recon PSNR)")
    ce.add_argument("--samples", type=cli_int, default=100)
    ce.add_argument("--seed", type=cli_int, default=0)
    ce.add_argument("--device", default=None)
    ce.add_argument("--json", default=None)
    _add_plan_args(ce)  # --preset / --plan: checker accuracy of samples generated under a plan
    ce.set_defaults(func=cmd_check_embedded)

    dm = sub.add_parser("demo", help="local web page (127.0.0.1): baseline and accelerated images side by side")
    _add_model_args(dm, default_model="embedded")
    _add_plan_args(dm)
    dm.add_argument("--port", type=cli_int, default=7860)
    dm.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    dm.set_defaults(func=cmd_demo)

    m = sub.add_parser("models", help="list known model names")
    m.set_defaults(func=cmd_models)

    try:
        from .train.cli import add_train_subparsers
    except ImportError:
        add_train_subparsers = None
    if add_train_subparsers is not None:
        add_train_subparsers(sub)
    from .eval.cli import add_eval_parser  # `fastvar eval …`; its handlers import their libraries lazily

    add_eval_parser(sub)
    from .accel.tune import add_tune_parser  # `fastvar tune`: the fastest plan for a quality budget

    add_tune_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; a usage error (bad flag value, unreadable file, unusable device) is printed as
    ``fastvar: error: <message>`` on stderr and returns 2, without a traceback."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"fastvar: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as e:  # library errors whose messages are written for users
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"fastvar: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
