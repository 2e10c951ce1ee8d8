"""structlog set-up: JSON lines in production, readable console output in development."""

from __future__ import annotations

import logging
import sys

import structlog

from serving.settings import Settings


def use_json(environment: str, log_format: str = "auto") -> bool:
    """JSON lines unless asked for console text, or, with `auto`, in development on a terminal:
    what goes to a file, a Ray replica's log or a container runtime is parsed by machines."""
    if log_format != "auto":
        return log_format == "json"
    return environment == "production" or not sys.stderr.isatty()


def configure_logging(environment: str, level: str = "INFO", log_format: str = "auto") -> None:
    json_lines = use_json(environment, log_format)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    )
    # Exceptions as structured fields in JSON (one line per event), as text on a console.
    exceptions: list[structlog.typing.Processor] = [structlog.processors.dict_tracebacks] if json_lines else []
    logging.basicConfig(level=level, stream=sys.stderr, format="%(message)s")
    for chatty in ("httpx", "httpcore", "alembic", "botocore", "urllib3"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *exceptions,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def configure_service_logging(settings: Settings) -> None:
    """Logging for any svd-serve process (CLI or Ray replica): renderer by environment, and
    secrets (keys, bearer tokens, URL signatures) redacted before anything is rendered."""
    from serving.security.redaction import install_redaction

    configure_logging(settings.environment, settings.log_level, settings.log_format)
    install_redaction(settings)
