"""Reading official checkpoint files safely and explaining mismatches.

Official files are plain state dicts (``torch.save``) or safetensors; we never unpickle arbitrary
objects (``weights_only=True``). A mismatch names the first differing keys and guesses which known
configuration the file looks like, because "wrong depth" is the usual cause.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

import torch
from torch import nn

from .errors import MissingInputError, UsageError


class CheckpointError(UsageError):
    """The file does not fit the model, or is no checkpoint at all; the message says what differs and the fix."""


class MissingCheckpointError(MissingInputError, CheckpointError):
    """A checkpoint path that does not exist (also a ``FileNotFoundError``)."""


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the format's own limit


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception's first line (library errors are often paragraphs), or its type."""
    text = str(exc).strip().splitlines()[0].strip() if str(exc).strip() else ""
    text = text.split(". ")[0].rstrip(".")
    if isinstance(exc, KeyError) or not text:
        text = f"{type(exc).__name__}: {text}" if text else f"{type(exc).__name__} (the file ends early?)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unreadable_checkpoint(path: str | os.PathLike, reason: str, flag: str = "--weights", fix: str | None = None
                          ) -> CheckpointError:
    """THE message for a file that cannot be read as a checkpoint (every loader raises this one).

    One line: the path, that it is not a readable checkpoint, a short reason, and the fix (``fix`` replaces
    the default "re-download it or pass the right file to ``flag``", e.g. for training run directories).
    """
    fix = fix or f"re-download it or pass the right file to {flag}"
    return CheckpointError(f"{path}: not a readable checkpoint (truncated or not a .pth/.safetensors file: "
                           f"{reason}); {fix}")


def _sniff(p: Path) -> str:
    """"safetensors", "zip" (``torch.save``) or "pickle" (legacy ``torch.save``) from the bytes, not the name.

    Raises ``ValueError(reason)`` for an empty, truncated or foreign file. Only headers are read (a few
    bytes, the safetensors JSON header, the zip central directory), so this is cheap on multi-GB files.
    """
    size = p.stat().st_size
    if size == 0:
        raise ValueError("the file is empty (0 bytes)")
    with open(p, "rb") as f:
        head = f.read(16)
        if len(head) >= 9 and head[8:9] == b"{":
            n = int.from_bytes(head[:8], "little")
            if n > _MAX_SAFETENSORS_HEADER or 8 + n > size:
                raise ValueError(f"safetensors header of {n} bytes does not fit in the {size}-byte file")
            f.seek(8)
            import json

            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise ValueError("the safetensors header is not valid JSON") from None
            ends = [int(v["data_offsets"][1]) for k, v in header.items()
                    if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
            need = 8 + n + max(ends, default=0)
            if need > size:
                raise ValueError(f"the tensors need {need} bytes but the file has {size}")
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        import zipfile

        try:
            with zipfile.ZipFile(p) as z:
                infos = z.infolist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ValueError(f"zip archive (torch.save format) is cut off: {short_reason(e)}") from None
        if any(i.header_offset + i.compress_size > size for i in infos):
            raise ValueError("zip archive (torch.save format) is cut off")
        return "zip"
    if head[:1] == b"\x80":  # a pickle protocol opcode: torch.save's legacy (pre-1.6) format
        return "pickle"
    if p.suffix == ".safetensors":
        raise ValueError("no safetensors header (the first 8 bytes + JSON)")
    raise ValueError(f"neither a torch.save zip/pickle nor safetensors (starts with {head[:8]!r})")


def check_checkpoint_file(path: str | os.PathLike, flag: str = "--weights", fix: str | None = None) -> str:
    """Cheap pre-flight check of one checkpoint file, run before any model is built: it exists, is a file,
    is readable and its header is intact. Returns its format (see :func:`_sniff`); raises a one-line
    :class:`CheckpointError` (:class:`MissingCheckpointError` when absent) naming ``flag`` and the fix."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingCheckpointError(f"{flag} {p}: no such file; pass the path of the .pth or .safetensors file")
    if p.is_dir():
        raise CheckpointError(f"{flag} {p}: is a folder, not a checkpoint file; pass the .pth/.safetensors file "
                              "inside it")
    denied = CheckpointError(f"{flag} {p}: permission denied (the file is not readable by this user); "
                             f"make it readable (chmod a+r {p}) or pass a readable copy to {flag}")
    if not os.access(p, os.R_OK):
        raise denied
    try:
        return _sniff(p)
    except PermissionError:
        raise denied from None
    except (ValueError, OSError) as e:
        raise unreadable_checkpoint(p, short_reason(e), flag, fix) from None


def read_state_dict(path: str | os.PathLike, top_key: str | None = None, flag: str = "--weights",
                    fix: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth``/``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors`` file.

    The format comes from the file's bytes, not its name. Every failure is one line naming ``flag``: a
    missing file, a folder, no permission, an empty/truncated/foreign file (:func:`unreadable_checkpoint`),
    pickled objects other than tensors (never unpickled), or content that is not a state dict.
    """
    p = Path(path).expanduser()
    fmt = check_checkpoint_file(p, flag, fix)
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise many types for damaged files
        if "weights only load failed" in str(e).lower() or "weights_only" in str(e):
            raise CheckpointError(
                f"{p}: holds pickled Python objects besides tensors, which fastvar never unpickles "
                f"(weights_only=True); {fix or f'pass a plain state-dict .pth or a .safetensors file to {flag}'}"
            ) from None
        raise unreadable_checkpoint(p, short_reason(e), flag, fix) from None
    if top_key is not None and isinstance(sd, Mapping) and top_key in sd:
        sd = sd[top_key]
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{p}: holds a {type(sd).__name__}, not a state dict (name -> tensor); "
                              f"pass the weights file to {flag}")
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


