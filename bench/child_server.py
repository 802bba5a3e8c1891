"""A server under test in a child process (`fedem hub serve`, `fedem serve`): a free port, a log
file, waiting until it answers its health check, and a clean stop."""

import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Any

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ChildServer:
    """Start `command` (which must listen on `self.port`, given to the caller first via `free_port`)
    with stderr (and stdout unless `**popen` redirects it) into `log_path`."""

    def __init__(self, command: list[str], port: int, log_path: Path, cwd: Path, **popen: Any) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.log: IO[bytes] = log_path.open("wb")
        popen.setdefault("stdout", self.log)
        self.proc = subprocess.Popen(command, stderr=self.log, cwd=cwd, **popen)

    def wait_healthy(self, path: str, timeout_s: float, what: str) -> None:
        """Poll `GET path` until 200; stop and raise with the log's tail if it does not come up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}{path}", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{what} did not come up\n{self.log_tail()}")

    def log_tail(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """SIGINT (a graceful shutdown), then SIGKILL after 15 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
