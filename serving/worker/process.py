"""`svd-serve worker`: connect to (or start) Ray, deploy the Serve app, run until SIGTERM."""

from __future__ import annotations

import signal
import threading

import structlog

from serving.settings import Settings

log = structlog.get_logger(__name__)

# Printed once the Serve app is deployed; `svd-serve up` (serving.local_stack) waits for it.
READY_LINE = "svd-serve worker ready"


def run_worker(settings: Settings, stop: threading.Event | None = None) -> None:
    import ray
    from ray import serve

    from serving.worker.deployments import build_app

    stop = stop or threading.Event()
    ray.init(
        # "local": a Ray of our own, never whatever cluster `ray start` left on this machine (ray.init
        # with no address would join it, through /tmp/ray/ray_current_cluster).
        address=settings.ray_address or "local",
        num_cpus=settings.ray_num_cpus if not settings.ray_address else None,
        include_dashboard=False,
        log_to_driver=True,
    )
    # After ray.init, which installs its own SIGTERM handler (it aborts the process): ours starts
    # the drain instead (issue #5).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(proxy_location="Disabled")
        serve.run(build_app(settings), name=settings.serve_app_name, route_prefix=None)
        log.info("worker_ready", app=settings.serve_app_name)
        print(READY_LINE, flush=True)
        stop.wait()
        log.info("worker_stopping")
        _drain_dispatcher(settings)
        serve.delete(settings.serve_app_name)
    finally:
        serve.shutdown()
        ray.shutdown()


def _drain_dispatcher(settings: Settings) -> None:
    """Hand unfinished jobs back to the queue at once (issue #5) rather than leaving them locked
    until their lease lapses; jobs that end within the grace period finish first."""
    from ray import serve

    try:
        handle = serve.get_deployment_handle("Dispatcher", app_name=settings.serve_app_name)
        report = handle.drain.remote("sigterm").result(timeout_s=settings.drain_grace_s + 5)
        log.info("worker_drained", finished=report.finished, handed_back=report.handed_back)
    except Exception as exc:  # the replica's __del__ drains too; a failed call only loses speed
        log.warning("worker_drain_failed", error=repr(exc))
