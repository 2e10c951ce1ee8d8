"""Application builder for `serve run` / KubeRay's `serveConfigV2`:
`import_path: serving.worker.entrypoint:app_builder`.

Settings come from the environment of the Ray cluster's pods (SVD_SERVE_*, REDIS_URL); `args`
from the Serve config override them (for example `default_model: svd-xt`)."""

from __future__ import annotations

from typing import Any

from ray import serve

from serving.settings import load_settings
from serving.worker.deployments import build_app


def app_builder(args: dict[str, Any]) -> serve.Application:
    return build_app(load_settings(**args))
