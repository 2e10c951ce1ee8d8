"""The Generator watchdog as a unit: a controllable clock and progress source."""

from __future__ import annotations

import pytest

from serving.worker.watchdog import GenerationWatchdog, UnhealthyReplica, cuda_context_check


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_progress_keeps_it_healthy_and_a_stall_fails_it() -> None:
    clock, progress = Clock(), {"a": 0.1}
    dog = GenerationWatchdog(progress.get, stall_s=10, deadline_s=1000, clock=clock)
    await dog.check()  # nothing running
    with dog.watch("a"):
        for step in range(5):
            clock.now += 8
            progress["a"] = 0.1 * (step + 2)
            await dog.check()  # 8 s between steps, under the 10 s stall limit
        clock.now += 11
        with pytest.raises(UnhealthyReplica, match="no progress"):
            await dog.check()
    await dog.check()  # the job ended: nothing to judge


async def test_deadline() -> None:
    clock, ticks = Clock(), iter(range(1000))
    dog = GenerationWatchdog(lambda _job: next(ticks), stall_s=10, deadline_s=30, clock=clock)
    with dog.watch("b"), dog.watch("b"):  # the same job twice (a retry racing a slow one)
        clock.now += 29
        await dog.check()
        clock.now += 2
        with pytest.raises(UnhealthyReplica, match="deadline"):
            await dog.check()


async def test_device_check_failure_propagates() -> None:
    def broken() -> None:
        raise UnhealthyReplica("CUDA context is broken: illegal memory access")

    dog = GenerationWatchdog(lambda _job: None, stall_s=10, deadline_s=30, device_check=broken)
    with pytest.raises(UnhealthyReplica, match="CUDA"):
        await dog.check()


def test_cuda_check_passes_without_an_initialised_gpu() -> None:
    cuda_context_check()  # on CPU (or an untouched GPU) there is nothing to judge
