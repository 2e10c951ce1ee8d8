"""`svd-serve up`: everything on one machine (private Redis, SQLite, local storage, Ray, ingress).

`LocalStack` starts the processes, says the stack is up only once this run's worker is ready,
and keeps it up: a worker or ingress that dies is started again (with a growing pause if it
keeps dying) and every change is printed as a status line. Every process it starts is told the
public base URL, so links it writes (webhook payloads, events) point where clients reach it.

The ingress's own `/readyz` does not depend on the worker (on Kubernetes the ingress keeps
accepting jobs while the GPU cluster is down); it reports the queue's consumers as information.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from serving.settings import Settings
from serving.worker.process import READY_LINE

# A child that dies is started again after RESTART_PAUSE_S, doubled for each death that came
# before it was ready again, up to RESTART_PAUSE_MAX_S.
RESTART_PAUSE_S = 1.0
RESTART_PAUSE_MAX_S = 60.0
WATCH_INTERVAL_S = 0.5
# While `up` starts, a child that exits this many times in a row stops it (a configuration error
# fails fast); a single death (Ray timing out on a busy machine) is retried like any other.
START_ATTEMPTS = 3


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def status(message: str) -> None:
    """One line of `up`'s own status, as the person running it sees it."""
    print(f"svd-serve up: {message}", flush=True)


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


def _terminate(proc: subprocess.Popen[bytes], grace_s: float, group: bool) -> None:
    """SIGTERM to the process (a worker drains on it, then stops its Ray processes itself), then
    SIGKILL after `grace_s`. `group`: it leads a process group (a worker and its Ray processes),
    and whatever of that group is left once it has ended is killed too."""

    def kill_group() -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if group:
        kill_group()


