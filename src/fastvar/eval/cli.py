"""``fastvar eval …``: generate for evaluation, score (geneval, fid, clipscore, hps, imagereward, fidelity), report.

Every handler checks its inputs (files exist and parse, folders hold images, options fit the model) before
any model or metric network is loaded, and reports a bad input as one line (``fastvar: error: …``). Each
scorer prints a table, writes ``--json OUT`` if asked, and records its result in ``IMAGES/scores/<metric>.json``
so ``fastvar eval report`` finds it next to the images it describes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from .. import validate
from ..errors import UsageError
from ..pipelines.common import atomic_write_text
from ..validate import cli_float, cli_int


# ---------------------------------------------------------------------------------------------- helpers
def _clean(obj: Any) -> Any:
    """JSON-safe: infinities and NaN become null (strict JSON has neither)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _write_json(obj: Any, path: Path) -> None:
    atomic_write_text(json.dumps(_clean(obj), indent=2, default=str) + "\n", Path(path))


def _record(args, metric: str, result: dict[str, Any]) -> None:
    """``--json`` and ``IMAGES/scores/<metric>.json`` (the report reads the latter)."""
    from .report import scores_path

    result = {"metric": metric, "images_dir": str(args.images), **result}
    if args.json:
        _write_json(result, Path(args.json))
    if not args.no_record:
        _write_json(result, scores_path(Path(args.images), metric))


def _device(value: str | None) -> str:
    import torch

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    validate.device(value, "--device")
    return value


def _check_scorer_args(args) -> None:
    if args.json:
        validate.output_file(args.json, "--json")
    if getattr(args, "batch_size", 1) < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")


def _add_scorer_common(p: argparse.ArgumentParser, batch: int | None = None) -> None:
    p.add_argument("--images", required=True, help="generation folder (fastvar eval generate --out) or image folder")
    p.add_argument("--json", default=None, help="write the result as JSON")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--no-record", dest="no_record", action="store_true",
                   help="do not store the result in IMAGES/scores/<metric>.json (where `eval report` reads it)")
    p.add_argument("--quiet", action="store_true")
    if batch is not None:
        p.add_argument("--batch-size", dest="batch_size", type=cli_int, default=batch)


# ---------------------------------------------------------------------------------------------- generate
def _items_for(args, spec) -> tuple[list, str | None]:
    from .prompts import class_items, load_class_ids, load_prompts

    text = spec.family != "var"
    if text:
        if args.classes_file:
            raise UsageError(f"--classes-file: {spec.name} is text-to-image; pass --prompts-file")
        if not args.prompts_file:
            raise UsageError(f"{spec.name} is text-to-image: pass --prompts-file (GenEval .jsonl, MJHQ meta_data.json "
                             "or one prompt a line)")
        return load_prompts(args.prompts_file), str(args.prompts_file)
    if args.prompts_file:
        raise UsageError(f"--prompts-file: {spec.name} is class-conditional; pass --classes-file (one class id a line)")
    n = spec.config["num_classes"]
    if args.classes_file:
        ids = load_class_ids(args.classes_file, n)
    elif spec.name == "embedded":
        ids = list(range(n))
    else:
        raise UsageError(f"{spec.name} is class-conditional: pass --classes-file (one class id a line, 0..{n - 1})")
    return class_items(ids, procedural=spec.name == "embedded"), args.classes_file


