"""`svd-serve worker`: connect to (or start) Ray, deploy the Serve app, run until SIGTERM."""

from __future__ import annotations

import signal
import threading

import structlog

from serving.settings import Settings

log = structlog.get_logger(__name__)


def run_worker(settings: Settings, stop: threading.Event | None = None) -> None:
    import ray
    from ray import serve

    from serving.worker.deployments import build_app

    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(
        address=settings.ray_address,
        num_cpus=settings.ray_num_cpus if not settings.ray_address else None,
        include_dashboard=False,
        log_to_driver=True,
    )
    try:
        serve.start(proxy_location="Disabled")
        serve.run(build_app(settings), name=settings.serve_app_name, route_prefix=None)
        log.info("worker_ready", app=settings.serve_app_name)
        print("svd-serve worker ready", flush=True)
        stop.wait()
        log.info("worker_stopping")
        serve.delete(settings.serve_app_name)
    finally:
        serve.shutdown()
        ray.shutdown()
