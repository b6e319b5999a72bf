"""Fixture access for the parity tests.

The folder comes from ``FASTVAR_PARITY_DIR`` (default ``../shared/parity`` next to the repo), and
every configuration value is read from the fixture's own JSON, so another fixture set with the same
layout (other seed, other tiny config) is checked by the same tests.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def parity_dir() -> Path:
    return Path(os.environ.get("FASTVAR_PARITY_DIR", REPO.parent / "shared" / "parity")).resolve()


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
        return self.tensors[name]

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


def manifest_files(model: str) -> list[Path]:
    return sorted(p for p in (parity_dir() / model / "manifest").glob("*.json") if p.name != "index.json")


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """The fixtures were made with 2 threads; oneDNN accumulation order depends on the thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)
