"""Reusable checks of user input, shared by the command line and the public Python API.

Why a module of its own: a bad value must fail *before* anything heavy happens (a model is built, weights
are read, a text encoder is loaded), with the same one-line message whether it came from a flag or an
argument. Every check raises :class:`fastvar.errors.UsageError` (a ``ValueError``); the CLI prints it as
``fastvar: error: <message>`` and exits with status 2.

Each check takes the option's *name* as the user wrote it: ``"--top-k"`` on the command line,
``"top_k"`` in Python. Messages then read ``--top-k -3: ...; e.g. --top-k 900`` or
``top_k=-3: ...; e.g. top_k=900``, so the fix is written in the caller's own syntax.
"""

from __future__ import annotations

import argparse
import math
import numbers
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import MissingInputError, UsageError

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds; keep a margin for seed + chunk index


# ---------------------------------------------------------------------------------------------- wording
def shown(name: str, value: Any) -> str:
    """How the user wrote the option: ``--cfg -2`` (flag) or ``cfg=-2`` (keyword argument)."""
    return f"{name} {value}" if name.startswith("-") else f"{name}={value!r}"


def setting(name: str, text: str) -> str:
    """How to write a fixed value in the caller's syntax: ``--cfg 4`` / ``--device cpu`` or ``cfg=4`` /
    ``device='cpu'`` (words are quoted for Python; numbers, lists and literals are not)."""
    if name.startswith("-"):
        return f"{name} {text}"
    try:
        float(text)
        literal = True
    except ValueError:
        literal = text.startswith(("[", "(", "'", '"')) or text in ("True", "False", "None")
    return f"{name}={text if literal else repr(text)}"


def fail(name: str, value: Any, problem: str, fix: str) -> UsageError:
    """The one message format: ``<option value>: <problem>; <fix>`` (returned, to be raised by the caller)."""
    return UsageError(f"{shown(name, value)}: {problem}; {fix}")


# ---------------------------------------------------------------------------------------------- numbers
def whole(value: Any, name: str) -> int:
    """``value`` as an int: ints and numpy integers pass, bools/floats/strings do not (no silent rounding)."""
    if isinstance(value, bool):
        raise fail(name, value, "expected a whole number, not a bool", f"e.g. {setting(name, '1')}")
    try:
        return operator.index(value)
    except TypeError:
        raise fail(name, value, f"expected a whole number, not {type(value).__name__}",
                   f"e.g. {setting(name, '1')}") from None


