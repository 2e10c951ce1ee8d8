"""The `svd-serve` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path

from serving.cli_client import add_client_commands
from serving.settings import Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in (("host", getattr(args, "host", None)), ("port", getattr(args, "port", None))) if v is not None}
    settings = load_settings(**overrides)
    from serving.logs import configure_service_logging

    configure_service_logging(settings)  # secrets never reach the logs
    return settings


def cmd_migrate(args: argparse.Namespace) -> int:
    """Upgrade the database, or with --check only say whether this code can run on it (exit 3 if
    not), waiting up to --wait seconds for another process (the api's init step) to migrate."""
    import asyncio
    import time

    from serving.db.errors import DatabaseNotMigrated
    from serving.db.migrate import check_migrated, upgrade

    settings = _settings(args)
    where = settings.resolved_database_url.split("@")[-1]
    deadline = time.monotonic() + args.wait
    while True:
        try:
            if args.check:
                asyncio.run(check_migrated(settings.resolved_database_url))
            else:
                upgrade(settings.resolved_database_url)
            break
        except DatabaseNotMigrated as exc:
            if time.monotonic() >= deadline:
                print(f"error: {exc.message}", file=sys.stderr)
                return 3
        time.sleep(2)
    from serving.db.migrate import current_revision, head_revision

    state = "compatible with this code" if args.check else "migrated"
    print(f"database {state}: {where} at revision {current_revision(settings.resolved_database_url)} "
          f"(this code's head: {head_revision()})")
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.ingress.app import create_app

    settings = _settings(args)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning", access_log=False,
                ws="websockets-sansio")
    return 0


