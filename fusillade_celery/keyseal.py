"""Batch API keys at rest: sealed with ``FUSILLADE_SECRET_KEY`` (Fernet) when it is set.

A batch submitted with its own upstream key keeps that key in its row, because workers on
other machines need it; it never enters a message, a log line or an error record, and it is
erased when the batch ends (``Store.finalize_batches``, ``Store.expire_batches``). With a
secret key configured, the stored value is a Fernet token (AES-128-CBC + HMAC-SHA256), so a
database dump or backup taken meanwhile does not hold the key in clear; every process that
submits or executes needs the same secret key.
"""

from __future__ import annotations

import functools

#: Marks a sealed value; a stored key without it is in clear (no secret key configured).
PREFIX = "fernet:"


class SealError(ValueError):
    """A sealed key cannot be opened here (no or another secret key)."""


def seal(api_key: str | None, secret_key: str) -> str | None:
    """The form in which ``api_key`` is stored: sealed with ``secret_key``, or as is."""
    if not api_key or not secret_key:
        return api_key
    return PREFIX + _fernet(secret_key).encrypt(api_key.encode()).decode()


@functools.lru_cache(maxsize=256)
def unseal(stored: str | None, secret_key: str) -> str | None:
    """The key a stored value stands for. Cached: every attempt of a batch reads the same
    stored value, and decrypting it each time would cost the hot path ~20 us an attempt."""
    if not stored or not stored.startswith(PREFIX):
        return stored
    if not secret_key:
        raise SealError(
            "the batch's API key is stored encrypted and FUSILLADE_SECRET_KEY is not set here"
        )
    from cryptography.fernet import InvalidToken

    try:
        return _fernet(secret_key).decrypt(stored[len(PREFIX) :].encode()).decode()
    except InvalidToken:
        raise SealError(
            "the batch's API key was encrypted with another FUSILLADE_SECRET_KEY"
        ) from None


@functools.lru_cache(maxsize=4)
def _fernet(secret_key: str):  # type: ignore[no-untyped-def]
    from cryptography.fernet import Fernet

    return Fernet(secret_key.encode())
