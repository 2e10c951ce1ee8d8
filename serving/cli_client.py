"""`svd-serve submit|status|watch|list|cancel|retry|download`: the CLI over the Python client.

Conventions: data on stdout (a job id, a table, or JSON with `--json`), progress and messages
on stderr; key and URL from `--api-key`/`--url` or `SVD_SERVE_API_KEY`/`SVD_SERVE_URL`; an
error is one line on stderr with the problem code, and the exit code says what kind it was
(`EXIT_*` below, documented in docs/cli.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from serving.ingress.schemas import AnimateOptions
from serving.types import OUTPUT_KINDS, JobStatus, Priority

if TYPE_CHECKING:
    from svd_serve_client import Client, Event, JobInfo

EXIT_OK = 0
EXIT_JOB_FAILED = 1  # the job ended `error` or `canceled`
EXIT_USAGE = 2  # bad arguments, a missing image file (argparse's own code)
EXIT_NOT_FOUND = 3  # 404: no such job (or not yours)
EXIT_REFUSED = 4  # any other 4xx: bad key (401), scope (403), conflict (409), invalid input (422), rate limit (429)
EXIT_UNREACHABLE = 5  # connection refused, DNS, timeout
EXIT_SERVER_ERROR = 6  # 5xx
EXIT_TIMEOUT = 7  # --wait / watch gave up before the job ended (the job goes on)

# The choices the API accepts, from the API's own definitions (checked before any request).
PRIORITIES = tuple(p.value for p in Priority)
PROVIDERS: tuple[str, ...] = get_args(AnimateOptions.model_fields["provider"].annotation)
OUTPUTS = OUTPUT_KINDS
STATUSES = tuple(s.value for s in JobStatus)


class CliError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _out(text: str) -> None:
    print(text, flush=True)


def _json_out(data: Any) -> None:
    _out(json.dumps(data, separators=(",", ":")))


@contextmanager
def _client(args: argparse.Namespace) -> Iterator[Client]:
    try:
        from svd_serve_client import Client
    except ImportError as exc:  # a server image without the client distribution
        raise CliError("the Python client is not installed: pip install ./clients/python", EXIT_USAGE) from exc
    with Client(args.url, args.api_key, timeout=args.http_timeout) as client:
        yield client


def run_client_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one client command, turning every expected failure into one stderr line and an exit code."""
    import svd_serve_client as sc

    prog = f"svd-serve {args.command}"
    try:
        return func(args)
    except CliError as exc:
        _err(f"{prog}: {exc}")
        return exc.exit_code
    except FileNotFoundError as exc:
        _err(f"{prog}: no such file: {exc.filename}")
        return EXIT_USAGE
    except sc.NotFoundError as exc:
        _err(f"{prog}: {exc.code} (404): {exc.detail}")
        return EXIT_NOT_FOUND
    except sc.APIStatusError as exc:
        retry = f" (retry after {exc.retry_after:g} s)" if exc.retry_after is not None else ""
        _err(f"{prog}: {exc.code} ({exc.status_code}): {exc.detail}{retry}")
        return EXIT_SERVER_ERROR if exc.status_code >= 500 else EXIT_REFUSED
    except sc.APIConnectionError as exc:
        _err(f"{prog}: unreachable: {exc}")
        return EXIT_UNREACHABLE
    except sc.JobFailed as exc:
        _err(f"{prog}: {exc}")
        if args.json:
            _json_out(exc.job.raw)
        return EXIT_JOB_FAILED
    except sc.JobTimeout as exc:
        _err(f"{prog}: {exc}")
        return EXIT_TIMEOUT
    except sc.ChecksumMismatch as exc:
        _err(f"{prog}: checksum_mismatch: {exc}")
        return EXIT_SERVER_ERROR


# --- progress on stderr --------------------------------------------------------------------------


class Progress:
    """A bar redrawn in place on a terminal; elsewhere (a log, a pipe) one line per new state
    and per tenth of the progress, so a log stays short."""

    def __init__(self, job_id: str, quiet: bool = False) -> None:
        self.job_id, self.quiet = job_id, quiet
        self.tty = sys.stderr.isatty()
        self.last: tuple[str, int] | None = None

    def __call__(self, event: Event) -> None:
        if self.quiet:
            return
        data = event.data
        fraction = 1.0 if event.type == "completed" else float(data.get("progress") or 0.0)
        if event.type == "queued" and data.get("queuePosition") is not None:
            detail = f"queue position {data['queuePosition']}"
        elif event.type == "progress" and data.get("steps"):
            detail = f"step {data.get('step')}/{data['steps']}"
        else:
            detail = str(data.get("stage") or "")
        line = f"{self.job_id} [{'#' * int(fraction * 20):<20}] {fraction:4.0%} {event.type} {detail}".rstrip()
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line + ("\n" if event.terminal else ""))
            sys.stderr.flush()
            return
        state = (event.type, int(fraction * 10))
        if state != self.last:
            _err(line)
        self.last = state


