"""Narrow workarounds in libraries we depend on, each applied once and explained here.

1. A kombu Redis-transport race (kombu 5.7).

When Redis goes away, the worker closes the transport (its ``client`` becomes None) and then,
while restoring unacknowledged messages, asks the same channel for a new Redis pool. kombu reads
``self.connection.client.hostname`` and raises ``AttributeError``, which Celery treats as an
unrecoverable error: the consumer stops for good and the worker no longer takes work. Raising a
Redis ``ConnectionError`` instead makes it the recoverable connection loss it really is, so the
consumer reconnects when Redis is back (unacked messages are lost with a restarted Redis anyway;
their rows are reaped and claimed again).

2. urllib3's keep-alive check under gevent. Before reusing a pooled connection urllib3 asks
whether the peer closed it, with a zero-timeout ``select.poll``. Under gevent that is gevent's
poll emulation (watchers, a result object, a hub round), which cost 10-12 % of an upstream
call's CPU; a zero-timeout check never blocks, so the operating system's own poll answers it
without holding up other greenlets. Waits with a timeout still go to gevent.

3. psycopg's wait under gevent. psycopg sees the patched ``select`` and waits with gevent's
poll emulation, which was 5 % of a worker's CPU; ``psycopg_gevent_wait`` follows psycopg's own
``wait_poll`` loop but asks the OS poll (zero timeout, never blocking) whether the socket is
ready, and only when it is not, parks the greenlet on a gevent watcher for the socket.

4. gevent's name resolution of numeric addresses. gevent resolves every name on its thread
pool, even an address that needs no lookup (``127.0.0.1``, ``10.0.0.5``): a hand-over to a
native thread and back for each new upstream connection, about 0.1 ms of CPU, which made a
third of the cost of opening the first 1,000 connections. A numeric host and port are
resolved inline (``AI_NUMERICHOST | AI_NUMERICSERV``, which never looks anything up, so it
cannot block); every other name goes to the resolver as before.

5. Blocking sleeps in kombu and Celery under gevent. ``gevent.monkey.patch_all`` imports Celery's
lazy proxies while it patches the existing locks, and with them ``kombu.utils.functional``,
before ``time`` is patched: that module's ``from time import sleep`` keeps the real, blocking
sleep, and ``retry_over_time`` (the consumer's reconnect loop) uses it. While the broker was
away, every reconnect wait froze the whole worker process: no heartbeat for 14-22 s, so the
reaper took its running requests as a dead worker's and sent them again. Modules that hold the
original sleep get gevent's.
"""

from __future__ import annotations

import _socket
import functools
import os
from typing import Any


def patch_kombu_redis_reconnect() -> None:
    try:
        from kombu.transport import redis as kombu_redis
        from redis.exceptions import ConnectionError as RedisConnectionError
    except ImportError:  # pragma: no cover - both are dependencies
        return
    channel = kombu_redis.Channel
    if _installed(channel, "_connparams"):
        return
    original = channel._connparams

    @functools.wraps(original)
    def _connparams(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.connection is None or self.connection.client is None:
            raise RedisConnectionError("broker transport closed; reconnecting")
        return original(self, *args, **kwargs)

    _install(channel, "_connparams", _connparams)


def _install(owner: Any, name: str, replacement: Any) -> None:
    """Put ``replacement`` in place of ``owner.name``, marked so that applying it again is a
    no-op (``_installed``)."""
    replacement._fusillade_patched = True
    setattr(owner, name, replacement)


def _installed(owner: Any, name: str) -> bool:
    return bool(getattr(getattr(owner, name), "_fusillade_patched", False))


@functools.cache
def _os_poll() -> Any:
    """``select.poll`` as it was before gevent patched it."""
    from gevent import monkey

    return monkey.get_original("select", "poll")


def _ready_now(fd: Any, mask: int) -> int:
    """The poll events of ``fd`` (a socket or a file descriptor) among ``mask`` right now,
    0 when none, from the operating system's poll: with a zero timeout it never blocks, so it
    is safe to call under gevent without gevent's emulation of it (see 2. and 3.)."""
    poll = _os_poll()()
    poll.register(fd, mask)
    events = poll.poll(0)
    return int(events[0][1]) if events else 0


def patch_urllib3_zero_timeout_wait() -> None:
    """Under gevent: answer urllib3's zero-timeout socket checks with the OS poll (see 2.)."""
    import select

    import urllib3.util.wait as wait

    if _installed(wait, "wait_for_socket"):
        return
    waiting = wait.poll_wait_for_socket  # calls gevent's poll once select is patched

    def wait_for_socket(
        sock: Any, read: bool = False, write: bool = False, timeout: float | None = None
    ) -> bool:
        if timeout != 0:
            return bool(waiting(sock, read, write, timeout))
        return bool(
            _ready_now(sock, (select.POLLIN if read else 0) | (select.POLLOUT if write else 0))
        )

    _install(wait, "wait_for_socket", wait_for_socket)


def patch_gevent_waits() -> None:
    """Apply 2. to 5.: call once gevent has patched the process (a ``-P gevent`` worker)."""
    patch_urllib3_zero_timeout_wait()
    patch_psycopg_gevent_wait()
    resolve_numeric_addresses_inline()
    cooperative_library_sleeps()


#: Modules that import ``sleep`` from ``time`` at their top, and may be imported before gevent
#: patches ``time`` (see 5.).
_SLEEPERS = (
    "kombu.utils.functional",
    "kombu.mixins",
    "kombu.asynchronous.hub",
    "kombu.transport.redis",
    "kombu.transport.virtual.base",
    "celery.worker.worker",
    "celery.worker.consumer.consumer",
)


def cooperative_library_sleeps() -> list[str]:
    """Give the modules of ``_SLEEPERS`` that hold the blocking sleep gevent's (see 5.);
    returns their names."""
    import sys

    import gevent
    from gevent import monkey

    blocking = monkey.get_original("time", "sleep")
    fixed = []
    for name in _SLEEPERS:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "sleep", None) is blocking:
            module.sleep = gevent.sleep  # type: ignore[attr-defined]
            fixed.append(name)
    return fixed


