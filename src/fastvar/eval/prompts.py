"""The three prompt-file formats of the evaluation suite, read into one list of :class:`PromptItem`.

Why one reader: generation, the GenEval scorer, CLIP score, HPS and ImageReward all need the same thing
per prompt folder (the prompt text, GenEval's ``include``/``exclude`` clauses, the MJHQ category), and
every format error must surface as one line *before* any model is loaded.

Formats (chosen by content, not only by name, so a GenEval file saved as ``.txt`` still reads right):

* GenEval metadata JSONL (``evaluation_metadata.jsonl``): one JSON object per line with ``tag``,
  ``include`` (``[{"class", "count", "color"?, "position": [relation, group]?}]``), ``exclude``? and ``prompt``;
* MJHQ-30K ``meta_data.json``: ``{id: {"prompt", "category"}}``;
* plain text: one prompt a line (blank lines are skipped);
* class ids (``--classes-file``): one whole number a line, for class-conditional models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..validate import input_file

GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""GenEval's six tasks (the ``tag`` of each metadata line); the overall score is the mean of their accuracies."""

GENEVAL_RELATIONS = ("left of", "right of", "above", "below")


@dataclass
class PromptItem:
    """One prompt (or class id) of an evaluation run, with what the scorers need to know about it.

    ``metadata`` is exactly what generation writes to ``<index>/metadata.jsonl``: for GenEval files the
    original line (the official evaluator reads it back), for other formats ``{"prompt": ...}`` plus the
    MJHQ ``category``/``id`` or the ``class_id``.
    """

    index: int
    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)
    class_id: int | None = None
    category: str | None = None


def _fail(flag: str, path: Path, problem: str, fix: str) -> UsageError:
    return UsageError(f"{flag} {path}: {problem}; {fix}")


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _fail(flag, path, "not a UTF-8 text file", "pass a .jsonl, .json or .txt prompt file") from None


def _check_geneval_line(obj: Any, path: Path, lineno: int, flag: str) -> dict:
    """One GenEval metadata line, checked against what the evaluator indexes (so scoring cannot fail later)."""
    where = f"line {lineno}"
    fix = "each line must look like GenEval's evaluation_metadata.jsonl"
    if not isinstance(obj, dict):
        raise _fail(flag, path, f"{where} holds a {type(obj).__name__}, not an object", fix)
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _fail(flag, path, f"{where} has no non-empty \"prompt\"", fix)
    if "include" in obj or "tag" in obj:
        if not isinstance(obj.get("tag"), str):
            raise _fail(flag, path, f"{where} has \"include\" but no \"tag\" string", fix)
        groups = obj.get("include", [])
        if not isinstance(groups, list):
            raise _fail(flag, path, f"{where}: \"include\" is not a list", fix)
        for key in ("include", "exclude"):
            clauses = obj.get(key, [])
            if not isinstance(clauses, list):
                raise _fail(flag, path, f"{where}: \"{key}\" is not a list", fix)
            for c in clauses:
                if not isinstance(c, dict) or not isinstance(c.get("class"), str) or not isinstance(c.get("count"), int):
                    raise _fail(flag, path, f"{where}: an \"{key}\" clause lacks \"class\" (text) or \"count\" (int)", fix)
        for gi, c in enumerate(groups):
            if "position" in c:
                pos = c["position"]
                ok = (isinstance(pos, list) and len(pos) == 2 and pos[0] in GENEVAL_RELATIONS and isinstance(pos[1], int)
                      and 0 <= pos[1] < gi)
                if not ok:
                    raise _fail(flag, path, f"{where}: \"position\" {pos!r} must be [relation, earlier include index] "
                                f"with a relation in {list(GENEVAL_RELATIONS)}", fix)
    return obj


def _geneval(text: str, path: Path, flag: str) -> list[PromptItem]:
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(flag, path, f"line {lineno} is not valid JSON ({e.msg})",
                        "GenEval metadata has one JSON object per line") from None
        obj = _check_geneval_line(obj, path, lineno, flag)
        items.append(PromptItem(len(items), obj["prompt"], obj))
    return items


