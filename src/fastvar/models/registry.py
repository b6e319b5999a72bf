"""Known model names and the configurations behind them (facts from the official builders)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..schedules import VAR_PATCH_NUMS


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    config: dict = field(default_factory=dict)
    weights: str | None = None  # default file name (hub repo : file)
    vae_weights: str | None = None
    resolution: int = 256


def _var(depth: int, res: int) -> ModelSpec:
    return ModelSpec(
        name=f"var-d{depth}",
        family="var",
        config=dict(
            vocab_size=4096, cvae=32, num_classes=1000, depth=depth, embed_dim=64 * depth, num_heads=depth,
            patch_nums=VAR_PATCH_NUMS[res], shared_aln=depth == 36,
        ),
        weights=f"FoundationVision/var:var_d{depth}.pth",
        vae_weights="FoundationVision/var:vae_ch160v4096z32.pth",
        resolution=res,
    )


VAE_VAR_CONFIG = dict(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4)

MODELS: dict[str, ModelSpec] = {s.name: s for s in [_var(16, 256), _var(20, 256), _var(24, 256), _var(30, 256), _var(36, 512)]}
MODELS["var"] = MODELS["var-d16"]
# The small VQVAE + VAR trained on the procedural dataset and shipped inside the package (offline default).
MODELS["embedded"] = ModelSpec(name="embedded", family="var", config=dict(num_classes=10), resolution=128)


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]

for _name in ("infinity-2b", "infinity-8b", "infinity-layer12"):
    MODELS[_name] = ModelSpec(name=_name, family="infinity", resolution=1024)
MODELS["infinity"] = MODELS["infinity-2b"]
