"""Watches a Serve application as its controller sees it and prints one JSON line per reading:
`{"t": epoch s, "app": "RUNNING", "deployments": {"Generator": [wanted, running], ...}}`.

Run as `python -m tests.cluster.serve_watch ADDRESS APP [INTERVAL_S]`: a Ray driver of its own, so
the test process never joins the cluster. The readings are the ground truth the scaling tests
assert on (and the timeline they print when something is late)."""

from __future__ import annotations

import json
import sys
import time
import warnings


def main() -> None:
    address, app = sys.argv[1], sys.argv[2]
    interval_s = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
    warnings.simplefilter("ignore")
    import ray
    from ray.serve.context import _get_global_client

    from serving.observability.replicas import app_status, replica_counts

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    client = None
    while True:
        try:
            client = client or _get_global_client()
            details = dict(client.get_serve_details())
            reading = {"t": time.time(), "app": app_status(details, app),
                       "deployments": {k: list(v) for k, v in replica_counts(details, app).items()}}
        except Exception as exc:  # Serve not started yet, or the controller restarting
            client = None
            reading = {"t": time.time(), "app": None, "deployments": {}, "error": repr(exc)[:200]}
        print(json.dumps(reading), flush=True)
        time.sleep(interval_s)  # the sampling period of the timeline


if __name__ == "__main__":
    main()
