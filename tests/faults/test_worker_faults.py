"""Fault-injection suite (issue #5), items 1-4: real dispatcher processes on real Redis and
PostgreSQL, killed or stopped mid-job. Leases are short (`lock_duration_ms`) so each test stays
well under a minute."""

from __future__ import annotations

import signal
import time

import pytest

from serving.types import JobStatus
from tests.faults.conftest import FaultStack
from tests.faults.worker_main import CRASH_EXIT_CODE

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

LEASE_MS = 1500


async def test_sigkill_mid_denoising_completes_once_with_one_webhook(stack: FaultStack) -> None:
    """1. SIGKILL mid-denoising -> the job completes once, with one webhook. (How soon is the
    lease's business, measured by the load test, not asserted here on a busy machine.)"""
    step_s, steps = 0.2, 5
    first = stack.start_worker(step_s=step_s, steps=steps, lock_duration_ms=LEASE_MS)
    job_id = await stack.submit(length=10)  # 10 s of denoising: the kill lands mid-job
    # Wait until it is denoising in the first worker, then kill that worker outright.
    deadline = time.monotonic() + 60
    while job_id not in stack.runs() and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the run log, bounded by the deadline
    assert stack.runs().get(job_id) == [first.proc.pid], "".join(first.lines)
    first.signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    killed = await stack.jobs.get(job_id)
    assert killed is not None and killed.status is JobStatus.PROCESSING, killed  # killed mid-job
    stack.start_worker(step_s=step_s, steps=steps, lock_duration_ms=LEASE_MS)

    records = await stack.wait_terminal([job_id], timeout_s=180)
    record = records[job_id]
    assert record.status is JobStatus.COMPLETED, record
    assert len(stack.runs()[job_id]) == 2  # at-least-once execution...
    webhooks = await stack.wait_webhooks(job_id, 1, timeout_s=10)
    assert {kind for _, kind in webhooks} == {"job.completed"} and len(webhooks) == 1  # ...one outcome


async def test_poison_job_ends_in_error_and_others_flow(stack: FaultStack) -> None:
    """2. A job that crashes its worker every time -> `error` after N attempts with the reason;
    jobs behind it complete."""
    attempts = 2
    settings = {"lock_duration_ms": LEASE_MS, "job_attempts": attempts}
    poison = await stack.submit(attempts=attempts, fault="crash")
    healthy = [await stack.submit(attempts=attempts) for _ in range(2)]
    # A supervisor (Kubernetes) restarts the worker each time the poison job takes it down.
    deadline = time.monotonic() + 50
    while time.monotonic() < deadline:
        worker = stack.start_worker(step_s=0.05, steps=3, **settings)
        while worker.proc.poll() is None and time.monotonic() < deadline:
            record = await stack.jobs.get(poison)
            done = [await stack.jobs.get(j) for j in healthy]
            if record and record.status.terminal and all(d and d.status.terminal for d in done):
                break
            time.sleep(0.1)  # polling the store and the process, bounded by the deadline
        else:
            assert worker.proc.returncode == CRASH_EXIT_CODE
            continue
        break
    records = await stack.wait_terminal([poison, *healthy], timeout_s=5)
    assert records[poison].status is JobStatus.ERROR
    assert records[poison].error_code == "worker_lost"
    assert "stopped its worker" in (records[poison].error_message or "")
    assert len(stack.runs()[poison]) == attempts
    assert all(records[j].status is JobStatus.COMPLETED for j in healthy)
    webhooks = await stack.wait_webhooks(poison, 1, timeout_s=10)
    assert {kind for _, kind in webhooks} == {"job.failed"}


async def test_job_three_times_longer_than_the_lease_runs_once(stack: FaultStack) -> None:
    """3. Lock renewal keeps a long healthy job with its worker: it runs exactly once."""
    lease_ms = 1000
    stack.start_worker(step_s=0.3, steps=10, lock_duration_ms=lease_ms)  # 3 s of work
    stack.start_worker(step_s=0.3, steps=10, lock_duration_ms=lease_ms)  # a rival that would steal it
    job_id = await stack.submit()
    records = await stack.wait_terminal([job_id], timeout_s=30)
    assert records[job_id].status is JobStatus.COMPLETED
    assert len(stack.runs()[job_id]) == 1
    assert records[job_id].attempts == 1


async def test_sigterm_hands_unfinished_jobs_back_at_once(stack: FaultStack) -> None:
    """4. SIGTERM a worker with 3 jobs in hand -> the ones it cannot finish within the grace
    period are re-run elsewhere at once (well before the lease would lapse); none is lost."""
    long_lease_ms = 60000  # a lapse would take a minute: a quick re-run proves the hand-back
    step_s, steps = 0.25, 8  # 2 s per job
    first = stack.start_worker(step_s=step_s, steps=steps, lock_duration_ms=long_lease_ms,
                               dispatcher_concurrency=3, drain_grace_s=1.0)
    job_ids = [await stack.submit() for _ in range(3)]
    deadline = time.monotonic() + 15
    while len(stack.runs()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the run log, bounded by the deadline
    assert set(stack.runs()) == set(job_ids)
    first.signal(signal.SIGTERM)
    drained = first.wait_for_line("drained", 15)
    assert first.wait(15) == 0
    handed_back = [j for j in drained.split("handed_back=")[1].strip().split(",") if j]
    assert handed_back, drained
    for job_id in handed_back:
        record = await stack.jobs.get(job_id)
        assert record is not None and record.status is JobStatus.QUEUED and record.stage == "requeued"

    second = stack.start_worker(step_s=step_s, steps=steps, lock_duration_ms=long_lease_ms,
                                dispatcher_concurrency=3)
    started = time.monotonic()
    records = await stack.wait_terminal(job_ids, timeout_s=20)
    assert time.monotonic() - started < long_lease_ms / 1000 / 3
    assert all(r.status is JobStatus.COMPLETED for r in records.values())
    for job_id in handed_back:
        assert stack.runs()[job_id] == [first.proc.pid, second.proc.pid]
        assert records[job_id].attempts == 2
