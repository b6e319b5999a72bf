"""Shared fixtures of the fast suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are dominated by thread hand-offs: one thread is faster and steadier on a loaded 2-core box
    (two threads ran ~8x slower there). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
