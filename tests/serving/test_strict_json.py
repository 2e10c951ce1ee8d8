"""Strict JSON in and out, and JSON columns written the same way on both stores."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.exc import StatementError

from serving import strict_json
from serving.db.engine import make_engine, make_session_factory
from serving.db.jobs import JobRepository
from serving.errors import InvalidInput
from tests.serving.events_helpers import PARAMS


@pytest.mark.parametrize("text", ['{"x": NaN}', '{"x": Infinity}', '[-Infinity]', '{"\\ud800": 1}', '"\\udfff"',
                                  '{"a": ["ok", "\\udbff"]}'])
def test_loads_refuses_what_is_not_json(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        strict_json.loads(text, "`metadata`")
    assert info.value.code == "invalid_json" and info.value.message.startswith("`metadata` is not valid JSON")


def test_loads_keeps_what_is() -> None:
    assert strict_json.loads('{"e": "\\ud83d\\ude00", "n": 1e308, "z": "\\u0000"}') == {
        "e": "\U0001F600", "n": 1e308, "z": "\x00"}  # a pair is one code point; NUL is JSON (not storable)


def test_dumps_never_writes_nan() -> None:
    for value in (float("nan"), float("inf"), {"a": [float("-inf")]}):
        with pytest.raises(ValueError):
            strict_json.dumps(value)
    assert strict_json.dumps({"a": [1, "\U0001F600"]}) == '{"a":[1,"\\ud83d\\ude00"]}'


def test_unstorable_names_the_place() -> None:
    assert strict_json.unstorable({"a": [{"b": "x\x00"}]}, "metadata") == (
        "`metadata.a[0].b` contains a NUL character (U+0000), which cannot be stored")
    assert strict_json.unstorable({"k\x00": 1}, "metadata") == (
        "a key in `metadata` contains a NUL character (U+0000), which cannot be stored")
    assert strict_json.unstorable("\udc80", "prompt") == (
        "`prompt` contains a lone surrogate (U+DC80), which is not Unicode text")
    assert strict_json.unstorable({"x": float("nan")}, "metadata") == "`metadata.x` is nan, which is not a JSON number"
    assert strict_json.unstorable({"ok": ["caf\u00e9", 1.5, None, True, "\U0001F600"]}, "metadata") is None


async def test_both_stores_refuse_a_non_finite_number_in_a_json_column(database_url: str) -> None:
    """PostgreSQL's JSONB refuses NaN; SQLite used to store it and hand it back: now both refuse
    it before writing, and nothing is stored."""
    engine = make_engine(database_url)
    try:
        jobs = JobRepository(make_session_factory(engine))
        owner = f"nan-{uuid.uuid4().hex[:8]}"
        with pytest.raises(StatementError, match="not JSON compliant"):
            await jobs.create(job_id=uuid.uuid4(), owner_id=owner, image_url="local://x", params=PARAMS.to_json(),
                              model="tiny-random", priority="normal", metadata={"x": float("nan")})
        assert (await jobs.list_for_owner(owner))[0] == []
    finally:
        await engine.dispose()
