"""Reading official checkpoint files safely and explaining mismatches.

Official files are plain state dicts (``torch.save``) or safetensors; we never unpickle arbitrary
objects (``weights_only=True``). A mismatch names the first differing keys and guesses which known
configuration the file looks like, because "wrong depth" is the usual cause.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """The file does not fit the model; the message lists differences and a fix."""


def read_state_dict(path: str | os.PathLike, top_key: str | None = None) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist; pass the path of a .pth or .safetensors file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p))
    else:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise CheckpointError(f"could not read {p} as a weights-only torch checkpoint: {e}") from e
    if top_key is not None and isinstance(sd, Mapping) and top_key in sd:
        sd = sd[top_key]
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{p} does not hold a state dict (found {type(sd).__name__})")
    return dict(sd)


def diff_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    return missing, unexpected, shapes


def mismatch_error(what: str, missing: list, unexpected: list, shapes: list, looks_like: str | None = None
                   ) -> CheckpointError | None:
    """The one message every loader gives for a file that does not fit: what differs, and what it looks like."""
    if not (missing or unexpected or shapes):
        return None
    parts = [f"checkpoint does not match {what}:"]
    if missing:
        parts.append(f"  {len(missing)} missing key(s), first: {missing[:5]}")
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected key(s), first: {unexpected[:5]}")
    if shapes:
        parts.append(f"  {len(shapes)} shape mismatch(es), first: {shapes[:5]}")
    if looks_like is not None:
        parts.append(f"  the file looks like: {looks_like}")
    return CheckpointError("\n".join(parts))


def load_checked(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    what: str,
    guess: Callable[[Mapping[str, torch.Tensor]], str] | None = None,
    ignore: tuple[str, ...] = (),
) -> None:
    """``load_state_dict(strict=True)`` with an error that says what differs and what the file looks like."""
    sd = {k: v for k, v in sd.items() if not any(re.fullmatch(p, k) for p in ignore)}
    missing, unexpected, shapes = diff_state_dict(model, sd)
    err = mismatch_error(what, missing, unexpected, shapes, guess(sd) if guess is not None and (missing or unexpected or shapes)
                         else None)
    if err is not None:
        raise err
    model.load_state_dict(sd, strict=True)


def resolve_file(path_or_hub_id: str, filename: str | None = None) -> Path:
    """A local file, a file inside a local folder, or ``owner/repo[:file]`` fetched with huggingface_hub.

    Without network the hub path fails fast with a message telling the user to pass a local path.
    """
    p = Path(path_or_hub_id).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if filename is None or not (p / filename).is_file():
            raise FileNotFoundError(f"folder {p} has no {filename!r}; pass the checkpoint file itself")
        return p / filename
    if re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w./-]+)?", path_or_hub_id) is None:
        raise FileNotFoundError(f"{path_or_hub_id!r} is neither an existing local path nor a hub id (owner/repo)")
    repo, _, fname = path_or_hub_id.partition(":")
    fname = fname or filename
    if not fname:
        raise ValueError(f"hub id {path_or_hub_id!r} needs a file name: use {path_or_hub_id}:<file>")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise ImportError(
            "downloading from the hub needs `pip install huggingface_hub`; or pass a local checkpoint path"
        ) from e
    try:
        return Path(hf_hub_download(repo_id=repo, filename=fname, etag_timeout=5))
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise ConnectionError(
            f"could not fetch {fname} from the hub repo {repo} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Without network, download it elsewhere and pass the local path, e.g. --weights /path/to/{fname}"
        ) from None
