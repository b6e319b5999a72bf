"""Generation pipelines per family and one entry point to build them from a model spec."""

from __future__ import annotations

from ..models.registry import ModelSpec


def load_pipeline(spec: ModelSpec, weights=None, vae_weights=None, text_encoder=None, random_init=False, device=None,
                  dtype="fp32", **kwargs):
    """Build the pipeline for ``spec``: random init, official weights, or (for embedded models) package assets.

    ``kwargs`` are family options (text-to-image schedule and architecture overrides); None means default.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if spec.family == "var":
        if text_encoder or kwargs:
            raise ValueError(f"{spec.name} is class-conditional: text encoder / {sorted(kwargs)} options do not apply")
        from .var import VARPipeline

        if spec.name == "embedded":
            if weights or vae_weights or random_init:
                raise ValueError("the embedded model ships its own weights; drop --weights/--vae-weights/--random-init")
            return VARPipeline.embedded(device=device, dtype=dtype)
        if random_init:
            return VARPipeline.from_spec(spec, device=device, dtype=dtype)
        return VARPipeline.from_pretrained(spec.name, weights, vae_weights, device=device, dtype=dtype, spec=spec)
    if spec.family == "hart":
        from .hart import HARTPipeline

        name = "hart-0.7b" if spec.name == "hart" else spec.name
        if random_init:
            if weights or vae_weights or text_encoder:
                raise ValueError("--random-init builds random weights and random text features; drop "
                                 "--weights/--vae-weights/--text-encoder")
            return HARTPipeline.random_init(name, device=device, dtype=dtype, **kwargs)
        return HARTPipeline.from_pretrained(name, weights, vae_weights, text_encoder, device=device, dtype=dtype, **kwargs)
    if spec.name == "embedded-t2i":
        from ..models.embedded_t2i import load_embedded_t2i_pipeline

        if weights or vae_weights or text_encoder or kwargs:
            raise ValueError(f"embedded-t2i ships its own weights, text encoder and schedule; drop "
                             f"--weights/--vae-weights/--text-encoder{'/' + '/'.join(sorted(kwargs)) if kwargs else ''}")
        return load_embedded_t2i_pipeline(device=device, dtype=dtype, random_init=random_init)
    if spec.family == "infinity":
        from .infinity import InfinityPipeline

        if random_init:
            if weights or vae_weights or text_encoder:
                raise ValueError("--random-init builds random weights and random text features; drop "
                                 "--weights/--vae-weights/--text-encoder")
            return InfinityPipeline.random_init(spec.name, device=device, dtype=dtype, **kwargs)
        return InfinityPipeline.from_pretrained(spec.name, weights, vae_weights, text_encoder, device=device, dtype=dtype,
                                                **kwargs)
    raise NotImplementedError(f"no pipeline for the {spec.family} family yet")
