"""Generation pipelines per family and one entry point to build them from a model spec."""

from __future__ import annotations

from ..models.registry import ModelSpec


def load_pipeline(spec: ModelSpec, weights=None, vae_weights=None, random_init=False, device=None, dtype="fp32"):
    """Build the pipeline for ``spec``: random init, official weights, or (for embedded models) package assets."""
    if spec.family == "var":
        from .var import VARPipeline

        if spec.name == "embedded":
            if weights or vae_weights or random_init:
                raise ValueError("the embedded model ships its own weights; drop --weights/--vae-weights/--random-init")
            return VARPipeline.embedded(device=device, dtype=dtype)
        if random_init:
            return VARPipeline.from_spec(spec, device=device, dtype=dtype)
        return VARPipeline.from_pretrained(spec.name, weights, vae_weights, device=device, dtype=dtype, spec=spec)
    raise NotImplementedError(f"no pipeline for the {spec.family} family yet")
