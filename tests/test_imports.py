"""Every module of the installed package imports, and every third-party import is declared.

A package installed by hand on a development machine once hid a missing dependency: CI passed, a user's
fresh install failed. These tests fail in that situation: the first imports every module in the
environment the suite runs in (CI builds a fresh one), the second reads the imports from the source and
checks each against pyproject.toml, so an undeclared import fails even where the package happens to be
installed.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import sys
from pathlib import Path

import pytest

import fastvar

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "fastvar"
# import name -> distribution name where they differ
_ALIASES = {"PIL": "pillow", "huggingface_hub": "huggingface-hub", "flash_attn": "flash-attn", "yaml": "pyyaml",
            "open_clip": "open-clip-torch", "cleanfid": "clean-fid", "ImageReward": "image-reward",
            "gradio_client": "gradio-client", "sklearn": "scikit-learn"}


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(fastvar.__path__, prefix="fastvar."))


@pytest.mark.parametrize("name", _modules())
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def _norm(s: str) -> str:
    return re.sub(r"[-_.]+", "-", s).lower()


def _requirements() -> tuple[set[str], set[str]]:
    """(base distribution names, names declared only in extras)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10: the test extra installs tomli
        import tomli as tomllib
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda d: _norm(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0])  # noqa: E731
    base = {name(d) for d in proj["dependencies"]}
    extra = {name(d) for deps in proj.get("optional-dependencies", {}).values() for d in deps}
    return base, extra - base


def _third_party_imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(top-level module, line, guarded by ``except ImportError``) for every absolute import."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            types = [h.type for h in node.handlers]
            names = {t.id for ty in types if ty is not None
                     for t in (ty.elts if isinstance(ty, ast.Tuple) else [ty]) if isinstance(t, ast.Name)}
            if names & {"ImportError", "ModuleNotFoundError", "Exception"}:  # Exception: optional fast paths
                guarded |= {id(n) for b in node.body for n in ast.walk(b)}
    out = []
    for node in ast.walk(tree):
        mods = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
        for m in mods:
            top = m.split(".")[0]
            if top in sys.stdlib_module_names or top in ("fastvar", "__future__"):
                continue
            out.append((top, node.lineno, id(node) in guarded))
    return out


def test_every_import_is_declared() -> None:
    """Base imports must be base dependencies; an extra's import must be guarded (a clear message when missing)."""
    base, extra = _requirements()
    problems = []
    for f in sorted(SRC.rglob("*.py")):
        for top, line, guarded in _third_party_imports(ast.parse(f.read_text(), str(f))):
            dist = _norm(_ALIASES.get(top, top))
            where = f"{f.relative_to(ROOT)}:{line}"
            if dist in base:
                continue
            if dist not in extra:
                problems.append(f"{where}: `{top}` is declared nowhere in pyproject.toml")
            elif not guarded:
                problems.append(f"{where}: `{top}` is only an extra but its import has no `except ImportError` message")
    assert not problems, "\n".join(problems)