#: getaddrinfo flags that make it parse, never look up (see 4.).
_NUMERIC_ONLY = _socket.AI_NUMERICHOST | _socket.AI_NUMERICSERV


class _NumericFirst:
    """gevent's resolver, with numeric addresses answered inline (see 4.)."""

    def __init__(self, resolver: Any):
        self._resolver = resolver

    def __getattr__(self, name: str) -> Any:
        return getattr(self._resolver, name)

    def getaddrinfo(
        self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> Any:
        try:
            return _socket.getaddrinfo(host, port, family, type, proto, flags | _NUMERIC_ONLY)
        except _socket.gaierror:  # a name to look up (or no such address): as before
            return self._resolver.getaddrinfo(host, port, family, type, proto, flags)


def resolve_numeric_addresses_inline() -> None:
    """Under gevent: numeric addresses skip the resolver's thread pool (see 4.). Only over
    gevent's default thread resolver; one an operator chose (``GEVENT_RESOLVER``) is kept."""
    import gevent
    from gevent.resolver.thread import Resolver

    hub = gevent.get_hub()
    if type(hub.resolver) is Resolver:
        _install(hub, "resolver", _NumericFirst(hub.resolver))


#: Longest psycopg_gevent_wait serves a connection whose socket keeps being ready (a large
#: result) before it lets the other greenlets run.
MAX_BUSY_S = 0.005


class _Idle(Exception):
    """The wait interval passed with the socket not ready (psycopg is told: nothing ready)."""


def patch_psycopg_gevent_wait() -> None:
    """Under gevent: psycopg waits on gevent watchers, readiness from the OS poll (see 3.)."""
    import select
    from time import monotonic

    import gevent
    from gevent.socket import wait as wait_on
    from psycopg import errors, waiting

    if _installed(waiting, "wait"):
        return
    masks = {
        waiting.WAIT_R: select.POLLIN,
        waiting.WAIT_W: select.POLLOUT,
        waiting.WAIT_RW: select.POLLIN | select.POLLOUT,
    }
    libev = {waiting.WAIT_R: 1, waiting.WAIT_W: 2, waiting.WAIT_RW: 3}  # READ, WRITE
    bad = ~(select.POLLIN | select.POLLOUT)

    def psycopg_gevent_wait(
        gen: Any, fileno: int, interval: float = 0.0, timeout: float | None = None
    ) -> Any:
        if interval is None:
            raise ValueError("indefinite wait not supported anymore")
        interval = max(interval, 0.0)
        deadline = monotonic() + timeout if timeout is not None else None
        hub = gevent.get_hub()
        busy_since = monotonic()
        try:
            s = next(gen)
            while True:
                ev = _ready_now(fileno, masks[s])
                if not ev:
                    wait_s = interval
                    if deadline is not None:
                        wait_s = max(0.0, min(interval, deadline - monotonic()))
                    watcher = hub.loop.io(fileno, libev[s])
                    try:
                        wait_on(watcher, timeout=wait_s, timeout_exc=_Idle())
                        ev = _ready_now(fileno, masks[s])
                    except _Idle:
                        pass
                    finally:
                        watcher.close()
                    busy_since = monotonic()
                elif monotonic() - busy_since > MAX_BUSY_S:
                    gevent.sleep(0)
                    busy_since = monotonic()
                if not ev:
                    gen.send(waiting.READY_NONE)
                else:
                    ready = 0
                    if ev & select.POLLIN:
                        ready = waiting.READY_R
                    if ev & select.POLLOUT:
                        ready |= waiting.READY_W
                    if not ready and ev & bad:
                        try:
                            os.fstat(fileno)
                        except OSError as exc:
                            raise errors.OperationalError("connection socket closed") from exc
                        raise errors.OperationalError("connection socket closed")
                    s = gen.send(ready)
                if deadline is not None and monotonic() >= deadline:
                    raise errors._WaitTimeout("wait timeout expired")
        except StopIteration as stop:
            return stop.value

    _install(waiting, "wait", psycopg_gevent_wait)
