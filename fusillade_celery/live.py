"""Limits and escalations as they are now: the environment's values overridden by the
``model_limits`` / ``model_escalations`` rows an operator sets while the engine runs.

Every claimer and every hand-off asks here instead of reading ``Settings`` directly. The rows
are read at most once per ``CACHE_FRACTION`` of a claim interval per process and database, so
a change reaches every process within one claim interval and the hot path pays a clock read
and a dict lookup, not a query. If the read fails (the database away), the last values read
are kept: the claim that follows would fail anyway, and a hand-off must not stop for it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy import Engine

from .settings import Escalation, Settings
from .store import Store, StoredConfig

log = logging.getLogger(__name__)

#: The cache lives this share of a claim interval (at most ``CACHE_MAX_S``): a change made
#: just after a read is in use before the next tick of beat's claimer.
CACHE_FRACTION = 0.5
CACHE_MAX_S = 1.0

SOURCE_SET = "set"  # a row in the database (``limits set``)
SOURCE_ENV = "env"  # FUSILLADE_MODEL_LIMITS / FUSILLADE_ESCALATIONS
SOURCE_DEFAULT = "default"  # FUSILLADE_DEFAULT_MODEL_LIMIT


@dataclass(frozen=True)
class LiveConfig:
    """One consistent view of the limits and escalations."""

    settings: Settings
    stored: StoredConfig = field(default_factory=lambda: StoredConfig({}, {}))

    def limit_for(self, model: str) -> int:
        stored = self.stored.limits.get(model)
        return stored if stored is not None else self.settings.limit_for(model)

    def limit_source(self, model: str) -> str:
        if model in self.stored.limits:
            return SOURCE_SET
        return SOURCE_ENV if model in self.settings.model_limits else SOURCE_DEFAULT

    @property
    def escalations(self) -> Mapping[str, Escalation]:
        merged: dict[str, Escalation | None] = {
            **self.settings.escalations,
            **self.stored.escalations,
        }
        return {m: e for m, e in merged.items() if e is not None}

    def escalation_source(self, model: str) -> str:
        return SOURCE_SET if model in self.stored.escalations else SOURCE_ENV

    def escalating(self, model: str) -> bool:
        """Whether ``model`` has an escalation or is one (the claimer decides its rows)."""
        esc = self.escalations
        return model in esc or any(e.model == model for e in esc.values())


class _Cache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: engine -> (monotonic expiry, the rows read)
        self._entries: dict[Engine, tuple[float, StoredConfig]] = {}

    def get(self, store: Store, settings: Settings) -> LiveConfig:
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(store.engine)
        if hit is not None and hit[0] > now:
            return LiveConfig(settings, hit[1])
        ttl = min(CACHE_MAX_S, settings.claim_interval_ms / 1000.0 * CACHE_FRACTION)
        try:
            stored = store.stored_config()
        except Exception as exc:  # noqa: BLE001 - keep the last values; see the module doc
            if hit is None:
                log.warning("could not read live limits (%s); using the environment's", exc)
                stored = StoredConfig({}, {})
            else:
                stored = hit[1]
        with self._lock:
            self._entries[store.engine] = (now + ttl, stored)
        return LiveConfig(settings, stored)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_CACHE = _Cache()


def current(store: Store, settings: Settings) -> LiveConfig:
    """The limits and escalations in force (cached; see the module doc)."""
    return _CACHE.get(store, settings)


def forget() -> None:
    """Drop the cache: the next ``current`` reads the rows (after a ``set`` in this process)."""
    _CACHE.clear()
