"""HART text-to-image generation: official folders, or random weights for speed measurements.

    pipe = HARTPipeline.from_pretrained("hart-0.7b", weights="hart-0.7b-1024px",
                                        text_encoder="Qwen2-VL-1.5B-Instruct")
    result = pipe(["a red fox in the snow"], seed=0, plan="fastvar")

The official release is two things: the ``hart-0.7b-1024px`` folder (``llm/`` = transformer config +
weights + ``ema_model.bin``, ``tokenizer/`` = the hybrid tokenizer) and a Qwen2 text model
(``mit-han-lab/Qwen2-VL-1.5B-Instruct``, the README's download). Both load unchanged.

``random_init`` builds the same architecture (or a narrower/shallower one) with random weights and
replaces Qwen2 by seeded random features: a benchmark then needs no download, and the features of a
prompt depend on the prompt alone (``zlib.crc32``), so two runs, machines or plans see the same input.
Without a tokenizer, ``decode`` maps the latent to [0, 1] with a fixed function (not per-image min-max),
so fidelity numbers of two plans are comparable.

Timing (``result.seconds``) covers the transformer and the residual diffusion head, not the text
encoder and not the tokenizer's decoder: neither depends on the plan.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import validate
from ..accel import AccelPlan
from ..checkpoints import check_checkpoint_file
from ..errors import UsageError
from ..models.hart import HART, HARTConfig, hart_config
from ..sampling import make_generator
from .common import (
    GenerationResult,
    PlanRunner,
    check_arch,
    check_load_args,
    check_sampling_args,
    resolve_dtype,
    with_defaults,
)

HART_DEFAULTS: dict[str, Any] = dict(
    cfg=4.5,  # sample.py / app.py default
    top_k=None,  # None = the released schedule: 600 for scales 0-6, 300 after (the official sampler ignores top_k)
    top_p=0.0,  # autoregressive_infer_cfg's default; the scripts do not pass one
    more_smooth=True,  # sample.py / app.py default (Gumbel-smoothed code embeddings)
    diffusion_steps="8",  # num_sampling_steps of the released llm/config.json (the model reads it from its config)
)

_HUB_ID = re.compile(r"([\w.-]+/[\w.-]+)(?::([\w./-]+))?")


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _check_square(aspect: str | None, pn: str | None) -> None:
    """HART-0.7B generates 1024x1024 only; refuse other aspect/pixel settings instead of ignoring them."""
    if aspect not in (None, "1:1"):
        raise ValueError(f"HART generates square images only; --aspect {aspect} is not available (use 1:1)")
    if pn not in (None, "1M"):
        raise ValueError(f"HART has one schedule (1024x1024, '1M'); --pn {pn} is not available")


def _hart_name(name: Any) -> str:
    """A HART model name of the registry; one UsageError line listing the known names otherwise."""
    if name not in ("hart-0.7b", "hart-0.7b-1024px", "hart"):
        raise UsageError(f"name={name!r}: not a HART model; known: hart-0.7b (alias hart)")
    return "hart-0.7b" if name in ("hart", "hart-0.7b-1024px") else name


def _check_weight_files(folder: Path, flag: str) -> None:
    """Headers of the weight files ``read_hf_weights`` will read from ``folder`` (and ``ema_model.bin``), checked
    before anything is built: a truncated download fails here, not after the tokenizer and text model load."""
    files = [folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).exists()]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file() and not files:
            import json

            try:
                names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as e:
                raise UsageError(f"{flag} {folder}: {index} is not a valid shard index ({type(e).__name__}); "
                                 "re-download the folder") from None
            files += [folder / n for n in names]
    if (folder / "ema_model.bin").exists():
        files.append(folder / "ema_model.bin")
    for f in files:
        check_checkpoint_file(f, flag)


def random_context(prompts: Sequence[str], tokens: int, channels: int) -> tuple[Tensor, Tensor]:
    """(features (B, tokens, channels), position ids (B, tokens)) standing in for Qwen2's output.

    Each prompt seeds its own generator with ``zlib.crc32`` (stable across processes, unlike ``hash``).
    Valid length = the prompt's word count (at least 1, at most ``tokens``): the ids are
    ``cumsum(mask) - 1`` as the official ``encode_prompts`` computes them, so the image RoPE offset
    varies with the prompt as it does with real text.
    """
    feats, pos = [], []
    for p in prompts:
        g = torch.Generator().manual_seed(zlib.crc32(p.encode("utf-8")))
        feats.append(torch.randn(tokens, channels, generator=g))
        n = min(tokens, max(1, len(p.split())))
        mask = torch.arange(tokens) < n
        pos.append(torch.cumsum(mask.long(), 0) - 1)
    return torch.stack(feats), torch.stack(pos)


def _resolve_folder(ref: str | Path, flag: str, what: str, patterns: Sequence[str] | None = None) -> Path:
    """A local folder, or ``owner/repo[:subfolder]`` fetched with huggingface_hub (fails fast offline).

    The error names ``flag`` so a user without network knows which option takes the local copy.
    """
    p = Path(ref).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise FileNotFoundError(f"{flag} {ref}: {what} is a folder, not a file; pass the folder")
    s = str(ref)
    m = _HUB_ID.fullmatch(s)
    if m is None or s.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{flag} {ref!r}: no such folder, and not a hub id (owner/repo[:subfolder]); "
                                f"pass the local folder holding {what}")
    repo, sub = m.group(1), m.group(2)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"fetching {repo} needs `pip install huggingface_hub`; or pass a local folder with {flag}") from None
    allow = [f"{sub.rstrip('/')}/*"] if sub else (list(patterns) if patterns else None)
    try:
        root = Path(snapshot_download(repo_id=repo, allow_patterns=allow, etag_timeout=5))
    except Exception as e:  # noqa: BLE001 - network and hub errors come in many types
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise ConnectionError(
            f"could not fetch {what} from the hub repo {repo} ({type(e).__name__}: {first}). "
            f"Without network, clone https://huggingface.co/{repo} elsewhere and pass the local folder with {flag}"
        ) from None
    out = root / sub if sub else root
    if not out.is_dir():
        raise FileNotFoundError(f"the hub repo {repo} has no folder {sub!r} ({flag})")
    return out


def _llm_dir(root: Path) -> Path:
    """``<root>/llm`` (the checkpoint folder) or ``root`` itself (what the official --model_path names)."""
    for d in (root / "llm", root):
        if (d / "config.json").is_file():
            return d
    raise FileNotFoundError(
        f"--weights {root}: not a HART checkpoint folder (expected {root}/llm/config.json; pass the clone of "
        "https://huggingface.co/mit-han-lab/hart-0.7b-1024px or its llm/ subfolder)"
    )


def load_text_encoder(ref: Any, max_length: int, device: torch.device) -> Any:
    """A :class:`~fastvar.text.qwen2.Qwen2TextEncoder` from an instance, a local folder or a hub id.

    A hub id is fetched with huggingface_hub first (weights as safetensors, else .bin): transformers'
    own download retries for about a minute without network, which is not failing fast.
    """
    from ..text.qwen2 import Qwen2TextEncoder

    if not isinstance(ref, (str, Path)):
        return ref  # an encoder object (anything callable on prompts returning a HARTContext)
    what = "the Qwen2 text model (config.json, tokenizer files, weights)"
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        folder = _resolve_folder(ref, "--text-encoder", what, patterns=["*.json", "*.txt", "*.model", "*.safetensors"])
        if not any(folder.glob("*.safetensors")):
            folder = _resolve_folder(ref, "--text-encoder", what, patterns=["*.bin"])
    try:
        return Qwen2TextEncoder.from_pretrained(str(folder), device=device, max_length=max_length, local_files_only=True)
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError for missing files, ValueError for a broken config, ...
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise OSError(f"--text-encoder {ref}: could not load {what} from {folder} ({msg})") from None


class HARTPipeline:
    """A HART transformer, its tokenizer (or only the quantizer for benchmarks) and a text encoder."""

    family = "hart"

    def __init__(self, model: HART, tokenizer: Any, name: str = "hart-0.7b", text_encoder: Any = None,
                 dtype: str | torch.dtype = "fp32", defaults: dict[str, Any] | None = None) -> None:
        """``tokenizer``: a :class:`~fastvar.tokenizers.hart_tokenizer.HARTTokenizer`, or any module with the
        ``quantize`` the sampling loop needs (random init). ``text_encoder`` None = seeded random features."""
        self.model, self.tokenizer, self.name, self.text_encoder = model, tokenizer, name, text_encoder
        self.dtype = resolve_dtype(dtype)
        self.defaults = dict(HART_DEFAULTS, diffusion_steps=model.config.num_sampling_steps)
        self.defaults.update(defaults or {})

    # ------------------------------------------------------------------ construction
    @classmethod
    def random_init(cls, name: str = "hart-0.7b", device: torch.device | str | None = None, dtype: str = "fp32",
                    seed: int = 0, text_tokens: int | None = None, depth: int | None = None, embed_dim: int | None = None,
                    num_heads: int | None = None, text_channels: int | None = None, tokenizer: bool = False,
                    aspect: str | None = None, pn: str | None = None, **overrides: Any) -> HARTPipeline:
        """The released architecture (or a reduced one) with random weights, for speed measurements.

        ``text_tokens`` / ``text_channels`` set the text prefix length and width (300 / 1536 by default);
        ``embed_dim`` without ``num_heads`` keeps the released head size of 64. Other HARTConfig fields
        (``diff_width``, ``diff_depth``, ``patch_nums`` ...) pass through ``overrides``; None means "the
        model's default". ``tokenizer=True`` also builds the full random tokenizer (to decode pixels);
        by default only its quantizer exists (codebook + Phi convs, all the sampling loop needs).
        Weights come from ``seed`` without touching the global RNG.
        """
        _hart_name(name)
        device, _ = check_load_args(device, dtype, seed)
        _check_square(aspect, pn)
        check_arch(text_tokens=text_tokens, depth=depth, embed_dim=embed_dim, num_heads=num_heads,
                   text_channels=text_channels, **{k: v for k, v in overrides.items()
                                                   if k in ("diff_width", "diff_depth") and v is not None})
        over = _drop_none(dict(context_token=text_tokens, depth=depth, embed_dim=embed_dim, num_heads=num_heads,
                               context_dim=text_channels, **overrides))
        if embed_dim is not None and num_heads is None:
            over["num_heads"] = max(1, embed_dim // 64)
        cfg = hart_config(name, **over)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = HART(cfg)
            tok = _random_tokenizer(cfg, full=tokenizer)
        return cls(model.eval().to(device), tok.eval().to(device), name, None, dtype)

    @classmethod
    def from_pretrained(cls, name: str = "hart-0.7b", weights: str | Path | None = None,
                        vae_weights: str | Path | None = None, text_encoder: Any = None,
                        device: torch.device | str | None = None, dtype: str = "fp32", use_ema: bool = True,
                        **kwargs: Any) -> HARTPipeline:
        """The official folders: ``weights`` = ``hart-0.7b-1024px`` (or its ``llm/``), ``vae_weights`` = its
        ``tokenizer/`` (default: next to ``llm/``, else the hub), ``text_encoder`` = the Qwen2 folder, hub id
        or an encoder object. Each may be a local folder or ``owner/repo[:subfolder]``.

        ``use_ema`` loads ``llm/ema_model.bin`` over the weights when present, as the official scripts do.
        Architecture overrides are refused (the checkpoint defines the architecture).
        """
        from ..models.hart import load_hart_folder
        from ..models.registry import get_spec

        spec = get_spec(_hart_name(name))
        device, _ = check_load_args(device, dtype)
        validate.flag_bool(use_ema, "use_ema")
        _check_square(kwargs.pop("aspect", None), kwargs.pop("pn", None))
        arch = _drop_none(kwargs)
        if arch:
            raise ValueError(f"{sorted(arch)} change the architecture, which the checkpoint defines; they apply to "
                             "--random-init only")
        root = _resolve_folder(weights or spec.weights, "--weights", "the HART checkpoint (llm/)")
        llm = _llm_dir(root)
        if vae_weights is not None:
            tok_dir = _resolve_folder(vae_weights, "--vae-weights", "the HART tokenizer folder")
        elif (llm.parent / "tokenizer" / "config.json").is_file():
            tok_dir = llm.parent / "tokenizer"
        else:
            tok_dir = _resolve_folder(spec.vae_weights, "--vae-weights", "the HART tokenizer folder")
        if not (tok_dir / "config.json").is_file():
            raise FileNotFoundError(f"--vae-weights {tok_dir}: no config.json (expected the tokenizer/ folder of "
                                    "https://huggingface.co/mit-han-lab/hart-0.7b-1024px)")
        _check_weight_files(llm, "--weights")  # intact headers before the tokenizer, text model or transformer load
        _check_weight_files(tok_dir, "--vae-weights")
        try:
            model, tok = load_hart_folder(llm, use_ema=use_ema, device="cpu", tokenizer_dir=tok_dir)
        except FileNotFoundError as e:
            flag = "--vae-weights" if str(tok_dir) in str(e) else "--weights"
            raise FileNotFoundError(f"{e} ({flag})") from None
        enc = load_text_encoder(text_encoder if text_encoder is not None else spec.text_encoder, model.context_token, device)
        pipe = cls(model.eval().to(device), tok.eval().to(device), name, enc, dtype)
        pipe.check_text_encoder()
        return pipe

    # ------------------------------------------------------------------ generation
    @property
    def device(self) -> torch.device:
        return self.model.device

    def check_text_encoder(self) -> None:
        """Fail at load time, not at the first prompt, when the text model does not fit the transformer."""
        enc, cfg = self.text_encoder, self.model.config
        if enc is None:
            return
        width = getattr(enc, "channels", None)
        if width is not None and width != cfg.context_dim:
            raise ValueError(f"--text-encoder gives {width}-wide features but the transformer expects context_dim "
                             f"{cfg.context_dim} (HART-0.7B uses Qwen2-1.5B: 1536)")
        if getattr(enc, "max_length", cfg.context_token) != cfg.context_token:
            raise ValueError(f"the text encoder pads to {enc.max_length} tokens; the transformer expects "
                             f"{cfg.context_token}")

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(context (B, context_token, context_dim), position ids (B, context_token)) on the model device."""
        cfg = self.model.config
        if self.text_encoder is None:
            feats, pos = random_context(prompts, cfg.context_token, cfg.context_dim)
        else:
            ctx = self.text_encoder(list(prompts))
            feats, pos = ctx.features, ctx.position_ids
        return feats.to(self.device, torch.float32), pos.to(self.device)

    def _amp(self):
        dev = self.device
        return torch.autocast(dev.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()

    def __call__(self, conditions: Sequence[str], seed: int | None = 0, plan: AccelPlan | str | None = None,
                 cfg: float | None = None, top_k: int | None = None, top_p: float | None = None, record: bool = False,
                 decode: bool = True, more_smooth: bool | None = None) -> GenerationResult:
        """One image per prompt. ``seed`` seeds the token sampler and ``seed + 1`` the diffusion head's
        noise (None = the global RNGs, as the official scripts); ``top_k=None`` is the released 600/300
        schedule. ``decode=False`` returns the latent f_hat (B, Cvae, 64, 64) only."""
        prompts = validate.prompts(conditions, "conditions", self.name)
        check_sampling_args(seed, plan, cfg, top_k, top_p, record=record, decode=decode, top_k_schedule=True)
        validate.flag_bool(more_smooth, "more_smooth", allow_none=True)
        d = self.defaults
        cfg, top_k, top_p, more_smooth = with_defaults(d, cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth)
        B, dev = len(prompts), self.device
        with torch.inference_mode(), self._amp():
            context, pos = self.encode_prompts(prompts)

        def run() -> Tensor:
            gen = make_generator(seed, dev)
            diff_gen = make_generator(None if seed is None else seed + 1, dev)
            with torch.inference_mode(), self._amp():
                return self.model.autoregressive_infer(
                    self.tokenizer, context, pos, cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth,
                    generator=gen, diffusion_generator=diff_gen, decode=False,
                )

        latent, secs, stats, hooks = PlanRunner(self.model).run(run, plan, B, self.model.schedule.sizes, record)
        stats["hooks"] = hooks if record else None
        if not decode:
            return GenerationResult(None, secs, stats, latent=latent)
        return GenerationResult(self.decode(latent), secs, stats, latent=latent)

    def decode(self, latent: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1], float32, CPU: the tokenizer's decoder, or without one (random init) a
        fixed map of the first three latent channels (sigmoid), identical for every plan."""
        if hasattr(self.tokenizer, "fhat_to_img"):
            with torch.inference_mode():
                return self.tokenizer.fhat_to_img(latent.float()).add_(1).mul_(0.5).float().cpu()
        x = latent.float()
        x = x[:, :3] if x.shape[1] >= 3 else x.repeat(1, 3, 1, 1)[:, :3]
        return torch.sigmoid(x).cpu()


class _QuantizerOnly(torch.nn.Module):
    """The part of the tokenizer the sampling loop uses (codebook, Phi convs); no encoder/decoder."""

    def __init__(self, quantize: torch.nn.Module) -> None:
        super().__init__()
        self.quantize = quantize


def _random_tokenizer(cfg: HARTConfig, full: bool) -> torch.nn.Module:
    from ..tokenizers.hart_tokenizer import HARTTokenizer, HybridQuantizer

    if full:
        return HARTTokenizer(vocab_size=cfg.vocab_size, z_channels=cfg.cvae, patch_nums=cfg.patch_nums)
    return _QuantizerOnly(HybridQuantizer(cfg.vocab_size, cfg.cvae, cfg.patch_nums, 0.5, 4, 0.25))


__all__ = ["HART_DEFAULTS", "HARTPipeline", "load_text_encoder", "random_context"]
