"""One typed settings object, every field read from an env var ``FUSILLADE_<NAME>``.

Why one object: the claimer, the workers, beat and the CLI must agree on limits, timeouts and
retry policy. Reading the environment in one place, with one parser per field and an error that
names the variable, keeps a typo from silently becoming a default in one process only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "FUSILLADE_"
DEFAULT_DATABASE_URL = "sqlite:///fusillade.sqlite3"
MEMORY_BROKER = "memory://localhost/"


class ConfigError(ValueError):
    """A setting could not be parsed; the message names the env var."""


@dataclass(frozen=True)
class Route:
    """Where requests for one model go: an OpenAI-compatible base URL and its key."""

    url: str
    api_key: str = ""

    def __repr__(self) -> str:  # keys never reach a log line through repr
        return f"Route(url={self.url!r}, api_key={'***' if self.api_key else ''!r})"


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
    limits = {name: int(value) for name, value in _pairs(raw)}
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


def _routes(raw: str) -> dict[str, Route]:
    """JSON ``{"model": {"url": ..., "api_key" | "api_key_env": ...}}``, or ``@path`` to one."""
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
        routes[model] = Route(url=spec["url"].rstrip("/"), api_key=key)
    return routes


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
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


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

    database_url: str = _env(_str, DEFAULT_DATABASE_URL, "state of record (SQLAlchemy URL)")
    broker_url: str = _env(_str, "", "Celery broker; empty = in-process (embedded mode)")
    upstream_url: str = _env(_str, "", "default upstream base URL for models without a route")
    upstream_api_key: str = _env(_str, "", "API key for the default upstream")
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
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("upstream_api_key", "retry_statuses")
        }
        shown["upstream_api_key"] = "***" if self.upstream_api_key else ""
        shown["database_url"] = redact_url(self.database_url)
        shown["broker_url"] = redact_url(self.broker_url)
        return f"Settings({shown})"


def redact_url(url: str) -> str:
    """Hide the password of ``scheme://user:pass@host`` URLs before they are printed."""
    return re.sub(r"(//[^:/@]*:)[^@/]+@", r"\1***@", url)


def env_help() -> list[tuple[str, str, str]]:
    """(env var, default, meaning) for every setting; the CLI prints this table."""
    rows = []
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        default = getattr(defaults, f.name)
        if f.name == "retry_statuses":
            default = "5xx,429,408,404"
        elif isinstance(default, tuple):
            default = ",".join(default)
        elif isinstance(default, dict):
            default = ""
        rows.append((ENV_PREFIX + f.name.upper(), str(default), f.metadata["doc"]))
    return rows
