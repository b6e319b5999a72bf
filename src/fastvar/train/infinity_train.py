"""Infinity trainer: text-to-image teacher forcing on a frozen BSQ-VAE's bit labels, with Bitwise Self-Correction.

What one step does (the Infinity paper's recipe, restated; the code is ours):

1. the frozen BSQ-VAE encodes the images to continuous latents (B, d, H, W);
2. :func:`bsc_flip_requant` quantises them scale by scale, coarse to fine. At every scale the bit labels
   are those of the residual left by the *previous, possibly corrupted* scales; with ``--bsc-rate`` > 0 a
   random fraction of the scale's bits is flipped before its codes are added to the running sum, so the
   next scale's input (the sum resized, trilinear) carries the error and its labels are the ones that
   correct it. That is the paper's Bitwise Self-Correction: the model learns to repair its own
   sampling mistakes instead of only ever seeing perfect prefixes;
3. the transformer predicts every bit of every token (``2 d`` logits per token, a two-way cross-entropy
   per bit, averaged over the d bits as the official ``bitloss_type='mean'``);
4. per-scale loss weights as the official ``reweight_loss_by_scale``: a token of scale (h, w) weighs
   ``sqrt(H W / (h w))`` relative to the last scale, normalised to sum 1, so the many fine tokens do not
   drown the few coarse ones that decide the layout.

Text: a tiny T5 (``fastvar.text.t5_native``) trained jointly by default (``--text-mode joint``), or fixed
(``frozen``: its features are cached per caption), or precomputed features from a file
(``--text-features``). Condition dropout (``--cond-drop-rate``) replaces captions by the model's learned
unconditional rows, which CFG needs at sampling time.

Distributed: DDP under torchrun (gloo on CPU, nccl on GPU) through the shared loop; ``--zero 2|3`` wraps
the model in FSDP (shard gradients+optimizer / also parameters) and needs CUDA.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ckpt as ck
from .bsq_train import T2ISource, check_data, load_bsq
from .config import LOOP_DEFAULTS, check_options, loop_config, merged
from .dist import cleanup, init_distributed
from .loop import Trainer
from .var_train import weights_digest

INFINITY_DEFAULTS: dict[str, Any] = dict(
    out=None,
    bsq=None,  # a BSQ-VAE run directory (latest checkpoint) or an exported .safetensors (+ .json)
    bsq_ema=True,
    data="procedural-t2i",
    data_seed=0,
    depth=6,
    embed_dim=256,
    num_heads=4,
    mlp_ratio=4.0,
    cond_drop_rate=0.1,
    label_smooth=0.0,
    reweight_by_scale=True,
    bsc_rate=0.3,  # official noise_apply_strength in the released training script
    bsc_layers=0,  # 0 = every scale
    bsc_mode="uniform",
    text_mode="joint",
    text_features="",
    t5_d_model=128,
    t5_layers=2,
    t5_heads=4,
    t5_d_ff=256,
    text_maxlen=32,
    zero=0,
    **LOOP_DEFAULTS,
    warmup=200,
    weight_decay=0.05,
    ckpt_every=100,
)


# ----------------------------------------------------------------------------------------- BSC


def bsc_flip_requant(
    h: Tensor, sizes: tuple[tuple[int, int], ...], rate: float = 0.0, layers: int = 0, mode: str = "uniform",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, list[Tensor], dict[str, float]]:
    """Teacher-forcing inputs and bit labels from continuous latents, with Bitwise Self-Correction.

    ``h``: (B, d, H, W) encoder output; ``sizes``: the (h, w) of every scale, last = (H, W).
    Returns ``x`` (B, L - 1, d): the inputs of scales 1.. (the summed codes resized to each scale),
    ``labels``: per scale (B, h·w, d) int64 bits, and stats (``flipped``: fraction of the corruptible
    bits that were flipped). ``rate`` 0 gives exactly the clean multi-scale quantisation the inference
    path decodes. ``mode``: ``fixed`` flips each bit with probability ``rate``; ``uniform`` (official)
    draws one probability per call from {0, 0.01, ..., rate}. ``layers`` > 0 corrupts only scales < layers.
    Codes use :func:`fastvar.tokenizers.bsq.bits_to_codes` and the sum the inference accumulation, so
    a model sees in training exactly what the sampler feeds it.
    """
    from ..tokenizers.bsq import bits_to_codes

    if mode not in ("uniform", "fixed"):
        raise ValueError(f"BSC mode {mode!r}: use 'uniform' or 'fixed'")
    B, d, H, W = h.shape
    x = h.float().unsqueeze(2)
    cum: Tensor | None = None
    inputs: list[Tensor] = []
    labels: list[Tensor] = []
    flipped = total = 0.0
    n = len(sizes)
    dev = h.device
    for si, (ph, pw) in enumerate(sizes):
        last = si == n - 1
        r = x if cum is None else x - cum
        if (ph, pw) != (H, W):
            r = F.interpolate(r, size=(1, ph, pw), mode="area")
        bits = (F.normalize(r, dim=1) > 0).squeeze(2).permute(0, 2, 3, 1)  # (B, h, w, d) bool
        labels.append(bits.reshape(B, ph * pw, d).long())
        if rate > 0 and (layers <= 0 or si < layers):
            if mode == "fixed":
                p = float(rate)
            else:
                p = int(torch.randint(0, int(round(100 * rate)) + 1, (1,), generator=generator)) * 0.01
            flip = torch.rand(bits.shape, generator=generator, device="cpu" if generator is not None and
                              generator.device.type == "cpu" else dev).to(dev) < p
            bits = bits ^ flip
            flipped += float(flip.sum())
            total += flip.numel()
        codes = bits_to_codes(bits.float())  # (B, d, 1, h, w)
        add = codes if (ph, pw) == (H, W) else F.interpolate(codes, size=(1, H, W), mode="trilinear")
        cum = add if cum is None else cum + add
        if not last:
            nh, nw = sizes[si + 1]
            nxt = F.interpolate(cum, size=(1, nh, nw), mode="trilinear").squeeze(2)
            inputs.append(nxt.reshape(B, d, -1).transpose(1, 2))
    x_wo_prefix = torch.cat(inputs, 1) if inputs else h.new_zeros(B, 0, d)
    return x_wo_prefix, labels, {"flipped": flipped / total if total else 0.0}


def scale_loss_weights(sizes: tuple[tuple[int, int], ...], reweight: bool) -> Tensor:
    """(L,) per-token weights summing to 1: official ``reweight_loss_by_scale`` or uniform."""
    if not reweight:
        L = sum(h * w for h, w in sizes)
        return torch.full((L,), 1.0 / L)
    last = math.sqrt(sizes[-1][0] * sizes[-1][1])
    w = torch.cat([torch.full((h * w,), last / math.sqrt(h * w)) for h, w in sizes])
    return w / w.sum()


# ----------------------------------------------------------------------------------------- model


class T2IModel(nn.Module):
    """What is optimised, averaged (EMA) and checkpointed: the transformer ``gpt`` and the T5 ``text``."""

    def __init__(self, gpt: nn.Module, text: nn.Module | None) -> None:
        super().__init__()
        self.gpt = gpt
        if text is not None:
            self.text = text

    # T5 ties ``encoder.embed_tokens`` to ``shared`` (one tensor, two keys): checkpoints and EMA keep ``shared``
    # only (safetensors refuses aliases) and loading restores the alias.
    _ALIAS = ("text.encoder.embed_tokens.weight", "text.shared.weight")

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        sd.pop(prefix + self._ALIAS[0], None)
        return sd

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
        sd = dict(state_dict)
        alias, src = self._ALIAS
        if hasattr(self, "text") and alias not in sd and src in sd:
            sd[alias] = sd[src]
        return super().load_state_dict(sd, strict=strict, assign=assign)


class TextFeatures:
    """Captions -> :class:`TextCondition` for the three ``--text-mode`` s (joint, frozen, precomputed)."""

    def __init__(self, mode: str, tokenizer: Any, max_length: int, table: dict[str, Tensor] | None = None) -> None:
        self.mode, self.tok, self.max_length, self.table = mode, tokenizer, int(max_length), table
        self.cache: dict[str, Tensor] = {}

    def __call__(self, text_module: nn.Module | None, captions: list[str], device: torch.device):
        from ..text.condition import pack_text_features

        if self.mode == "precomputed":
            assert self.table is not None
            feats = []
            for c in captions:
                if c not in self.table:
                    raise KeyError(f"--text-features has no entry for the caption {c!r}; precompute every caption "
                                   "of the dataset (fastvar.train.infinity_train.precompute_text_features)")
                feats.append(self.table[c].float())
            return _pack_rows(feats, device)
        ids, mask = self.tok(captions, self.max_length)
        ids, mask = ids.to(device), mask.to(device)
        if self.mode == "joint":
            return pack_text_features(text_module(ids, mask).float(), mask)
        missing = [i for i, c in enumerate(captions) if c not in self.cache]
        if missing:
            with torch.no_grad():
                f = text_module(ids[missing], mask[missing]).float()
            for j, i in enumerate(missing):
                self.cache[captions[i]] = f[j, : int(mask[i].sum())].detach()
        return _pack_rows([self.cache[c] for c in captions], device)


def _pack_rows(rows: list[Tensor], device: torch.device):
    from ..text.condition import TextCondition

    lens = [int(r.shape[0]) for r in rows]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return TextCondition(torch.cat(rows).to(device), lens, cu, max(lens))


class BitTeacherForcing(nn.Module):
    """T2IModel + frozen BSQ-VAE -> weighted per-bit cross-entropy (what DDP wraps)."""

    def __init__(self, model: T2IModel, vae: nn.Module, sizes: tuple[tuple[int, int], ...], text: TextFeatures,
                 weights: Tensor, bsc: dict[str, Any], label_smooth: float) -> None:
        super().__init__()
        self.model = model
        self._vae = (vae,)  # frozen: not a submodule, never saved or synchronised
        self.sizes, self.text, self.bsc, self.ls = sizes, text, bsc, float(label_smooth)
        self.register_buffer("w", weights, persistent=False)

    def forward(self, img: Tensor, captions: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        gpt = self.model.gpt
        with torch.no_grad(), torch.autocast(img.device.type, enabled=False):
            h = self._vae[0].encode_raw(img.float())
            x, labels, st = bsc_flip_requant(h, self.sizes, **self.bsc)
        cond = self.text(getattr(self.model, "text", None), captions, img.device)
        logits = gpt(cond, x, self.sizes)  # (B, L, 2d)
        B, L, _ = logits.shape
        gt = torch.cat(labels, 1)  # (B, L, d)
        d = gt.shape[-1]
        lg = logits.float().reshape(B, L, d, 2)
        ce = F.cross_entropy(lg.permute(0, 3, 1, 2), gt, reduction="none", label_smoothing=self.ls).mean(-1)  # (B, L)
        loss = (ce * self.w).sum(-1).mean()
        # keep every parameter in the graph (DDP): the unconditional rows are only used by dropped captions
        loss = loss + 0.0 * gpt.cfg_uncond.sum()
        with torch.no_grad():
            acc = (lg.argmax(-1) == gt).float()
            first = self.sizes[0][0] * self.sizes[0][1]
            m = {"bit_acc": acc.mean(), "tok_acc": acc.all(-1).float().mean(), "acc_s0": acc[:, :first].mean(),
                 "flipped": torch.tensor(st["flipped"])}
        return loss, m


# ----------------------------------------------------------------------------------------- options


def check_infinity_options(d: dict[str, Any]) -> None:
    """Every Infinity-trainer flag, before anything loads (one-line UsageError / MissingInputError each)."""
    from .. import validate
    from ..errors import MissingInputError, UsageError

    check_options({k: v for k, v in d.items() if k != "data"})
    check_data(d["data"])
    if not d.get("bsq"):
        raise UsageError("--bsq is required: a BSQ-VAE run directory (fastvar train bsq --out DIR) or its exported "
                         ".safetensors")
    p = Path(str(d["bsq"])).expanduser()
    if not p.exists():
        raise MissingInputError(f"--bsq {d['bsq']}: does not exist; pass a BSQ-VAE run directory or its exported "
                                ".safetensors file (fastvar train bsq --out DIR makes one)")
    validate.number_in(d["bsc_rate"], "--bsc-rate", 0, 0.5, meaning="fraction of bits flipped", example="0.3")
    validate.int_at_least(d["bsc_layers"], "--bsc-layers", 0, "scales, 0 = all")
    if d["bsc_mode"] not in ("uniform", "fixed"):
        raise validate.fail("--bsc-mode", d["bsc_mode"], "unknown value", "use uniform (official) or fixed")
    if d["text_mode"] not in ("joint", "frozen"):
        raise validate.fail("--text-mode", d["text_mode"], "unknown value", "use joint or frozen")
    for k in ("t5_d_model", "t5_layers", "t5_heads", "t5_d_ff", "text_maxlen"):
        validate.int_at_least(d[k], "--" + k.replace("_", "-"), 1, "")
    if int(d["t5_d_model"]) % int(d["t5_heads"]):
        raise UsageError(f"--t5-d-model {d['t5_d_model']}: not divisible by --t5-heads {d['t5_heads']}")
    if d["text_features"]:
        f = Path(str(d["text_features"])).expanduser()
        if not f.is_file():
            raise MissingInputError(f"--text-features {d['text_features']}: no such file; write one with "
                                    "fastvar.train.infinity_train.precompute_text_features")
    z = d["zero"]
    if z not in (0, 2, 3):
        raise validate.fail("--zero", z, "unknown value", "use 0 (DDP), 2 or 3 (FSDP)")
    if int(z) and not torch.cuda.is_available():
        raise UsageError(f"--zero {z}: FSDP needs CUDA (no GPU here); use --zero 0 (DDP, works on CPU with gloo)")
    if int(z) and str(d.get("device", "auto")).startswith("cpu"):
        raise UsageError(f"--zero {z}: FSDP needs CUDA; drop --device cpu or use --zero 0")


def t2i_config(d: dict[str, Any], bsq_info: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The embedded-t2i config dict (TEXT's format: fastvar.models.embedded_t2i.resolve_config)."""
    from ..models.embedded_t2i import resolve_config

    sched = [int(s[0]) for s in bsq_info["schedule"]]
    cfg = {
        "image_size": int(bsq_info["image_size"]),
        "schedule": sched,
        "text": dict(vocab_size=int(vocab_size), d_model=int(d["t5_d_model"]), d_kv=int(d["t5_d_model"]) // int(d["t5_heads"]),
                     d_ff=int(d["t5_d_ff"]), num_layers=int(d["t5_layers"]), num_heads=int(d["t5_heads"]),
                     max_length=int(d["text_maxlen"]), trainable=d["text_mode"] == "joint"),
        "bsq": dict(bsq_info["bsq"]),
        "infinity": dict(embed_dim=int(d["embed_dim"]), depth=int(d["depth"]), num_heads=int(d["num_heads"]),
                         mlp_ratio=float(d["mlp_ratio"]), text_channels=int(d["t5_d_model"]),
                         text_maxlen=int(d["text_maxlen"]), d_vae=int(bsq_info["bsq"]["codebook_dim"]),
                         block_chunks=1, pad_to_multiplier=1, emulate_bf16_cross_attn=False,
                         cond_drop_rate=float(d["cond_drop_rate"])),
    }
    return resolve_config(cfg, vocab_size)


