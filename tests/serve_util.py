"""Run `seekwen serve` as a real process on a free loopback port, for tests."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One model thread (OMP_NUM_THREADS=1): the engine thread and the HTTP side then share 2 cores without
    OpenMP workers spinning against the event loop (and the tests do not measure speed)."""

    def __init__(self, *args: str, env: dict | None = None, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.log = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
        cmd = [sys.executable, "-m", "seekwen", "serve", *args, "--host", "127.0.0.1", "--port", str(self.port),
               "--no-access-log", "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})

    def wait_ready(self, timeout: float = 300.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s: {self.output()}")

    def output(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path and self.log_path.exists() else ""

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.log is not subprocess.DEVNULL:
            self.log.close()
        return self.proc.returncode


@contextlib.contextmanager
def serving(*args: str, log: Path):
    """A ready server started with `args` (logging to `log`); it must stop cleanly (exit status 0)."""
    srv = ServerProcess(*args, log=log)
    try:
        yield srv.wait_ready()
    finally:
        assert srv.terminate() == 0, srv.output()


@functools.cache
def bundled_fp32():
    """The bundled model in fp32, loaded once per test process (the reference side of server tests)."""
    import torch

    import seekwen
    from seekwen.tools.common import bundled_model_path

    return seekwen.load(bundled_model_path(), dtype=torch.float32)


def greedy_reference(server: ServerProcess, name: str, prompt: str, n: int) -> str:
    """The bundled model's own greedy continuation (n tokens, no engine, no server) of the tokens the
    server makes of `prompt`."""
    import torch

    ids = post_json(server.url + "/tokenize", {"model": name, "prompt": prompt})[1]["tokens"]
    model = bundled_fp32()
    new = model.generate(torch.tensor([ids]), max_new_tokens=n, stop_at_eos=False)[0].tolist()
    return model.tokenizer.decode(new)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def http(url: str, method: str = "GET", body: bytes | str | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, bytes]:
    """One raw request: (status, body)."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        data = body.encode() if isinstance(body, str) else body
        conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body=data, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def post_json(url: str, obj, headers: dict | None = None) -> tuple[int, dict]:
    import json

    status, raw = http(url, "POST", json.dumps(obj), {"Content-Type": "application/json", **(headers or {})})
    return status, json.loads(raw) if raw else {}
