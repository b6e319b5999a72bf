"""``fastvar train vqvae ...`` / ``fastvar train var ...`` argument parsing (wired into ``fastvar.cli``).

Options are generated from the trainers' default tables, so the CLI and the Python API cannot drift.
Every option defaults to ``None`` on the command line so that the trainers' defaults apply.
"""

from __future__ import annotations

import argparse
from typing import Any

_HELP = {
    "out": "run directory (checkpoints, log.csv); an existing run there is resumed automatically",
    "data": "'procedural' (built-in shapes) or an ImageNet-style folder root/<class>/*.JPEG",
    "vqvae": "VQVAE run directory (latest checkpoint) or .safetensors file with its .json config",
    "steps": "total optimizer steps (the cosine schedule ends there)",
    "batch_size": "batch size per process",
    "amp": "auto | bf16 | fp16 | none (CPU always trains in fp32)",
    "ema": "EMA decay (0 = off)",
    "ckpt_every": "write a checkpoint every N steps",
    "threads": "torch CPU threads (0 = torch default)",
    "time_limit": "stop with a checkpoint after this many seconds (0 = no limit)",
    "pg": "progressive training: fraction of the steps that grow the scale prefix (0 = off)",
    "pg0": "progressive training: index of the last scale trained at the start",
    "pgwp": "progressive training: steps over which a new scale's loss weight ramps up",
    "moments_dtype": "dtype of the optimizer moments on disk: bf16 (half size) or fp32",
    "schedule": "latent sides of the scales, comma-separated; the last = image size / VAE stride",
    "bsq": "BSQ-VAE run directory (latest checkpoint) or .safetensors file with its .json config",
    "bsc_rate": "Bitwise Self-Correction: flip probability of the teacher-forced bits (0 = off)",
    "bsc_layers": "Bitwise Self-Correction: corrupt the first N scales (0 = all)",
    "bsc_mode": "uniform: each step draws its rate from [0, --bsc-rate] (official); fixed: exactly --bsc-rate",
    "text_mode": "joint (train the T5 with the transformer) | frozen (fixed T5, features cached per caption)",
    "text_features": "precomputed features: a .safetensors file of caption -> (T, C) features (overrides --text-mode)",
    "zero": "0 = DDP; 2 / 3 = FSDP (shard grads+optimizer / also parameters; needs CUDA)",
    "reweight_by_scale": "official per-scale loss weights (sqrt(last area / scale area), normalised)",
}


def _add_options(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    from ..validate import cli_float, cli_int
    from .loop import LoopConfig

    loop_defaults = {k: v for k, v in vars(LoopConfig(out="")).items() if k not in ("extra", "resume")}
    table = {**loop_defaults, **defaults}
    for k, v in table.items():
        flag = "--" + k.replace("_", "-")
        h = _HELP.get(k, "")
        if isinstance(v, bool):
            p.add_argument(flag, dest=k, default=None, action=argparse.BooleanOptionalAction, help=f"{h} (default {v})")
        elif isinstance(v, tuple):
            p.add_argument(flag, dest=k, default=None, help=f"{h} comma-separated (default {','.join(map(str, v))})")
        else:
            typ = cli_int if isinstance(v, int) else cli_float if isinstance(v, float) else str
            p.add_argument(flag, dest=k, type=typ, default=None, required=k == "out",
                           help=f"{h} (default {v})" if v is not None else h)
    p.add_argument("--no-resume", dest="resume", action="store_false", default=None,
                   help="ignore an existing checkpoint in --out (it is overwritten by the next save)")


def add_train_subparsers(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` with sub-commands ``vqvae`` and ``var`` to an argparse sub-parser collection.

    Each sub-command sets ``func`` to a callable taking the parsed namespace.
    """
    from .bsq_train import BSQ_DEFAULTS
    from .infinity_train import INFINITY_DEFAULTS
    from .var_train import VAR_DEFAULTS
    from .vqvae_train import VQVAE_DEFAULTS

    train = subparsers.add_parser("train", help="train a VQVAE, VAR, BSQ-VAE or Infinity (torchrun-compatible)")
    sub = train.add_subparsers(dest="train_command", required=True, metavar="{vqvae,var,bsq,infinity}")
    pv = sub.add_parser("vqvae", help="train the multi-scale VQVAE tokenizer",
                        description="Reconstruction + multi-scale VQ training; resumes from --out automatically.")
    _add_options(pv, VQVAE_DEFAULTS)
    pv.set_defaults(func=_run_vqvae)
    pa = sub.add_parser("var", help="train a class-conditional VAR on a frozen VQVAE",
                        description="Teacher-forcing training; resumes from --out automatically. "
                        "Multi-process: torchrun --nproc_per_node N -m fastvar.cli train var ...")
    _add_options(pa, VAR_DEFAULTS)
    pa.set_defaults(func=_run_var)
    pb = sub.add_parser("bsq", help="train a BSQ-VAE (Infinity's bitwise tokenizer)",
                        description="Reconstruction + multi-scale BSQ (commitment, entropy) training; resumes from "
                        "--out automatically.")
    _add_options(pb, BSQ_DEFAULTS)
    pb.set_defaults(func=_run_bsq)
    pi = sub.add_parser("infinity", help="train a text-to-image Infinity on a frozen BSQ-VAE",
                        description="Bit-label teacher forcing with Bitwise Self-Correction; resumes from --out "
                        "automatically. Multi-process: torchrun --nproc_per_node N -m fastvar.cli train infinity ...")
    _add_options(pi, INFINITY_DEFAULTS)
    pi.set_defaults(func=_run_infinity)
    return train


def _run_bsq(args: argparse.Namespace) -> int:
    from .bsq_train import train_bsq

    train_bsq(args)
    return 0


def _run_infinity(args: argparse.Namespace) -> int:
    from .infinity_train import train_infinity

    train_infinity(args)
    return 0


def _run_vqvae(args: argparse.Namespace) -> int:
    from .vqvae_train import train_vqvae

    train_vqvae(args)
    return 0


def _run_var(args: argparse.Namespace) -> int:
    from .var_train import train_var

    train_var(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m fastvar.train.cli vqvae ...``), usable under torchrun.

    A bad option is printed as one line (``fastvar: error: ...``, exit status 2), as by ``fastvar train``.
    """
    import sys

    from ..errors import UsageError
    from ..validate import UsageParser

    parser = UsageParser(prog="fastvar")
    add_train_subparsers(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(["train", *(argv if argv is not None else sys.argv[1:])])
        return args.func(args)
    except UsageError as e:
        print(f"fastvar: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
