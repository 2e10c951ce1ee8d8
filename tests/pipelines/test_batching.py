"""One denoising loop for many requests: batched == alone == diffusers, per-request isolation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipelines import (
    BatchItem,
    BatchOutcome,
    CallbackFailed,
    EngineOptions,
    GenerationCanceled,
    InvalidParams,
    VideoPipeline,
    batch_cost,
    batch_key,
    plan_batches,
)
from pipelines.svd import fit_image
from tests.pipelines.conftest import diffusers_frames, engine, make_params, mixed_params

# float32 on the CPU: a batch changes BLAS blocking, hence the last bits; an unrelated request
# would differ by ~1e-1.
ATOL = 1e-4


def test_batched_equals_alone_equals_diffusers_for_mixed_requests(reference_engine: VideoPipeline) -> None:
    requests = mixed_params()
    batched = reference_engine.run_batch([BatchItem(p) for p in requests])
    alone = [reference_engine.run_batch([BatchItem(p)])[0] for p in requests]
    diffusers_pipe = reference_engine.diffusers_pipeline
    diffusers_pipe.set_progress_bar_config(disable=True)

    for params, together, single in zip(requests, batched, alone, strict=False):
        assert together.error is None and single.error is None
        assert together.frames is not None and single.frames is not None
        assert together.latents is not None and single.latents is not None
        reference = diffusers_frames(diffusers_pipe, params, fit_image(params.image, params.width, params.height))
        torch.testing.assert_close(single.frames, reference, rtol=0, atol=ATOL)
        torch.testing.assert_close(together.frames, single.frames, rtol=0, atol=ATOL)
        torch.testing.assert_close(together.latents, single.latents, rtol=0, atol=ATOL)
    # The requests really differ: equality above is not three copies of one video.
    assert (batched[0].frames - batched[1].frames).abs().max() > 0.05  # type: ignore[operator]


def test_a_request_does_not_depend_on_its_batch_mates(reference_engine: VideoPipeline) -> None:
    first, second, third = mixed_params()
    with_second = reference_engine.run_batch([BatchItem(first), BatchItem(second)])[0]
    with_third = reference_engine.run_batch([BatchItem(third), BatchItem(first)])[1]
    assert with_second.frames is not None and with_third.frames is not None
    torch.testing.assert_close(with_second.frames, with_third.frames, rtol=0, atol=ATOL)


def test_generate_batch_returns_uint8_videos_in_order(reference_engine: VideoPipeline) -> None:
    requests = mixed_params()
    outcomes = reference_engine.generate_batch([BatchItem(p) for p in requests])
    assert [o.ok for o in outcomes] == [True, True, True]
    for outcome in outcomes:
        assert outcome.frames is not None
        assert outcome.frames.shape == (4, 64, 64, 3) and outcome.frames.dtype == np.uint8
        assert outcome.frames.std() > 0
    alone = reference_engine.generate(requests[2])
    assert np.abs(alone.astype(int) - outcomes[2].frames.astype(int)).max() <= 1  # type: ignore[union-attr]


def test_items_with_different_batch_keys_are_refused_up_front(reference_engine: VideoPipeline) -> None:
    calls: list[tuple[int, int]] = []
    items = [
        BatchItem(make_params(), on_progress=lambda d, t: calls.append((d, t))),
        BatchItem(make_params(num_frames=3)),
    ]
    with pytest.raises(InvalidParams, match="must share width, height, num_frames and num_inference_steps"):
        reference_engine.generate_batch(items)
    assert calls == []


def test_an_invalid_item_fails_alone(reference_engine: VideoPipeline) -> None:
    good, bad = make_params(), make_params(seed=-5)
    outcomes = reference_engine.generate_batch([BatchItem(good), BatchItem(bad)])
    assert outcomes[0].ok
    assert isinstance(outcomes[1].error, InvalidParams) and "`seed`" in str(outcomes[1].error)
    np.testing.assert_array_equal(outcomes[0].frames, reference_engine.generate(good))  # type: ignore[arg-type]


def test_cancel_drops_one_item_mid_loop_and_the_others_are_unaffected(reference_engine: VideoPipeline) -> None:
    requests = [make_params(num_inference_steps=4, seed=s) for s in (1, 2, 3)]
    progress: dict[int, list[tuple[int, int]]] = {0: [], 1: [], 2: []}

    def items(cancel_second: bool) -> list[BatchItem]:
        return [
            BatchItem(
                params,
                on_progress=lambda d, t, i=i: progress[i].append((d, t)),  # type: ignore[misc]
                should_cancel=(lambda i=i: cancel_second and i == 1 and len(progress[1]) >= 2),  # type: ignore[misc]
            )
            for i, params in enumerate(requests)
        ]

    canceled = reference_engine.run_batch(items(cancel_second=True))
    assert isinstance(canceled[1].error, GenerationCanceled)
    assert (canceled[1].error.steps_done, canceled[1].error.total_steps) == (2, 4)
    # Stopped within one step: no progress after the step at which it was canceled.
    assert progress[1] == [(1, 4), (2, 4)]
    assert progress[0] == progress[2] == [(1, 4), (2, 4), (3, 4), (4, 4)]

    full = reference_engine.run_batch(items(cancel_second=False))
    for kept in (0, 2):
        assert canceled[kept].frames is not None and full[kept].frames is not None
        torch.testing.assert_close(canceled[kept].frames, full[kept].frames, rtol=0, atol=ATOL)


def test_a_cancel_under_step_caching_leaves_the_others_as_they_were() -> None:
    # DeepCache every 3rd step: full UNet at steps 0 and 3, shallow passes on cached deep features
    # between. A guided request canceled after step 2 must not change its batch-mates (one guided,
    # one not, both moving to new rows): they keep their own cached features, no extra full step.
    pipeline = engine(EngineOptions(deepcache_interval=3))
    requests = [dataclasses.replace(p, num_inference_steps=6) for p in mixed_params()]
    requests[0], requests[1] = requests[1], requests[0]  # the guided one to cancel in the middle
    done: list[int] = []

    def items(cancel: bool) -> list[BatchItem]:
        return [
            BatchItem(requests[0], on_progress=lambda d, t: done.append(d)),
            BatchItem(requests[1], should_cancel=lambda: cancel and len(done) >= 2),
            BatchItem(requests[2]),
        ]

    full = pipeline.run_batch(items(cancel=False))
    done.clear()
    canceled = pipeline.run_batch(items(cancel=True))
    assert isinstance(canceled[1].error, GenerationCanceled) and canceled[1].error.steps_done == 2
    for kept in (0, 2):
        assert canceled[kept].latents is not None and full[kept].latents is not None
        assert canceled[kept].frames is not None and full[kept].frames is not None
        torch.testing.assert_close(canceled[kept].latents, full[kept].latents, rtol=0, atol=ATOL)
        torch.testing.assert_close(canceled[kept].frames, full[kept].frames, rtol=0, atol=ATOL)
    # UNet rows: 5 (two guided + one unguided) for steps 0-1, then 3; full passes only at 0 and 3.
    timings = pipeline.last_timings
    assert (timings.unet_rows_full, timings.unet_rows_cached) == (5 + 3, 5 + 3 * 3)


def test_every_item_canceled_stops_the_loop(reference_engine: VideoPipeline) -> None:
    steps: list[int] = []
    items = [
        BatchItem(make_params(seed=s), on_progress=lambda d, t: steps.append(d), should_cancel=lambda: bool(steps))
        for s in (1, 2)
    ]
    outcomes = reference_engine.generate_batch(items)
    assert all(isinstance(o.error, GenerationCanceled) for o in outcomes)
    assert steps == [1, 1]  # both left after the first step; the loop did not run a second one


def test_cancel_before_the_first_step_never_runs_that_item(reference_engine: VideoPipeline) -> None:
    outcomes = reference_engine.generate_batch(
        [BatchItem(make_params(), should_cancel=lambda: True), BatchItem(make_params(seed=5))]
    )
    assert isinstance(outcomes[0].error, GenerationCanceled) and outcomes[0].error.steps_done == 0
    assert outcomes[1].ok


def test_a_failing_callback_ends_only_its_own_item(reference_engine: VideoPipeline) -> None:
    def broken(done: int, total: int) -> None:
        raise ConnectionError("redis is down")

    outcomes = reference_engine.generate_batch([BatchItem(make_params(), on_progress=broken), BatchItem(make_params())])
    assert isinstance(outcomes[0].error, CallbackFailed)
    assert isinstance(outcomes[0].error.__cause__, ConnectionError)
    assert outcomes[1].ok
    # Alone, `generate` raises the caller's own exception, as before batching existed.
    with pytest.raises(ConnectionError, match="redis is down"):
        reference_engine.generate(make_params(), on_progress=broken)


def test_batch_key_and_cost() -> None:
    params = make_params()
    assert batch_key(params) == (64, 64, 4, 3)
    assert batch_key(dataclasses.replace(params, seed=9, fps=3, max_guidance_scale=1.0)) == batch_key(params)
    assert batch_key(dataclasses.replace(params, width=128)) != batch_key(params)
    assert batch_cost(params) == 4 * 64 * 64


def test_plan_batches_respects_key_cost_and_size() -> None:
    small = make_params()  # cost 16384
    big = make_params(width=128, height=128)  # cost 65536, another key
    requests = [small, big, small, small, big, small]
    assert plan_batches(requests, max_cost=3 * 16384, max_size=8) == [[0, 2, 3], [1], [4], [5]]
    assert plan_batches(requests, max_cost=10**9, max_size=2) == [[0, 2], [1, 4], [3, 5]]
    # A request above the budget on its own still runs, alone.
    assert plan_batches([big], max_cost=1, max_size=4) == [[0]]
    with pytest.raises(ValueError, match="at least 1"):
        plan_batches(requests, max_cost=0, max_size=1)


def test_batch_outcome_holds_frames_or_an_error() -> None:
    with pytest.raises(ValueError, match="either frames or an error"):
        BatchOutcome(frames=None, error=None)
    assert not BatchOutcome(frames=None, error=InvalidParams("x")).ok