@torch.no_grad()
def _training_init(gpt: nn.Module) -> None:
    """Small output head (the official ``init_head`` idea): the first steps do not start from confident bits."""
    gpt.head.weight.mul_(0.02)
    gpt.head.bias.zero_()


def build_t2i(cfg: dict[str, Any], vocab: list[str], seed: int, text: bool = True) -> tuple[T2IModel, Any]:
    """(T2IModel with random weights, tokenizer) for a resolved config."""
    from ..models.embedded_t2i import build_embedded_t2i

    enc, _, gpt = build_embedded_t2i({**cfg, "vocab": vocab}, weights=None, seed=seed)
    _training_init(gpt)
    return T2IModel(gpt.train(), enc.encoder.train() if text else None), enc.tokenizer


# ----------------------------------------------------------------------------------------- training


def train_infinity(config: Any) -> dict[str, float]:
    """Train (or resume) a text-to-image Infinity on a frozen BSQ-VAE (see INFINITY_DEFAULTS for the options)."""
    d = merged(INFINITY_DEFAULTS, config)
    check_infinity_options(d)
    if int(d["threads"]) > 0:
        torch.set_num_threads(int(d["threads"]))
    lcfg = loop_config(d)
    info = init_distributed(d["device"])
    try:
        vae, binfo, bdesc = load_bsq(d["bsq"], bool(d["bsq_ema"]))
        vae = vae.to(info.device)
        sizes = tuple(tuple(int(v) for v in s) for s in binfo["schedule"])
        from ..models.embedded_t2i import default_vocab

        vocab = default_vocab()
        table = None
        mode = d["text_mode"]
        if d["text_features"]:
            from safetensors.torch import load_file

            table = load_file(str(Path(d["text_features"]).expanduser()))
            mode = "precomputed"
            d["t5_d_model"] = int(next(iter(table.values())).shape[-1])
        cfg = t2i_config(d, binfo, len(vocab))
        model, tok = build_t2i(cfg, vocab, lcfg.seed, text=mode != "precomputed")
        if mode == "frozen":
            model.text.requires_grad_(False).eval()
        model = model.to(info.device)
        text = TextFeatures(mode, tok, cfg["text"]["max_length"], table)
        data_fp = d["data"] if d["data"] in ("procedural-t2i", "procedural", "shapes") else "jsonl"
        fingerprint = {"kind": "infinity", "config": cfg, "vocab": vocab, "bsq_sha256": weights_digest(vae),
                       "data": data_fp, "text_mode": mode}
        meta = {"kind": "infinity", "t2i_config": cfg, "vocab": vocab, "bsq_source": bdesc, "text_mode": mode}
        bsc = {"rate": float(d["bsc_rate"]), "layers": int(d["bsc_layers"]), "mode": d["bsc_mode"]}
        weights = scale_loss_weights(sizes, bool(d["reweight_by_scale"]))
        fwd = BitTeacherForcing(model, vae, sizes, text, weights, bsc, float(d["label_smooth"])).to(info.device)
        trainer = _make_trainer(model, fwd, lcfg, info, fingerprint, meta, int(d["zero"]))
        source = T2ISource(d["data"], int(binfo["image_size"]), lcfg.batch_size, info.world_size, int(d["data_seed"]),
                           sizes, int(binfo["bsq"]["patch_size"]))

        def step_fn(module, step: int):
            random.seed(lcfg.seed * 1_000_003 + step * 131 + info.rank)  # condition dropout (python RNG)
            img, caps = source.get(step, info.rank)
            loss, m = module(img.to(info.device, non_blocking=True), caps)
            return loss, {k: float(v) for k, v in m.items()}

        return trainer.fit(step_fn)
    finally:
        cleanup(info)