# --- commands --------------------------------------------------------------------------------------


def _submit_options(args: argparse.Namespace) -> dict[str, Any]:
    names = ("model", "prompt", "num_frames", "num_inference_steps", "fps", "seed", "width", "height",
             "motion_bucket_id", "noise_aug_strength", "priority", "provider", "webhook_url", "interpolate_fps")
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.outputs:
        options["outputs"] = args.outputs
    if args.loop:
        options["loop"] = True
    if args.no_cache:
        options["cache"] = False
    if args.metadata is not None:
        options["metadata"] = args.metadata
    return options


def _image(value: str) -> str:
    if not value.startswith(("http://", "https://")) and not Path(value).is_file():
        raise FileNotFoundError(2, "no such file", value)
    return value


def _finish(client: Client, job_id: str, args: argparse.Namespace) -> int:
    """--wait / watch: follow the job, download with --out, print the result."""
    info = client.wait(job_id, timeout=args.timeout, on_event=Progress(job_id, quiet=args.quiet))
    files: dict[str, str] = {}
    if getattr(args, "out", None):
        files = _download_all(client, info, Path(args.out))
    if args.json:
        _json_out({**info.raw, **({"downloaded": files} if files else {})})
    else:
        _out(job_id)
        for path in files.values():
            _out(path)
    return EXIT_OK


def _download_all(client: Client, info: JobInfo, out: Path) -> dict[str, str]:
    """The video to `out`, the thumbnail beside it (`.jpg`) when the job has one."""
    files = {"mp4": str(client.download(info, out, output="mp4"))}
    if "thumbnail" in info.outputs:
        thumb = out / f"{info.id}.jpg" if out.is_dir() else out.with_suffix(".jpg")
        files["thumbnail"] = str(client.download(info, thumb, output="thumbnail"))
    return files


def cmd_submit(args: argparse.Namespace) -> int:
    image = _image(args.image)
    with _client(args) as client:
        job = client.submit(image, idempotency_key=args.idempotency_key, **_submit_options(args))
        if not args.wait and not args.out:
            if args.json:
                _json_out(job.accepted.raw)
            else:
                _out(job.id)
            return EXIT_OK
        _err(f"submitted: job {job.id}")
        return _finish(client, job.id, args)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.status(args.job_id)
    if args.json:
        _json_out(info.raw)
    else:
        _out(_status_line(info))
        if info.error:
            _out(f"error: {info.error.get('code')}: {info.error.get('message')}")
        for kind, url in info.outputs.items():
            _out(f"{kind}: {url}")
    return EXIT_OK


def _status_line(info: JobInfo) -> str:
    created = str(info.raw.get("createdAt") or "")
    return f"{info.id}  {info.status:<10} {info.progress:4.0%}  {info.model or '-':<12} {created}"


def cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if not args.json:
            return _finish(client, args.job_id, args)
        # --json: every event as one JSON line on stdout (NDJSON), for a script to follow.
        for event in client.events(args.job_id):
            _json_out({"id": event.id, "event": event.type, "data": event.data})
        info = client.status(args.job_id)
    if info.status != "completed":
        _err(f"svd-serve watch: job {info.id} ended {info.status}")
        return EXIT_JOB_FAILED
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list(limit=args.limit, cursor=args.cursor, status=args.status)
    if args.json:
        _json_out({"jobs": [j.raw for j in page.jobs], "nextCursor": page.next_cursor})
        return EXIT_OK
    for info in page.jobs:
        _out(_status_line(info))
    if page.next_cursor:
        _err(f"more: svd-serve list --cursor {page.next_cursor}")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.cancel(args.job_id)
    if args.json:
        _json_out(info.raw)
    else:
        _out(f"{info.id} {info.status}")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.retry(args.job_id)
        if not args.wait:
            if args.json:
                _json_out(job.accepted.raw)
            else:
                _out(job.id)
            return EXIT_OK
        _err(f"retrying {args.job_id} as job {job.id}")
        return _finish(client, job.id, args)


def cmd_download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        path = client.download(args.job_id, Path(args.out), output=args.output)
    if args.json:
        _json_out({"jobId": args.job_id, "output": args.output, "path": str(path)})
    else:
        _out(str(path))
    return EXIT_OK


# --- parsers ----------------------------------------------------------------------------------------


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {number}")
    return number


def _outputs(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in OUTPUTS]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(OUTPUTS)} (comma-separated), not {value!r}")
    return items


def _json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return parsed


