"""API keys: stored as a hash, looked up by it on every HTTP request."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, insert, select, update

from .. import schema as t
from .base import NotFound, StoreBase, _on_disconnect_retry


class KeyStore(StoreBase):
    """The ``api_keys`` rows (``fusillade-celery keys``, the API's authentication)."""

    def add_key(self, row: dict[str, Any]) -> None:
        with self._tx() as conn:
            conn.execute(insert(t.api_keys), [row])

    @_on_disconnect_retry
    def key_owner(self, key_hash: str) -> str | None:
        """The name a live (not revoked) key acts for, or None."""
        k = t.api_keys
        with self._one() as conn:
            name = conn.execute(
                select(k.c.name).where(k.c.key_hash == key_hash, k.c.revoked_at.is_(None))
            ).scalar()
        return None if name is None else str(name)

    def list_keys(self) -> list[dict[str, Any]]:
        k = t.api_keys
        with self._tx() as conn:
            rows = conn.execute(
                select(k.c.id, k.c.name, k.c.prefix, k.c.created_at, k.c.revoked_at).order_by(
                    k.c.created_at, k.c.id
                )
            ).mappings()
            return [dict(m) for m in rows]

    def live_key_count(self) -> int:
        k = t.api_keys
        with self._tx() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(k).where(k.c.revoked_at.is_(None))
                ).scalar_one()
            )

    def revoke_key(self, key_id: str, now: float) -> bool:
        """Revoke a key; False when it was revoked already. NotFound for an unknown id."""
        k = t.api_keys
        with self._tx() as conn:
            found = conn.execute(select(k.c.revoked_at).where(k.c.id == key_id)).first()
            if found is None:
                raise NotFound(f"no key {key_id!r}")
            res = conn.execute(
                update(k).where(k.c.id == key_id, k.c.revoked_at.is_(None)).values(revoked_at=now)
            )
            return res.rowcount > 0
