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
    text_encoder: str | None = None  # default text model (local folder or hub id) of text-to-image families


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

# Infinity (FoundationVision/Infinity): every released file lives in the hub repo FoundationVision/Infinity; the
# 8B transformers are folders of shards. infinity-layer12 (125M) has official builder kwargs but no released
# checkpoint (weights None: pass --weights). All use google/flan-t5-xl as the text encoder.
_INF_HUB = "FoundationVision/Infinity"
for _name, _res, _w, _v in (
    ("infinity-2b", 1024, "infinity_2b_reg.pth", "infinity_vae_d32reg.pth"),
    ("infinity-8b", 1024, "infinity_8b_weights", "infinity_vae_d56_f8_14_patchify.pth"),
    ("infinity-8b-512", 512, "infinity_8b_512x512_weights", "infinity_vae_d56_f8_14_patchify.pth"),
    ("infinity-layer12", 256, None, "infinity_vae_d32reg.pth"),
):
    MODELS[_name] = ModelSpec(name=_name, family="infinity", resolution=_res,
                              weights=f"{_INF_HUB}:{_w}" if _w else None, vae_weights=f"{_INF_HUB}:{_v}",
                              text_encoder="google/flan-t5-xl")
MODELS["infinity"] = MODELS["infinity-2b"]
# The small word-level T5 + BSQ-VAE + Infinity trained on procedural captions, shipped inside the package
# (fastvar.models.embedded_t2i; its assets json is the source of truth, these are the facts the CLI needs
# before loading: the fixed schedule for plan checks and the depth for presets; a test keeps them equal).
MODELS["embedded-t2i"] = ModelSpec(name="embedded-t2i", family="infinity", resolution=128,
                                   config=dict(patch_nums=(1, 2, 3, 4, 6, 8, 11, 16), depth=6))

# HART-0.7B-1024px (mit-han-lab/hart): the architecture lives in fastvar.models.hart (HART_0_7B); these are the
# facts the CLI needs before building it. One hub repo holds both folders: llm/ (transformer) and tokenizer/.
# The text model is the README's download (sample.py's --text_model_path points at a local clone of it).
MODELS["hart-0.7b"] = ModelSpec(
    name="hart-0.7b", family="hart",
    config=dict(depth=24, embed_dim=1536, num_heads=24, context_token=300, context_dim=1536,
                patch_nums=(1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)),
    weights="mit-han-lab/hart-0.7b-1024px:llm", vae_weights="mit-han-lab/hart-0.7b-1024px:tokenizer",
    resolution=1024, text_encoder="mit-han-lab/Qwen2-VL-1.5B-Instruct",
)
MODELS["hart"] = MODELS["hart-0.7b"]