def _make_trainer(model, fwd, lcfg, info, fingerprint, meta, zero: int) -> Trainer:
    if not zero:
        return Trainer(model, lcfg, info, fingerprint, meta, forward_module=fwd)
    return FSDPTrainer(model, lcfg, info, fingerprint, meta, forward_module=fwd, zero=zero)


class FSDPTrainer(Trainer):
    """The shared loop with the forward module wrapped in FSDP instead of DDP (``--zero 2|3``, CUDA only).

    ZeRO-2 = ``SHARD_GRAD_OP`` (gradients and optimizer state sharded), ZeRO-3 = ``FULL_SHARD`` (parameters
    too); ``use_orig_params`` keeps the parameter objects the optimizer was built on. What differs from
    the DDP path, and why:

    * gradient clipping uses FSDP's global norm (an optimizer pre-step hook): the loop's own clip would
      only see this rank's shards;
    * checkpoints hold the full (gathered) weights, so a run can resume with any ``--zero`` or on CPU;
      the optimizer moments are sharded per rank and are not saved: a resume re-initialises them
      (the DDP path resumes exactly);
    * no EMA (the average would be taken over shards): ``--ema`` must be 0.

    Not exercised in the CPU test suite (FSDP needs CUDA); the DDP path is.
    """

    def __init__(self, model, cfg, info, fingerprint, meta, forward_module, zero: int) -> None:
        from dataclasses import replace

        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy

        from ..errors import UsageError

        if info.device.type != "cuda":
            raise UsageError(f"--zero {zero}: FSDP needs CUDA; use --zero 0")
        if cfg.ema > 0:
            raise UsageError(f"--zero {zero}: EMA is not supported with FSDP (sharded weights); pass --ema 0 or --zero 0")
        strategy = ShardingStrategy.SHARD_GRAD_OP if zero == 2 else ShardingStrategy.FULL_SHARD
        self._fsdp = FSDP(forward_module, sharding_strategy=strategy, use_orig_params=True, device_id=info.device,
                          sync_module_states=True)
        single = type(info)(rank=info.rank, world_size=1, local_rank=info.local_rank, device=info.device)
        super().__init__(model, replace(cfg, grad_clip=0.0), single, fingerprint, meta, forward_module=self._fsdp)
        self.cfg, self.info, self.ddp = cfg, info, self._fsdp
        if cfg.grad_clip > 0:
            self.opt.register_step_pre_hook(lambda *_: self._fsdp.clip_grad_norm_(cfg.grad_clip))

    def _full_state(self) -> dict[str, Tensor]:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(self._fsdp, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            sd = self._fsdp.state_dict()  # collective: every rank calls it
        return {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")
                and not k.endswith(T2IModel._ALIAS[0])}

    def save(self) -> None:
        from .dist import barrier

        model = self._full_state()
        if self.info.is_main:
            meta = dict(self.meta, optimizer={"fsdp": True}, loop=vars(self.cfg) | {"betas": list(self.cfg.betas)})
            ck.save_checkpoint(self.out, self.step, {"model": model}, meta, self.fingerprint,
                               keep_last=self.cfg.keep_last, max_shard_bytes=int(self.cfg.max_shard_mb * 1024 * 1024))
        barrier(self.info)

    def try_resume(self) -> int:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        path = ck.find_latest(self.out) if self.cfg.resume else None
        if path is None:
            return 0
        meta, groups = ck.load_checkpoint(path, self.fingerprint)
        sd = {"model." + k: v for k, v in groups["model"].items()}
        alias, src = T2IModel._ALIAS
        if "model." + src in sd:
            sd["model." + alias] = sd["model." + src]
        with FSDP.state_dict_type(self._fsdp, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=True, rank0_only=False)):
            self._fsdp.load_state_dict(sd, strict=False)
        if self.info.is_main:
            print(f"[train] FSDP resume from step {meta['step']}: weights loaded, optimizer moments re-initialised",
                  flush=True)
        self.step = int(meta["step"])
        return self.step


