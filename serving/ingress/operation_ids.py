"""Stable OpenAPI operation ids: generated clients get `submitJob`, not `submit_api_v1_animate_image_post`.

Every public route names its id (`operation_id=`); a route that does not gets its function name
in camelCase (`list_jobs` -> `listJobs`) rather than FastAPI's name-path-method default."""

from __future__ import annotations

from fastapi.routing import APIRoute


def operation_id(route: APIRoute) -> str:
    head, *rest = route.name.split("_")
    return head + "".join(part.capitalize() for part in rest)