def _mjhq(text: str, path: Path, flag: str) -> list[PromptItem]:
    fix = "MJHQ-30K's meta_data.json maps each image id to {\"prompt\", \"category\"}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(flag, path, f"not valid JSON ({e.msg} at line {e.lineno})", fix) from None
    if not isinstance(data, dict):
        raise _fail(flag, path, f"the JSON holds a {type(data).__name__}, not an object of id -> entry", fix)
    items = []
    for key, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            raise _fail(flag, path, f"entry {key!r} has no non-empty \"prompt\"", fix)
        cat = entry.get("category")
        meta = {"prompt": entry["prompt"], "id": str(key)}
        if cat is not None:
            meta["category"] = str(cat)
        items.append(PromptItem(len(items), entry["prompt"], meta, category=None if cat is None else str(cat)))
    return items


def _plain(text: str) -> list[PromptItem]:
    lines = [ln.strip() for ln in text.splitlines()]
    return [PromptItem(i, p, {"prompt": p}) for i, p in enumerate(p for p in lines if p)]


def _is_mjhq(text: str) -> bool:
    """One JSON document mapping ids to objects (a one-line GenEval file has string values, so it is not)."""
    if not text.startswith("{"):
        return False
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and bool(data) and all(isinstance(v, dict) for v in data.values())


def load_prompts(path: str | Path, flag: str = "--prompts-file") -> list[PromptItem]:
    """Prompts of a GenEval JSONL, an MJHQ ``meta_data.json`` or a plain text file, in file order.

    The format is the file's content: a ``.json`` file (or text starting with ``{`` that is one JSON
    document) is MJHQ; a file whose non-blank lines all start with ``{`` is GenEval JSONL; anything else
    is one prompt a line. Raises a one-line :class:`UsageError` naming ``flag`` for a missing, empty or
    malformed file.
    """
    p = input_file(path, flag, "a prompt file (GenEval .jsonl, MJHQ meta_data.json or one prompt a line)")
    text = _read_text(p, flag)
    stripped = text.strip()
    if not stripped:
        raise _fail(flag, p, "the file is empty", "put one prompt a line, or pass GenEval/MJHQ metadata")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if p.suffix == ".json" or _is_mjhq(stripped):
        items = _mjhq(text, p, flag)
    elif p.suffix == ".jsonl" or all(ln.lstrip().startswith("{") for ln in lines):
        items = _geneval(text, p, flag)
    else:
        items = _plain(text)
    if not items:
        raise _fail(flag, p, "holds no prompts", "put one prompt a line, or pass GenEval/MJHQ metadata")
    return items


def class_items(class_ids: list[int], procedural: bool = False) -> list[PromptItem]:
    """One item per class id; for the embedded (procedural) model also GenEval metadata a detector can check.

    Why the GenEval clause for the embedded model: its class ``c`` *is* a coloured shape ("red circle"), so
    the same scorer that checks "a photo of a red bench" on an official model checks "a red circle" here,
    with the procedural detector instead of Mask2Former (task ``colors``: one object of that class and colour).
    """
    items = []
    for i, c in enumerate(class_ids):
        meta: dict[str, Any] = {"class_id": int(c)}
        if procedural:
            from ..train.data import COLOURS, SHAPES

            shape, colour = SHAPES[c % len(SHAPES)], COLOURS[c // len(SHAPES)]
            meta.update({"tag": "colors", "include": [{"class": shape, "count": 1, "color": colour}],
                         "prompt": f"a photo of a {colour} {shape}"})
        else:
            meta["prompt"] = f"class {c}"
        items.append(PromptItem(i, meta["prompt"], meta, class_id=int(c)))
    return items


def load_class_ids(path: str | Path, num_classes: int, flag: str = "--classes-file") -> list[int]:
    """Class ids, one whole number a line (blank lines and ``#`` comments skipped), each in [0, num_classes)."""
    p = input_file(path, flag, "a class-id file (one id a line)")
    ids = []
    for lineno, line in enumerate(_read_text(p, flag).splitlines(), 1):
        s = line.split("#", 1)[0].strip()
        if not s:
            continue
        try:
            c = int(s)
        except ValueError:
            raise _fail(flag, p, f"line {lineno} ({s!r}) is not a whole number", "put one class id a line") from None
        if not 0 <= c < num_classes:
            raise _fail(flag, p, f"line {lineno}: class id {c} is out of range", f"valid ids are 0..{num_classes - 1}")
        ids.append(c)
    if not ids:
        raise _fail(flag, p, "holds no class ids", "put one class id a line")
    return ids


__all__ = ["GENEVAL_RELATIONS", "GENEVAL_TASKS", "PromptItem", "class_items", "load_class_ids", "load_prompts"]
