"""Crash-safe, resumable training checkpoints.

Layout of a run directory::

    latest.json            {"step", "dir", "fingerprint"}; replaced atomically (temp file + os.replace)
    ckpt-00001200/         one complete checkpoint: *.safetensors shards + meta.json
    log.csv

A checkpoint directory is written under a temporary name, fsynced and renamed; only then is
``latest.json`` swapped to point at it, and only then are older checkpoints deleted. A run killed at
any instant therefore leaves ``latest.json`` pointing at a complete checkpoint (the old or the new one).
Tensors are stored as safetensors (no pickle) in shards of at most ``max_shard_bytes`` so that every
file stays small enough to commit; optimizer moments may be stored in bfloat16 to halve their size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoints import read_state_dict

LATEST = "latest.json"
_CKPT_RE = re.compile(r"^ckpt-(\d{8})$")
DEFAULT_SHARD_BYTES = 24 * 1024 * 1024


class CheckpointError(RuntimeError):
    """A checkpoint is missing pieces or cannot be read."""


class CheckpointMismatchError(ValueError):
    """The checkpoint in the run directory was written for a different model/data configuration."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON so that readers see either the old or the new content, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are meant to be shared/committed
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, name: str, max_bytes: int) -> list[str]:
    """Save ``tensors`` as ``name-00000.safetensors``, ... each at most ``max_bytes`` (one tensor per shard minimum)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nb = v.numel() * v.element_size()
        if shards[-1] and size + nb > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v.detach().contiguous().cpu()
        size += nb
    files = []
    for i, shard in enumerate(shards):
        fn = f"{name}-{i:05d}.safetensors"
        save_file(shard, str(folder / fn))
        files.append(fn)
    return files


def load_sharded(folder: Path, name: str) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob(f"{name}-*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {folder} has no '{name}' tensors")
    out: dict[str, torch.Tensor] = {}
    for f in files:  # a damaged shard is one line naming it and the way out
        out.update(read_state_dict(f, flag="--out", fix=f"delete {folder} to resume from the previous checkpoint, "
                                   "or pass --no-resume"))
    return out


def optimizer_to_tensors(opt: torch.optim.Optimizer, moment_dtype: torch.dtype | None) -> tuple[dict, dict]:
    """Split an optimizer state_dict into (tensors, json-able rest); moments optionally cast (e.g. bf16)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.numel() > 1:
                t = v.to(moment_dtype) if (moment_dtype is not None and v.is_floating_point()) else v
                tensors[f"{pid}.{k}"] = t
            else:
                scalars.setdefault(str(pid), {})[k] = v.item() if torch.is_tensor(v) else v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict, rest: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for pid, sc in rest["scalars"].items():
        for k, v in sc.items():
            state.setdefault(int(pid), {})[k] = torch.tensor(float(v)) if k == "step" else v
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, st in state.items():
        p = params[pid]
        for k, v in st.items():
            if torch.is_tensor(v) and v.is_floating_point() and v.numel() > 1:
                st[k] = v.to(device=p.device, dtype=p.dtype)
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    out = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = _CKPT_RE.match(p.name)
            if m and p.is_dir() and (p / "meta.json").is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    groups: dict[str, dict[str, torch.Tensor]],
    meta: dict[str, Any],
    fingerprint: dict[str, Any],
    keep_last: int = 2,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write ``groups`` (name -> tensors) and ``meta`` as checkpoint ``step``; atomically mark it latest."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"ckpt-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".ckpt-{step:08d}.", suffix=".tmp", dir=run_dir))
    try:
        files = {name: save_sharded(t, tmp, name, max_shard_bytes) for name, t in groups.items()}
        meta = dict(meta, step=step, fingerprint=fingerprint, files=files)
        with open(tmp / "meta.json", "w") as f:  # written last: its presence marks a complete directory
            json.dump(meta, f, indent=1, sort_keys=True)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(run_dir)
    write_json_atomic(run_dir / LATEST, {"step": step, "dir": final.name, "fingerprint": fingerprint})
    for s, p in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        if s != step:
            shutil.rmtree(p, ignore_errors=True)
    for p in run_dir.glob(".ckpt-*.tmp"):  # leftovers of killed runs
        shutil.rmtree(p, ignore_errors=True)
    return final


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The directory of the latest complete checkpoint, or None if the run has none yet."""
    run_dir = Path(run_dir)
    latest = run_dir / LATEST
    if latest.is_file():
        try:
            info = json.loads(latest.read_text())
            p = run_dir / info["dir"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{latest} is unreadable ({e}); delete it to fall back to the newest ckpt-*") from e
        if (p / "meta.json").is_file():
            return p
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Raise a readable error when a run directory belongs to another configuration."""
    keys = sorted(set(saved) | set(current))
    diffs = [f"  {k}: checkpoint={saved.get(k)!r} now={current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointMismatchError(
            f"cannot resume from {where}: it was written for a different configuration:\n"
            + "\n".join(diffs)
            + "\nUse another --out directory (or --no-resume to start over there)."
        )


def load_checkpoint(ckpt_dir: Path, fingerprint: dict[str, Any] | None = None) -> tuple[dict, dict[str, dict]]:
    """Read (meta, groups) from a checkpoint directory, checking the configuration fingerprint."""
    try:
        meta = json.loads((ckpt_dir / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {ckpt_dir / 'meta.json'}: {e}") from e
    if fingerprint is not None:
        check_fingerprint(meta.get("fingerprint", {}), fingerprint, ckpt_dir)
    groups = {name: load_sharded(ckpt_dir, name) for name in meta.get("files", {})}
    return meta, groups
