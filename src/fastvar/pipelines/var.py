"""Class-conditional generation with VAR: load (official files, embedded model, or random init), sample.

    pipe = VARPipeline.from_pretrained("var-d16", weights="var_d16.pth", vae_weights="vae_ch160v4096z32.pth")
    result = pipe([207, 360], seed=0, cfg=4.0, plan="fastvar")
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

from ..accel import AccelPlan
from ..checkpoints import load_checked, read_state_dict, resolve_file
from ..models.registry import VAE_VAR_CONFIG, ModelSpec, get_spec
from ..models.var import VAR
from ..sampling import make_generator
from .common import GenerationResult, PlanRunner, default_device, resolve_dtype, with_defaults


def _guess_var(sd) -> str:
    depths = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    if not depths:
        return "not a VAR transformer (no blocks.* keys); is this the VQVAE file?"
    d = max(depths) + 1
    w = sd["word_embed.weight"].shape[0] if "word_embed.weight" in sd else "?"
    return f"a VAR with depth {d} and width {w} (try --model var-d{d})"


def build_vae(config: dict):
    from ..tokenizers.vqvae import VQVAE

    return VQVAE(**config)


class VARPipeline:
    family = "var"

    def __init__(self, model: VAR, vae, name: str = "var", defaults: dict | None = None) -> None:
        self.model, self.vae, self.name = model, vae, name
        self.defaults = dict(cfg=4.0, top_k=900, top_p=0.95, more_smooth=False)
        self.defaults.update(defaults or {})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_spec(cls, spec: ModelSpec, device=None, dtype="fp32", seed: int = 0, vae_config: dict | None = None):
        device = torch.device(device) if device is not None else default_device()
        torch.manual_seed(seed)
        model = VAR(**spec.config)
        model.init_weights()
        vae = build_vae(vae_config or {**VAE_VAR_CONFIG, "patch_nums": spec.config["patch_nums"]})
        pipe = cls(model.eval().to(device), vae.eval().to(device), spec.name)
        pipe.dtype = resolve_dtype(dtype)
        return pipe

    @classmethod
    def embedded(cls, device=None, dtype="fp32") -> VARPipeline:
        """The small model trained on the procedural dataset, shipped inside the package (no download)."""
        from ..train.embedded import EmbeddedModelMissing, load_embedded

        device = torch.device(device) if device is not None else default_device()
        try:
            model, vae, cfg = load_embedded(device)
        except EmbeddedModelMissing as e:
            raise FileNotFoundError(
                f"{e}. This install has no embedded model; use an official model instead, e.g. "
                "--model var-d16 --weights var_d16.pth --vae-weights vae_ch160v4096z32.pth"
            ) from None
        pipe = cls(model, vae, "embedded", defaults=cfg.get("sampling"))
        pipe.dtype = resolve_dtype(dtype)
        return pipe

    @classmethod
    def random_init(cls, name: str = "var-d16", device=None, dtype="fp32", seed: int = 0) -> VARPipeline:
        """Full-size architecture with random weights: for speed measurements without checkpoints."""
        return cls.from_spec(get_spec(name), device, dtype, seed)

    @classmethod
    def from_pretrained(cls, name: str = "var-d16", weights: str | None = None, vae_weights: str | None = None,
                        device=None, dtype="fp32", spec: ModelSpec | None = None) -> VARPipeline:
        """Official checkpoints from local files/folders or the hub (``owner/repo:file``)."""
        spec = spec or get_spec(name)
        wpath = resolve_file(weights or spec.weights, spec.weights.split(":")[-1])
        vpath = resolve_file(vae_weights or spec.vae_weights, spec.vae_weights.split(":")[-1])
        device = torch.device(device) if device is not None else default_device()
        with torch.device("meta"):
            model = VAR(**spec.config)
            vae = build_vae({**VAE_VAR_CONFIG, "patch_nums": spec.config["patch_nums"]})
        model = model.to_empty(device="cpu")
        vae = vae.to_empty(device="cpu")
        load_checked(model, read_state_dict(wpath), f"{name} ({spec.config['depth']} blocks)", _guess_var)
        vae.load_official(read_state_dict(vpath))
        pipe = cls(model.eval().to(device), vae.eval().to(device), name)
        pipe.dtype = resolve_dtype(dtype)
        return pipe

    # ------------------------------------------------------------------ generation
    @property
    def device(self) -> torch.device:
        return self.model.device

    def check_classes(self, classes: Sequence[int]) -> list[int]:
        n = self.model.num_classes
        bad = [c for c in classes if not 0 <= int(c) < n]
        if bad:
            raise ValueError(f"class id(s) {bad} out of range: this model has classes 0..{n - 1}")
        return [int(c) for c in classes]

    def __call__(self, classes: Sequence[int], seed: int | None = 0, plan: AccelPlan | str | None = None,
                 cfg: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 more_smooth: bool | None = None, record: bool = False, decode: bool = True) -> GenerationResult:
        """Generate one image per class id. ``decode=False`` returns latents (``result.latent``) only."""
        classes = self.check_classes(classes)
        d = self.defaults
        cfg, top_k, top_p, more_smooth = with_defaults(d, cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth)
        B = len(classes)
        dev = self.device
        labels = torch.tensor(classes, dtype=torch.long, device=dev)
        dtype = getattr(self, "dtype", torch.float32)
        amp = torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

        def run() -> Tensor:
            gen = make_generator(seed, dev)
            with torch.inference_mode(), amp:
                return self.model.autoregressive_infer(
                    self.vae, B, labels, cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth, generator=gen,
                    decode=decode,
                )

        imgs, secs, stats, hooks = PlanRunner(self.model).run(run, plan, B, self.model.schedule.sizes, record)
        stats["hooks"] = hooks if record else None
        if not decode:
            return GenerationResult(None, secs, stats, latent=imgs)
        return GenerationResult(imgs.float().cpu(), secs, stats)

    def decode(self, latent: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.vae.fhat_to_img(latent.float()).add_(1).mul_(0.5).float().cpu()