def cmd_generate(args) -> int:
    import torch

    from .. import cli as main_cli
    from ..train.dist import barrier, cleanup, init_distributed
    from .generate import GenerationJob, check_manifest, clean_stale_temp, make_manifest, run_job, write_manifest, write_metadata

    spec = main_cli._spec_for(args)
    plan = main_cli._load_plan(args)
    main_cli._family_kwargs(args, spec)
    items, source = _items_for(args, spec)
    validate.int_at_least(args.samples_per_prompt, "--samples-per-prompt", 1, "images per prompt")
    seed = validate.seed(args.seed, "--seed")
    if args.cfg is not None:
        validate.guidance(args.cfg, "--cfg")
    if args.top_k is not None:
        validate.top_k(args.top_k, "--top-k")
    if args.top_p is not None:
        validate.top_p(args.top_p, "--top-p")
    out = validate.output_dir(args.out, "--out")
    if args.device is not None:
        validate.device(args.device, "--device")
    plan_id = plan.to_dict() if hasattr(plan, "to_dict") else plan
    sampling = {"cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p}
    weights = {"weights": args.weights, "vae_weights": args.vae_weights, "text_encoder": args.text_encoder,
               "random_init": args.random_init}
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    manifest = make_manifest(model=spec.name, weights=weights, plan=plan_id, seed=seed,
                             samples_per_prompt=args.samples_per_prompt, items=items, prompts_file=source,
                             sampling=sampling, world=world,
                             device=args.device or "auto", dtype=args.dtype)
    check_manifest(out, manifest)  # before the model loads: a folder of another run is refused at once

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1 and dev == "cuda":
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    info = init_distributed(dev)
    try:
        if info.is_main:
            clean_stale_temp(out)
            write_metadata(out, items)
            if not (out / "manifest.json").is_file():
                write_manifest(out, manifest)
        barrier(info)
        args.device = str(info.device)
        pipe = main_cli._build_pipeline(args, spec)
        opts = {k: v for k, v in sampling.items() if v is not None}
        text = spec.family != "var"

        def generate_one(item, image_seed):
            cond = item.prompt if text else item.class_id
            res = pipe([cond], seed=image_seed, plan=plan, **opts)
            return res.images[0], float(res.seconds)

        job = GenerationJob(items, out, generate_one, args.samples_per_prompt, seed, info.rank, info.world_size,
                            progress=not args.quiet, limit=args.max_images,
                            log_extra={"device": str(info.device)})
        res = run_job(job)
        barrier(info)
        print(f"rank {res['rank']}: {res['generated']} generated, {res['skipped']} already there, "
              f"{res['remaining']} left, {res['seconds']:.2f}s in the transformer", file=sys.stderr)
        if info.is_main:
            from .generate import sample_path, work_units

            missing = sum(not sample_path(out, p, s).is_file() for p, s in work_units(len(items), args.samples_per_prompt))
            print(f"{out}: {len(items)} prompts x {args.samples_per_prompt} samples, {missing} image(s) missing"
                  + (" (run again to resume)" if missing else ""))
    finally:
        cleanup(info)
    return 0


# ---------------------------------------------------------------------------------------------- scorers
def cmd_geneval(args) -> int:
    from .geneval import ClipColourClassifier, Rules, detector_colours, format_summary, geneval_images, score_image, summarize
    from .metrics import collect_images, load_clip, load_rgb

    _check_scorer_args(args)
    collect_images(args.images)
    pairs = geneval_images(Path(args.images))
    no_tag = [str(p) for p, m in pairs if "include" not in m]
    if not pairs or no_tag:
        raise UsageError(f"--images {args.images}: GenEval needs prompts with include clauses "
                         f"({no_tag[0] if no_tag else 'no <00000>/metadata.jsonl found'}); generate from GenEval's "
                         "evaluation_metadata.jsonl (or the embedded model's classes)")
    detector_name = args.detector
    if detector_name is None:
        man = Path(args.images) / "manifest.json"
        model = json.loads(man.read_text()).get("model") if man.is_file() else None
        detector_name = "procedural" if model in ("embedded", "embedded-t2i") else "mask2former"
    if detector_name == "mask2former" and not args.detector_weights:
        raise UsageError("--detector mask2former needs --detector-weights mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth "
                         "(GenEval's evaluation/download_models.sh); the built-in procedural images use --detector procedural")
    if args.detector_weights:
        validate.input_file(args.detector_weights, "--detector-weights", "the Mask2Former checkpoint")
    rules = Rules(threshold=args.threshold, counting_threshold=args.counting_threshold, max_objects=args.max_objects,
                  position_threshold=args.position_threshold)
    device = _device(args.device)
    if detector_name == "procedural":
        from .detect_procedural import ProceduralDetector

        detector, colour_fn = ProceduralDetector(), detector_colours
    else:
        from .geneval import MMDetDetector

        model, processor = load_clip(args.clip_model, device)
        detector, colour_fn = MMDetDetector(args.detector_config, args.detector_weights, device), \
            ClipColourClassifier(model, processor, device)
    from tqdm import tqdm

    results = [score_image(load_rgb(p), meta, detector, colour_fn, rules, str(p))
               for p, meta in tqdm(pairs, desc="geneval", disable=args.quiet)]
    summary = summarize(results)
    print(format_summary(summary))
    if args.results:
        atomic_write_text("".join(json.dumps(r.__dict__) + "\n" for r in results), Path(args.results))
    _record(args, "geneval", {**summary, "detector": detector_name, "rules": rules.__dict__})
    return 0


def cmd_fid(args) -> int:
    from .metrics import collect_images, fid_score, load_inception, load_stats

    _check_scorer_args(args)
    gen = collect_images(args.images)
    ref = Path(args.ref).expanduser()
    ref_records = ref_stats = None
    if ref.is_file() and ref.suffix == ".npz":
        ref_stats = load_stats(ref)
        if args.save_ref_stats:
            raise UsageError("--save-ref-stats: --ref is already statistics; pass a reference image folder to save them")
    else:
        ref_records = collect_images(ref, "--ref")
    if args.save_ref_stats:
        validate.output_file(args.save_ref_stats, "--save-ref-stats")
    if len(gen) < 2:
        raise UsageError(f"--images {args.images}: FID needs at least 2 images, found {len(gen)}")
    device = _device(args.device)
    feature = load_inception(args.inception_weights, device)
    res = fid_score(gen, ref_records, ref_stats, feature=feature, batch_size=args.batch_size, device=device,
                    progress=not args.quiet, save_ref_stats=args.save_ref_stats)
    print(f"{'set':<28}{'FID':>10}{'images':>9}")
    print(f"{'all':<28}{res['fid']:>10.3f}{res['num_images']:>9}")
    for cat, v in res.get("categories", {}).items():
        print(f"{cat:<28}{v['fid']:>10.3f}{v['num_images']:>9}")
    if "category_mean" in res:
        print(f"{'mean over categories':<28}{res['category_mean']:>10.3f}")
    _record(args, "fid", {**res, "ref": str(ref), "feature": "inception-v3-compat (torch-fidelity 2015 weights)"})
    return 0


def _prompted(args, metric: str, scorer) -> int:
    from .metrics import score_prompted

    res = score_prompted(args._records, scorer, metric, args.batch_size, progress=not args.quiet)
    print(f"{'set':<28}{metric:>12}{'images':>9}")
    print(f"{'all':<28}{res[metric]:>12.4f}{res['num_images']:>9}")
    for cat, v in res.get("categories", {}).items():
        print(f"{cat:<28}{v[metric]:>12.4f}{v['num_images']:>9}")
    _record(args, metric, res)
    return 0


def _records_with_prompts(args, metric: str):
    from .metrics import _with_prompts, collect_images

    _check_scorer_args(args)
    args._records = _with_prompts(collect_images(args.images), metric)


def cmd_clipscore(args) -> int:
    from .metrics import clip_scores, load_clip

    _records_with_prompts(args, "clipscore")
    device = _device(args.device)
    model, processor = load_clip(args.clip_model, device)
    return _prompted(args, "clipscore", lambda ims, ps: clip_scores(ims, ps, model, processor, device))


def cmd_hps(args) -> int:
    from .metrics import HPSv21

    _records_with_prompts(args, "hps")
    if args.hps_weights:
        validate.input_file(args.hps_weights, "--hps-weights", "HPS_v2.1_compressed.pt")
    return _prompted(args, "hps", HPSv21(args.hps_weights, _device(args.device)))


def cmd_imagereward(args) -> int:
    from .metrics import ImageRewardScorer

    _records_with_prompts(args, "imagereward")
    return _prompted(args, "imagereward", ImageRewardScorer(args.imagereward_dir, _device(args.device)))


def _check_same_run(images: Path, ref: Path) -> None:
    """Fidelity compares the same prompts and seeds: refuse two manifests that disagree on them."""
    a, b = images / "manifest.json", ref / "manifest.json"
    if not (a.is_file() and b.is_file()):
        return
    ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
    for key in ("model", "seed", "prompts_sha256", "samples_per_prompt", "seed_rule"):
        if ma.get(key) != mb.get(key):
            raise UsageError(f"--images {images} and --ref {ref} differ in {key} ({ma.get(key)!r} vs {mb.get(key)!r}); "
                             "fidelity compares the same prompts and seeds with and without a plan")


def cmd_fidelity(args) -> int:
    from .metrics import collect_images, fidelity, load_lpips, match_pairs

    _check_scorer_args(args)
    bad = [m for m in args.metrics if m not in ("psnr", "ssim", "lpips")]
    if bad:
        raise UsageError(f"--metrics {' '.join(bad)}: unknown; choose from psnr ssim lpips")
    pairs = match_pairs(collect_images(args.images), collect_images(args.ref, "--ref"))
    _check_same_run(Path(args.images), Path(args.ref))
    device = _device(args.device)
    lp = load_lpips(args.lpips_net, device) if "lpips" in args.metrics else None
    res = fidelity(pairs, args.metrics, lp, device, progress=not args.quiet)
    cells = [f"{m.upper()} {res[m]:.4f}" if res[m] is not None and math.isfinite(res[m]) else f"{m.upper()} inf"
             for m in args.metrics]
    print(f"{res['num_images']} image pairs ({res['psnr_identical']} identical) | " + " | ".join(cells))
    _record(args, "fidelity", {**res, "ref": str(args.ref), "lpips_net": args.lpips_net if lp is not None else None})
    return 0


def cmd_report(args) -> int:
    from .report import build_report, load_run, plot_report, to_markdown

    runs = []
    for spec in args.runs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = Path(spec).name, spec
        runs.append((name, folder))
    names = [n for n, _ in runs]
    if len(set(names)) != len(names):
        raise UsageError(f"--runs: names repeat ({', '.join(names)}); give each run a name: NAME=DIR")
    for flag in ("json", "markdown", "plot"):
        if getattr(args, flag):
            validate.output_file(getattr(args, flag), f"--{flag}")
    report = build_report([load_run(n, f) for n, f in runs], args.baseline or names[0])
    md = to_markdown(report)
    print(md)
    if args.markdown:
        atomic_write_text(md + "\n", Path(args.markdown))
    if args.json:
        _write_json(report, Path(args.json))
    if args.plot:
        plot_report(report, args.plot)
    return 0


# ---------------------------------------------------------------------------------------------- parser
def _one_line_imports(fn):
    """A metric library that is not installed is a one-line error naming the package (exit status 2), like
    every other bad input, not a traceback: the loaders raise ImportError with the pip line."""
    import functools

    @functools.wraps(fn)
    def run(args):
        try:
            return fn(args)
        except ImportError as e:
            raise UsageError(str(e).splitlines()[0] if str(e) else f"missing package: {e.name}") from None

    return run


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fastvar eval`` and its sub-commands on the main parser's ``subparsers``."""
    from .. import cli as main_cli

    ev = subparsers.add_parser("eval", help="evaluation: generate (sharded, resumable), score, report")
    sub = ev.add_subparsers(dest="eval_command", metavar="eval-command")
    ev.set_defaults(func=lambda args: (ev.print_help(), 0)[1])

    g = sub.add_parser("generate", help="images for evaluation in GenEval's layout (torchrun: one shard per rank)")
    main_cli._add_model_args(g, default_model="embedded")
    main_cli._add_plan_args(g)
    g.add_argument("--prompts-file", dest="prompts_file", default=None,
                   help="GenEval metadata .jsonl, MJHQ meta_data.json, or one prompt a line (text-to-image models)")
    g.add_argument("--classes-file", dest="classes_file", default=None,
                   help="one class id a line (class-conditional models; the embedded model defaults to all 10)")
    g.add_argument("--samples-per-prompt", dest="samples_per_prompt", type=cli_int, default=4,
                   help="images per prompt (GenEval: 4)")
    g.add_argument("--seed", type=cli_int, default=0, help="run seed; image (i, k) uses a seed derived from (seed, i, k)")
    g.add_argument("--cfg", type=cli_float, default=None)
    g.add_argument("--top-k", dest="top_k", type=cli_int, default=None)
    g.add_argument("--top-p", dest="top_p", type=cli_float, default=None)
    g.add_argument("--out", required=True, help="output folder (resumed when it already holds this run)")
    g.add_argument("--max-images", dest="max_images", type=cli_int, default=None,
                   help="stop after this many new images per rank (a budgeted partial run; run again to continue)")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=_one_line_imports(cmd_generate))

    ge = sub.add_parser("geneval", help="GenEval: detection, counting, colour, position; overall = mean of the tasks")
    _add_scorer_common(ge)
    ge.add_argument("--detector", choices=["procedural", "mask2former"], default=None,
                    help="default: procedural for the embedded model's images, else mask2former (mmdet)")
    ge.add_argument("--detector-weights", dest="detector_weights", default=None, help="Mask2Former .pth")
    ge.add_argument("--detector-config", dest="detector_config", default=None, help="mmdet config (default: mmdet's)")
    ge.add_argument("--clip-model", dest="clip_model", default="openai/clip-vit-large-patch14",
                    help="colour classifier (mask2former only): HF id in the cache or a local folder")
    ge.add_argument("--threshold", type=cli_float, default=0.3)
    ge.add_argument("--counting-threshold", dest="counting_threshold", type=cli_float, default=0.9)
    ge.add_argument("--max-objects", dest="max_objects", type=cli_int, default=16)
    ge.add_argument("--position-threshold", dest="position_threshold", type=cli_float, default=0.1)
    ge.add_argument("--results", default=None, help="per-image results as JSONL (GenEval's results.jsonl fields)")
    ge.set_defaults(func=_one_line_imports(cmd_geneval))

    f = sub.add_parser("fid", help="FID (Inception-v3) against a reference folder or .npz statistics; per category")
    _add_scorer_common(f, batch=32)
    f.add_argument("--ref", required=True, help="reference image folder (MJHQ: <category>/<id>.jpg) or .npz (mu, sigma)")
    f.add_argument("--save-ref-stats", dest="save_ref_stats", default=None, help="store the reference's statistics (.npz)")
    f.add_argument("--inception-weights", dest="inception_weights", default=None,
                   help="weights-inception-2015-12-05-6726825d.pth (default: the torch hub cache)")
    f.set_defaults(func=_one_line_imports(cmd_fid))

    c = sub.add_parser("clipscore", help="CLIP score: 100 x cosine(image, prompt), ViT-L/14")
    _add_scorer_common(c, batch=16)
    c.add_argument("--clip-model", dest="clip_model", default="openai/clip-vit-large-patch14")
    c.set_defaults(func=_one_line_imports(cmd_clipscore))

    h = sub.add_parser("hps", help="HPSv2.1 (hpsv2 package)")
    _add_scorer_common(h, batch=16)
    h.add_argument("--hps-weights", dest="hps_weights", default=None, help="HPS_v2.1_compressed.pt")
    h.set_defaults(func=_one_line_imports(cmd_hps))

    ir = sub.add_parser("imagereward", help="ImageReward-v1.0 (image-reward package)")
    _add_scorer_common(ir, batch=16)
    ir.add_argument("--imagereward-dir", dest="imagereward_dir", default=None,
                    help="folder with ImageReward.pt and med_config.json (default ~/.cache/ImageReward)")
    ir.set_defaults(func=_one_line_imports(cmd_imagereward))

    fi = sub.add_parser("fidelity", help="PSNR/SSIM/LPIPS of a plan's images against the baseline's (same seeds)")
    _add_scorer_common(fi)
    fi.add_argument("--ref", required=True, help="the baseline's generation folder")
    fi.add_argument("--metrics", nargs="+", default=["psnr", "ssim", "lpips"], help="psnr ssim lpips")
    fi.add_argument("--lpips-net", dest="lpips_net", default="alex", choices=["alex", "vgg", "squeeze"])
    fi.set_defaults(func=_one_line_imports(cmd_fidelity))

    r = sub.add_parser("report", help="one table comparing runs: every metric, delta vs baseline, speedup; plot")
    r.add_argument("--runs", nargs="+", required=True,
                   help="NAME=DIR[,DIR2] generation folders of one run each, e.g. its GenEval and MJHQ folders "
                        "(first = baseline by default)")
    r.add_argument("--baseline", default=None)
    r.add_argument("--markdown", default=None, help="write the table as markdown")
    r.add_argument("--json", default=None)
    r.add_argument("--plot", default=None, help="quality vs speedup PNG (needs matplotlib)")
    r.set_defaults(func=_one_line_imports(cmd_report))
    return ev


__all__ = ["add_eval_parser"]
