"""fastvar.train: procedural data + checker, VQVAE / VAR trainers (DDP-ready), checkpoints, embedded model.

Entry points used by the CLI: :func:`train_vqvae`, :func:`train_var`, :func:`add_train_subparsers`,
:func:`check_embedded`, :func:`load_embedded`.
"""

from __future__ import annotations

from typing import Any


def train_vqvae(config: Any) -> dict[str, float]:
    from .vqvae_train import train_vqvae as _f

    return _f(config)


def train_var(config: Any) -> dict[str, float]:
    from .var_train import train_var as _f

    return _f(config)


def add_train_subparsers(subparsers):
    from .cli import add_train_subparsers as _f

    return _f(subparsers)


def check_embedded(samples: int = 100, seed: int = 0, device: str = "cpu", **kw) -> dict[str, Any]:
    from .check import check_embedded as _f

    return _f(samples, seed, device, **kw)


def load_embedded(device: str = "cpu", assets=None):
    from .embedded import load_embedded as _f

    return _f(device, assets)


__all__ = ["add_train_subparsers", "check_embedded", "load_embedded", "train_var", "train_vqvae"]
