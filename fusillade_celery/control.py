"""Cancel within a second: ``cancel_batch`` tells every worker at once (invariant 6).

The database is the record of a cancel (``Store.cancel_batch``), and every worker's cancel
poll finds it within ``cancellation_poll_interval_ms`` (5 s by default). On top of that, the
client broadcasts the cancelled batch ids over Celery's remote control (the broker's fanout
exchange, which Flower and ``celery control`` use too), and each worker process aborts its
in-flight calls of those batches as the broadcast arrives: their upstream connections close
within tens of milliseconds instead of seconds. A lost broadcast (broker away, a worker
reconnecting) costs only speed: the poll stays the fallback. The broadcast carries batch ids
only, never a key or a body (invariant 8).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from celery.worker.control import control_command

log = logging.getLogger(__name__)

COMMAND = "fusillade_cancel"


@control_command(name=COMMAND, variadic="batch_ids", signature="<batch_id> [batch_id ...]")
def fusillade_cancel(state: Any, batch_ids: Sequence[str] | str = (), **_: Any) -> dict[str, str]:
    """Worker side: abort this process's in-flight attempts of the given batches."""
    from .cancel_watch import cancel_now

    ids = [batch_ids] if isinstance(batch_ids, str) else list(batch_ids)
    aborted = cancel_now(ids)
    if aborted:
        log.info("cancel broadcast: aborting %d in-flight requests of %s", aborted, ids)
    return {"ok": f"aborting {aborted} in-flight requests"}


def announce_cancel(app: Any, batch_ids: Sequence[str]) -> None:
    """Client side: broadcast the cancel to every worker, without waiting for replies. A
    failure is logged and left to the workers' cancel poll."""
    try:
        app.control.broadcast(COMMAND, arguments={"batch_ids": list(batch_ids)}, reply=False)
    except Exception as exc:  # noqa: BLE001 - the poll finds the cancel in the database
        log.warning("could not broadcast the cancel (%s); workers' poll will find it", exc)
