"""Fixture access for the parity tests.

The folder comes from ``FASTVAR_PARITY_DIR`` (default ``../shared/parity`` next to the repo), and
every configuration value is read from the fixture's own JSON, so another fixture set with the same
layout (other seed, other tiny config) is checked by the same tests.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def parity_dir() -> Path:
    return Path(os.environ.get("FASTVAR_PARITY_DIR", REPO.parent / "shared" / "parity")).resolve()


def _natural(name: str) -> list:
    """Sort key that orders ``x_s2`` before ``x_s10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass
class Fixture:
    root: Path
    config: dict
    cases: dict
    tensors: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]

    def case(self, name: str) -> dict:
        return self.cases["cases"][name] if "cases" in self.cases else self.cases[name]

    def t(self, name: str) -> torch.Tensor:
        """A stored tensor; a name the case's JSON lists as ``{"same_as": "<tensor>"}`` resolves to that tensor."""
        if name not in self.tensors:
            case = name.split(".input.")[0].split(".output.")[0]
            entry = self.case(case).get("tensors", {}).get(name) if case in self.case_names() else None
            if isinstance(entry, dict) and entry.get("same_as") in self.tensors:
                return self.tensors[entry["same_as"]]
        return self.tensors[name]

    def case_names(self) -> list[str]:
        """Every case of ``cases.json`` (entries such as ``_conventions`` and ``naming`` are not cases)."""
        table = self.cases["cases"] if "cases" in self.cases else self.cases
        return [k for k, v in table.items() if not k.startswith("_") and isinstance(v, dict) and "tensors" in v]

    def names(self, case: str, kind: str = "output") -> list[str]:
        """The ``<name>`` part of every ``<case>.<kind>.<name>`` tensor stored in cases.safetensors."""
        head = f"{case}.{kind}."
        return sorted(k[len(head):] for k in self.tensors if k.startswith(head))

    def matching(self, case: str, pattern: str, kind: str = "output") -> list[re.Match]:
        """The stored ``<case>.<kind>.<name>`` names that fully match ``pattern`` (a regex), as matches."""
        found = [m for n in self.names(case, kind) if (m := re.fullmatch(pattern, n))]
        return sorted(found, key=lambda m: _natural(m.group(0)))

    def one(self, case: str, pattern: str, kind: str = "output") -> str:
        """The single stored name of ``case`` that matches ``pattern``; fails (never skips) otherwise."""
        found = self.matching(case, pattern, kind)
        assert len(found) == 1, f"{case}: expected one {kind} matching {pattern!r}, found {[m.group(0) for m in found]}"
        return f"{case}.{kind}.{found[0].group(0)}"

    def cases_storing(self, pattern: str, kind: str = "output") -> list[str]:
        """The cases that store a ``<kind>`` tensor whose name fully matches ``pattern``."""
        return [c for c in self.case_names() if self.matching(c, pattern, kind)]

    def per_scale(self, prefix: str) -> list[torch.Tensor]:
        """``<prefix>_s0, <prefix>_s1, ...`` in scale order."""
        out, i = [], 0
        while f"{prefix}_s{i}" in self.tensors:
            out.append(self.tensors[f"{prefix}_s{i}"])
            i += 1
        return out

    def weights_with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Sub-model weights with the prefix stripped, floats cast to float32 as the README instructs."""
        return {
            k[len(prefix):]: (v.float() if v.is_floating_point() else v)
            for k, v in self.weights.items()
            if k.startswith(prefix)
        }


@cache
def load_fixture(model: str) -> Fixture:
    root = parity_dir() / model
    tiny = root / "tiny"
    if not tiny.is_dir():
        raise FileNotFoundError(
            f"parity fixtures for {model!r} not found at {tiny}; set FASTVAR_PARITY_DIR to the folder holding "
            f"<model>/tiny/ (default ../shared/parity)"
        )
    return Fixture(
        root=root,
        config=json.loads((tiny / "config.json").read_text()),
        cases=json.loads((tiny / "cases.json").read_text()),
        tensors=load_file(str(tiny / "cases.safetensors")),
        weights=load_file(str(tiny / "weights.safetensors")),
    )


def nonempty(items: list, what: str) -> list:
    """A parametrize list read from the fixture; empty means the fixture lacks it: an error, never a skip."""
    if not items:
        raise AssertionError(f"the parity fixture has no {what}")
    return items


def manifest_files(model: str) -> list[Path]:
    return sorted(p for p in (parity_dir() / model / "manifest").glob("*.json") if p.name != "index.json")


DEFAULT_THREADS = 2  # what the fixtures were made with where config.json does not record it


@pytest.fixture(autouse=True)
def _deterministic_threads(request):
    """Run with the fixture's thread count (config.json ``num_threads`` where recorded): oneDNN's accumulation
    order depends on it. A test module names its fixture folder in ``PARITY_MODEL``."""
    model = getattr(request.module, "PARITY_MODEL", None)
    threads = load_fixture(model).config.get("num_threads", DEFAULT_THREADS) if model else DEFAULT_THREADS
    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    yield
    torch.set_num_threads(old)
