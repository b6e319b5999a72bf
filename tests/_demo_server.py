"""Start ``fastvar demo`` for real (a subprocess on a free 127.0.0.1 port) and stop it: shared by the HTTP
tests (fast suite) and the browser test (``-m browser``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STARTUP_DEADLINE_S = 180.0  # import torch + gradio, load the embedded model, warm up: ~35 s on the loaded dev box


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DemoServer:
    """``python -m fastvar demo --port P`` (embedded model, one thread) in its own process group.

    ``start()`` returns at once (the server boots while other tests run), ``wait()`` blocks until the page
    answers, bounded by a deadline and by the process exiting; ``stop()`` terminates it (kill if it lingers).
    """

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = Path(tmp) / "demo-server.log"
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.ready = False

    def start(self) -> DemoServer:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "fastvar", "demo", "--port", str(self.port), *self.extra],
                                         stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.log.parent,
                                         start_new_session=True)
        return self

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait(self, deadline_s: float = STARTUP_DEADLINE_S) -> str:
        if self.ready:
            return self.url
        deadline = time.monotonic() + deadline_s
        while True:  # bounded: the deadline, or the process exiting
            if self.proc.poll() is not None:
                raise AssertionError(f"fastvar demo exited with {self.proc.returncode} before serving:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        self.ready = True
                        return self.url
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"fastvar demo did not answer on {self.url} within {deadline_s:.0f} s:\n{self.tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


@contextmanager
def demo_server(tmp: Path, *extra: str) -> Iterator[DemoServer]:
    """A started and answering server, stopped on exit."""
    srv = DemoServer(tmp, *extra).start()
    try:
        srv.wait()
        yield srv
    finally:
        srv.stop()
