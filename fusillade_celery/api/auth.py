"""API keys on HTTP requests: ``Authorization: Bearer <key>`` for ``/v1``, or the key the
page's login form put in an HttpOnly cookie for the page. Only a hash of a key is stored
(``keys.key_hash``) and neither the key nor its hash is logged.

A key acts for its name: the files and batches whose owner is that name. With
``serve --no-auth`` (loopback only) there is no key and every caller sees everything."""

from __future__ import annotations

from fastapi import Request

from ..keys import key_hash
from ..store import Store
from .errors import ApiError

#: The page's cookie (HttpOnly, SameSite=Strict): set by POST /login, never by a URL.
COOKIE = "fusillade_key"
#: Longest key accepted: anything longer is not one of ours (and is not hashed).
MAX_KEY_CHARS = 256


class Auth:
    """Who a request acts for: an owner name, or None when authentication is off."""

    def __init__(self, store: Store, enabled: bool):
        self.store = store
        self.enabled = enabled

    def owner_of_key(self, key: str | None) -> str | None:
        """The owner a live key acts for, or None (unknown, revoked, malformed)."""
        if not key or len(key) > MAX_KEY_CHARS:
            return None
        return self.store.key_owner(key_hash(key))

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


def api_owner(request: Request) -> str | None:
    """FastAPI dependency of every ``/v1`` route: the caller's owner name."""
    auth: Auth = request.app.state.api.auth
    return auth.bearer(request)