# ----------------------------------------------------------------------------------------- export / helpers


def precompute_text_features(captions: list[str], text_encoder: Any, path: str | Path) -> Path:
    """Write ``caption -> (T, C)`` features (a frozen encoder's valid rows) for ``--text-features``."""
    from safetensors.torch import save

    from ..checkpoints import atomic_output

    table = {}
    for c in dict.fromkeys(captions):
        cond = text_encoder([c])
        table[c] = cond.kv_compact.float().cpu().contiguous()
    with atomic_output(Path(path)) as f:
        f.write(save(table))
    return Path(path)


def load_t2i_run(run: str | Path, prefer_ema: bool = True) -> tuple[T2IModel, Any, dict[str, Any], dict[str, Any]]:
    """(T2IModel in eval mode, tokenizer, config, meta) from an Infinity run directory's latest checkpoint."""
    p = Path(run)
    cdir = ck.find_latest(p) if not (p / "meta.json").is_file() else p
    if cdir is None:
        raise FileNotFoundError(f"no Infinity checkpoint in {p} (train one with `fastvar train infinity --out {p}`)")
    meta, groups = ck.load_checkpoint(cdir)
    if meta.get("kind") != "infinity":
        raise ValueError(f"{cdir} is a {meta.get('kind')!r} checkpoint, not an Infinity one")
    cfg, vocab = meta["t2i_config"], meta["vocab"]
    model, tok = build_t2i(cfg, vocab, 0, text=meta.get("text_mode") != "precomputed")
    use_ema = prefer_ema and "ema" in groups
    model.load_state_dict(groups["ema"] if use_ema else groups["model"], strict=True)
    meta = dict(meta, ema=use_ema, checkpoint=str(cdir))
    return model.eval(), tok, cfg, meta


