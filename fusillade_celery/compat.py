"""A narrow workaround for a kombu Redis-transport race (kombu 5.7).

When Redis goes away, the worker closes the transport (its ``client`` becomes None) and then,
while restoring unacknowledged messages, asks the same channel for a new Redis pool. kombu reads
``self.connection.client.hostname`` and raises ``AttributeError``, which Celery treats as an
unrecoverable error: the consumer stops for good and the worker no longer takes work. Raising a
Redis ``ConnectionError`` instead makes it the recoverable connection loss it really is, so the
consumer reconnects when Redis is back (unacked messages are lost with a restarted Redis anyway;
their rows are reaped and claimed again).
"""

from __future__ import annotations

import functools
from typing import Any


def patch_kombu_redis_reconnect() -> None:
    try:
        from kombu.transport import redis as kombu_redis
        from redis.exceptions import ConnectionError as RedisConnectionError
    except ImportError:  # pragma: no cover - both are dependencies
        return
    channel = kombu_redis.Channel
    original = channel._connparams
    if getattr(original, "_fusillade_patched", False):
        return

    @functools.wraps(original)
    def _connparams(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.connection is None or self.connection.client is None:
            raise RedisConnectionError("broker transport closed; reconnecting")
        return original(self, *args, **kwargs)

    _connparams._fusillade_patched = True  # type: ignore[attr-defined]
    channel._connparams = _connparams  # type: ignore[method-assign]
