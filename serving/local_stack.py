"""`svd-serve up`: everything on one machine (private Redis, SQLite, local storage, Ray, ingress)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from serving.settings import Settings


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until(check: Callable[[], bool], timeout_s: float, what: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise StackError(f"{what}: a process exited early with code {proc.returncode}")
        if check():
            return
        time.sleep(0.2)
    raise StackError(f"{what} did not become ready within {timeout_s:.0f} s")


def start_private_redis(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError("redis-server is not installed: install it (apt-get install redis-server) or set REDIS_URL")
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # Append-only file: jobs accepted before a restart of `up` are still queued after it.
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(redis_dir.resolve()),
         "--appendonly", "yes", "--save", "", "--logfile", "redis.log"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"

    def ping() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    _wait_until(ping, 20, "private redis-server", [proc])
    return proc, url


def _stop(procs: list[subprocess.Popen[bytes]], grace_s: float = 20.0) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in reversed(procs):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def local_stack(settings: Settings, ready_timeout_s: float = 300.0) -> Iterator[str]:
    """Start redis (if needed), migrate, then `svd-serve worker` and `svd-serve api` as processes.
    Yields the ingress base URL once it is ready and the worker has deployed."""
    from serving.db.migrate import upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ)
    env["SVD_SERVE_DATA_DIR"] = str(settings.data_dir.resolve())
    if settings.auth_disabled:
        env["SVD_SERVE_AUTH_DISABLED"] = "true"  # the decision made for this stack, passed to its processes
    try:
        redis_url = settings.redis_url
        if not redis_url:
            redis_proc, redis_url = start_private_redis(settings.data_dir)
            procs.append(redis_proc)
            print(f"private redis-server at {redis_url}", flush=True)
        env["REDIS_URL"] = redis_url
        upgrade(settings.resolved_database_url)
        exe = [sys.executable, "-m", "serving.cli"]
        worker_log = (settings.data_dir / "worker.log").open("ab")
        worker = subprocess.Popen([*exe, "worker"], env=env, stdout=worker_log, stderr=subprocess.STDOUT)
        procs.append(worker)
        api = subprocess.Popen([*exe, "api", "--host", settings.host, "--port", str(settings.port)], env=env)
        procs.append(api)
        base = settings.resolved_public_base_url

        def api_ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_until(api_ready, 60, "ingress", procs)
        log_path = settings.data_dir / "worker.log"
        _wait_until(lambda: b"svd-serve worker ready" in log_path.read_bytes(), ready_timeout_s, "worker", procs)
        print(f"svd-serve is up at {base} (docs at {base}/docs; worker log {log_path})", flush=True)
        yield base
    finally:
        _stop(procs)