@dataclass
class Child:
    """One process the stack runs and restarts: `svd-serve worker` or `svd-serve api`."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path | None  # output appended here (None: inherited)
    ready: Callable[[Child], bool]
    own_group: bool = False  # leads a process group (the worker and its Ray processes)
    proc: subprocess.Popen[bytes] | None = None
    log_offset: int = 0  # where this run's output starts in `log_path`
    is_ready: bool = False
    restarts: int = 0
    failures_in_a_row: int = 0  # deaths since it was last ready
    restart_at: float | None = None  # monotonic time of a pending restart
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        if self.log_path is not None:
            self._log = self.log_path.open("ab")
            stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            self._log.write(f"--- svd-serve up: {self.name} started at {stamp} ---\n".encode())
            self._log.flush()
            # Only what this run writes counts: a log appended to across runs holds the ready
            # line of every earlier run.
            self.log_offset = self._log.tell()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT if self._log
                                     else None, start_new_session=self.own_group)
        self.is_ready = False
        self.restart_at = None

    def output(self) -> bytes:
        """What this run of the child has written to its log so far."""
        if self.log_path is None:
            return b""
        with self.log_path.open("rb") as log:
            log.seek(self.log_offset)
            return log.read()

    def check_ready(self) -> bool:
        if not self.is_ready and self.alive and self.ready(self):
            self.is_ready = True
            self.failures_in_a_row = 0
        return self.is_ready

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float) -> None:
        if self.proc is not None:
            _terminate(self.proc, grace_s, self.own_group)
        if self._log is not None:
            self._log.close()
            self._log = None


class LocalStack:
    """The processes of `svd-serve up`; use as a context manager, then `supervise` until stopped."""

    def __init__(self, settings: Settings, ready_timeout_s: float = 300.0) -> None:
        self.settings = settings
        self.ready_timeout_s = ready_timeout_s
        self.base_url = settings.resolved_public_base_url
        self.worker_log = settings.data_dir / "worker.log"
        self._redis: subprocess.Popen[bytes] | None = None
        self._children: list[Child] = []

    def _env(self, redis_url: str) -> dict[str, str]:
        env = dict(os.environ)
        env["SVD_SERVE_DATA_DIR"] = str(self.settings.data_dir.resolve())
        env["REDIS_URL"] = redis_url
        # Every process builds links from the same public address: the worker writes webhook
        # payloads (statusUrl, eventsUrl, resultUrl), not only the ingress.
        env["SVD_SERVE_HOST"] = self.settings.host
        env["SVD_SERVE_PORT"] = str(self.settings.port)
        env["SVD_SERVE_PUBLIC_BASE_URL"] = self.base_url
        if self.settings.auth_disabled:
            env["SVD_SERVE_AUTH_DISABLED"] = "true"  # the decision made for this stack, passed to its processes
        return env

    def __enter__(self) -> LocalStack:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start everything; return once the ingress answers /readyz and this run's worker is ready."""
        from serving.db.migrate import upgrade

        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        redis_url = self.settings.redis_url
        if not redis_url:
            self._redis, redis_url = start_private_redis(self.settings.data_dir)
            status(f"private redis-server at {redis_url}")
        upgrade(self.settings.resolved_database_url)
        env = self._env(redis_url)
        exe = [sys.executable, "-m", "serving.cli"]
        worker = Child("worker", [*exe, "worker"], env, self.worker_log,
                       ready=lambda child: READY_LINE.encode() in child.output(), own_group=True)
        api = Child("api", [*exe, "api", "--host", self.settings.host, "--port", str(self.settings.port)], env, None,
                    ready=lambda child: self._api_ready())
        self._children = [worker, api]
        for child in self._children:
            child.start()
            status(f"{child.name} started (pid {child.pid})")
        deadline = time.monotonic() + self.ready_timeout_s
        while not all(child.is_ready for child in self._children):
            self._check_redis()
            for child in self._children:
                if child.failures_in_a_row >= START_ATTEMPTS:
                    where = f"; see {child.log_path}" if child.log_path else ""
                    raise StackError(f"{child.name} exited {START_ATTEMPTS} times before it was ready{where}")
                self._watch(child)
            if time.monotonic() > deadline:
                late = ", ".join(child.name for child in self._children if not child.is_ready)
                raise StackError(f"{late} did not become ready within {self.ready_timeout_s:.0f} s")
            time.sleep(WATCH_INTERVAL_S)
        print(f"svd-serve is up at {self.base_url} (docs at {self.base_url}/docs; worker log {self.worker_log})",
              flush=True)

    def _api_ready(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def supervise(self, stop: threading.Event) -> None:
        """Until `stop` is set: start again a worker or ingress that died, and say so."""
        while not stop.wait(WATCH_INTERVAL_S):
            self._check_redis()
            for child in self._children:
                self._watch(child)

    def _check_redis(self) -> None:
        if self._redis is not None and self._redis.poll() is not None:
            raise StackError(f"the private redis-server exited with code {self._redis.returncode}")

    def _watch(self, child: Child) -> None:
        if child.alive:
            if not child.is_ready and child.check_ready():
                status(f"{child.name} ready again (restart {child.restarts})" if child.restarts else f"{child.name} ready")
            return
        now = time.monotonic()
        if child.restart_at is None:
            code = child.proc.returncode if child.proc is not None else None
            child.stop(grace_s=5)  # collects what is left of it (a worker's Ray processes)
            child.failures_in_a_row += 1
            pause = min(RESTART_PAUSE_S * 2 ** (child.failures_in_a_row - 1), RESTART_PAUSE_MAX_S)
            child.restart_at = now + pause
            status(f"{child.name} exited with code {code}; starting it again in {pause:g} s")
            return
        if now >= child.restart_at:
            child.restarts += 1
            child.start()
            status(f"{child.name} restarted (pid {child.pid}, restart {child.restarts})")

    def close(self, grace_s: float = 20.0) -> None:
        # The ingress first, then the worker (which drains), then Redis.
        for child in reversed(self._children):
            child.stop(grace_s)
        if self._redis is not None:
            _terminate(self._redis, grace_s, group=False)


@contextmanager
def local_stack(settings: Settings, ready_timeout_s: float = 300.0) -> Iterator[str]:
    """Start redis (if needed), migrate, then `svd-serve worker` and `svd-serve api` as processes.
    Yields the ingress base URL once it is ready and this run's worker has deployed."""
    with LocalStack(settings, ready_timeout_s) as stack:
        yield stack.base_url