def real(value: Any, name: str) -> float:
    """``value`` as a finite float (ints allowed; bools, strings, NaN and infinities are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise fail(name, value, f"expected a number, not {type(value).__name__}", f"e.g. {setting(name, '1.0')}")
    v = float(value)
    if not math.isfinite(v):
        raise fail(name, value, "expected a finite number", f"e.g. {setting(name, '1.0')}")
    return v


def int_at_least(value: Any, name: str, lo: int, meaning: str = "", example: int | None = None) -> int:
    """A whole number ``>= lo``; ``meaning`` says what the option counts (goes into the message)."""
    v = whole(value, name)
    if v < lo:
        what = f" ({meaning})" if meaning else ""
        raise fail(name, value, f"must be >= {lo}{what}", f"e.g. {setting(name, str(example if example is not None else lo))}")
    return v


def number_in(value: Any, name: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
              hi_open: bool = False, meaning: str = "", example: str | None = None) -> float:
    """A finite number in the interval given by ``lo``/``hi`` (closed unless ``lo_open``/``hi_open``)."""
    v = real(value, name)
    bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        if lo is not None and hi is not None:
            rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            rng = f"{'>' if lo_open else '>='} {lo:g}"
        else:
            rng = f"{'<' if hi_open else '<='} {hi:g}"
        what = f" ({meaning})" if meaning else ""
        ex = example if example is not None else f"{lo + 1 if lo_open else lo:g}" if lo is not None else f"{hi:g}"
        raise fail(name, value, f"must be {rng}{what}", f"e.g. {setting(name, ex)}")
    return v


# ---------------------------------------------------------------------------------------------- sampling
def seed(value: Any, name: str = "--seed") -> int | None:
    """None (the global RNG) or a whole number in [0, 2**63)."""
    if value is None:
        return None
    v = whole(value, name)
    if not 0 <= v <= SEED_MAX:
        raise fail(name, value, "seeds are whole numbers >= 0 (below 2**63)", f"e.g. {setting(name, '0')}")
    return v


def top_k(value: Any, name: str = "--top-k", allow_schedule: bool = False) -> Any:
    """None (the model's default), or a whole number >= 0 (0 turns top-k filtering off).

    ``allow_schedule``: HART also takes a per-scale sequence of ks or a callable ``scale index -> k``.
    """
    if value is None or (allow_schedule and callable(value)):
        return value
    if allow_schedule and isinstance(value, Sequence) and not isinstance(value, str):
        for k in value:
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
                raise fail(name, list(value), f"per-scale top-k values must be whole numbers >= 0, got {k!r}",
                           "e.g. [600] * 7 + [300] * 7")
        return value
    v = whole(value, name)
    if v < 0:
        raise fail(name, value, "must be >= 0 (0 turns top-k filtering off)", f"e.g. {setting(name, '900')}")
    return v


def top_p(value: Any, name: str = "--top-p") -> float | None:
    """None (the model's default) or a number in [0, 1] (0 turns top-p filtering off)."""
    if value is None:
        return None
    return number_in(value, name, 0.0, 1.0, meaning="the kept probability mass; 0 turns top-p filtering off",
                     example="0.95")


def guidance(value: Any, name: str = "--cfg", per_scale: bool = False) -> Any:
    """None (the model's default) or a classifier-free guidance scale >= 0 (``per_scale``: or one per scale)."""
    if value is None:
        return None
    if per_scale and isinstance(value, Sequence) and not isinstance(value, str):
        return [number_in(v, name, 0.0, meaning="guidance scale", example="4") for v in value]
    return number_in(value, name, 0.0, meaning="guidance scale", example="4")


def temperature(value: Any, name: str = "tau", per_scale: bool = False) -> Any:
    """None (the model's default) or a sampling temperature > 0 (``per_scale``: or one per scale)."""
    if value is None:
        return None
    if per_scale and isinstance(value, Sequence) and not isinstance(value, str):
        return [number_in(v, name, 0.0, lo_open=True, meaning="temperature", example="0.5") for v in value]
    return number_in(value, name, 0.0, lo_open=True, meaning="temperature", example="0.5")


def flag_bool(value: Any, name: str, allow_none: bool = False) -> bool | None:
    """A real bool (a string such as "false" is truthy and would silently mean True)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise fail(name, value, f"expected True or False, not {type(value).__name__}", f"e.g. {setting(name, 'True')}")
    return value


# ---------------------------------------------------------------------------------------------- conditions
def class_ids(values: Any, num_classes: int, name: str = "--classes", model: str = "this model") -> list[int]:
    """One or more whole class ids in [0, num_classes)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        values = [values]
    values = list(values)
    if not values:
        raise UsageError(f"{name}: no class ids given; give one or more ids in 0..{num_classes - 1}")
    out = []
    for c in values:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise UsageError(f"{name}: class id {c!r} is not a whole number; {model} is class-conditional: give ids "
                             f"in 0..{num_classes - 1} (text prompts need a text-to-image model)")
        out.append(int(c))
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise UsageError(f"{name}: class id(s) {bad} out of range for {model}; valid ids are 0..{num_classes - 1}")
    return out


def prompts(values: Any, name: str = "--prompts", model: str = "this model") -> list[str]:
    """One or more non-blank prompt strings (a single string is one prompt)."""
    values = [values] if isinstance(values, str) else values
    if values is None or not isinstance(values, Iterable):
        raise UsageError(f"{name}: {model} is text-to-image and needs prompt strings, got {type(values).__name__}; "
                         "pass a list of prompts, e.g. ['a red fox in the snow']")
    values = list(values)
    if not values:
        raise UsageError(f"{name}: no prompts given; pass one or more prompts, e.g. ['a red fox in the snow']")
    notstr = [v for v in values if not isinstance(v, str)]
    if notstr:
        raise UsageError(f"{name}: {model} is text-to-image and needs prompt strings, got {notstr[0]!r}; pass text "
                         "prompts (class ids need a class-conditional model)")
    empty = [i for i, v in enumerate(values) if not v.strip()]
    if empty:
        raise UsageError(f"{name}: prompt(s) at position {empty} are empty; give each image a non-blank prompt")
    return values


# ---------------------------------------------------------------------------------------------- devices
_DEVICE_TYPES = ("cpu", "cuda", "mps")


def device(value: Any, name: str = "--device", allow_auto: bool = False) -> Any:
    """A usable torch device: the string/``torch.device`` parses, its kind is supported and present.

    Returns a ``torch.device`` (None stays None: "the default"; ``"auto"`` stays ``"auto"`` when allowed).
    Why here: torch reports a missing CUDA with an ``AssertionError`` deep inside ``.to()``, after the
    model was built; this check names the flag, the torch build and the fix before anything is loaded.
    """
    import torch

    if value is None:
        return None
    if allow_auto and value == "auto":
        return "auto"
    use = "auto, cpu, cuda, cuda:N or mps" if allow_auto else "cpu, cuda, cuda:N or mps"
    if not isinstance(value, (str, torch.device)):
        raise fail(name, value, f"expected a device name, not {type(value).__name__}", f"use {use}")
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise fail(name, value, "not a device name", f"use {use}") from None
    if dev.type not in _DEVICE_TYPES:
        raise fail(name, value, f"fastvar runs on {', '.join(_DEVICE_TYPES)} devices only", f"use {use}")
    build = f"torch {torch.__version__}"
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise fail(name, value, f"CUDA is not available in this torch build ({build}, CPU-only)",
                       f"use {setting(name, 'cpu')} or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise fail(name, value, f"no CUDA device is visible ({build} built for CUDA {torch.version.cuda}; "
                       "check the driver and CUDA_VISIBLE_DEVICES)", f"use {setting(name, 'cpu')}")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            have = "cuda:0" if n == 1 else f"cuda:0 .. cuda:{n - 1}"
            raise fail(name, value, f"this machine has {n} CUDA device(s) ({have})",
                       f"use one of those, e.g. {setting(name, 'cuda:0')}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        why = ("this torch build has no MPS support" if not torch.backends.mps.is_built()
               else "MPS needs Apple silicon with macOS 12.3+")
        raise fail(name, value, f"MPS is not available ({build}: {why})", f"use {setting(name, 'cpu')}")
    return dev


def dtype(value: Any, name: str = "--dtype") -> Any:
    """A compute dtype name (fp32/bf16/fp16 or their torch spellings) or a floating ``torch.dtype``."""
    import torch

    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if isinstance(value, torch.dtype):
        if value not in table.values():
            raise fail(name, value, "not a compute dtype", "use fp32, bf16 or fp16")
        return value
    if value not in table:
        raise fail(name, value, "unknown dtype", "use fp32, bf16 or fp16")
    return table[value]


# ---------------------------------------------------------------------------------------------- files
def input_file(path: Any, name: str, what: str = "the file") -> Path:
    """An existing, readable regular file (not a folder)."""
    if not isinstance(path, (str, os.PathLike)):
        raise fail(name, path, f"expected a path, not {type(path).__name__}", f"pass the path of {what}")
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingInputError(f"{shown(name, str(path))}: does not exist; pass the path of {what}")
    if p.is_dir():
        raise fail(name, str(path), "is a folder, not a file", f"pass the path of {what}")
    if not os.access(p, os.R_OK):
        raise fail(name, str(path), "permission denied (not readable by this user)",
                   f"make it readable (chmod a+r {p}) or pass a readable copy")
    return p


def _nearest_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _unwritable(p: Path) -> str | None:
    """Why folder ``p`` cannot be written or created (None when it can)."""
    if p.exists() and not p.is_dir():
        return "exists and is not a folder"
    base = _nearest_existing(p)
    if not base.is_dir():
        return f"{base} is a file, so the folder cannot be created"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"{base} is not writable by this user"
    import tempfile

    try:  # the permission bits say nothing for root or on special file systems (/proc, read-only mounts)
        fd, probe = tempfile.mkstemp(prefix=".fastvar-write-test-", dir=base)
    except OSError as e:
        return f"{base} is not writable ({e.strerror or type(e).__name__})"
    os.close(fd)
    os.unlink(probe)
    return None


def output_dir(path: Any, name: str = "--out") -> Path:
    """A folder that exists and is writable, or can be created (its nearest existing parent is a writable folder).

    Nothing is created here: a job that fails later must not leave an empty output folder behind.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise fail(name, path, "expected a folder path", "pass a folder to write to")
    p = Path(path).expanduser()
    problem = _unwritable(p)
    if problem:
        raise fail(name, str(path), problem, "pass a folder you can write to")
    return p


def output_file(path: Any, name: str = "--json") -> Path:
    """A file path that can be written: not a folder, and its folder exists writable or can be created."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise fail(name, path, "expected a file path", "pass a file to write to")
    p = Path(path).expanduser()
    if p.is_dir():
        raise fail(name, str(path), "is a folder", "pass a file path, e.g. a .json file inside it")
    if p.exists() and not os.access(p, os.W_OK):
        raise fail(name, str(path), "the file is not writable by this user", "pass a file you can write")
    problem = _unwritable(p.parent)
    if problem:
        raise fail(name, str(path), f"its folder {p.parent}: {problem}", "pass a path you can write to")
    return p


def plan_file(path: Any, name: str = "--plan") -> Any:
    """An :class:`~fastvar.accel.AccelPlan` read from a readable JSON file; every failure is one line."""
    import json

    from .accel import AccelPlan, PlanError

    p = input_file(path, name, "a plan JSON file (write one with `fastvar plan fastvar > plan.json`)")
    try:
        data = json.loads(p.read_text())
    except UnicodeDecodeError:
        raise fail(name, str(path), "not a text file", "pass a plan JSON file (`fastvar plan fastvar > plan.json`)") from None
    except json.JSONDecodeError as e:
        raise fail(name, str(path), f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                   "fix the file or start from `fastvar plan fastvar > plan.json`") from None
    if not isinstance(data, dict):
        raise fail(name, str(path), f"the JSON holds a {type(data).__name__}, not a plan object",
                   "start from `fastvar plan fastvar > plan.json`")
    try:
        return AccelPlan.from_dict(data)
    except (PlanError, TypeError, ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise fail(name, str(path), f"invalid plan ({msg})", "fix the file or start from `fastvar plan fastvar`") from None


def plan(value: Any, name: str = "plan") -> Any:
    """What ``pipe(..., plan=...)`` accepts: None, an AccelPlan, a hooks object (an engine of policies),
    or a known preset name ("none" included)."""
    from .accel import AccelPlan, Hooks
    from .accel.presets import PRESETS

    if value is None or isinstance(value, (AccelPlan, Hooks)):
        return value
    if isinstance(value, str):
        if value == "none" or value in PRESETS:
            return value
        hint = (f"load a plan file with AccelPlan.from_json({value!r})" if value.endswith(".json")
                else f"known presets: {', '.join(sorted(PRESETS))}")
        raise fail(name, value, "unknown preset", hint)
    raise fail(name, value, f"expected an AccelPlan, a preset name or None, not {type(value).__name__}",
               f"e.g. {setting(name, repr('fastvar'))}")


# ---------------------------------------------------------------------------------------------- argparse
def _cli_type(convert: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return v

    parse.__name__ = what
    return parse


cli_int = _cli_type(int, "a whole number")
"""argparse ``type=``: a whole number, with a message that says so (not "invalid int value")."""
cli_float = _cli_type(float, "a finite number")
"""argparse ``type=``: a finite number (NaN and infinities are refused)."""


__all__ = [
    "class_ids", "cli_float", "cli_int", "device", "dtype", "fail", "flag_bool", "guidance", "input_file",
    "int_at_least", "number_in", "output_dir", "output_file", "plan", "plan_file", "prompts", "real", "seed",
    "setting", "shown", "temperature", "top_k", "top_p", "UsageParser", "whole",
]


class UsageParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose parse errors raise :class:`UsageError` instead of printing usage and exiting.

    Why: the CLI prints every usage error the same way (one line, ``fastvar: error: ...``, status 2), and
    in-process callers (tests, notebooks) get an exception rather than a ``SystemExit``. Sub-parsers
    inherit the class, so ``fastvar generate --top-k x`` behaves the same.
    """

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message}; see `{self.prog} --help`")
