"""``fastvar demo``: a local web page that shows the baseline and an accelerated plan side by side.

Why a page: whether a plan is worth it is a judgement on images (where did pixels change, by how much,
which scales got faster), which a table of numbers does not convey. The page runs one condition (a
class id or a prompt) with and without the plan and shows both images, a difference heat map, PSNR/SSIM,
the two transformer times with the speedup, and a per-scale time chart.

Layout of this module, so most of it is testable without a browser or Gradio:

- plain functions and :class:`DemoSession`: parse the page's inputs (one-line :class:`UsageError`
  messages), run the baseline and the plan, cache baselines per (model, condition, seed, sampling), the
  heat map, the chart image. They import no Gradio.
- :func:`build_app` / :func:`serve` / :func:`serve_from_args`: the Gradio page. Gradio is imported there
  only, lazily, so ``import fastvar.demo`` works without it; without it the command stops with one line
  naming the extra to install.

The server listens on 127.0.0.1 only; a public link is made only when ``share=True`` (``--share``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from . import validate
from .accel import AccelPlan, PlanError
from .errors import UsageError
from .pipelines.common import GenerationResult, to_uint8

GRADIO_MISSING = "the demo needs gradio: pip install 'fastvar-vision[demo]'"
HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DIFF_VMAX = 0.5  # the heat map's full scale: a mean absolute RGB difference of 0.5 (of the [0, 1] range)
DISPLAY_MIN_SIDE = 256  # small images (the embedded model's 128 px) are enlarged, pixel for pixel, to this side
BASELINE_CACHE_SIZE = 32  # baselines kept (LRU); each holds one decoded image


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class DemoRequest:
    """One validated set of page inputs. ``condition`` is a class id or a prompt; ``aspect``/``pn`` are the
    Infinity schedule (None for the other families); ``cfg`` None means the pipeline's default."""

    condition: int | str
    seed: int
    cfg: float | None
    aspect: str | None = None
    pn: str | None = None


