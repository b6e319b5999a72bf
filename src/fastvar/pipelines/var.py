"""Class-conditional generation with VAR: load (official files, embedded model, or random init), sample.

    pipe = VARPipeline.from_pretrained("var-d16", weights="var_d16.pth", vae_weights="vae_ch160v4096z32.pth")
    result = pipe([207, 360], seed=0, cfg=4.0, plan="fastvar")
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

from .. import validate
from ..accel import AccelPlan
from ..checkpoints import check_checkpoint_file, load_checked, read_state_dict, resolve_file
from ..errors import UsageError
from ..models.registry import MODELS, VAE_VAR_CONFIG, ModelSpec
from ..models.var import VAR
from ..sampling import make_generator
from .common import GenerationResult, PlanRunner, check_load_args, check_sampling_args, with_defaults


def _guess_var(sd) -> str:
    depths = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    if not depths:
        return "not a VAR transformer (no blocks.* keys); is this the VQVAE file?"
    d = max(depths) + 1
    w = sd["word_embed.weight"].shape[0] if "word_embed.weight" in sd else "?"
    return f"a VAR with depth {d} and width {w} (try --model var-d{d})"


def var_spec(name: str) -> ModelSpec:
    """The registry entry of a VAR model name; a one-line UsageError listing the known ones otherwise."""
    spec = MODELS.get(name) if isinstance(name, str) else None
    if spec is None or spec.family != "var" or spec.name == "embedded":
        known = sorted(k for k, v in MODELS.items() if v.family == "var" and k != "embedded")
        raise UsageError(f"name={name!r}: not a VAR model; known: {', '.join(known)} "
                         "(the shipped small model is VARPipeline.embedded())")
    return spec


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
    def from_spec(cls, spec: ModelSpec, device=None, dtype="fp32", seed: int = 0,
                  vae_config: dict | None = None) -> VARPipeline:
        """Random weights for ``spec``'s architecture (speed measurements); arguments are checked first."""
        device, dt = check_load_args(device, dtype, seed)
        torch.manual_seed(seed)
        model = VAR(**spec.config)
        model.init_weights()
        vae = build_vae(vae_config or {**VAE_VAR_CONFIG, "patch_nums": spec.config["patch_nums"]})
        pipe = cls(model.eval().to(device), vae.eval().to(device), spec.name)
        pipe.dtype = dt
        return pipe

    @classmethod
    def embedded(cls, device=None, dtype="fp32") -> VARPipeline:
        """The small model trained on the procedural dataset, shipped inside the package (no download)."""
        from ..train.embedded import EmbeddedModelMissing, load_embedded

        device, dt = check_load_args(device, dtype)
        try:
            model, vae, cfg = load_embedded(device)
        except EmbeddedModelMissing as e:
            raise FileNotFoundError(
                f"{e}. This install has no embedded model; use an official model instead, e.g. "
                "--model var-d16 --weights var_d16.pth --vae-weights vae_ch160v4096z32.pth"
            ) from None
        pipe = cls(model, vae, "embedded", defaults=cfg.get("sampling"))
        pipe.dtype = dt
        return pipe

    @classmethod
    def random_init(cls, name: str = "var-d16", device=None, dtype="fp32", seed: int = 0) -> VARPipeline:
        """Full-size architecture with random weights: for speed measurements without checkpoints."""
        return cls.from_spec(var_spec(name), device, dtype, seed)

    @classmethod
    def from_pretrained(cls, name: str = "var-d16", weights: str | None = None, vae_weights: str | None = None,
                        device=None, dtype="fp32", spec: ModelSpec | None = None) -> VARPipeline:
        """Official checkpoints from local files/folders or the hub (``owner/repo:file``).

        Every argument and both files (present, readable, intact headers) are checked before the model is built.
        """
        spec = spec or var_spec(name)
        device, dt = check_load_args(device, dtype)
        wpath = resolve_file(weights or spec.weights, spec.weights.split(":")[-1], "--weights")
        vpath = resolve_file(vae_weights or spec.vae_weights, spec.vae_weights.split(":")[-1], "--vae-weights")
        check_checkpoint_file(wpath, "--weights")  # both headers first: a bad second file fails before the first loads
        check_checkpoint_file(vpath, "--vae-weights")
        wsd = read_state_dict(wpath, flag="--weights")
        vsd = read_state_dict(vpath, flag="--vae-weights")
        with torch.device("meta"):
            model = VAR(**spec.config)
            vae = build_vae({**VAE_VAR_CONFIG, "patch_nums": spec.config["patch_nums"]})
        model = model.to_empty(device="cpu")
        vae = vae.to_empty(device="cpu")
        load_checked(model, wsd, f"{name} ({spec.config['depth']} blocks)", _guess_var)
        vae.load_official(vsd)
        del wsd, vsd
        pipe = cls(model.eval().to(device), vae.eval().to(device), name)
        pipe.dtype = dt
        return pipe

    # ------------------------------------------------------------------ generation
    @property
    def device(self) -> torch.device:
        return self.model.device

    def check_classes(self, classes: Sequence[int]) -> list[int]:
        """Whole class ids in [0, num_classes) (one UsageError line otherwise)."""
        return validate.class_ids(classes, self.model.num_classes, "classes", self.name)

    def __call__(self, classes: Sequence[int], seed: int | None = 0, plan: AccelPlan | str | None = None,
                 cfg: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 more_smooth: bool | None = None, record: bool = False, decode: bool = True) -> GenerationResult:
        """Generate one image per class id. ``decode=False`` returns latents (``result.latent``) only.

        Every argument is checked before sampling starts (one-line ``ValueError``s naming the argument).
        """
        classes = self.check_classes(classes)
        check_sampling_args(seed, plan, cfg, top_k, top_p, record=record, decode=decode)
        validate.flag_bool(more_smooth, "more_smooth", allow_none=True)
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
