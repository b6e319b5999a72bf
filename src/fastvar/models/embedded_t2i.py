"""``embedded-t2i``: the small text-to-image model shipped inside the package (word-level T5 + BSQ-VAE + Infinity).

Three parts, all built from one JSON config so training (``fastvar.train``), export and generation agree:

* text: :class:`~fastvar.text.word_tokenizer.WordTokenizer` over the procedural captions' vocabulary and a
  tiny :class:`~fastvar.text.t5_native.T5Encoder` (T5 v1.1 architecture, Hugging Face key names);
* tokenizer: a :class:`~fastvar.tokenizers.bsq.BSQVAE` with stride 8 and 16-bit codes (128 px -> 16x16);
* transformer: an :class:`~fastvar.models.infinity.Infinity` whose text channels are the T5 width.

The schedule is custom (1, 2, 3, 4, 6, 8, 11, 16): Infinity's official templates use a 16x VAE and a
first scale list that reaches 16 only at 256 px, and a short schedule keeps the model fast on CPU.

Files (``src/fastvar/assets/``, or a folder given as ``assets`` / ``$FASTVAR_EMBEDDED_T2I_DIR``):
``embedded_t2i.json`` (config + sampling defaults + provenance), ``embedded_t2i_vocab.json`` (the word list),
``embedded_t2i_{t5,bsq,infinity}.safetensors`` (any float dtype on disk, loaded as float32). Nothing here
imports ``transformers``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from ..schedules import Schedule
from ..text.t5_native import T5Encoder, T5EncoderConfig, load_t5_state
from ..text.word_tokenizer import WordT5TextEncoder, WordTokenizer
from ..tokenizers.bsq import BSQVAE, BSQVAEConfig, load_bsq_vae_state
from .infinity import Infinity, InfinityConfig, load_infinity_state

__all__ = [
    "ASSETS", "CONFIG_FILE", "DEFAULT_CONFIG", "ENV_DIR", "TRAIN_HINT", "VOCAB_FILE", "WEIGHT_FILES",
    "EmbeddedT2IMissing", "assets_dir", "build_embedded_t2i", "caption_words", "check_embedded_t2i_files",
    "default_vocab", "embedded_t2i_files", "load_embedded_t2i_pipeline", "resolve_config", "save_embedded_t2i",
    "schedule_of",
]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
ENV_DIR = "FASTVAR_EMBEDDED_T2I_DIR"
CONFIG_FILE = "embedded_t2i.json"
VOCAB_FILE = "embedded_t2i_vocab.json"
WEIGHT_FILES = {"t5": "embedded_t2i_t5.safetensors", "bsq": "embedded_t2i_bsq.safetensors",
                "infinity": "embedded_t2i_infinity.safetensors"}
TRAIN_HINT = ("train and export it with `bash artifacts/embedded-t2i-train/train.sh bsq|freeze|infinity|export` "
              "(see artifacts/embedded-t2i-train/README.md)")

DEFAULT_CONFIG: dict[str, Any] = {
    "image_size": 128,
    "schedule": [1, 2, 3, 4, 6, 8, 11, 16],
    # vocab_size None: the vocabulary's length
    "text": dict(vocab_size=None, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                 layer_norm_epsilon=1e-6, dropout_rate=0.0, max_length=32, trainable=True),
    "bsq": dict(codebook_dim=16, patch_size=8, base_ch=32, num_res_blocks=1, encoder_ch_mult=[1, 1, 2, 2],
                decoder_ch_mult=[1, 1, 2, 2]),
    "infinity": dict(embed_dim=256, depth=6, num_heads=4, text_channels=128, text_maxlen=32, d_vae=16,
                     block_chunks=1, pad_to_multiplier=1, emulate_bf16_cross_attn=False, cond_drop_rate=0.1),
    # a 2-way bit choice per token: top-k/top-p over two values only matter at k=1 / small p
    "sampling": dict(cfg=3.0, tau=1.0, top_k=0, top_p=0.0),
}

class EmbeddedT2IMissing(FileNotFoundError):
    """The package (or the given folder) has no trained embedded-t2i files."""


def caption_words() -> list[str]:
    """Every word the procedural captions use (the tokenizer's vocabulary, specials excluded). A trained model
    reads its own ``embedded_t2i_vocab.json`` instead, so a later change of the caption grammar cannot
    shift the ids of a shipped model."""
    from ..train.t2i_data import t2i_vocabulary

    return list(t2i_vocabulary())


def default_vocab() -> list[str]:
    """The full id -> word list of a new model: ``<pad>``, ``</s>``, ``<unk>``, then the caption words."""
    return WordTokenizer.from_words(caption_words()).vocab


def resolve_config(config: Mapping[str, Any] | None = None, vocab_size: int | None = None) -> dict[str, Any]:
    """``config`` over :data:`DEFAULT_CONFIG` (section by section), with the derived sizes filled in and
    checked, so a config that builds three parts that do not fit together fails here in one line."""
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    for k, v in (config or {}).items():
        if isinstance(v, Mapping) and isinstance(cfg.get(k), dict):
            cfg[k].update(copy.deepcopy(dict(v)))
        else:
            cfg[k] = copy.deepcopy(v)
    t, b, inf = cfg["text"], cfg["bsq"], cfg["infinity"]
    if t.get("vocab_size") is None:
        t["vocab_size"] = int(vocab_size if vocab_size is not None else len(default_vocab()))
    sched = [int(s) for s in cfg["schedule"]]
    checks = [
        (inf["text_channels"] == t["d_model"], f"infinity.text_channels {inf['text_channels']} != text.d_model {t['d_model']}"),
        (inf["text_maxlen"] >= t["max_length"], f"infinity.text_maxlen {inf['text_maxlen']} < text.max_length {t['max_length']}"),
        (inf["d_vae"] == b["codebook_dim"], f"infinity.d_vae {inf['d_vae']} != bsq.codebook_dim {b['codebook_dim']}"),
        (sched == sorted(sched) and sched[0] >= 1, f"schedule {sched} must be increasing sides >= 1"),
        (sched[-1] * b["patch_size"] == cfg["image_size"],
         f"schedule ends at {sched[-1]} x stride {b['patch_size']} != image_size {cfg['image_size']}"),
        (len(sched) <= 15, f"schedule has {len(sched)} scales; Infinity's level embedding has 15 rows"),
    ]
    bad = [msg for ok, msg in checks if not ok]
    if bad:
        raise ValueError(f"embedded-t2i config does not fit together: {'; '.join(bad)}")
    cfg["schedule"] = sched
    return cfg


def schedule_of(config: Mapping[str, Any] | None = None) -> Schedule:
    """The (square) scale schedule of a config: transformer token maps = VAE latent sizes."""
    return Schedule.square(tuple(resolve_config(config)["schedule"]))


def _sub(cls: type, d: Mapping[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})


def _configs(cfg: Mapping[str, Any]) -> tuple[T5EncoderConfig, BSQVAEConfig, InfinityConfig]:
    return _sub(T5EncoderConfig, cfg["text"]), _sub(BSQVAEConfig, cfg["bsq"]), _sub(InfinityConfig, cfg["infinity"])


def assets_dir(assets: str | os.PathLike | None = None) -> Path:
    """``assets``, else ``$FASTVAR_EMBEDDED_T2I_DIR``, else the package's assets folder."""
    if assets is not None:
        return Path(assets).expanduser()
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else ASSETS


def embedded_t2i_files(assets: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of the five files (config, vocab, t5, bsq, infinity) in an assets folder (present or not)."""
    d = assets_dir(assets)
    return {"config": d / CONFIG_FILE, "vocab": d / VOCAB_FILE, **{k: d / v for k, v in WEIGHT_FILES.items()}}


def check_embedded_t2i_files(assets: str | os.PathLike | None = None) -> dict[str, Path]:
    """The files, or one :class:`EmbeddedT2IMissing` line naming the absent ones and the command that makes them."""
    files = embedded_t2i_files(assets)
    absent = [p.name for p in files.values() if not p.is_file()]
    if absent:
        where = assets_dir(assets)
        raise EmbeddedT2IMissing(f"embedded-t2i is not trained in this install: {', '.join(absent)} missing in {where}; "
                                 f"{TRAIN_HINT}, or try it with random weights: --random-init")
    return files


def build_embedded_t2i(
    config: Mapping[str, Any] | None = None, weights: str | os.PathLike | None = None, seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[WordT5TextEncoder, BSQVAE, Infinity]:
    """(text encoder, BSQ-VAE, Infinity) in eval mode, float32, on ``device``.

    ``weights``: an assets folder holding the five files (its json is the config unless ``config`` is
    given; the shipped model: ``assets_dir()``), or None for random weights seeded by ``seed`` (the modules'
    default inits; the same seed gives the same model on every machine). Training starts from the random
    build; generation loads a folder (:func:`load_embedded_t2i_pipeline` does, from the package by default).
    A ``"vocab"`` list in ``config`` (random build only) replaces :func:`default_vocab`.
    """
    if weights is None:
        vocab = list(config["vocab"]) if config is not None and "vocab" in config else default_vocab()
        cfg = resolve_config({k: v for k, v in (config or {}).items() if k != "vocab"}, len(vocab))
        tcfg, bcfg, icfg = _configs(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            t5 = T5Encoder(tcfg)
            t5.reset_parameters(seed)
            vae = BSQVAE(bcfg)
            model = Infinity(icfg)
        tok = WordTokenizer(vocab)
    else:
        from ..checkpoints import CheckpointError, read_state_dict

        files = check_embedded_t2i_files(weights)
        fix = f"re-export the model ({TRAIN_HINT})"
        if config is None:
            try:
                config = json.loads(files["config"].read_text(encoding="utf-8"))
            except ValueError as e:
                raise CheckpointError(f"{files['config']}: not valid JSON ({e}); {fix}") from None
        tok = WordTokenizer.from_json(files["vocab"])
        cfg = resolve_config(config, len(tok))
        tcfg, bcfg, icfg = _configs(cfg)
        with torch.random.fork_rng(devices=[]):  # plain CPU builds (small; the meta device would import dynamo)
            t5, vae, model = T5Encoder(tcfg), BSQVAE(bcfg), Infinity(icfg)
        try:
            load_t5_state(t5, read_state_dict(files["t5"], flag="assets", fix=fix))
        except ValueError as e:
            raise CheckpointError(f"{files['t5']}: {e}; {fix}") from None
        load_bsq_vae_state(vae, {k: v.float() if v.is_floating_point() else v
                                 for k, v in read_state_dict(files["bsq"], flag="assets", fix=fix).items()})
        sd = read_state_dict(files["infinity"], flag="assets", fix=fix)
        load_infinity_state(model, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    if tcfg.vocab_size < len(tok):
        raise ValueError(f"text.vocab_size {tcfg.vocab_size} is smaller than the {len(tok)}-word vocabulary")
    enc = WordT5TextEncoder(t5.eval().to(device), tok, max_length=cfg["text"]["max_length"])
    return enc, vae.eval().to(device), model.eval().to(device)


def save_embedded_t2i(
    folder: str | os.PathLike, config: Mapping[str, Any], text_encoder: WordT5TextEncoder, vae: BSQVAE, model: Infinity,
    dtype: torch.dtype = torch.float16,
) -> dict[str, Path]:
    """Write the five files atomically (weights cast to ``dtype``; fp16 keeps the model under 30 MB).

    ``config`` may carry extra top-level keys (training provenance); the sizes are re-derived from it.
    Tied/aliased tensors are stored once (the loaders restore the aliases).
    """
    from safetensors.torch import save

    from ..checkpoints import atomic_output

    files = embedded_t2i_files(folder)
    cfg = resolve_config(config, len(text_encoder.tokenizer))

    def cast(sd: Mapping[str, torch.Tensor], drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        return {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous().clone()
                for k, v in sd.items() if k not in drop}

    parts = {
        "t5": cast(text_encoder.encoder.state_dict(), ("encoder.embed_tokens.weight",)),
        "bsq": cast(vae.state_dict(), ("quantizer.lfq.mask", "quantize.lfq.mask")),
        "infinity": cast(model.state_dict()),
    }
    for name, sd in parts.items():
        with atomic_output(files[name]) as f:
            f.write(save(sd, metadata={"format": "pt", "model": f"embedded-t2i {name}"}))
    text_encoder.tokenizer.save(files["vocab"])
    with atomic_output(files["config"], "w") as f:
        f.write(json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    return files


def load_embedded_t2i_pipeline(device: torch.device | str | None = None, assets: str | os.PathLike | None = None,
                               dtype: str | torch.dtype = "fp32", random_init: bool = False, seed: int = 0) -> Any:
    """The embedded-t2i :class:`~fastvar.pipelines.infinity.InfinityPipeline` (trained files, or
    ``random_init`` weights for tests and speed runs); raises :class:`EmbeddedT2IMissing` in one line."""
    from ..pipelines.common import check_load_args
    from ..pipelines.infinity import InfinityPipeline

    device, dt = check_load_args(device, dtype)
    if random_init:
        enc, vae, model = build_embedded_t2i(seed=seed, device=device)
        cfg = resolve_config(None, len(enc.tokenizer))
    else:
        files = check_embedded_t2i_files(assets)
        enc, vae, model = build_embedded_t2i(weights=files["config"].parent, device=device)
        cfg = resolve_config(json.loads(files["config"].read_text(encoding="utf-8")), len(enc.tokenizer))
    model = model.to(dtype=dt)
    return InfinityPipeline(model, "embedded-t2i", vae, enc, text_tokens=cfg["text"]["max_length"],
                            defaults=cfg["sampling"], schedule=schedule_of(cfg))
