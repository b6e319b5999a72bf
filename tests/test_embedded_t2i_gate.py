"""The shipped embedded-t2i weights, checked in CI with a small fixed gate.

Why this gate and not GenEval's: after its first (short, CPU) training run the model draws blobs of the
prompt's colour but rarely the right shape (procedural GenEval overall 0.067, benchmarks/embedded_t2i_gates.json),
so a GenEval gate would fail by design. This gate pins what the shipped weights do reliably - an object in
every image, in the prompted colour far above chance (1 in 4) - so a broken export, loader, tokenizer or
sampling path fails CI. Raise it as the model is trained further (artifacts/embedded-t2i-train/README.md).
"""

from __future__ import annotations

import numpy as np
import pytest

from fastvar.eval.detect_procedural import ProceduralDetector
from fastvar.models.embedded_t2i import embedded_t2i_files, load_embedded_t2i_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = ("red", "yellow", "green", "blue")
SHAPES = ("circle", "square", "triangle", "ring")


def test_shipped_model_draws_the_prompted_colour(monkeypatch):
    monkeypatch.delenv("FASTVAR_EMBEDDED_T2I_DIR", raising=False)  # the weights inside the package
    missing = [p for p in embedded_t2i_files().values() if not p.is_file()]
    assert not missing, f"shipped embedded-t2i files missing: {missing}"
    pipe = load_embedded_t2i_pipeline(device="cpu")
    prompts = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    res = pipe(prompts, seed=5)
    images = (res.images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    det = ProceduralDetector()
    found = [det(im) for im in images]
    assert all(found), "an image with no object at all"
    colour_ok = np.mean([any(d.colour == p.split()[1] for d in f) for p, f in zip(prompts, found)])
    # measured 0.69-0.75 on seeds 5 and 123 with the step-285 export; chance is 0.25
    assert colour_ok >= 0.5, f"prompted colour found in {colour_ok:.2f} of the images (gate 0.5)"
    assert res.images.shape == (len(prompts), 3, 128, 128)
