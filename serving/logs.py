"""structlog set-up: JSON lines in production, readable console output in development."""

from __future__ import annotations

import logging
import sys

import structlog

from serving.settings import Settings


def configure_logging(environment: str, level: str = "INFO") -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if environment == "production" else structlog.dev.ConsoleRenderer(colors=False)
    )
    logging.basicConfig(level=level, stream=sys.stderr, format="%(message)s")
    for chatty in ("httpx", "httpcore", "alembic", "botocore", "urllib3"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def configure_service_logging(settings: Settings) -> None:
    """Logging for any svd-serve process (CLI or Ray replica): renderer by environment, and
    secrets (keys, bearer tokens, URL signatures) redacted before anything is rendered."""
    from serving.security.redaction import install_redaction

    configure_logging(settings.environment)
    install_redaction(settings)
