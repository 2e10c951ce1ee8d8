"""`.env.example`, written from `Settings` itself: every field, its variable, its default and the
comments beside it in serving/settings.py (`svd-serve config env-example > .env.example`).

The comments in settings.py are the one place a setting is explained; this reads them with
`tokenize` rather than keeping a second description per field.
"""

from __future__ import annotations

import inspect
import io
import json
import tokenize
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from serving.settings import Settings

HEADER = """\
# Generated from serving/settings.py by `svd-serve config env-example > .env.example`; do not edit
# (tests/serving/test_env_example.py fails when it is stale). Copy to .env (ignored by git) or
# export these; every line shows the default. Secrets may also be files named after the setting
# (lower case) in the folder SVD_SERVE_SECRETS_DIR points to. Production: docs/production.md.
"""


def env_name(name: str, field: FieldInfo) -> str:
    """The environment variable a field is read from."""
    if isinstance(field.validation_alias, str):
        return field.validation_alias
    prefix = str(Settings.model_config.get("env_prefix", ""))
    return f"{prefix}{name}".upper()


def render_value(value: Any) -> str:
    """A default as pydantic-settings parses it back from the environment."""
    if value is None:
        return ""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)  # complex types are JSON in the environment
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _choices(annotation: Any) -> list[str]:
    """The values of a Literal field (also inside `X | None`)."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(v) for v in typing.get_args(annotation)]
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is typing.Literal:
            return _choices(arg)
    return []


def _comments(cls: type) -> dict[str, tuple[list[str], str]]:
    """field name -> (comment lines just above it, comment at the end of its line)."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    own_line: dict[int, str] = {}
    trailing: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row = token.start[0]
            text = token.string.lstrip("#").strip()
            (own_line if not lines[row - 1][: token.start[1]].strip() else trailing)[row] = text
    found: dict[str, tuple[list[str], str]] = {}
    for row, line in enumerate(lines, start=1):
        name = line.strip().split(":", 1)[0]
        if not line.startswith("    ") or line.startswith("     ") or name not in cls.model_fields:  # type: ignore[attr-defined]
            continue
        above: list[str] = []
        previous = row - 1
        while previous in own_line:
            above.insert(0, own_line[previous])
            previous -= 1
        found[name] = (above, trailing.get(row, ""))
    return found


def render() -> str:
    """The whole `.env.example`."""
    out = [HEADER]
    comments = _comments(Settings)
    for name, field in Settings.model_fields.items():
        above, beside = comments.get(name, ([], ""))
        if above:
            out.append("")
            out += [f"# {text}".rstrip() for text in above]
        notes = [beside] if beside else []
        choices = _choices(field.annotation)
        if choices:
            notes.append("one of " + "|".join(choices))
        line = f"# {env_name(name, field)}={render_value(field.get_default(call_default_factory=True))}"
        out.append(f"{line:<56} # {'; '.join(notes)}" if notes else line)
    return "\n".join(out) + "\n"
