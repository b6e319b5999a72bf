"""The training loop shared by the VQVAE and VAR trainers.

Everything that is not model-specific lives here: AdamW, warm-up + cosine LR, gradient clipping, optional
EMA, AMP (bf16/fp16 autocast on CUDA, fp32 on CPU), DDP, CSV logging, periodic crash-safe checkpoints and
automatic resume. Resume is exact without saving RNG or data-loader state: the batch of step ``s`` and
the random seed of step ``s`` are pure functions of ``(seed, s, rank)``.
"""

from __future__ import annotations

import csv
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import ckpt as ck
from .dist import DistInfo, all_reduce_mean, barrier, broadcast_object


@dataclass
class LoopConfig:
    out: str
    steps: int = 1000
    batch_size: int = 16  # per process
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 2.0
    ema: float = 0.0  # 0 disables EMA
    amp: str = "auto"  # auto | bf16 | fp16 | none
    ckpt_every: int = 200
    log_every: int = 10
    keep_last: int = 2
    seed: int = 0
    resume: bool = True
    moments_dtype: str = "bf16"  # optimizer moments on disk: bf16 | fp32
    max_shard_mb: float = 24.0
    time_limit: float = 0.0  # seconds; 0 = none. Stop (with a checkpoint) after this much wall time.
    extra: dict[str, Any] = field(default_factory=dict)


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    t = min(max(step - cfg.warmup, 0) / span, 1.0)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * t))


def amp_setup(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed). CPU always trains in fp32."""
    if device.type != "cuda" or mode == "none":
        return None, False
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "bf16":
        return torch.bfloat16, False
    if mode == "fp16":
        return torch.float16, True
    raise ValueError(f"unknown --amp {mode!r} (auto, bf16, fp16, none)")


class EMA:
    """Exponential moving average of the trainable parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.is_floating_point():
                s.mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                s.copy_(v)