def export_t2i(run: str | Path, bsq: str | Path, folder: str | Path, prefer_ema: bool = True,
               sampling: dict[str, Any] | None = None, dtype: torch.dtype = torch.float16) -> dict[str, Path]:
    """Write the embedded-t2i asset files (TEXT's format) from an Infinity run + its BSQ-VAE."""
    from ..models.embedded_t2i import DEFAULT_CONFIG, save_embedded_t2i
    from ..text.word_tokenizer import WordT5TextEncoder

    model, tok, cfg, meta = load_t2i_run(run, prefer_ema)
    if not hasattr(model, "text"):
        raise ValueError("this run used precomputed text features; the embedded-t2i export needs its T5")
    vae, _, bdesc = load_bsq(bsq)
    enc = WordT5TextEncoder(model.text, tok, max_length=cfg["text"]["max_length"])
    out = dict(cfg, sampling=dict(sampling or DEFAULT_CONFIG["sampling"]),
               train={"step": int(meta["step"]), "ema": bool(meta["ema"]), "bsq": bdesc,
                      "checkpoint": str(meta["checkpoint"])})
    return save_embedded_t2i(folder, out, enc, vae, model.gpt, dtype=dtype)


def compact_checkpoint(run: str | Path, dtype: torch.dtype = torch.bfloat16, drop_optimizer: bool = False) -> Path:
    """Rewrite a run's latest checkpoint with the model and EMA weights in ``dtype`` (in place, same step).

    Why: a committed resume point of the 7.4 M-parameter model is ~90 MB in float32 (weights + EMA +
    moments); in bfloat16 it is half that. Resuming from it continues at the same step (the fp32 master
    weights are re-created from the rounded ones), so it is not bit-identical to an uninterrupted run.
    ``drop_optimizer`` also leaves out the AdamW moments (~30 MB here): a resume then restarts them from
    zero (bias-corrected, as at step 0) while the step count and the LR schedule continue.
    """
    p = Path(run)
    cdir = ck.find_latest(p)
    if cdir is None:
        raise FileNotFoundError(f"no checkpoint in {p}")
    meta, groups = ck.load_checkpoint(cdir)
    fingerprint, step = meta.pop("fingerprint"), int(meta.pop("step"))
    meta.pop("files", None)
    small = {g: {k: (v.to(dtype) if g in ("model", "ema") and v.is_floating_point() else v) for k, v in t.items()}
             for g, t in groups.items() if not (drop_optimizer and g == "optim")}
    if drop_optimizer:
        meta["optimizer"] = dict(meta["optimizer"], scalars={})
    return ck.save_checkpoint(p, step, small, dict(meta, compact=str(dtype).removeprefix("torch.")), fingerprint,
                              keep_last=1)


def describe_run(run: str | Path) -> str:
    """One line: step and last logged metrics of a run (for the README status log)."""
    p = Path(run)
    latest = ck.find_latest(p)
    meta = json.loads((latest / "meta.json").read_text()) if latest else {}
    return f"{p}: step {meta.get('step')}"
