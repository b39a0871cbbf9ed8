"""`python serve.py` as a child process, for the load benchmark and the soak (scripts/bench_serve.py,
scripts/soak_serve.py): start it on a free port with its output in a log file, wait until /health answers,
pause and resume it, stop it."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServerProcess:
    name: str
    command: list[str]
    process: subprocess.Popen
    url: str
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(name: str, overrides: list[str], log: Path) -> ServerProcess:
    """`python serve.py <overrides> port=<free>`; its output goes to `log`."""
    port = free_port()
    command = [sys.executable, str(ROOT / "serve.py"), *overrides, f"port={port}"]
    log.parent.mkdir(parents=True, exist_ok=True)
    # A file, not a pipe: a pipe nobody reads would fill up and stall the server.
    process = subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return ServerProcess(name, command, process, f"http://127.0.0.1:{port}", log)


def wait_healthy(server: ServerProcess, timeout: float) -> dict[str, Any]:
    """/health's answer once it says ok; SystemExit (with the log's end) if the server dies or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SystemExit(f"serve.py ({server.name}) exited:\n{server.log.read_text()[-2000:]}")
        try:
            response = httpx.get(f"{server.url}/health", timeout=2)
            if response.status_code == 200 and response.json().get("status") == "ok":
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"serve.py ({server.name}) was not healthy after {timeout:.0f} s; see {server.log}")


def pause(server: ServerProcess) -> None:
    server.process.send_signal(signal.SIGSTOP)


def resume(server: ServerProcess) -> None:
    server.process.send_signal(signal.SIGCONT)


def stop_server(server: ServerProcess) -> None:
    if server.process.poll() is None:
        resume(server)  # a stopped process would not act on SIGTERM
        server.process.terminate()
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