def _connection_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument("--url", help="the service's base URL (default: $SVD_SERVE_URL, else http://127.0.0.1:8000)")
    group.add_argument("--api-key", help="API key (default: $SVD_SERVE_API_KEY)")
    group.add_argument("--http-timeout", type=float, default=30.0, metavar="S",
                       help="seconds one HTTP request may take (default 30)")
    parent.add_argument("--json", action="store_true", help="print JSON on stdout instead of text")
    return parent


def _wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=600, metavar="S",
                        help="give up waiting after this many seconds, exit 7 (default 600; the job goes on)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def add_client_commands(sub: Any) -> None:
    parent = _connection_parent()

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help, parents=[parent])
        parser.set_defaults(func=lambda args: run_client_command(func, args))
        return parser

    submit = command("submit", cmd_submit, "submit an image; prints the job id (the video with --wait/--out)")
    submit.add_argument("image", help="a PNG, JPEG or WebP file, or an http(s) URL the service fetches")
    submit.add_argument("--wait", action="store_true", help="follow the job to its end, progress on stderr")
    submit.add_argument("--out", metavar="PATH",
                        help="download the MP4 to PATH (a file or directory; implies --wait); the thumbnail goes beside it")
    _wait_options(submit)
    submit.add_argument("--idempotency-key", metavar="KEY",
                        help="repeat a submit safely: the same key returns the same job (default: a new key)")
    params = submit.add_argument_group("job parameters (default: the model's own)")
    params.add_argument("--model", help="model name (`svd-serve models list`)")
    params.add_argument("--prompt", help="text prompt (used by providers that take one, e.g. runway)")
    params.add_argument("--num-frames", type=_positive_int, metavar="N", help="frames to generate")
    params.add_argument("--steps", dest="num_inference_steps", type=_positive_int, metavar="N",
                        help="denoising steps")
    params.add_argument("--fps", type=_positive_int, metavar="N", help="frames per second of the video (1-60)")
    params.add_argument("--seed", type=int, metavar="N", help="random seed (0 to 2^32-1); fixed seeds can be cached")
    params.add_argument("--width", type=_positive_int, metavar="PX", help="width, a multiple of 64")
    params.add_argument("--height", type=_positive_int, metavar="PX", help="height, a multiple of 64")
    params.add_argument("--motion-bucket-id", type=int, metavar="N", help="amount of motion (0-1023)")
    params.add_argument("--noise-aug-strength", type=float, metavar="X", help="noise added to the image (0-1)")
    params.add_argument("--interpolate-fps", type=_positive_int, metavar="N",
                        help="interpolate the video up to this frame rate (above --fps)")
    params.add_argument("--loop", action="store_true", help="ping-pong: forwards, then backwards")
    params.add_argument("--outputs", type=_outputs, metavar="LIST",
                        help=f"comma-separated, of {','.join(OUTPUTS)} (default mp4,thumbnail)")
    params.add_argument("--priority", choices=PRIORITIES, help="queue priority (default normal)")
    params.add_argument("--provider", choices=PROVIDERS, help="where the job runs (default auto)")
    params.add_argument("--webhook-url", metavar="URL", help="POST the job's end here (Standard Webhooks)")
    params.add_argument("--metadata", type=_json_object, metavar="JSON", help="a JSON object kept with the job")
    params.add_argument("--no-cache", action="store_true", help="never reuse an identical earlier job's result")

    status = command("status", cmd_status, "print a job's status")
    status.add_argument("job_id", help="the job id that submit printed")

    watch = command("watch", cmd_watch,
                    "follow a job live (progress on stderr) until it ends; --json prints each event as a JSON line")
    watch.add_argument("job_id", help="the job id that submit printed")
    watch.add_argument("--out", metavar="PATH", help="then download the MP4 to PATH (and the thumbnail beside it)")
    _wait_options(watch)

    listing = command("list", cmd_list, "list your jobs, newest first")
    listing.add_argument("--status", choices=STATUSES, help="only jobs in this state")
    listing.add_argument("--limit", type=_positive_int, default=20, metavar="N", help="jobs per page (default 20)")
    listing.add_argument("--cursor", help="the next page's cursor, from the previous page")

    cancel = command("cancel", cmd_cancel, "cancel a queued or running job")
    cancel.add_argument("job_id", help="the job id that submit printed")

    retry = command("retry", cmd_retry, "re-run a job that ended in error or was canceled; prints the new job id")
    retry.add_argument("job_id", help="the failed or canceled job's id")
    retry.add_argument("--wait", action="store_true", help="follow the new job to its end")
    _wait_options(retry)

    download = command("download", cmd_download, "download an output of a completed job (SHA-256 checked)")
    download.add_argument("job_id", help="the job id")
    download.add_argument("--out", default=".", metavar="PATH", help="a file, or a directory (default: here)")
    download.add_argument("--output", choices=OUTPUTS, default="mp4", help="which output (default mp4)")