def _whole_number(value: Any) -> Any:
    """Gradio's Number gives floats (``3.0``); a whole float becomes an int, anything else is left to the
    validators (which then name the problem)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return value


def class_labels(num_classes: int, model_name: str) -> list[str] | None:
    """Dropdown entries ``"3: blue square"`` for the embedded model's procedural classes (None for other
    models: 1000 ImageNet ids are entered as a number)."""
    if model_name != "embedded":
        return None
    from .train.data import class_name

    return [f"{i}: {class_name(i)}" for i in range(num_classes)]


def parse_condition(value: Any, family: str, num_classes: int | None = None, model: str = "this model") -> int | str:
    """A class id (class-conditional models: ``3``, ``3.0``, ``"3"`` or ``"3: blue square"``) or a prompt
    (text-to-image models), checked with the same validators (and messages) as the command line."""
    if family == "var":
        v = value
        if isinstance(v, str):
            m = re.match(r"\s*(-?\d+)\s*(?::.*)?$", v)
            if m is None:
                raise UsageError(f"class {v!r}: not a class id; {model} is class-conditional: give a whole number "
                                 f"in 0..{(num_classes or 1) - 1}")
            v = int(m.group(1))
        return validate.class_ids([_whole_number(v)], num_classes or 0, "class", model)[0]
    prompt = validate.prompts(value if isinstance(value, str) else [value], "prompt", model)[0]
    return prompt.strip()


def parse_plan_text(text: Any) -> AccelPlan:
    """The plan editor's JSON as an :class:`AccelPlan`; every failure is one line that names the problem (the
    plan's own :class:`PlanError` messages for bad fields) and the fix.

    A plan's ``cache.sim_path`` is refused: it names a file on the server that the plan would read or (in
    calibration mode) overwrite, which a web form must not be able to do. Caching plans still work: the
    demo calibrates them on the requested image first, as ``--compare-configs`` does.
    """
    if not isinstance(text, str) or not text.strip():
        raise UsageError("plan: empty; pick a preset or paste a plan (`fastvar plan fastvar` prints one)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"plan: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix it or pick a "
                         "preset") from None
    if not isinstance(data, dict):
        raise UsageError(f"plan: the JSON holds a {type(data).__name__}, not a plan object; pick a preset to start from")
    cache = data.get("cache")
    if isinstance(cache, dict) and cache.get("sim_path"):
        raise UsageError(f"plan: cache.sim_path {cache['sim_path']!r}: the demo reads and writes no files; drop "
                         "sim_path (caching plans are calibrated on the requested image)")
    try:
        return AccelPlan.from_dict(data)
    except PlanError as e:
        raise UsageError(f"plan: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"plan: invalid plan ({msg}); fix the field or pick a preset to start from") from None


# ---------------------------------------------------------------------------------------------- pictures
_HEAT = np.array([[0, 0, 0], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]], dtype=np.float64)


def diff_heatmap(image: Tensor, reference: Tensor, vmax: float = DIFF_VMAX) -> np.ndarray:
    """Where and how much ``image`` differs from ``reference`` ((3, H, W) or (1, 3, H, W) in [0, 1]): the
    mean absolute RGB difference per pixel, 0 … ``vmax`` mapped black → purple → orange → pale yellow, as
    (H, W, 3) uint8. A fixed scale (not the image's own maximum) so two plans' maps compare by eye and an
    identical pair is black, not amplified noise."""
    a, b = image.float().reshape(-1, *image.shape[-3:])[0], reference.float().reshape(-1, *reference.shape[-3:])[0]
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    d = (a - b).abs().mean(0).clamp(0, vmax).div(vmax).cpu().numpy()  # (H, W) in [0, 1]
    pos = d * (len(_HEAT) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_HEAT) - 2)
    t = (pos - lo)[..., None]
    rgb = _HEAT[lo] * (1 - t) + _HEAT[lo + 1] * t
    return rgb.round().clip(0, 255).astype(np.uint8)


def enlarge(array: np.ndarray, min_side: int = DISPLAY_MIN_SIDE) -> np.ndarray:
    """An (H, W, 3) image repeated pixel for pixel to at least ``min_side`` (browsers blur small images when
    they scale them; the 128 px embedded model's tokens stay visible this way)."""
    f = max(1, -(-min_side // max(1, min(array.shape[:2]))))
    return array if f == 1 else np.repeat(np.repeat(array, f, axis=0), f, axis=1)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def scale_time_chart(sizes: list, baseline: dict[str, float], plan: dict[str, float], plan_name: str = "plan",
                     width: int = 760, height: int = 320) -> np.ndarray:
    """Per-scale transformer time, baseline vs plan, as grouped bars in an (H, W, 3) uint8 image.

    Why an image drawn with Pillow: it needs no plotting library (Pillow is a base dependency; matplotlib is
    an extra) and looks the same in every Gradio version. ``sizes``: the schedule's (h, w) per scale;
    ``baseline`` / ``plan``: ``stats["scale_seconds"]`` (scale index as a string -> seconds); a scale the
    plan skips has no entry and is marked "skip".
    """
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    dr = ImageDraw.Draw(img)
    font, small = _font(14), _font(11)
    n = len(sizes)
    left, right, top, bottom = 56, 12, 44, 40
    ms = [1e3 * v for v in list(baseline.values()) + list(plan.values())] or [1.0]
    ymax = max(max(ms), 1e-3) * 1.1
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    dr.line([(x0, y0), (x0, y1), (x1, y1)], fill="#444444")
    for k in range(5):  # horizontal grid and y labels
        v = ymax * k / 4
        y = y1 - (y1 - y0) * k / 4
        if k:
            dr.line([(x0 + 1, y), (x1, y)], fill="#e5e5e5")
        dr.text((x0 - 6, y), f"{v:.0f}" if ymax >= 20 else f"{v:.1f}", fill="#444444", font=small, anchor="rm")
    colors = (("baseline", "#5b7fbf"), (plan_name, "#f28e2b"))
    lx = x0 + 0.35 * (x1 - x0)  # legend near the top centre (Gradio overlays its label and buttons on the corners)
    dr.text((x0 - 6, 22), "ms", fill="#444444", font=small, anchor="rm")
    for label, col in colors:
        dr.rectangle([lx, 16, lx + 12, 28], fill=col)
        dr.text((lx + 16, 22), label, fill="#222222", font=font, anchor="lm")
        lx += dr.textlength(label, font=font) + 34
    slot = (x1 - x0) / max(n, 1)
    bw = max(2.0, slot * 0.36)
    for si, (h, w) in enumerate(sizes):
        cx = x0 + slot * (si + 0.5)
        for j, (secs, (_l, col)) in enumerate(((baseline.get(str(si)), colors[0]), (plan.get(str(si)), colors[1]))):
            bx = cx - bw + j * bw
            if secs is None:
                if j == 1 and baseline.get(str(si)) is not None:
                    dr.text((bx + bw / 2, y1 - 4), "skip", fill=col, font=small, anchor="mb")
                continue
            bh = (y1 - y0) * (1e3 * secs) / ymax
            dr.rectangle([bx, y1 - bh, bx + bw - 1, y1 - 1], fill=col)
        dr.text((cx, y1 + 6), f"{h}x{w}" if h != w else str(h), fill="#444444", font=small, anchor="ma")
    dr.text(((x0 + x1) / 2, height - 6), "scale (tokens per side)", fill="#444444", font=small, anchor="mb")
    return np.asarray(img)


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class BaselineRun:
    """One cached baseline: the decoded image, the transformer time of the plain run (no hooks, as
    ``generate --compare`` and ``bench`` time it) and per-scale times from a run through the engine's
    identity hooks (same images bit for bit; the plain run records no per-scale times)."""

    image: Tensor  # (1, 3, H, W) in [0, 1]
    seconds: float
    scale_seconds: dict[str, float]
    sizes: list
    total_flops: float | None = None
    tokens_total: int | None = None


@dataclass
class DemoResult:
    """Everything one run shows: images as (H, W, 3) uint8 arrays and the numbers as a JSON-able dict."""

    baseline: np.ndarray
    accelerated: np.ndarray
    heatmap: np.ndarray
    chart: np.ndarray
    metrics: dict = field(default_factory=dict)

    def summary(self) -> str:
        """One Markdown line: times, speedup, fidelity, and whether the baseline came from the cache."""
        m = self.metrics
        psnr = "∞ (identical)" if m["psnr"] is None else f"{m['psnr']:.2f} dB"
        cached = " (cached)" if m["baseline_cached"] else ""
        flops = f" | FLOPs {100 * m['flop_ratio']:.0f} %" if m.get("flop_ratio") is not None else ""
        return (f"**{m['plan']}** {m['plan_seconds']:.3f} s vs **baseline** {m['baseline_seconds']:.3f} s{cached} "
                f"→ speedup **{m['speedup']:.2f}×** | PSNR {psnr} | SSIM {m['ssim']:.4f}{flops}  \n"
                "<small>transformer time, decoding excluded; PSNR/SSIM of the plan's image against the "
                f"baseline's; heat map: mean absolute RGB difference, black 0 … pale yellow ≥ {DIFF_VMAX}</small>")


class DemoSession:
    """One loaded pipeline and what the page needs around it: input parsing, the baseline cache, runs.

    Why a class: the baseline of a (model, condition, seed, sampling) does not depend on the plan, so it
    is computed once and kept (LRU, :data:`BASELINE_CACHE_SIZE` entries); editing the plan reruns only the
    plan. Generations are serialised by a lock: the hooks are installed on the shared model, and two
    runs at once would also time each other.
    """

    def __init__(self, pipe: Any, model_name: str | None = None, aspect: str | None = None, pn: str | None = None,
                 cache_size: int = BASELINE_CACHE_SIZE) -> None:
        self.pipe = pipe
        self.model_name = model_name or getattr(pipe, "name", "model")
        self.family = getattr(pipe, "family", "var")
        self.lock = threading.Lock()
        self.cache: OrderedDict[tuple, BaselineRun] = OrderedDict()
        self.cache_size = int(cache_size)
        self.baseline_runs = 0  # plain baseline generations so far (the cache's effect, for tests and logs)
        # A model trained at one fixed schedule (embedded-t2i) has no aspect ratio or pixel budget to choose.
        self.fixed_schedule = getattr(pipe, "fixed_schedule", None) is not None
        self.default_aspect = None if self.fixed_schedule else aspect or getattr(pipe, "aspect", None) or "1:1"
        self.default_pn = None if self.fixed_schedule else pn or getattr(pipe, "pn", None) or "1M"

    # ------------------------------------------------------------------ what the page offers
    @property
    def text_to_image(self) -> bool:
        return self.family != "var"

    @property
    def num_classes(self) -> int | None:
        return None if self.text_to_image else int(self.pipe.model.num_classes)

    def condition_choices(self) -> list[str] | None:
        """Dropdown entries for the class (None: a free number or a prompt box)."""
        return None if self.text_to_image else class_labels(self.num_classes, self.model_name)

    def default_condition(self) -> int | str:
        if self.text_to_image:
            from .cli import DEFAULT_PROMPTS, MODEL_PROMPTS

            return MODEL_PROMPTS.get(self.model_name, DEFAULT_PROMPTS)[0]
        return 0 if self.model_name == "embedded" else min(207, self.num_classes - 1)

    def default_cfg(self) -> float | None:
        cfg = self.pipe.defaults.get("cfg")
        return float(cfg) if isinstance(cfg, (int, float)) else None

    @staticmethod
    def preset_names() -> list[str]:
        """The selector's entries: pruning presets, caching presets, and one combination of both."""
        from .accel.cache_presets import CACHE_PRESETS
        from .accel.presets import PRESETS

        return [n for n in PRESETS if n != "none"] + [n for n in CACHE_PRESETS if n != "no-cache"] + ["fastvar+original"]

    def plan_json(self, plan: str | AccelPlan) -> str:
        """The plan editor's text for a preset name (resolved for this model's schedule and depth, so the
        editor shows the scales it really touches) or a plan."""
        from .eval.compare import resolve_config

        if isinstance(plan, str):
            if plan not in self.preset_names():
                raise UsageError(f"preset {plan!r}: unknown; known presets: {', '.join(self.preset_names())}")
            with self.lock:
                self._set_schedule(self.default_aspect, self.default_pn)
                plan = resolve_config(plan, self.pipe.model)
        return plan.to_json()

    # ------------------------------------------------------------------ parsing
    def parse_request(self, condition: Any, seed: Any, cfg: Any = None, aspect: Any = None, pn: Any = None) -> DemoRequest:
        """Validated inputs (one-line :class:`UsageError` otherwise); nothing runs."""
        cond = parse_condition(condition, self.family, self.num_classes, self.model_name)
        s = validate.seed(_whole_number(seed), "seed")
        if s is None:
            raise UsageError("seed: empty; give a whole number >= 0, e.g. 0")
        g = self.default_cfg() if cfg is None or cfg == "" else float(validate.guidance(cfg, "guidance"))
        a = p = None
        if self.family == "infinity" and not self.fixed_schedule:
            from .pipelines.infinity import resolve_aspect, resolve_pn

            a = str(aspect or self.default_aspect).strip()
            p = str(pn or self.default_pn).strip()
            try:
                resolve_aspect(a)
            except ValueError as e:
                raise UsageError(f"aspect {a!r}: {e}") from None
            try:
                p = resolve_pn(p)
            except ValueError as e:
                raise UsageError(f"pixel budget {p!r}: {e}") from None
        return DemoRequest(cond, s, g, a, p)  # the default guidance spelled out: one cache key for both

    def _set_schedule(self, aspect: str | None, pn: str | None) -> None:
        if self.family == "infinity" and aspect is not None and pn is not None:
            self.pipe.set_schedule(aspect, pn)

    def check_plan(self, plan: AccelPlan) -> None:
        """Resolve ``plan`` against the current schedule and depth: scale refs the schedule lacks, layer
        ranges beyond the depth, cache stages — the plan's own messages, before anything runs."""
        model = self.pipe.model
        try:
            plan.resolve(model.schedule, model.depth)
            if plan.cache is not None:
                plan.cache.resolve_stages(model.schedule)
        except PlanError as e:
            raise UsageError(f"plan: {e}") from None

    # ------------------------------------------------------------------ generation
    def _generate(self, req: DemoRequest, plan: AccelPlan | str | None = None, hooks: Any = None) -> GenerationResult:
        """One latent generation (decoding is done separately and untimed, as ``compare_configs`` does).
        ``hooks``: installed on the model for this call (calibrated caching hooks)."""
        model = self.pipe.model
        prev = model.hooks
        if hooks is not None:
            model.hooks = hooks
        try:
            return self.pipe([req.condition], seed=req.seed, plan=plan, cfg=req.cfg, decode=False)
        finally:
            model.hooks = prev

    def baseline_key(self, req: DemoRequest) -> tuple:
        """What a baseline depends on: model, condition, seed and sampling (guidance, schedule)."""
        return (self.model_name, req.condition, req.seed, req.cfg, req.aspect, req.pn)

    def baseline(self, req: DemoRequest) -> tuple[BaselineRun, bool]:
        """The baseline of ``req`` and whether it came from the cache. Call with the lock held."""
        key = self.baseline_key(req)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key], True
        res = self._generate(req, None)
        self.baseline_runs += 1
        ident = self._generate(req, "identity")
        run = BaselineRun(self.pipe.decode(res.latent), res.seconds, dict(ident.stats.get("scale_seconds") or {}),
                          list(ident.stats.get("sizes") or []), ident.stats.get("total_flops"),
                          ident.stats.get("tokens_total"))
        self.cache[key] = run
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return run, False

    def _run_plan(self, req: DemoRequest, plan: AccelPlan) -> GenerationResult:
        """The plan's generation; a caching plan without similarity data is calibrated on the same request
        first (calibration output equals the baseline; ``fastvar generate --compare-configs`` does the same)."""
        from .eval.run import needs_calibration, prepare_hooks

        if not needs_calibration(plan):
            return self._generate(req, plan)
        hooks = prepare_hooks(self.pipe.model, plan, calibrate=lambda cal: self._generate(req, hooks=cal))
        return self._generate(req, hooks=hooks)

    def run(self, condition: Any, seed: Any, cfg: Any, aspect: Any, pn: Any, plan_text: Any) -> DemoResult:
        """Validate everything, then the baseline (cached) and the plan; images, heat map, chart, numbers.

        Raises :class:`UsageError` (one line) for bad inputs or plans, before any generation starts.
        """
        from .eval.benchmark import psnr_ssim

        req = self.parse_request(condition, seed, cfg, aspect, pn)
        plan = parse_plan_text(plan_text)
        with self.lock:
            self._set_schedule(req.aspect, req.pn)
            self.check_plan(plan)
            base, cached = self.baseline(req)
            try:
                res = self._run_plan(req, plan)
            except PlanError as e:
                raise UsageError(f"plan: {e}") from None
            img = self.pipe.decode(res.latent)
        psnr, ssim = psnr_ssim(img, base.image)
        st = res.stats
        plan_scales = dict(st.get("scale_seconds") or {})
        sizes = base.sizes or list(st.get("sizes") or [])
        metrics = {
            "model": self.model_name, "condition": req.condition, "seed": req.seed,
            "guidance": req.cfg if req.cfg is not None else self.default_cfg(),
            **({"aspect": req.aspect, "pn": req.pn} if self.family == "infinity" else {}),
            "plan": plan.name, "baseline_seconds": base.seconds, "plan_seconds": res.seconds,
            "speedup": base.seconds / max(res.seconds, 1e-9), "psnr": None if psnr == float("inf") else psnr,
            "ssim": ssim, "baseline_cached": cached,
            "tokens_forwarded": st.get("tokens_forwarded"), "tokens_total": base.tokens_total,
            "flop_ratio": (st["total_flops"] / base.total_flops) if st.get("total_flops") and base.total_flops else None,
            "sizes": [list(s) for s in sizes],
            "scale_seconds": {"baseline": base.scale_seconds, "plan": plan_scales},
        }
        base_u8, img_u8 = to_uint8(base.image)[0], to_uint8(img)[0]
        return DemoResult(enlarge(base_u8), enlarge(img_u8), enlarge(diff_heatmap(img, base.image)),
                          scale_time_chart(sizes, base.scale_seconds, plan_scales, plan.name), metrics)

    def warmup(self, plan_text: str) -> DemoResult:
        """Run the default request once untimed (first calls allocate and select kernels, which would make
        the first timing on the page wrong), then for real: the page opens showing this result, and its
        baseline is cached."""
        req = self.parse_request(self.default_condition(), 0, None, None, None)
        plan = parse_plan_text(plan_text)
        with self.lock:
            self._set_schedule(req.aspect, req.pn)
            self.check_plan(plan)
            self._run_plan(req, plan)  # the plan's path runs every kernel the plain one does, and the hooks
        return self.run(req.condition, req.seed, None, req.aspect, req.pn, plan_text)


def error_text(exc: BaseException) -> str:
    """What the page shows for a failed run: the one-line message of a user error; for anything else the
    exception's type and first line (the traceback goes to the server's log, never to the page)."""
    if isinstance(exc, (UsageError, PlanError, ValueError, KeyError)):
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        return str(msg).splitlines()[0] if str(msg) else type(exc).__name__
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"internal error ({type(exc).__name__}{': ' + first if first else ''}); details are in the server log"


# ---------------------------------------------------------------------------------------------- Gradio
def import_gradio() -> Any:
    """Gradio, or a one-line :class:`UsageError` naming the extra that installs it. Analytics are turned
    off first: the demo is meant to run offline and report nothing."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError:
        raise UsageError(GRADIO_MISSING) from None
    return gr


def _kw(fn: Callable, **kwargs: Any) -> dict:
    """Only the keyword arguments ``fn`` accepts: component options differ between Gradio 4, 5 and 6."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def build_app(session: DemoSession, plan_text: str, initial: DemoResult | None = None) -> Any:
    """The page: inputs and plan editor on the left, the two images, heat map, numbers and chart on the
    right. Endpoints (for ``gradio_client``): ``/generate`` (condition, seed, guidance, aspect, pixel
    budget, plan JSON -> baseline, plan image, heat map, summary, chart, details, status) and ``/preset``
    (preset name -> plan JSON)."""
    gr = import_gradio()
    infinity = session.family == "infinity" and not session.fixed_schedule  # aspect / budget choosers
    m = initial.metrics if initial is not None else {}

    def image(label: str, value: Any) -> Any:
        return gr.Image(**_kw(gr.Image.__init__, value=value, label=label, type="numpy", interactive=False,
                              format="png", height=300))

    with gr.Blocks(**_kw(gr.Blocks.__init__, title="fastvar demo", analytics_enabled=False)) as app:
        gr.Markdown(f"## fastvar demo — `{session.model_name}`: baseline and accelerated side by side\n"
                    "Pick a condition and a plan (a preset, or edit its JSON), then **Generate**. The baseline of a "
                    "(model, condition, seed, guidance) is cached: changing only the plan reruns only the plan.")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                choices = session.condition_choices()
                default = m.get("condition", session.default_condition())
                if session.text_to_image:
                    cond = gr.Textbox(value=default, label="prompt", lines=2)
                elif choices is not None:
                    cond = gr.Dropdown(**_kw(gr.Dropdown.__init__, choices=choices, value=choices[int(default)],
                                             label="class", allow_custom_value=True))
                else:
                    cond = gr.Number(value=int(default), label=f"class id (0..{session.num_classes - 1})", precision=0)
                with gr.Row():
                    seed = gr.Number(value=0, label="seed", precision=0)
                    cfg = gr.Number(value=session.default_cfg(), label="guidance (CFG)")
                with gr.Row(visible=infinity):
                    from .schedules_infinity import INFINITY_ASPECTS, INFINITY_PNS

                    aspect = gr.Dropdown(**_kw(gr.Dropdown.__init__, choices=list(INFINITY_ASPECTS),
                                               value=session.default_aspect, label="aspect (W:H)",
                                               allow_custom_value=True))
                    pn = gr.Dropdown(**_kw(gr.Dropdown.__init__, choices=list(INFINITY_PNS), value=session.default_pn,
                                           label="pixel budget", allow_custom_value=True))
                presets = session.preset_names()
                try:
                    start = json.loads(plan_text).get("name")
                except (ValueError, AttributeError):
                    start = None
                preset = gr.Dropdown(**_kw(gr.Dropdown.__init__, choices=presets,
                                           value=start if start in presets else None, label="preset"))
                plan = gr.Code(value=plan_text, language="json", label="plan (JSON; edit freely)", lines=14)
                go = gr.Button("Generate", variant="primary")
                status = gr.Markdown(
                    "Ready: warm-up done; the images show the default condition." if initial is not None else "")
            with gr.Column(scale=5):
                with gr.Row():
                    out_base = image("baseline", initial.baseline if initial else None)
                    out_plan = image("accelerated (plan)", initial.accelerated if initial else None)
                    out_diff = image("difference |plan − baseline|", initial.heatmap if initial else None)
                summary = gr.Markdown(initial.summary() if initial else "")
                chart = image("time per scale (ms): baseline vs plan", initial.chart if initial else None)
                with gr.Accordion("details (JSON)", open=False):
                    details = gr.JSON(value=m or None, label="metrics")

        def on_generate(condition, seed_v, cfg_v, aspect_v, pn_v, plan_v):
            try:
                r = session.run(condition, seed_v, cfg_v, aspect_v, pn_v, plan_v)
            except Exception as e:  # every failure becomes one line on the page, never a traceback
                if not isinstance(e, (UsageError, PlanError, ValueError, KeyError)):
                    traceback.print_exc(file=sys.stderr)
                msg = error_text(e)
                return None, None, None, "", None, {"error": msg}, f"**Error:** {msg}"
            cached = "baseline from the cache, plan rerun" if r.metrics["baseline_cached"] else "baseline and plan run"
            return (r.baseline, r.accelerated, r.heatmap, r.summary(), r.chart, r.metrics, f"Done: {cached}.")

        def on_preset(name):
            try:
                return session.plan_json(name), ""
            except Exception as e:
                return gr.update(), f"**Error:** {error_text(e)}"

        go.click(on_generate, inputs=[cond, seed, cfg, aspect, pn, plan],
                 outputs=[out_base, out_plan, out_diff, summary, chart, details, status], api_name="generate")
        preset.change(on_preset, inputs=[preset], outputs=[plan, status], api_name="preset")
    return app


def serve(session: DemoSession, plan_text: str, port: int = DEFAULT_PORT, share: bool = False,
          block: bool = True, warmup: bool = True) -> Any:
    """Warm up, build the page and start the server on 127.0.0.1:``port`` (a public link only with
    ``share``). ``block=False`` returns the running app (tests, notebooks); close it with ``app.close()``."""
    import_gradio()
    initial = session.warmup(plan_text) if warmup else None
    app = build_app(session, plan_text, initial)
    print(f"fastvar demo: http://{HOST}:{port}/ (Ctrl+C stops it)", file=sys.stderr, flush=True)
    app.launch(server_name=HOST, server_port=port, share=bool(share), prevent_thread_lock=not block, quiet=True)
    return app


def serve_from_args(args: Any) -> int:
    """``fastvar demo``: the same model flags as ``generate`` (checked before anything loads), the pipeline
    built by the command line's own loader, then :func:`serve`."""
    from . import cli

    port = validate.int_at_least(args.port, "--port", 1, "TCP port", DEFAULT_PORT)
    if port > 65535:
        raise UsageError(f"--port {port}: TCP ports end at 65535; e.g. --port {DEFAULT_PORT}")
    spec = cli._spec_for(args)
    cli._family_kwargs(args, spec)
    cli._schedule_for(spec, args)
    start = cli._load_plan(args)
    start = "fastvar" if start in (None, "none") else start  # the page always compares with some plan
    import_gradio()  # after the cheap flag checks, before the (possibly minutes of) model loading
    print(f"fastvar demo: loading {spec.name} …", file=sys.stderr, flush=True)
    pipe = cli._build_pipeline(args, spec)
    session = DemoSession(pipe, spec.name, aspect=args.aspect, pn=args.pn)
    plan_text = session.plan_json(start)
    print("fastvar demo: warming up …", file=sys.stderr, flush=True)
    serve(session, plan_text, port=port, share=args.share)
    return 0


__all__ = [
    "BaselineRun", "DemoRequest", "DemoResult", "DemoSession", "GRADIO_MISSING", "build_app", "class_labels",
    "diff_heatmap", "enlarge", "error_text", "import_gradio", "parse_condition", "parse_plan_text",
    "scale_time_chart", "serve", "serve_from_args",
]
