"""A real `fastllm serve` process on 127.0.0.1 for tests and benchmarks: started on a free port, ready when /health
says 200, stopped (terminate, then kill) on close. Loopback only."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m fastllm serve [MODEL_DIR] --port P ARGS...`; its output goes to a log file (log())."""

    def __init__(self, model=None, *args: str, timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the server's output: a file, not a pipe nobody reads (a full pipe would block the server); closed in close()
        self._log = tempfile.NamedTemporaryFile("w+b", prefix="fastllm-serve-", suffix=".log", delete=False)  # noqa: SIM115
        command = [sys.executable, "-m", "fastllm", "serve", *([str(model)] if model else []),
                   "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fastllm serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"fastllm serve was not ready within {timeout} s:\n{self.log()[-3000:]}")

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
        return self.request("GET", path, None, headers)

    def post(self, path: str, body, headers: dict | None = None) -> tuple[int, dict, bytes]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})

    def request(self, method: str, path: str, data: bytes | None, headers: dict | None,
                timeout: float = 60.0) -> tuple[int, dict, bytes]:
        """(status, headers with lower-case names, body); an HTTP error status is returned, not raised."""
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def metrics(self) -> dict[str, float]:
        """The /metrics samples without labels: name -> value."""
        _, _, body = self.get("/metrics")
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def replica_metrics(self) -> dict[str, dict[str, float]]:
        """The /metrics of a Ray deployment by replica: {replica: {name: value, 'pid': pid}}; {} from a plain server,
        whose samples carry no replica label."""
        _, _, body = self.get("/metrics")
        out: dict[str, dict[str, float]] = {}
        for line in body.decode().splitlines():
            if line.startswith("#") or "replica=" not in line:
                continue
            name, rest = line.split("{", 1)
            labels, value = rest.rsplit("} ", 1)
            fields = {k: v.strip('"') for k, v in (part.split("=", 1) for part in labels.split(","))}
            out.setdefault(fields["replica"], {"pid": float(fields["pid"])})[name] = float(value)
        return out

    def rss_bytes(self) -> int:
        return rss_bytes(self.proc.pid)

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
