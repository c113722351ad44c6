"""A real `peftserve serve` process on loopback ports, for the e2e tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

READY_RE = re.compile(r"peftserve listening on (\S+):(\d+) metrics (\S+)(?: http (\S+))?")
START_TIMEOUT_S = 120.0


class ServerProcess:
    """Starts `python -m peftserve.cli serve ARGS` with ports 0 and reads the bound ones from
    its first line. stdout lines are kept in `lines`; stderr goes to `log_path`."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self.lines: list[str] = []
        self.target = ""
        self.metrics_url = ""
        self.http_url = ""  # with --http-port: the OpenAI-compatible API's base URL
        self.proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()

    def start(self) -> ServerProcess:
        self._log = self.log_path.open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PEFTSERVE_ADMIN_TOKEN", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "peftserve.cli", "--log-level", "INFO", "serve",
             "--port", "0", "--metrics-port", "0", *self.args],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT_S) or not self.target:
            self.kill()
            raise RuntimeError(f"server did not start:\n{self.log_tail()}")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = READY_RE.search(line)
            if m:
                self.target = f"{m.group(1)}:{m.group(2)}"
                self.metrics_url = f"http://{m.group(3)}/metrics"
                if m.group(4):
                    self.http_url = f"http://{m.group(4)}"
                self._ready.set()
        self._ready.set()  # exited before it was ready

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (a graceful drain) and the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if hasattr(self, "_log"):
            self._log.close()

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text().splitlines()
        except OSError:
            lines = []
        return "\n".join(self.lines[-n:] + lines[-n:])


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, every: float = 0.02,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))
