"""Helpers for the events and webhook tests: the ingress on a real uvicorn server (loopback, own
thread and event loop), an SSE reader, settings, a stepping backend and a job factory."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from serving.backend import StageCallback
from serving.db.jobs import JobRepository
from serving.settings import Settings
from serving.types import JobParams, RenderJob, RenderOutcome, Stage, StoredObject

PARAMS = JobParams(
    model="tiny-random", width=64, height=64, num_frames=4, fps=7, motion_bucket_id=127,
    noise_aug_strength=0.02, num_inference_steps=2, seed=1, min_guidance_scale=1.0, max_guidance_scale=3.0,
)
# Two Standard Webhooks secrets (base64 of 24 and 32 random-looking bytes): "old" and "new".
OLD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NEW_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD3CUf1w/Iw6s="
STARTUP_TIMEOUT_S = 15.0


def make_settings(
    tmp_path: Path, database_url: str, redis_url: str, prefix: str, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "database_url": database_url,
        "redis_url": redis_url,
        "queue_name": prefix,
        "key_prefix": prefix,
        "api_keys": f"alice-{prefix}:key-alice-{prefix},bob-{prefix}:key-bob-{prefix}",
        "storage_dir": tmp_path / "storage",
        "allow_private_urls": True,  # the receivers of these tests listen on loopback
        "webhook_secrets": f"{NEW_SECRET} {OLD_SECRET}",
        "webhook_time_scale": 0.0001,
        "webhook_poll_interval_s": 0.01,
        "webhook_timeout_s": 2.0,
        "events_heartbeat_s": 0.2,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Owner:
    id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def owners(prefix: str) -> tuple[Owner, Owner]:
    return Owner(f"alice-{prefix}", f"key-alice-{prefix}"), Owner(f"bob-{prefix}", f"key-bob-{prefix}")


async def new_job(jobs: JobRepository, owner_id: str, *, webhook_url: str | None = None) -> str:
    job_id = str(uuid.uuid4())
    await jobs.create(
        job_id=job_id, owner_id=owner_id, image_url=f"local://{owner_id}/{job_id}/input.png",
        params=PARAMS.to_json(), model="tiny-random", priority="normal", webhook_url=webhook_url,
    )
    return job_id


@dataclass
class RunningServer:
    app: FastAPI
    base_url: str
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def services(self) -> Any:
        return self.app.state.services


@contextmanager
def serve(app: FastAPI) -> Iterator[RunningServer]:
    """Run `app` (lifespan included) on a real uvicorn server on 127.0.0.1 in its own thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", ws="websockets-sansio")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        # uvicorn flips `started` once the lifespan ran and the socket listens.
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        pause = threading.Event()
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            pause.wait(0.01)
        if not server.started:
            raise RuntimeError("uvicorn did not start")
        yield RunningServer(app, f"http://127.0.0.1:{port}", server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=STARTUP_TIMEOUT_S)
        sock.close()


@dataclass
class SseEvent:
    id: str | None
    event: str
    data: dict[str, Any]


async def sse_events(response: httpx.Response) -> AsyncIterator[SseEvent | str]:
    """Parse an SSE body: yields events, and comment lines (heartbeats) as strings."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield line
            continue
        if not line:
            if "data" in fields:
                yield SseEvent(fields.get("id"), fields.get("event", "message"), json.loads(fields["data"]))
            fields = {}
            continue
        name, _, value = line.partition(":")
        fields[name] = value[1:] if value.startswith(" ") else value


@dataclass
class SteppedBackend:
    """Reports `steps` progress stages; waits on `gates[i]` (if any) before stage i."""

    steps: int = 3
    gates: dict[int, asyncio.Event] = field(default_factory=dict)
    reached: dict[int, asyncio.Event] = field(default_factory=dict)
    name: str = "stepped"

    def gate(self, step: int) -> asyncio.Event:
        self.reached.setdefault(step, asyncio.Event())
        return self.gates.setdefault(step, asyncio.Event())

    async def render(self, job: RenderJob, on_stage: StageCallback) -> RenderOutcome:
        for step in range(1, self.steps + 1):
            if step in self.gates:
                self.reached[step].set()
                await asyncio.wait_for(self.gates[step].wait(), timeout=20)
            await on_stage(Stage.DENOISING, step / (self.steps + 1))
        key = f"{job.owner_id}/{job.job_id}/video.mp4"
        return RenderOutcome(
            objects={"mp4": StoredObject("video.mp4", key, f"local://{key}", "video/mp4", 10)},
            gpu_seconds=0.1,
            device="cpu",
        )

    async def discard(self, job: RenderJob) -> None:
        return None


async def wait_until(predicate: Any, *, timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll an async predicate until it returns something truthy (bounded)."""
    async with asyncio.timeout(timeout):
        while True:
            value = await predicate()
            if value:
                return value
            await asyncio.sleep(interval)