def _rewrite_log(path: Path, upto: int) -> None:
    """Drop log rows past the resumed step (they belong to work lost in a kill)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    keep = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= upto]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(keep)
    os.replace(tmp, path)


StepFn = Callable[[nn.Module, int], tuple[torch.Tensor, dict[str, float]]]


class Trainer:
    """Owns the optimisation state of one model and runs ``step_fn`` until ``cfg.steps``.

    ``step_fn(module, step)`` returns (loss, metrics) for this rank's batch of ``step``; ``module`` is
    ``forward_module`` (default: ``model``), DDP-wrapped when distributed. ``model`` is what is optimised
    and saved. ``fingerprint`` is what a checkpoint must match to be resumed.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: LoopConfig,
        info: DistInfo,
        fingerprint: dict[str, Any],
        meta: dict[str, Any] | None = None,
        param_groups: list[dict] | None = None,
        forward_module: nn.Module | None = None,
    ) -> None:
        self.model, self.cfg, self.info = model, cfg, info
        self.fingerprint, self.meta = fingerprint, dict(meta or {})
        self.out = Path(cfg.out)
        self.amp_dtype, need_scaler = amp_setup(cfg.amp, info.device)
        self.scaler = torch.amp.GradScaler("cuda") if need_scaler else None
        if param_groups is None:
            decay, no_decay = [], []
            for n, p in model.named_parameters():
                if p.requires_grad:
                    (no_decay if p.ndim <= 1 or n.endswith(".bias") or "pos_" in n else decay).append(p)
            param_groups = [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ]
        fused = info.device.type == "cuda"
        self.opt = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, fused=fused)
        self.ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
        self.step = 0
        fwd = forward_module if forward_module is not None else model
        self.ddp = DDP(fwd, device_ids=[info.device.index] if info.device.type == "cuda" else None) if info.distributed else fwd
        self._stop = False
        # model-specific extra state (e.g. code-usage counters) saved with every checkpoint
        self.extra_state: dict[str, torch.Tensor] = {}

    # -------------------------------------------------------------- checkpoints
    def state_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        groups = {"model": {k: v for k, v in self.model.state_dict().items()}}
        if self.ema is not None:
            groups["ema"] = self.ema.shadow
        mdt = torch.bfloat16 if self.cfg.moments_dtype == "bf16" else None
        opt_t, self._opt_rest = ck.optimizer_to_tensors(self.opt, mdt)
        groups["optim"] = opt_t
        if self.extra_state:
            groups["extra"] = self.extra_state
        return groups

    def save(self) -> None:
        if self.info.is_main:
            groups = self.state_groups()
            meta = dict(self.meta, optimizer=self._opt_rest, loop=vars(self.cfg) | {"betas": list(self.cfg.betas)})
            if self.scaler is not None:
                meta["scaler"] = {k: (float(v) if isinstance(v, float | int) else v) for k, v in
                                  self.scaler.state_dict().items()}
            ck.save_checkpoint(
                self.out, self.step, groups, meta, self.fingerprint,
                keep_last=self.cfg.keep_last, max_shard_bytes=int(self.cfg.max_shard_mb * 1024 * 1024),
            )
        barrier(self.info)

    def try_resume(self) -> int:
        """Load the latest checkpoint of ``cfg.out`` if any (and resume is on); returns the start step."""
        if not self.cfg.resume:
            return 0
        path = ck.find_latest(self.out)
        if path is None:
            return 0
        meta, groups = ck.load_checkpoint(path, self.fingerprint)
        missing, unexpected = self.model.load_state_dict(groups["model"], strict=False)
        if missing or unexpected:
            raise ck.CheckpointMismatchError(
                f"{path}: model weights do not match this configuration (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]})"
            )
        if self.ema is not None and "ema" in groups:
            for k, v in groups["ema"].items():
                self.ema.shadow[k].copy_(v)
        ck.optimizer_from_tensors(self.opt, groups.get("optim", {}), meta["optimizer"])
        for k, v in groups.get("extra", {}).items():
            if k in self.extra_state:
                self.extra_state[k].copy_(v)
        if self.scaler is not None and "scaler" in meta:
            self.scaler.load_state_dict(meta["scaler"])
        self.step = int(meta["step"])
        self.meta.update({k: v for k, v in meta.items() if k.startswith("user_")})
        return self.step

    # -------------------------------------------------------------- loop
    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop = True

    def fit(self, step_fn: StepFn, on_log: Callable[[int, dict], None] | None = None) -> dict[str, float]:
        cfg, info = self.cfg, self.info
        start = self.try_resume()
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _rewrite_log(self.out / "log.csv", start)
            print(f"[train] {self.out}: start at step {start} / {cfg.steps}", flush=True)
        old = {}
        if threading.current_thread() is threading.main_thread():  # graceful stop: checkpoint, then exit
            old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        t_begin = time.time()
        last: dict[str, float] = {}
        log_f = None
        writer = None
        new = False
        try:
            if info.is_main:
                new = not (self.out / "log.csv").is_file()
                log_f = open(self.out / "log.csv", "a", newline="")
            t0, t0_step = time.time(), self.step
            while self.step < cfg.steps:
                step = self.step
                lr = lr_at(step, cfg)
                for g in self.opt.param_groups:
                    g["lr"] = lr
                torch.manual_seed(cfg.seed * 1_000_003 + step * 131 + info.rank)
                self.ddp.train()
                ctx = torch.autocast(info.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
                with ctx:
                    loss, metrics = step_fn(self.ddp, step)
                self.opt.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.unscale_(self.opt)
                else:
                    loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e9)
                if self.scaler is not None:
                    self.scaler.step(self.opt)
                    self.scaler.update()
                elif torch.isfinite(gn):
                    self.opt.step()
                if self.ema is not None:
                    self.ema.update(self.model, step)
                self.step = step + 1
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    vals = torch.tensor([loss.detach().float().item()] + [float(v) for v in metrics.values()])
                    vals = all_reduce_mean(vals.to(info.device), info).cpu()
                    dt = (time.time() - t0) / max(self.step - t0_step, 1)
                    t0, t0_step = time.time(), self.step
                    last = {"loss": vals[0].item(), **{k: vals[i + 1].item() for i, k in enumerate(metrics)}}
                    row = {"step": self.step, "lr": lr, "grad_norm": float(gn), "s_per_step": dt, **last}
                    if info.is_main and log_f is not None:
                        if writer is None:
                            writer = csv.DictWriter(log_f, fieldnames=list(row))
                            if new:
                                writer.writeheader()
                        writer.writerow({k: row.get(k) for k in writer.fieldnames})
                        log_f.flush()
                        print("[train] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                    for k, v in row.items()), flush=True)
                    if on_log is not None:
                        on_log(self.step, row)
                stop = self._stop or (cfg.time_limit > 0 and time.time() - t_begin > cfg.time_limit)
                stop = bool(broadcast_object(stop, info))
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or stop:
                    self.save()
                if stop:
                    if info.is_main:
                        print(f"[train] stopping at step {self.step} (checkpoint written)", flush=True)
                    break
        finally:
            if log_f is not None:
                log_f.close()
            for s, h in old.items():
                signal.signal(s, h)
        return last
