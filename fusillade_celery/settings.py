"""One typed settings object, every field read from an env var ``FUSILLADE_<NAME>``.

Why one object: the claimer, the workers, beat and the CLI must agree on limits, timeouts and
retry policy. Reading the environment in one place, with one parser per field and an error that
names the variable, keeps a typo from silently becoming a default in one process only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .toolconfig import ToolConfig, parse_tools

ENV_PREFIX = "FUSILLADE_"
DEFAULT_DATABASE_URL = "sqlite:///fusillade.sqlite3"
MEMORY_BROKER = "memory://localhost/"


class ConfigError(ValueError):
    """A setting could not be parsed; the message names the env var."""


@dataclass(frozen=True)
class Route:
    """Where requests for one model go: an OpenAI-compatible base URL and its key; ``stream``
    overrides ``FUSILLADE_STREAM_ENDPOINTS`` for this route (None: the endpoints decide)."""

    url: str
    api_key: str = ""
    stream: bool | None = None

    def __repr__(self) -> str:  # keys never reach a log line through repr
        return (
            f"Route(url={self.url!r}, api_key={'***' if self.api_key else ''!r}, "
            f"stream={self.stream!r})"
        )


@dataclass(frozen=True)
class Escalation:
    """SLA escalation: when a batch has less than ``threshold_s`` left, route to ``model``."""

    model: str
    threshold_s: int = 900


def _int(raw: str) -> int:
    return int(raw.replace("_", ""))


def _positive(raw: str) -> int:
    """An int of at least 1: a limit, a size, a cadence or a timeout of 0 would not mean
    "none" or "off" but a run that waits for ever without a word (a limit of 0 claims
    nothing)."""
    value = _int(raw)
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


def _port(raw: str) -> int:
    """A TCP port, 0 meaning "not served"."""
    value = _int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port from 0 to 65535, got {value}")
    return value


def _float(raw: str) -> float:
    return float(raw)


def _str(raw: str) -> str:
    return raw


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in raw.split(",") if p.strip())


def _pairs(raw: str) -> list[tuple[str, str]]:
    pairs = []
    for part in _csv(raw):
        name, sep, value = part.rpartition("=")
        if not sep or not name.strip():
            raise ValueError(f"expected name=value, got {part!r}")
        pairs.append((name.strip(), value.strip()))
    return pairs


def _model_limits(raw: str) -> dict[str, int]:
    limits = {}
    for name, value in _pairs(raw):
        try:
            limits[name] = int(value)
        except ValueError:
            raise ValueError(f"expected model=integer, got {name}={value}") from None
    bad = [n for n, v in limits.items() if v < 1]
    if bad:
        raise ValueError(f"limits must be >= 1 (model {bad[0]!r})")
    return limits


def _statuses(raw: str) -> frozenset[int]:
    """``5xx,429,408`` -> the set of codes; ``Nxx`` expands to a whole class."""
    codes: set[int] = set()
    for part in _csv(raw):
        if re.fullmatch(r"[1-5]xx", part.lower()):
            base = int(part[0]) * 100
            codes.update(range(base, base + 100))
        else:
            codes.add(int(part))
    return frozenset(codes)


def _http_url(raw: str) -> str:
    """An http(s) base URL with a host, without its trailing slash: a typo here (a missing
    scheme, a stray space) would otherwise surface only as every request failing upstream."""
    url = raw.strip().rstrip("/")
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s]*)?", url):
        raise ValueError(f"expected an http(s) URL like http://host:8000, got {redact_url(raw)!r}")
    return url


def _database_url(raw: str) -> str:
    """A URL SQLAlchemy can parse (checked here, so a bad value is one line naming the
    variable rather than an ``ArgumentError`` traceback where the engine is built)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(raw)
    except ArgumentError:
        raise ValueError(
            f"expected a database URL like postgresql+psycopg://user:pass@host/db or "
            f"sqlite:///path, got {redact_url(raw)!r}"
        ) from None
    return raw


def _url_prefixes(raw: str) -> tuple[str, ...]:
    return tuple(_http_url(p) for p in _csv(raw))


def _fernet_key(raw: str) -> str:
    """A Fernet key (``Fernet.generate_key()``: 32 url-safe base64-encoded bytes)."""
    from cryptography.fernet import Fernet

    try:
        Fernet(raw.strip().encode())
    except ValueError:
        raise ValueError(
            "expected a Fernet key (python -c 'from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())')"
        ) from None
    return raw.strip()


def _window(raw: str) -> str:
    parse_duration_s(raw)
    return raw.strip()


