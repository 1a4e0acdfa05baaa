"""API keys on HTTP requests: ``Authorization: Bearer <key>`` for ``/v1``, or the key the
page's login form put in an HttpOnly cookie for the page. Only a hash of a key is stored
(``keys.key_hash``) and neither the key nor its hash is logged.

A key acts for its name: the files and batches whose owner is that name. With
``serve --no-auth`` (loopback only) there is no key and every caller sees everything."""

from __future__ import annotations

import threading
import time

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..keys import key_hash
from ..store import Store
from .errors import ApiError

#: The page's cookie (HttpOnly, SameSite=Strict): set by POST /login, never by a URL.
COOKIE = "fusillade_key"
#: Longest key accepted: anything longer is not one of ours (and is not hashed).
MAX_KEY_CHARS = 256


#: A key found live is trusted this long without asking the database again (a revoked key
#: stops working within it). Unknown keys are asked about every time.
CACHE_S = 1.0
CACHE_ENTRIES = 4096


class Auth:
    """Who a request acts for: an owner name, or None when authentication is off."""

    def __init__(self, store: Store, enabled: bool):
        self.store = store
        self.enabled = enabled
        self._lock = threading.Lock()
        self._live: dict[str, tuple[float, str]] = {}  # key hash -> (checked at, owner)

    def owner_of_key(self, key: str | None) -> str | None:
        """The owner a live key acts for, or None (unknown, revoked, malformed)."""
        if not key or len(key) > MAX_KEY_CHARS:
            return None
        digest = key_hash(key)
        now = time.monotonic()
        with self._lock:
            hit = self._live.get(digest)
        if hit is not None and now - hit[0] < CACHE_S:
            return hit[1]
        owner = self.store.key_owner(digest)
        with self._lock:
            if owner is None:
                self._live.pop(digest, None)
            else:
                if len(self._live) >= CACHE_ENTRIES:
                    self._live.pop(next(iter(self._live)))
                self._live[digest] = (now, owner)
        return owner

    def cached_bearer(self, request: Request) -> str | None:
        """The owner of the request's key when it was found live within CACHE_S, else None
        (the caller then asks ``bearer``)."""
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key or len(key) > MAX_KEY_CHARS:
            return None
        with self._lock:
            hit = self._live.get(key_hash(key))
        return hit[1] if hit is not None and time.monotonic() - hit[0] < CACHE_S else None

    def bearer(self, request: Request) -> str | None:
        """The owner of the request's bearer key; 401 when it has none or a bad one."""
        if not self.enabled:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                401,
                "no API key: send it as 'Authorization: Bearer <key>' "
                "(keys are made with `fusillade-celery keys create`)",
                code="missing_api_key",
            )
        owner = self.owner_of_key(key.strip())
        if owner is None:
            raise ApiError(401, "incorrect or revoked API key", code="invalid_api_key")
        return owner

    def cookie(self, request: Request) -> tuple[bool, str | None]:
        """(signed in, owner) for the page: authentication off counts as signed in."""
        if not self.enabled:
            return True, None
        owner = self.owner_of_key(request.cookies.get(COOKIE))
        return owner is not None, owner


async def api_owner(request: Request) -> str | None:
    """FastAPI dependency of every ``/v1`` route: the caller's owner name. Async: a key seen
    within CACHE_S costs no thread hop (a sync dependency runs in the thread pool, apart
    from its route: a poll paid two hops); a key not in the cache is looked up in a thread."""
    auth: Auth = request.app.state.api.auth
    if not auth.enabled:
        return None
    cached = auth.cached_bearer(request)
    if cached is not None:
        return cached
    return await run_in_threadpool(auth.bearer, request)