def cmd_exporter(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.observability.exporter import create_exporter_app

    settings = _settings(args)
    uvicorn.run(create_exporter_app(settings), host=args.host or "127.0.0.1", port=args.port or 9100,
                log_level="warning", access_log=False)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from serving.worker.process import run_worker

    run_worker(_settings(args))
    return 0


def _ray_address(args: argparse.Namespace, settings: Settings) -> str:
    """The GCS address: --address, else RAY_ADDRESS (KubeRay sets it in every Ray pod), else
    SVD_SERVE_RAY_ADDRESS."""
    import os

    address = args.address or os.environ.get("RAY_ADDRESS") or settings.ray_address
    if not address:
        raise SystemExit("no Ray address: pass --address or set RAY_ADDRESS")
    return address


def cmd_drain_node(args: argparse.Namespace) -> int:
    """A GPU pod's preStop: drain this Ray node before Kubernetes stops it (serving.worker.node_drain)."""
    import asyncio

    from serving.worker.node_drain import GcsNodes, drain_this_node, local_node_id

    settings = _settings(args)
    nodes = GcsNodes(_ray_address(args, settings))
    node_id = args.node_id or local_node_id(nodes)
    left = asyncio.run(
        drain_this_node(nodes, node_id, deadline_s=args.deadline_s, message=args.reason, wait=not args.no_wait)
    )
    print(f"drained Ray node {node_id}" + (f"; still running: {', '.join(left)}" if left else ""), flush=True)
    return 0


def cmd_spot_watch(args: argparse.Namespace) -> int:
    """A GPU pod's sidecar: wait for the spot notice of this node, then drain its Ray node."""
    import asyncio

    from serving.worker.node_drain import GcsNodes, local_node_id
    from serving.worker.preemption import notice_from_settings, watch_and_drain

    settings = _settings(args)
    source = notice_from_settings(settings)
    if source is None:
        print("svd-serve spot-watch: set SVD_SERVE_PREEMPTION_WATCHER=aws or gcp", file=sys.stderr)
        return 2
    nodes = GcsNodes(_ray_address(args, settings))
    notice = asyncio.run(watch_and_drain(source, nodes, args.node_id or local_node_id(nodes), settings.preemption_poll_s))
    print(f"drained this Ray node: {notice.reason}", flush=True)
    return 0


def _local_dev_auth(settings: Settings) -> Settings:
    """`up` and `demo` run a private development stack. Unless keys or the auth flag are
    configured, they disable authentication explicitly; the ingress says so at start-up."""
    if settings.environment != "development" or settings.api_keys.get_secret_value():
        return settings
    if "auth_disabled" in settings.model_fields_set:
        return settings  # the operator decided, either way
    print("local development stack: authentication disabled (SVD_SERVE_AUTH_DISABLED=true)", flush=True)
    return settings.model_copy(update={"auth_disabled": True})


def cmd_up(args: argparse.Namespace) -> int:
    from serving.local_stack import LocalStack, StackError

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with LocalStack(_local_dev_auth(_settings(args))) as stack:
            print("press Ctrl-C to stop", flush=True)
            stack.supervise(stop)  # restarts a worker or ingress that dies, until Ctrl-C / SIGTERM
    except StackError as exc:
        print(f"svd-serve up: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the local stack, animate the bundled sample image, write MP4 + thumbnail, stop."""
    from svd_serve_client import Client

    from serving.cli_client import Progress
    from serving.local_stack import free_port, local_stack

    settings = _local_dev_auth(_settings(args))
    if args.port is None:
        settings = settings.model_copy(update={"port": free_port()})
    sample = Path(__file__).parent / "assets" / "sample.png"
    out = Path(args.out)
    with local_stack(settings) as base, Client(base, api_key="") as client:
        job = client.submit(sample, seed=42)
        print(f"submitted {sample.name}: job {job.id}", flush=True)
        status = job.wait(timeout=600, on_event=Progress(job.id))
        video = client.download(status, out / "demo.mp4")
        thumb = client.download(status, out / "demo.jpg", output="thumbnail")
    print(f"video: {video.resolve()}\nthumbnail: {thumb.resolve()}\nmodel: {status.model}")
    if status.model == "tiny-random":
        print("note: tiny-random has random weights; its video is noise, made to prove the pipeline end to end.")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run scripts/bench_gpu.py's `main` (loaded by path: `scripts/` is not an installed package)."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", script)
    if spec is None or spec.loader is None or not script.is_file():
        print(f"svd-serve bench runs from a checkout of the repository; {script} is missing", file=sys.stderr)
        return 2
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return int(module.main(args.bench_args))


def cmd_models(args: argparse.Namespace) -> int:
    from models.registry import get_spec, list_specs

    if args.models_command == "list":
        if args.json:
            print(json.dumps([dataclasses.asdict(spec) for spec in list_specs()]))
            return 0
        for spec in list_specs():
            label = " (random weights, for tests and demos)" if spec.is_random else ""
            print(f"{spec.name:12} {spec.hub_id or '-':48} {spec.native_width}x{spec.native_height} "
                  f"{spec.default_num_frames} frames{label}")
        return 0
    settings = _settings(args)
    spec = get_spec(args.name)
    if spec.hub_id is None:
        print(f"{spec.name} is built locally on first use; nothing to download")
        return 0
    from huggingface_hub import snapshot_download

    from models.download import download_patterns

    target = settings.resolved_models_dir / spec.name
    allow, ignore = download_patterns(None if args.variant == "full" else args.variant)
    revision = args.revision or settings.model_revision
    snapshot_download(spec.hub_id, revision=revision, local_dir=target, allow_patterns=allow, ignore_patterns=ignore)
    print(f"downloaded {spec.hub_id}@{revision} ({args.variant}) to {target}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """`config env-example`: every setting with its default, from `Settings` (no settings loaded)."""
    from serving.env_example import render

    sys.stdout.write(render())
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """`keys create|list|revoke` on the job store's `api_keys` table."""
    import asyncio

    from serving.security.keys_cli import run_keys_command

    return asyncio.run(run_keys_command(_settings(args), args))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("svd-serve")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svd-serve", description="Self-hosted Stable Video Diffusion service")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_bind(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--host", help="listen address (default 127.0.0.1)")
        p.add_argument("--port", type=int, help="listen port (default 8000)")
        return p

    with_bind(sub.add_parser("up", help="run everything on this machine")).set_defaults(func=cmd_up)
    with_bind(sub.add_parser("api", help="run the HTTP ingress")).set_defaults(func=cmd_api)
    sub.add_parser("worker", help="deploy the Ray Serve app and run until stopped").set_defaults(func=cmd_worker)
    exporter = with_bind(sub.add_parser("exporter", help="serve the Redis-held metrics once (port 9100)"))
    exporter.set_defaults(func=cmd_exporter)
    migrate = sub.add_parser("migrate", help="apply database migrations (docs/migrations.md)")
    migrate.add_argument("--check", action="store_true",
                         help="change nothing; exit 3 unless this code can run on the database")
    migrate.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                         help="keep trying this long before giving up (an init container waiting for the migration)")
    migrate.set_defaults(func=cmd_migrate)
    drain = sub.add_parser("drain-node", help="drain this host's Ray node before it goes (a GPU pod's preStop)")
    drain.add_argument("--deadline-s", type=float, required=True,
                       help="seconds until the node is killed (the pod's grace period less a margin)")
    drain.add_argument("--address", help="Ray GCS address host:port (default: $RAY_ADDRESS)")
    drain.add_argument("--node-id", help="hex id of the Ray node (default: the node with this host's IP)")
    drain.add_argument("--reason", default="pod terminating", help="recorded with the drain")
    drain.add_argument("--no-wait", action="store_true", help="return at once instead of waiting for the replicas to leave")
    drain.set_defaults(func=cmd_drain_node)
    watch = sub.add_parser("spot-watch", help="wait for this node's spot notice, then drain its Ray node")
    watch.add_argument("--address", help="Ray GCS address host:port (default: $RAY_ADDRESS)")
    watch.add_argument("--node-id", help="hex id of the Ray node (default: the node with this host's IP)")
    watch.set_defaults(func=cmd_spot_watch)
    demo = with_bind(sub.add_parser("demo", help="run the stack, animate the sample image, stop"))
    demo.add_argument("--out", default="demo-output", help="directory for demo.mp4 and demo.jpg")
    demo.set_defaults(func=cmd_demo)

    add_client_commands(sub)  # submit, status, watch, list, cancel, retry, download (serving.cli_client)

    models = sub.add_parser("models", help="list or download models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_list = models_sub.add_parser("list", help="the models this service knows")
    models_list.add_argument("--json", action="store_true", help="print JSON on stdout instead of text")
    download = models_sub.add_parser("download", help="fetch a model's weights into the models directory")
    download.add_argument("name", help="a name from `svd-serve models list`")
    download.add_argument("--revision",
                          help="hub branch, tag or commit to fetch (default: SVD_SERVE_MODEL_REVISION, main)")
    download.add_argument("--variant", choices=("fp16", "full"), default="fp16",
                          help="fp16 weights (GPU; half the download) or full precision (default fp16)")
    models.set_defaults(func=cmd_models)

    # Every argument, --help included, belongs to the benchmark's own parser: with a prefix other
    # than "-" this subparser treats them all as positionals and hands them over untouched.
    bench = sub.add_parser("bench", help="benchmark diffusers vs the engine presets (scripts/bench_gpu.py)",
                           add_help=False, prefix_chars="+")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    config = sub.add_parser("config", help="configuration helpers")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    config_sub.add_parser("env-example", help="print .env.example: every setting, its default and what it does")
    config.set_defaults(func=cmd_config)

    keys = sub.add_parser("keys", help="create, list or revoke API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it (shown this once only)")
    create.add_argument("--owner", required=True, help="the owner whose jobs the key sees")
    create.add_argument("--scopes", default="submit,read", help="comma-separated: submit,read,admin")
    create.add_argument("--name", help="a label to recognise the key by")
    list_keys = keys_sub.add_parser("list", help="list keys (never the keys themselves)")
    list_keys.add_argument("--owner", help="only this owner's keys")
    list_keys.add_argument("--all", action="store_true", help="include revoked keys")
    list_keys.add_argument("--json", action="store_true", help="print JSON on stdout instead of text")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id or prefix")
    revoke.add_argument("key", help="the id or prefix that `keys list` shows")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
