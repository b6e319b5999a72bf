"""Infinity text-to-image generation: official checkpoints, or random weights for speed measurements.

    pipe = InfinityPipeline.from_pretrained("infinity-2b", weights="infinity_2b_reg.pth",
                                            vae_weights="infinity_vae_d32reg.pth", text_encoder="flan-t5-xl")
    result = pipe(["a red fox in the snow"], seed=0, plan="fastvar")   # result.images: (1, 3, 1024, 1024)

The official release is three things: the transformer (``infinity_2b_reg.pth``: a flat state dict; the
8B models: a folder of shards with an index json), the BSQ-VAE (``infinity_vae_*.pth``, top-level key
``'vae'``) and Flan-T5-XL (``google/flan-t5-xl``). All load unchanged, from local paths or the hub
(``FoundationVision/Infinity``); without network every missing piece fails before anything heavy is
read, with a message naming the option that takes a local copy (``--weights``, ``--vae-weights``,
``--text-encoder``).

``random_init`` builds the released architecture (or a narrower/shallower one) with random weights and
replaces T5 by seeded random features: each prompt seeds its own generator with ``zlib.crc32`` (stable
across processes, unlike ``hash``), so a benchmark needs no download and two runs, machines or plans see
the same input. Without a VAE, ``decode`` maps the latent to [0, 1] with a fixed function (not a
per-batch min-max), so fidelity numbers of two plans are comparable.

Timing (``result.seconds``) covers the transformer's scale loop only: the text encoder and the VAE
decoder do not depend on the plan.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor

from .. import validate
from ..accel import AccelPlan
from ..accel.stats import FlopDims
from ..checkpoints import CheckpointError, check_checkpoint_file, looks_local, read_state_dict
from ..errors import UsageError
from ..models.infinity import INFINITY_MODELS, Infinity, build_infinity, infinity_config, load_infinity_state
from ..schedules import Schedule
from ..schedules_infinity import (
    INFINITY_ASPECTS,
    INFINITY_PNS,
    VAE_STRIDE,
    aspect_to_h_div_w,
    infinity_image_size,
    infinity_schedule,
    nearest_aspect,
    schedule_sizes,
)
from ..text.condition import TextCondition, pack_text_features
from .common import (
    GenerationResult,
    PlanRunner,
    check_arch,
    check_load_args,
    check_sampling_args,
    with_defaults,
)

# Sampling defaults of the official inference (tools/run_infinity_pipeline.py and the 2B notebook: cfg 3,
# tau 0.5, gen_one_img's top_k 900 / top_p 0.97, CFG mixed on the logits); the 8B notebook uses tau 1.0.
INFINITY_DEFAULTS: dict[str, Any] = dict(cfg=3.0, tau=0.5, top_k=900, top_p=0.97, cfg_insertion_layer=0)
_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {"infinity-8b": dict(tau=1.0), "infinity-8b-512": dict(tau=1.0)}

DEFAULT_TEXT_ENCODER = "google/flan-t5-xl"
RANDOM_TEXT_TOKENS = 24  # caption length of the random text features (a typical short prompt in T5 tokens)

# A W:H aspect within this relative distance of a template snaps to it (16:9 -> the 7:4 template, as the
# official scripts snap any h/w to the nearest template); anything farther is an error listing the templates.
ASPECT_SNAP_TOLERANCE = 0.05

_HUB_ID = re.compile(r"([\w.-]+/[\w.-]+)(?::([\w./-]+))?")
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


# ----------------------------------------------------------------------------------------- options


def _arch_name(name: str) -> str:
    """The INFINITY_MODELS key of a registry name ("infinity" is the 2B model)."""
    key = "infinity-2b" if name == "infinity" else name
    if key not in INFINITY_MODELS:
        known = sorted(k for k in INFINITY_MODELS if k.startswith("infinity-"))
        raise UsageError(f"name={name!r}: unknown Infinity model; known: {', '.join(known)}")
    return key


def resolve_aspect(aspect: str | float) -> float:
    """The official template key (h/w) of ``aspect``: a ``"W:H"`` string, or a float h/w.

    Non-template ratios within :data:`ASPECT_SNAP_TOLERANCE` snap to the nearest template (the released
    models only know the templates); farther ones raise a ValueError that lists the valid aspects.
    """
    valid = ", ".join(INFINITY_ASPECTS)
    if isinstance(aspect, str) and aspect.strip() in INFINITY_ASPECTS:
        return INFINITY_ASPECTS[aspect.strip()]
    try:
        r = aspect_to_h_div_w(aspect)
    except (TypeError, ValueError):
        raise ValueError(f"aspect {aspect!r} is not a ratio; give W:H, one of {valid}") from None
    if not math.isfinite(r) or r <= 0:
        raise ValueError(f"aspect {aspect!r} must be a positive ratio; give W:H, one of {valid}")
    key = nearest_aspect(r)
    if abs(key - r) / r > ASPECT_SNAP_TOLERANCE:
        raise ValueError(
            f"aspect {aspect!r} (h/w {r:.3f}) is too far from every Infinity template; valid aspects (W:H): {valid}"
        )
    return key


def resolve_pn(pn: str) -> str:
    """The canonical pixel-budget name (case-insensitive; "0.6M" = "0.60M"); a ValueError lists the valid ones."""
    s = str(pn).strip().upper()
    s = {"0.6M": "0.60M"}.get(s, s)
    for p in INFINITY_PNS:
        if p.upper() == s:
            return p
    raise ValueError(f"pixel budget {pn!r} is not supported; choose one of {', '.join(INFINITY_PNS)}")


def random_text_features(prompts: Sequence[str], tokens: int, channels: int) -> TextCondition:
    """Packed (B captions x ``tokens`` rows, ``channels``) N(0, 1) features standing in for T5's output.

    Each prompt seeds its own generator with ``zlib.crc32`` of its UTF-8 bytes, so a prompt always maps to
    the same features (in any batch, process or machine) and a list of prompts is reproducible.
    """
    feats = []
    for p in prompts:
        g = torch.Generator().manual_seed(zlib.crc32(p.encode("utf-8")))
        feats.append(torch.randn(tokens, channels, generator=g))
    x = torch.stack(feats)
    return pack_text_features(x, torch.ones(x.shape[:2], dtype=torch.bool))


def _check_sizes(text_tokens: Any, over: dict[str, Any]) -> None:
    """``text_tokens`` and the integer architecture overrides: whole numbers >= 1 (before anything is built)."""
    check_arch(text_tokens=text_tokens, **{k: over[k] for k in ("depth", "embed_dim", "num_heads", "text_channels",
                                                                "block_chunks", "text_maxlen") if k in over})


def _check_insertion_layer(layer: Any, depth: int) -> None:
    """``cfg_insertion_layer``: None (default), 0/1 (mix the logits) or a negative block offset > -depth, or a list."""
    if layer is None:
        return
    items = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    for item in items:
        v = validate.whole(item, "cfg_insertion_layer")
        if not (v in (0, 1) or -depth < v < 0):
            raise validate.fail("cfg_insertion_layer", layer, f"use 0/1 (logits) or a negative block offset above "
                                f"-{depth} (the model has {depth} blocks)", "e.g. cfg_insertion_layer=0")


# ----------------------------------------------------------------------------------------- files


def _hub_parts(ref: str) -> tuple[str, str | None] | None:
    m = _HUB_ID.fullmatch(ref)
    if m is None or ref.startswith((".", "/", "~")):
        return None
    return m.group(1), m.group(2)


def _shard_index(folder: Path) -> Path | None:
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.index.json"))
    return found[0] if found else None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether one TCP connection to the hub endpoint opens within ``timeout`` seconds.

    Without network huggingface_hub retries a failed request with backoff for ~25 s before it gives up;
    this check fails in milliseconds, so an offline run stops at once with the option to pass. With a
    proxy configured the direct connection says nothing, so it is skipped (True).
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        raise ImportError("downloading from the hub needs `pip install huggingface_hub`; or pass local paths") from None

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_checkpoint(ref: str | Path, default_name: str | None, flag: str, what: str) -> Path:
    """A checkpoint file, or a folder of shards, from a local path or ``owner/repo[:name]`` on the hub.

    A local folder may hold ``default_name`` (e.g. a weights folder with every release file) or be a
    shard folder itself. Hub files are fetched with ``hf_hub_download``, hub folders (the 8B shards) with
    ``snapshot_download``; every failure names ``flag`` so an offline user knows what to pass.
    """
    p = Path(ref).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if default_name and (p / default_name).exists():
            return p / default_name
        if _shard_index(p) is not None:
            return p
        raise FileNotFoundError(
            f"{flag} {p}: the folder holds neither {default_name!r} nor a shard index (*.index.json); "
            f"pass {what} itself"
        )
    s = str(ref)
    hub = None if looks_local(ref) else _hub_parts(s)
    if hub is None:
        raise FileNotFoundError(f"{flag} {s!r}: no such file or folder, and not a hub id (owner/repo:file); "
                                f"pass the local path of {what}")
    repo, name = hub[0], hub[1] or default_name
    if not name:
        raise ValueError(f"{flag} {s!r}: a hub id needs a file name: {repo}:<file>")
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:
        raise ImportError(
            f"downloading from the hub needs `pip install huggingface_hub`; or pass a local path with {flag}"
        ) from None

    def fetch(local_only: bool) -> Path:
        if name.endswith(_FILE_SUFFIXES):
            return Path(hf_hub_download(repo_id=repo, filename=name, etag_timeout=5, local_files_only=local_only))
        out = Path(snapshot_download(repo_id=repo, allow_patterns=[f"{name.rstrip('/')}/*"], etag_timeout=5,
                                     local_files_only=local_only)) / name
        if local_only and not out.is_dir():  # a cached snapshot of other files of the repo
            raise FileNotFoundError(out)
        return out

    hint = (f"Without network, download it elsewhere (https://huggingface.co/{repo}) and pass the local path with "
            f"{flag} /path/to/{name}")
    try:
        out = fetch(local_only=True)  # the local hub cache: no network involved
    except Exception:  # noqa: BLE001 - not cached (the hub's error types vary by version)
        if not hub_reachable():
            raise ConnectionError(f"{name} ({what}) is not in the local hub cache and the hub is unreachable. {hint}") from None
        try:
            out = fetch(local_only=False)
        except Exception as e:  # noqa: BLE001 - network and hub errors come in many types
            first = str(e).splitlines()[0][:200] if str(e) else ""
            raise ConnectionError(
                f"could not fetch {name} ({what}) from the hub repo {repo} ({type(e).__name__}: {first}). {hint}"
            ) from None
    if not out.exists():
        raise FileNotFoundError(f"the hub repo {repo} has no {name!r} ({flag})")
    return out


def _shard_files(path: Path, flag: str = "--weights") -> list[Path]:
    """The shard files of a checkpoint folder (from its index, else every checkpoint file in it)."""
    index = _shard_index(path)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{flag} {path}: {index.name} is not a valid shard index ({type(e).__name__}); "
                             "re-download the folder") from None
    else:
        shards = sorted(f.name for f in path.iterdir() if f.suffix in _FILE_SUFFIXES)
    if not shards:
        raise FileNotFoundError(f"{flag} {path}: the folder holds no checkpoint shards; pass the checkpoint itself")
    return [path / n for n in shards]


def check_weight_files(path: Path, flag: str = "--weights") -> None:
    """Headers of a checkpoint file or of every shard of a folder, checked before anything is built or loaded."""
    for f in _shard_files(path, flag) if path.is_dir() else [path]:
        check_checkpoint_file(f, flag)


def read_infinity_weights(path: Path, flag: str = "--weights") -> dict[str, Tensor]:
    """A flat transformer state dict from one file or a folder of shards (merged; tensors are not copied)."""
    if not path.is_dir():
        return read_state_dict(path, flag=flag)
    sd: dict[str, Tensor] = {}
    for f in _shard_files(path, flag):
        sd.update(read_state_dict(f, flag=flag))
    return sd


def load_text_encoder(ref: Any, max_length: int, device: torch.device) -> Any:
    """A :class:`~fastvar.text.t5.T5TextEncoder` from an instance, a local folder or a hub id.

    Anything that is not a path or a string is used as is (an encoder object: prompts -> TextCondition).
    A hub id is tried from the local cache first, so a cached model loads offline without a network wait.
    """
    from ..text.t5 import T5TextEncoder

    if not isinstance(ref, (str, Path)):
        return ref
    p = Path(ref).expanduser()
    s = str(ref)
    if not p.is_dir() and _hub_parts(s) is None:
        raise FileNotFoundError(f"--text-encoder {s!r}: no such folder, and not a hub id; pass the local folder of "
                                f"Flan-T5 (config.json, tokenizer files, weights; e.g. a clone of {DEFAULT_TEXT_ENCODER})")
    src = str(p) if p.is_dir() else s
    try:
        try:
            return T5TextEncoder.from_pretrained(src, device=device, max_length=max_length, local_files_only=True)
        except OSError:
            if p.is_dir():
                raise
            if not hub_reachable():
                raise OSError("not in the local hub cache and the hub is unreachable") from None
            return T5TextEncoder.from_pretrained(src, device=device, max_length=max_length)
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError offline, ValueError for a broken folder, ...
        first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise ConnectionError(
            f"could not load the T5 text encoder {s!r} ({first}). Pass a local folder with --text-encoder "
            f"(e.g. a clone of https://huggingface.co/{DEFAULT_TEXT_ENCODER})"
        ) from None


# ----------------------------------------------------------------------------------------- pipeline


class InfinityPipeline:
    """An Infinity transformer, optionally its BSQ-VAE, and a text encoder (None: seeded random features)."""

    family = "infinity"

    def __init__(self, model: Infinity, name: str = "infinity-2b", vae: Any = None, text_encoder: Any = None,
                 aspect: str | float = "1:1", pn: str = "1M", text_tokens: int | None = None,
                 defaults: dict[str, Any] | None = None, schedule: Schedule | Sequence | None = None) -> None:
        """``vae``: a :class:`~fastvar.tokenizers.bsq.BSQVAE` (or anything with ``decode(latent) -> [-1, 1]``);
        ``text_tokens``: caption length of the random features used without a text encoder; ``schedule``: a
        fixed custom schedule (e.g. a small trained model's) instead of the official (aspect, pn) templates."""
        self.model, self.name, self.vae, self.text_encoder = model, name, vae, text_encoder
        self.text_tokens = min(RANDOM_TEXT_TOKENS, model.cfg.text_maxlen) if text_tokens is None else int(text_tokens)
        if not 1 <= self.text_tokens <= model.cfg.text_maxlen:
            raise ValueError(f"text_tokens must be in 1..{model.cfg.text_maxlen} (the model's text_maxlen), "
                             f"got {self.text_tokens}")
        self.defaults = dict(INFINITY_DEFAULTS, **_MODEL_DEFAULTS.get(name, {}))
        self.defaults.update(defaults or {})
        self._cross_len = float(self.text_tokens)
        self.fixed_schedule = None if schedule is None else Schedule(schedule_sizes(schedule))
        if self.fixed_schedule is not None:
            h, w = self.fixed_schedule.sizes[-1]
            self.aspect, self.h_div_w, self.pn = f"{w}:{h}", h / w, "fixed"
            self.schedule = self.model.schedule = self.fixed_schedule
        else:
            self.set_schedule(aspect, pn)
        model.flop_dims = self._flop_dims  # stats need the dims; the backbone file stays method-agnostic

    def set_schedule(self, aspect: str | float = "1:1", pn: str = "1M") -> Schedule:
        """Choose the aspect ratio and pixel budget of the next generations (see :func:`resolve_aspect`)."""
        if self.fixed_schedule is not None:
            if (aspect, pn) != (self.aspect, self.pn):
                raise ValueError(f"{self.name} generates at one fixed schedule {list(self.fixed_schedule.sizes)}; "
                                 "aspect and pixel budget do not apply")
            return self.schedule
        key, pn = resolve_aspect(aspect), resolve_pn(pn)
        self.aspect, self.h_div_w, self.pn = aspect, key, pn
        self.schedule = infinity_schedule(key, pn)
        self.model.schedule = self.schedule  # presets read the schedule from the model
        return self.schedule

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) in pixels of the decoded images."""
        if self.fixed_schedule is not None:
            stride = getattr(self.vae, "stride", VAE_STRIDE)
            h, w = self.fixed_schedule.sizes[-1]
            return h * stride, w * stride
        return infinity_image_size(self.h_div_w, self.pn)

    def _flop_dims(self) -> FlopDims:
        c = self.model.cfg
        return FlopDims(width=c.embed_dim, ffn_hidden=c.mlp_hidden, ffn_mats=2, vocab_out=c.vocab,
                        cross_len=max(1, round(self._cross_len)), branches=("attn", "cross", "ffn"))

    # ------------------------------------------------------------------ construction
    @classmethod
    def random_init(cls, name: str = "infinity-2b", device: torch.device | str | None = None,
                    dtype: str | torch.dtype = "fp32", seed: int = 0, aspect: str | float = "1:1", pn: str = "1M",
                    text_tokens: int | None = None, **overrides: Any) -> InfinityPipeline:
        """The released architecture (or a reduced one: ``depth``, ``embed_dim``, ``num_heads``,
        ``text_channels`` ...) with random weights, no VAE and random text features: for speed measurements.

        A ``depth`` that the released ``block_chunks`` does not divide uses one chunk (chunks only name
        checkpoint keys). None values mean "the model's default".
        """
        arch = _arch_name(name)
        device, dt = check_load_args(device, dtype, seed)
        resolve_aspect(aspect)  # options before the (possibly multi-GB) random model is built
        resolve_pn(pn)
        over = {k: v for k, v in overrides.items() if v is not None}
        _check_sizes(text_tokens, over)
        if "depth" in over and "block_chunks" not in over:
            chunks = infinity_config(arch).block_chunks
            over["block_chunks"] = chunks if over["depth"] % chunks == 0 else 1
        model = build_infinity(arch, device=device, dtype=dt, seed=seed, **over)
        return cls(model, arch, None, None, aspect, pn, text_tokens)

    @classmethod
    def from_pretrained(cls, name: str = "infinity-2b", weights: str | Path | None = None,
                        vae_weights: str | Path | None = None, text_encoder: Any = None,
                        device: torch.device | str | None = None, dtype: str | torch.dtype = "fp32",
                        aspect: str | float = "1:1", pn: str = "1M", vae_config: Any = None,
                        text_tokens: int | None = None, **overrides: Any) -> InfinityPipeline:
        """The official transformer, BSQ-VAE and Flan-T5, from local paths or hub ids (``owner/repo:file``).

        ``weights``: ``infinity_2b_reg.pth`` (or a folder holding it, or an 8B shard folder);
        ``vae_weights``: ``infinity_vae_*.pth``; ``text_encoder``: a Flan-T5 folder, hub id or encoder object.
        Each defaults to the registry's hub location. ``overrides`` change the architecture (config fields,
        e.g. ``depth``) and ``vae_config`` (a BSQVAEConfig, its kwargs, or a released VAE name) the VAE, for
        fine-tuned or custom checkpoints. The transformer is cast to ``dtype``; the VAE stays float32.
        """
        from ..models.registry import get_spec
        from ..tokenizers.bsq import BSQVAE, BSQVAEConfig, bsq_vae_config, load_bsq_vae_state

        arch = _arch_name(name)
        spec = get_spec(arch)
        device, dt = check_load_args(device, dtype)
        over = {k: v for k, v in overrides.items() if v is not None}
        _check_sizes(text_tokens, over)
        cfg = infinity_config(arch, **over)
        if isinstance(vae_config, BSQVAEConfig):
            vcfg = vae_config
        elif isinstance(vae_config, dict):
            vcfg = BSQVAEConfig(**vae_config)
        else:
            vcfg = bsq_vae_config(vae_config or INFINITY_MODELS[arch]["vae"])
        bits = vcfg.codebook_dim * (4 if cfg.apply_spatial_patchify else 1)
        if bits != cfg.d_vae:
            raise ValueError(f"the VAE has {vcfg.codebook_dim}-bit codes ({bits} per token) but the transformer "
                             f"predicts d_vae={cfg.d_vae}; pass a matching vae_config or d_vae")
        # The schedule first (cheap), then every file: a bad option or a missing file fails before any loading.
        resolve_aspect(aspect)
        resolve_pn(pn)
        wref = weights if weights is not None else spec.weights
        if wref is None:
            raise FileNotFoundError(f"{arch} has no released checkpoint; pass the transformer weights with --weights")
        wname = spec.weights.partition(":")[2] if spec.weights else None
        vname = spec.vae_weights.partition(":")[2] if spec.vae_weights else None
        wpath = resolve_checkpoint(wref, wname, "--weights", "the Infinity transformer checkpoint")
        vpath = resolve_checkpoint(vae_weights if vae_weights is not None else spec.vae_weights, vname,
                                   "--vae-weights", "the BSQ-VAE checkpoint")
        check_weight_files(wpath, "--weights")  # intact headers before the text model or transformer load
        check_weight_files(vpath, "--vae-weights")
        enc = load_text_encoder(text_encoder if text_encoder is not None else (spec.text_encoder or DEFAULT_TEXT_ENCODER),
                                cfg.text_maxlen, device)

        with torch.device("meta"):
            model = Infinity(cfg)
        model = model.to_empty(device="cpu")
        model.reset_parameters()  # cfg_uncond rows a shorter checkpoint lacks keep a defined value
        try:
            load_infinity_state(model, read_infinity_weights(wpath, "--weights"))
        except CheckpointError as e:
            raise e if "--weights" in str(e) else CheckpointError(f"--weights {wpath}: {e}") from None
        with torch.random.fork_rng(devices=[]):
            vae = BSQVAE(vcfg)
        try:
            load_bsq_vae_state(vae, vpath)
        except CheckpointError as e:
            raise e if "--vae-weights" in str(e) else CheckpointError(f"--vae-weights {vpath}: {e}") from None
        model = model.to(device=device, dtype=dt).eval()
        pipe = cls(model, arch, vae.eval().to(device), enc, aspect, pn, text_tokens)
        pipe.check_text_encoder()
        return pipe

    def check_text_encoder(self) -> None:
        """Fail at load time, not at the first prompt, when the text model does not fit the transformer."""
        width = getattr(self.text_encoder, "channels", None)
        if width is not None and width != self.model.cfg.text_channels:
            raise ValueError(f"--text-encoder gives {width}-wide features but the transformer expects text_channels "
                             f"{self.model.cfg.text_channels} (released Infinity models use Flan-T5-XL: 2048)")

    # ------------------------------------------------------------------ generation
    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode_prompts(self, prompts: Sequence[str]) -> TextCondition:
        """Packed text condition of ``prompts`` on the model device (T5, or seeded random features)."""
        if self.text_encoder is None:
            cond = random_text_features(prompts, self.text_tokens, self.model.cfg.text_channels)
        else:
            cond = self.text_encoder(list(prompts))
        return cond.to(self.device)

    @staticmethod
    def check_prompts(conditions: Sequence[str] | str) -> list[str]:
        """One or more non-blank prompt strings (a single string is one prompt); one UsageError line otherwise."""
        return validate.prompts(conditions, "conditions", "Infinity")

    def __call__(self, conditions: Sequence[str], seed: int | None = 0, plan: AccelPlan | str | None = None,
                 cfg: float | None = None, top_k: int | None = None, top_p: float | None = None, record: bool = False,
                 decode: bool = True, tau: float | None = None, negative_prompt: str | None = None,
                 cfg_insertion_layer: int | None = None) -> GenerationResult:
        """One image per prompt; None options take ``self.defaults`` (the official ones).

        ``seed`` seeds the bit sampler (one draw per executed scale, as the official code; None = the
        global RNG). ``negative_prompt`` replaces the learned unconditional caption in the CFG batch.
        ``decode=False`` returns only the summed codes ``result.latent`` (B, d, H/16, W/16).
        """
        prompts = self.check_prompts(conditions)
        check_sampling_args(seed, plan, cfg, top_k, top_p, record=record, decode=decode, cfg_per_scale=True)
        validate.temperature(tau, "tau", per_scale=True)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise validate.fail("negative_prompt", negative_prompt, "expected a string or None",
                                "e.g. negative_prompt='blurry'")
        _check_insertion_layer(cfg_insertion_layer, self.model.depth)
        d = self.defaults
        cfg, tau, top_k, top_p, layer = with_defaults(d, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p,
                                                      cfg_insertion_layer=cfg_insertion_layer)
        B = len(prompts)
        with torch.inference_mode():
            text = self.encode_prompts(prompts)
            neg = self.encode_prompts([negative_prompt] * B) if negative_prompt else None
        self._cross_len = sum(text.lens) / len(text.lens)
        sizes = self.schedule.sizes

        def run() -> Any:
            with torch.inference_mode():
                return self.model.autoregressive_infer(
                    text, sizes, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, g_seed=seed, cfg_insertion_layer=layer,
                    negative_text=neg,
                )

        out, secs, stats, hooks = PlanRunner(self.model).run(run, plan, B, sizes, record)
        stats["hooks"] = hooks if record else None
        stats["executed_scales"] = list(out.executed)
        latent = out.summed_codes
        return GenerationResult(self.decode(latent) if decode else None, secs, stats, latent=latent)

    def decode(self, latent: Tensor) -> Tensor:
        """Summed codes -> (N, 3, H, W) in [0, 1], float32, CPU: the BSQ-VAE decoder, or without one (random
        init) a fixed map of the first three latent channels at latent resolution, identical for every plan."""
        if self.vae is not None:
            with torch.inference_mode():
                img = self.vae.decode(latent.to(self.device)).float().clamp(-1, 1)
            return img.add(1).mul(0.5).cpu()
        x = latent.float()
        x = x[:, :3] if x.shape[1] >= 3 else x.repeat(1, 3, 1, 1)[:, :3]
        return torch.sigmoid(x * math.sqrt(latent.shape[1]) / 4).cpu()
