"""Strict JSON for what we read and what we write (RFC 8259, I-JSON RFC 7493).

Python's `json` reads and writes `NaN`, `Infinity` and `-Infinity`, which are not JSON (a webhook
body holding one is refused by Node's `JSON.parse`), and reads `"\\ud800"` into a string that is
not Unicode text (it cannot be encoded as UTF-8). PostgreSQL keeps neither a NUL character in text
nor `\\u0000` in JSONB, where SQLite takes both: a value one store takes and the other refuses is
refused for both, before anything is stored. So:

- `loads` refuses the non-standard constants and lone surrogates (422 `invalid_json`);
- `dumps` refuses non-finite numbers rather than writing them;
- `unstorable` says why a value (text, or JSON-shaped) cannot be stored as it is, or None.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from serving.errors import InvalidInput

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a valid pair is one code point once decoded


def _refuse_constant(name: str) -> Any:
    raise InvalidInput(f"{name} is not a JSON value; send numbers that are finite.", code="invalid_json")


def loads(raw: str | bytes, what: str = "The body") -> Any:
    """Parse JSON text as RFC 8259 defines it; `InvalidInput` (`invalid_json`) naming `what`."""
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except InvalidInput as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc.message}", code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc.msg}.", code="invalid_json") from exc
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON: it is not UTF-8 text.", code="invalid_json") from exc
    except RecursionError:
        # A few hundred thousand nested brackets exhaust the parser's stack: refuse, do not crash.
        raise InvalidInput(f"{what} is nested too deeply.", code="invalid_json") from None
    problem = _first_lone_surrogate(value)
    if problem is not None:
        raise InvalidInput(f"{what} is not valid JSON: {problem}.", code="invalid_json")
    return value


def dumps(value: Any) -> str:
    """Compact JSON; a non-finite number raises ValueError instead of becoming `NaN`."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _first_lone_surrogate(value: Any) -> str | None:
    for text in _strings(value):
        match = _LONE_SURROGATE.search(text)
        if match:
            return f"it holds a lone surrogate (U+{ord(match.group()):04X}), which is not Unicode text"
    return None


def _strings(value: Any) -> Any:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (U+0000), which cannot be stored"
    match = _LONE_SURROGATE.search(text)
    if match:
        return f"contains a lone surrogate (U+{ord(match.group()):04X}), which is not Unicode text"
    return None


def _label(key: str) -> str:
    shown = key.encode("ascii", "backslashreplace").decode()
    return shown if len(shown) <= 40 else shown[:37] + "..."


def unstorable(value: Any, where: str) -> str | None:
    """Why `value` cannot be stored and read back intact by every job store, as a sentence about
    `where` (a field name) and the path inside it; None when it can."""
    stack: list[tuple[str, Any]] = [(where, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            problem = _text_problem(item)
            if problem:
                return f"`{path}` {problem}"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"`{path}` is {item}, which is not a JSON number"
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and (problem := _text_problem(key)):
                    return f"a key in `{path}` {problem}"
                stack.append((f"{path}.{_label(str(key))}", child))
        elif isinstance(item, list | tuple):
            stack.extend((f"{path}[{index}]", child) for index, child in enumerate(item))
    return None
