"""Fault-injection suite (issue #5), items 6 and 8: a real ingress process (`svd-serve api`) and
a real dispatcher process, on real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import io
import signal
from pathlib import Path

import httpx
import pytest
from PIL import Image

from serving.types import JobStatus
from tests.faults.conftest import FaultStack

pytestmark = pytest.mark.slow


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


async def submit(client: httpx.AsyncClient, priority: str) -> httpx.Response:
    return await client.post("/api/v1/animate-image", files={"image": ("a.png", png(), "image/png")},
                             data={"priority": priority})


async def test_burst_beyond_capacity_is_refused_cleanly_and_drains(stack: FaultStack, tmp_path: Path) -> None:
    """8. A 3x capacity burst -> 429/503 with Retry-After, no 5xx, no lost job, and the queue
    drains completely after the burst."""
    ingress = stack.start_ingress(tmp_path / "ingress", max_queued_per_priority=4, max_queued_total=6)
    stack.start_worker(step_s=0.4, steps=2, dispatcher_concurrency=1)  # under a job a second
    async with ingress.client() as client:
        # Capacity here is the queue bound (6); send three times that at once.
        answers = await asyncio.gather(*(submit(client, ("normal", "low")[i % 2]) for i in range(18)))
    codes = [a.status_code for a in answers]
    assert all(code in (202, 429, 503) for code in codes), codes
    refused = [a for a in answers if a.status_code in (429, 503)]
    assert refused, [a.text[:200] for a in answers]
    for answer in refused:
        assert int(answer.headers["retry-after"]) >= 1
        assert answer.json()["code"] in ("queue_full", "service_saturated")
    accepted = [a.json()["jobId"] for a in answers if a.status_code == 202]
    records = await stack.wait_terminal(accepted, timeout_s=40)
    assert all(r.status is JobStatus.COMPLETED for r in records.values())
    counts = await stack.queue.counts()
    assert (counts["waiting"], counts["active"], counts["delayed"]) == (0, 0, 0)


async def test_killed_ingress_loses_no_accepted_job(stack: FaultStack, tmp_path: Path) -> None:
    """6. Kill the ingress during a burst of submissions -> every 202 it returned corresponds to
    a job that completes."""
    ingress = stack.start_ingress(tmp_path / "ingress")
    stack.start_worker(step_s=0.02, steps=2, dispatcher_concurrency=2)
    accepted: list[str] = []
    some_accepted = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient) -> None:
        while True:
            try:
                answer = await submit(client, "normal")
            except httpx.HTTPError:
                return  # the ingress is gone
            if answer.status_code == 202:
                accepted.append(answer.json()["jobId"])
                if len(accepted) >= 5:
                    some_accepted.set()

    async with ingress.client() as client:
        loops = [asyncio.create_task(client_loop(client)) for _ in range(6)]
        await asyncio.wait_for(some_accepted.wait(), 30)
        ingress.proc.send_signal(signal.SIGKILL)  # mid-burst: requests are in flight
        await asyncio.wait_for(asyncio.gather(*loops), 30)
    assert ingress.proc.wait(10) == -signal.SIGKILL
    records = await stack.wait_terminal(accepted, timeout_s=40)
    assert all(r.status is JobStatus.COMPLETED for r in records.values())


async def test_twenty_concurrent_duplicates_make_one_job(stack: FaultStack, tmp_path: Path) -> None:
    """7. Duplicate submissions with one Idempotency-Key from 20 concurrent clients -> one job."""
    ingress = stack.start_ingress(tmp_path / "ingress")
    clients = [ingress.client() for _ in range(20)]
    try:
        answers = await asyncio.gather(*(
            c.post("/api/v1/animate-image", files={"image": ("a.png", png(), "image/png")},
                   data={"prompt": "same"}, headers={"Idempotency-Key": "order-7"})
            for c in clients
        ))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    codes = [a.status_code for a in answers]
    assert codes.count(202) == 1 and set(codes) <= {200, 202, 409}, codes
    job_ids = {a.json()["jobId"] for a in answers if a.status_code in (200, 202)}
    assert len(job_ids) == 1
    records, _ = await stack.jobs.list_for_owner(stack.owner)
    assert [r.id for r in records] == list(job_ids)
    assert (await stack.queue.counts())["waiting"] == 1
