"""The web console: a static page with plain JavaScript modules under `/console`, shipped in the
package (`serving/console`), no build step. It uses only the public JSON API, with the key the
person types in; the ingress serves it and `/` links to it."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

CONSOLE_DIR = Path(str(files("serving") / "console"))
CONSOLE_PATH = "/console"

router = APIRouter(include_in_schema=False)

LANDING = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>svd-serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/console/static/console.css"></head>
<body class="landing"><main><h1>svd-serve</h1>
<p>Image-to-video with Stable Video Diffusion.</p>
<ul><li><a href="/console/">Console</a>: submit an image, watch it animate, browse your jobs</li>
<li><a href="/docs">API reference</a> (OpenAPI at <a href="/openapi.json">/openapi.json</a>)</li></ul>
</main></body></html>
"""


@router.get("/")
async def landing() -> HTMLResponse:
    return HTMLResponse(LANDING)


@router.get(CONSOLE_PATH)
async def console_redirect() -> RedirectResponse:
    # A trailing slash, so that the page's relative module URLs resolve under /console/.
    return RedirectResponse(f"{CONSOLE_PATH}/", status_code=308)


@router.get(f"{CONSOLE_PATH}/")
async def console_page() -> FileResponse:
    return FileResponse(CONSOLE_DIR / "index.html", media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})


def install_console(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(f"{CONSOLE_PATH}/static", StaticFiles(directory=CONSOLE_DIR), name="console-static")
