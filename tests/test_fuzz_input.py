"""Property-based: whatever bytes or JSON arrive, the parser accepts the file or refuses it
with InputError, and a refused file leaves zero rows."""

from __future__ import annotations

import io
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from fusillade_celery import schema
from fusillade_celery.settings import Settings
from fusillade_celery.submit import Client
from fusillade_celery.validation import InputError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)
line_objects = st.fixed_dictionaries(
    {},
    optional={
        "custom_id": st.text(max_size=70) | st.integers(),
        "method": st.sampled_from(["POST", "GET", "post"]),
        "url": st.sampled_from(["/v1/chat/completions", "/v1/embeddings", "/v2/x", ""]),
        "body": st.fixed_dictionaries({}, optional={"model": st.text(max_size=12) | st.integers()})
        | json_values,
    },
)


def _rows(client: Client) -> int:
    with client.store.engine.connect() as conn:
        return sum(
            conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in (schema.files, schema.request_templates, schema.batches, schema.requests)
        )


def _check(client: Client, data: bytes) -> None:
    before = _rows(client)
    try:
        client.submit_batch(io.BytesIO(data))
    except InputError as exc:
        assert str(exc)
        assert _rows(client) == before
    else:
        assert _rows(client) > before


_FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_FUZZ
@given(st.lists(st.binary(max_size=80), max_size=5))
def test_random_bytes(tmp_path_factory, chunks: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    _check(_client(tmp_path_factory), b"\n".join(chunks))


@_FUZZ
@given(st.lists(line_objects | json_values, min_size=0, max_size=5))
def test_random_json_lines(tmp_path_factory, objs: list[object]) -> None:  # type: ignore[no-untyped-def]
    data = b"".join(json.dumps(o).encode() + b"\n" for o in objs)
    _check(_client(tmp_path_factory), data)


_clients: dict[str, Client] = {}


def _client(tmp_path_factory) -> Client:  # type: ignore[no-untyped-def]
    """One SQLite database for all examples (examples only ever add rows or none)."""
    if "c" not in _clients:
        path: Path = tmp_path_factory.mktemp("fuzz") / "fuzz.sqlite3"
        _clients["c"] = Client(
            Settings().replace(database_url=f"sqlite:///{path}", upstream_url="http://127.0.0.1:9")
        )
    return _clients["c"]


def test_lone_surrogate_escapes_are_refused(tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    client = _client(tmp_path_factory)
    before = _rows(client)
    bad = (
        b'{"custom_id": "a\\ud800", "method": "POST", "url": "/v1/embeddings",'
        b' "body": {"model": "m"}}\n'
    )
    try:
        client.submit_batch(io.BytesIO(bad))
    except InputError as exc:
        assert (exc.line, exc.field) == (1, "custom_id")
    else:
        raise AssertionError("a lone surrogate must be refused")
    assert _rows(client) == before