def _routes(raw: str) -> dict[str, Route]:
    """JSON ``{"model": {"url": ..., "api_key" | "api_key_env": ..., "stream": bool}}``, or
    ``@path`` to one."""
    text = Path(raw[1:]).read_text() if raw.startswith("@") else raw
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object of model -> {url, api_key | api_key_env}")
    routes = {}
    for model, spec in data.items():
        if isinstance(spec, str):
            spec = {"url": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
            raise ValueError(f"route for {model!r} needs a 'url'")
        key = spec.get("api_key") or os.environ.get(spec.get("api_key_env") or "", "")
        try:
            url = _http_url(spec["url"])
        except ValueError as exc:
            raise ValueError(f"route for {model!r}: {exc}") from None
        stream = spec.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise ValueError(f"route for {model!r}: 'stream' must be true or false")
        routes[model] = Route(url=url, api_key=key, stream=stream)
    return routes


#: The paths whose replies can be streamed and reassembled (``sse.py``), by the suffix that
#: names their format.
STREAMABLE_SUFFIXES = ("/chat/completions", "/completions", "/responses")


def _stream_endpoints(raw: str) -> frozenset[str]:
    """``/v1/chat/completions,/v1/responses``: paths sent streamed. Only paths of a format the
    reassembly knows: another would be stored as raw event text."""
    paths = frozenset(_csv(raw))
    bad = sorted(p for p in paths if not p.startswith("/") or not p.endswith(STREAMABLE_SUFFIXES))
    if bad:
        raise ValueError(
            f"cannot stream {bad[0]!r}: expected paths ending in " + ", ".join(STREAMABLE_SUFFIXES)
        )
    return paths


_PROCESSOR_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def _processors(raw: str) -> dict[str, str]:
    """``/v1/my/path=pkg.module:factory,...``: the request processor of each path, loaded
    when a worker starts (``processors.load``); only the form is checked here."""
    out = {}
    for path, spec in _pairs(raw):
        if not path.startswith("/") or any(c.isspace() for c in path):
            raise ValueError(f"expected a path like /v1/my/path, got {path!r}")
        if not _PROCESSOR_SPEC.fullmatch(spec):
            raise ValueError(f"expected {path}=package.module:factory, got {path}={spec}")
        out[path] = spec
    return out


def _escalations(raw: str) -> dict[str, Escalation]:
    """``gpt-4=gpt-4-fast:600,small=big`` (threshold seconds optional, default 900)."""
    out = {}
    for model, target in _pairs(raw):
        name, _, threshold = target.partition(":")
        out[model] = Escalation(name, int(threshold) if threshold else 900)
    return out


def parse_duration_s(raw: str) -> int:
    """``24h``/``90m``/``30s``/``2d`` -> seconds; used for completion windows."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", raw or "")
    if not m:
        raise ValueError(f"expected a duration like '24h', '30m' or '90s', got {raw!r}")
    seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if seconds < 1:  # a batch that expires as it is created would only ever fail
        raise ValueError(f"must be at least 1s, got {raw!r}")
    return seconds


def _env(parser: Callable[[str], Any], default: Any, doc: str) -> Any:
    """A settings field: its parser, default and one-line meaning (shown by ``--help``)."""
    factory = (lambda: dict(default)) if isinstance(default, dict) else None
    meta = {"parser": parser, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """Every knob of the engine. Build with :meth:`from_env`; override with :meth:`replace`."""

    database_url: str = _env(
        _database_url, DEFAULT_DATABASE_URL, "state of record (SQLAlchemy URL)"
    )
    broker_url: str = _env(_str, "", "Celery broker; empty = in-process (embedded mode)")
    upstream_url: str = _env(_http_url, "", "default upstream base URL for models without a route")
    upstream_api_key: str = _env(_str, "", "API key for the default upstream")
    allowed_upstreams: tuple[str, ...] = _env(
        _url_prefixes, (), "URL prefixes a batch's own upstream must start with (empty: any)"
    )
    batch_api_key: str = _env(_str, "", "API key the CLI sends to its --upstream (never printed)")
    completion_window: str = _env(_window, "24h", "default deadline of a batch (CLI), e.g. 24h")
    secret_key: str = _env(
        _fernet_key, "", "Fernet key: batch API keys are stored encrypted with it (empty: in clear)"
    )
    routes: dict[str, Route] = _env(_routes, {}, "per-model routes: JSON or @file")
    model_limits: dict[str, int] = _env(_model_limits, {}, "max in flight per model: gpt-4=8,b=3")
    default_model_limit: int = _env(_positive, 10, "limit for models not in model_limits")
    claim_interval_ms: int = _env(_positive, 1000, "beat cadence of the claimer")
    claim_batch_size: int = _env(_positive, 100, "most rows claimed per model per run")
    requests_per_message: int = _env(
        _positive, 64, "most requests in one execute message (and at most the consumers' -c)"
    )
    handoff_window_ms: int = _env(
        _int, 30000, "a message hands its freed slots to pending requests this long (0: never)"
    )
    max_retries: int = _env(_int, 1000, "attempts after the first")
    stop_before_deadline_ms: int = _env(_int, 0, "no retry due later than expiry minus this")
    backoff_ms: int = _env(_int, 1000, "first retry delay")
    backoff_factor: float = _env(_float, 2.0, "growth of the retry delay per attempt")
    max_backoff_ms: int = _env(_int, 10000, "cap of the retry delay")
    timeout_ms: int = _env(_positive, 600000, "timeout of one upstream attempt")
    retry_statuses: frozenset[int] = _env(
        _statuses, _statuses("5xx,429,408,404"), "HTTP statuses that are retried"
    )
    claim_timeout_ms: int = _env(_positive, 60000, "claimed longer than this -> back to pending")
    processing_timeout_ms: int = _env(_positive, 600000, "processing longer than this -> pending")
    unclaim_batch_size: int = _env(
        _positive, 10000, "most stale requests one reaper pass returns to pending"
    )
    heartbeat_interval_ms: int = _env(_positive, 5000, "worker heartbeat cadence")
    stale_worker_threshold_ms: int = _env(
        _positive, 30000, "heartbeat older than this = dead worker"
    )
    cancellation_poll_interval_ms: int = _env(
        _int,
        5000,
        "abort poll of in-flight attempts; finalize/expiry cadence (at most the claim interval)",
    )
    batch_metadata_fields: tuple[str, ...] = _env(
        _csv, ("id", "endpoint", "created_at", "completion_window"), "x-fusillade-batch-* headers"
    )
    purge_interval_ms: int = _env(_int, 600000, "purge cadence (0 disables)")
    purge_batch_size: int = _env(_positive, 1000, "rows deleted per purge chunk")
    purge_throttle_ms: int = _env(_int, 100, "pause between purge chunks")
    escalations: dict[str, Escalation] = _env(_escalations, {}, "model=escalation_model:seconds")
    max_line_bytes: int = _env(_positive, 1_048_576, "largest accepted input line")
    max_file_bytes: int = _env(_positive, 2_147_483_648, "largest accepted input file")
    db_pool_size: int = _env(_positive, 10, "SQLAlchemy pool size per process")
    metrics_port: int = _env(
        _port, 0, "each worker serves its Prometheus /metrics on this port (0: not served)"
    )
    status_log_interval_ms: int = _env(
        _int, 30000, "each worker logs in flight, completed and failed this often (0: never)"
    )
    processors: dict[str, str] = _env(
        _processors, {}, "request processors by path: /v1/my/path=pkg.module:factory,..."
    )
    stream_endpoints: frozenset[str] = _env(
        _stream_endpoints, frozenset(), "paths sent streamed (SSE) and reassembled, csv"
    )
    stream_first_event_timeout_ms: int = _env(
        _positive, 120000, "streamed call: longest wait for the first event"
    )
    stream_idle_timeout_ms: int = _env(
        _positive, 60000, "streamed call: longest wait between two events"
    )
    stream_total_timeout_ms: int = _env(
        _positive, 600000, "streamed call: longest time for the whole stream"
    )
    tools: ToolConfig = _env(
        parse_tools, ToolConfig(), "server-side tools of the /v1/responses loop: JSON or @file"
    )
    responses_max_iterations: int = _env(
        _positive, 10, "/v1/responses loop: most model calls per level (agent)"
    )
    responses_max_depth: int = _env(_positive, 8, "/v1/responses loop: most nested agent levels")
    responses_tool_concurrency: int = _env(
        _positive, 4, "/v1/responses loop: sibling tool calls run at once"
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every field from ``FUSILLADE_<NAME>``; unknown values raise :class:`ConfigError`."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = ENV_PREFIX + f.name.upper()
            raw = env.get(name)
            if not raw:
                continue
            try:
                values[f.name] = f.metadata["parser"](raw)
            except (ValueError, OSError) as exc:
                raise ConfigError(f"{name}: {exc}") from None
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def embedded(self) -> bool:
        """No broker configured: run broker, worker and claimer in this process."""
        return not self.broker_url or self.broker_url.startswith("memory://")

    def limit_for(self, model: str) -> int:
        return self.model_limits.get(model, self.default_model_limit)

    def route_for(self, model: str) -> Route | None:
        """The model's route, else the default upstream, else None (unknown model)."""
        if model in self.routes:
            return self.routes[model]
        if self.upstream_url:
            return Route(self.upstream_url.rstrip("/"), self.upstream_api_key)
        return None

    def __repr__(self) -> str:
        shown = {
            f.name: shown_value(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
        }
        return f"Settings({shown})"


#: Settings whose value is a secret: shown as ``***`` wherever settings are printed.
SECRET_FIELDS = frozenset({"upstream_api_key", "batch_api_key", "secret_key"})
#: Settings holding URLs, which may carry ``user:password@``.
URL_FIELDS = frozenset({"database_url", "broker_url", "upstream_url"})
#: ``FUSILLADE_*`` names read outside :class:`Settings` (by Celery's config loader and the
#: test suite), so they are not reported as unknown.
OTHER_ENV_NAMES = frozenset(
    {"FUSILLADE_CELERY_CONFIG", "FUSILLADE_TEST_PG", "FUSILLADE_TEST_REDIS"}
)


def shown_value(name: str, value: Any) -> str:
    """A setting's value as printed: secrets masked, URLs without passwords, sets compact."""
    if name in SECRET_FIELDS:
        return "***" if value else ""
    if name in URL_FIELDS:
        return redact_url(str(value))
    if name == "allowed_upstreams":
        return ",".join(redact_url(p) for p in value)
    if name == "retry_statuses":
        return _compact_statuses(value)
    if name == "routes":
        return ",".join(
            f"{m}={redact_url(r.url)}" + ("" if r.stream is None else f" stream={r.stream}")
            for m, r in sorted(value.items())
        )
    if name == "tools":
        return str(value.describe())
    if name == "escalations":
        return ",".join(f"{m}={e.model}:{e.threshold_s}" for m, e in sorted(value.items()))
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, frozenset):
        return ",".join(sorted(value))
    return str(value)


def _compact_statuses(codes: frozenset[int]) -> str:
    parts = []
    for base in range(100, 600, 100):
        block = set(range(base, base + 100))
        if block <= codes:
            parts.append(f"{base // 100}xx")
            codes = codes - block
    return ",".join(parts + [str(c) for c in sorted(codes, reverse=True)])


@functools.lru_cache(maxsize=256)
def upstream_allowed(url: str, prefixes: tuple[str, ...]) -> bool:
    """Whether a batch's own upstream is within ``FUSILLADE_ALLOWED_UPSTREAMS`` (empty:
    anything goes), asked at submit and by the worker (cached: per attempt there). A prefix
    matches at a boundary only: ``https://api.example.com`` allows
    ``https://api.example.com/v1`` but not ``https://api.example.com.evil.net``."""
    if not prefixes:
        return True
    url = url.rstrip("/")
    return any(
        url == p or (url.startswith(p) and (p.endswith("/") or url[len(p)] in "/?#"))
        for p in prefixes
    )


def redact_url(url: str) -> str:
    """Hide the password of ``scheme://user:pass@host`` URLs before they are printed."""
    return re.sub(r"(//[^:/@]*:)[^@/]+@", r"\1***@", url)


def env_help() -> list[tuple[str, str, str]]:
    """(env var, default, meaning) for every setting."""
    return [(name, value, doc) for name, value, _, doc in env_table(Settings(), {})]


def env_table(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> list[tuple[str, str, str, str]]:
    """(env var, value in effect, "env" or "default", meaning) for every setting: what
    ``fusillade-celery settings`` prints, so an operator sees what a process will run with."""
    env = os.environ if environ is None else environ
    rows = []
    for f in dataclasses.fields(Settings):
        name = ENV_PREFIX + f.name.upper()
        source = "env" if env.get(name) else "default"
        rows.append(
            (name, shown_value(f.name, getattr(settings, f.name)), source, f.metadata["doc"])
        )
    return rows


def unknown_env_names(environ: Mapping[str, str] | None = None) -> list[str]:
    """``FUSILLADE_*`` variables that no setting reads, each with a suggestion when one is
    close: a typo (``FUSILLADE_MODEL_LIMIT``) would otherwise silently leave the default."""
    import difflib

    env = os.environ if environ is None else environ
    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)} | OTHER_ENV_NAMES
    suffixes = {n[len(ENV_PREFIX) :]: n for n in known}
    out = []
    for name in sorted(n for n in env if n.startswith(ENV_PREFIX) and n not in known):
        close = difflib.get_close_matches(name[len(ENV_PREFIX) :], list(suffixes), n=1, cutoff=0.8)
        out.append(f"{name} (did you mean {suffixes[close[0]]}?)" if close else name)
    return out