def looks_local(ref: str | os.PathLike) -> bool:
    """Whether a reference that does not exist was meant as a local path rather than a hub id.

    Hub ids are ``owner/repo[:file]`` (one slash before the colon); an absolute or ``./``/``~`` path, a
    checkpoint suffix without ``:`` or several slashes cannot be one, so its absence is reported at once
    instead of as a failed download.
    """
    s = str(ref)
    repo = s.partition(":")[0]
    return (isinstance(ref, os.PathLike) or s.startswith(("/", ".", "~")) or repo.count("/") != 1
            or (":" not in s and s.endswith(CHECKPOINT_SUFFIXES)))


def resolve_file(path_or_hub_id: str | os.PathLike, filename: str | None = None, flag: str = "--weights") -> Path:
    """A local file, a file inside a local folder, or ``owner/repo[:file]`` fetched with huggingface_hub.

    Without network the hub path fails fast with a message telling the user to pass a local path; a
    missing local path or a folder without ``filename`` fails with a one-line message naming ``flag``.
    """
    p = Path(path_or_hub_id).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if filename is None or not (p / filename).is_file():
            raise MissingCheckpointError(f"{flag} {p}: the folder has no {filename!r}; pass the checkpoint file "
                                         "itself")
        return p / filename
    path_or_hub_id = str(path_or_hub_id)
    if looks_local(path_or_hub_id) or re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w./-]+)?", path_or_hub_id) is None:
        raise MissingCheckpointError(f"{flag} {path_or_hub_id}: no such file or folder (and not a hub id "
                                     "owner/repo:file); pass the path of the downloaded checkpoint")
    repo, _, fname = path_or_hub_id.partition(":")
    fname = fname or filename
    if not fname:
        raise UsageError(f"{flag} {path_or_hub_id}: a hub id needs a file name; use {path_or_hub_id}:<file>")
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
            f"Without network, download it elsewhere and pass the local path, e.g. {flag} /path/to/{fname}"
        ) from None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` through a temporary file in the same folder, renamed into place only when the ``with``
    block succeeds: readers (and a resumed run) see the old file or the complete new one, never half a file.

    For writers that need a file object (``np.savez``, ``fig.savefig``); on any exception, KeyboardInterrupt
    included, the temporary file is removed and the target is left untouched.
    """
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the result is as readable as any file written by open()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
