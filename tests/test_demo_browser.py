"""A real headless browser (Debian's chromium) opens the demo page and takes a screenshot; the screenshot
must show the rendered app, not a blank page. Run with ``python -m pytest -q -m browser`` (``.ci/run`` does,
after installing chromium). A missing chromium fails the test: a skipped browser test would look green."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from ._demo_server import demo_server

pytestmark = pytest.mark.browser


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("the browser test needs Debian's chromium on PATH: apt-get install chromium "
                "(.ci/run installs it before running `pytest -m browser`)")


def screenshot(url: str, out, profile, budget_ms: int = 15000) -> subprocess.CompletedProcess:
    """``chromium --headless --screenshot``: the page after ``budget_ms`` of virtual time (scripts run,
    the app mounts, its images load)."""
    cmd = [chromium(), "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--mute-audio",
           f"--user-data-dir={profile}", f"--screenshot={out}", "--window-size=1400,1000",
           f"--virtual-time-budget={budget_ms}", url]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # chromium refuses to run as root with its sandbox (CI containers)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_page_renders_in_headless_chromium(tmp_path):
    chromium()  # fail before starting the server when there is no browser
    shot = tmp_path / "page.png"
    with demo_server(tmp_path) as srv:
        proc = screenshot(srv.url, shot, tmp_path / "profile")
    assert shot.is_file(), f"chromium wrote no screenshot (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (1000, 1400)
    colours, counts = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
    assert counts.max() / counts.sum() < 0.9 and len(colours) > 200, "the screenshot is (nearly) blank"
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    red = int(((r > 170) & (g < 90) & (b < 90)).sum())  # the default condition is a red circle
    assert red > 2000, f"the warm-up images did not render ({red} red pixels)"
