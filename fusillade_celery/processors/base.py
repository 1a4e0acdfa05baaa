"""The request-processor seam: what runs one started request and returns its ``Outcome``.

The execute path (claim, fencing, retries, hand-off, write-back) does not know what a request
does upstream; it asks the processor registered for the request's path, or the default (one
call, ``default.py``). A processor is the whole attempt: one slot, one processing timeout, one
fenced write-back and one abort, however many calls it makes (the multi-step ``/v1/responses``
loop is one). Applications register their own by path: ``FUSILLADE_PROCESSORS`` (loaded when a
worker starts, ``load``) or ``register_processor``.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ..cancel_watch import Aborted, CancelWatch
from ..settings import ConfigError, Settings
from ..states import ErrorKind
from ..store import WorkItem
from ..upstream import Outcome

if TYPE_CHECKING:
    import requests

ENV_NAME = "FUSILLADE_PROCESSORS"
log = logging.getLogger(__name__)


class Cancellation(Protocol):
    """The cancellation handle a processor is given. Under gevent a cancel kills the
    attempt's greenlet wherever it waits (its connections close); elsewhere, and between the
    steps of a longer processor, ``check()`` is how it learns of the cancel."""

    @property
    def cancelled(self) -> bool:
        """Whether the request's batch has been cancelled (or expired) meanwhile."""
        ...

    def check(self) -> None:
        """Raise ``Aborted`` once cancelled: the attempt ends, nothing is written (the row is
        ``canceled`` already)."""
        ...


class RequestProcessor(Protocol):
    """Runs one started request and returns the ``Outcome`` for the write-back:
    ``Outcome(None, 200, body)`` on success, else an ``ErrorKind`` whose ``retriable`` decides
    between a retry and a failure (one that raises instead is retried as
    ``task_terminated``). ``session`` is the worker's pooled HTTP session
    (``upstream.get_session``); ``upstream.attempt`` makes the default single call."""

    def process(
        self,
        item: WorkItem,
        session: requests.Session,
        settings: Settings,
        cancel: Cancellation,
    ) -> Outcome: ...


class BatchCancellation:
    """``Cancellation`` read from this process's cancel watch: the batches its last poll found
    cancelled and those a cancel broadcast named (two set lookups, no query)."""

    __slots__ = ("_watch", "batch_id")

    def __init__(self, watch: CancelWatch, batch_id: str):
        self._watch = watch
        self.batch_id = batch_id

    @property
    def cancelled(self) -> bool:
        watch = self._watch
        return self.batch_id in watch.cancelled or self.batch_id in watch.broadcast

    def check(self) -> None:
        if self.cancelled:
            raise Aborted(self.batch_id)


class NeverCancelled:
    """For a call made outside a worker's execute path (tests, scripts)."""

    cancelled = False

    def check(self) -> None:
        return None


NEVER = NeverCancelled()

#: Processors registered through the Python API (``register_processor``), by path.
_registered: dict[str, RequestProcessor] = {}
#: Processors loaded from a settings' ``processors`` (``load``), by that mapping's items.
_loaded: dict[tuple[tuple[str, str], ...], dict[str, RequestProcessor]] = {}
#: The table ``table`` returns for those items: both of the above, the setting winning.
_tables: dict[tuple[tuple[str, str], ...], Mapping[str, RequestProcessor]] = {}
_lock = threading.Lock()


def register_processor(path: str, processor: RequestProcessor) -> None:
    """Requests to ``path`` (a batch's ``url``, e.g. ``/v1/my/path``) run ``processor`` in
    this process. Call it before the worker starts (a module its ``-A`` app or ``--include``
    imports) or before an embedded run; a path also in ``FUSILLADE_PROCESSORS`` runs the
    setting's processor. Submitting to a path no built-in endpoint has needs it registered in
    the submitting process too (or named in its ``FUSILLADE_PROCESSORS``)."""
    if not path.startswith("/"):
        raise ValueError(f"a processor's path starts with '/', got {path!r}")
    if not callable(getattr(processor, "process", None)):
        raise TypeError(f"{processor!r} has no process(item, session, settings, cancel)")
    with _lock:
        _registered[path] = processor
        _tables.clear()


def unregister_processor(path: str) -> None:
    """Forget a processor registered with ``register_processor`` (tests)."""
    with _lock:
        _registered.pop(path, None)
        _tables.clear()


def processor_paths(settings: Settings) -> frozenset[str]:
    """The paths with a processor of their own in this process (registered or set): they are
    accepted at submit beside the built-in endpoints. Nothing is imported."""
    return frozenset(_registered) | frozenset(settings.processors)


def load(settings: Settings) -> Mapping[str, RequestProcessor]:
    """Import and build the processors ``FUSILLADE_PROCESSORS`` names (once per process and
    value; a worker does it at start-up). Each ``pkg.module:factory`` is called with the
    settings and must return an object with ``process``. Any problem is a ``ConfigError``
    naming the variable and the path, one line."""
    return table(settings)


def table(settings: Settings) -> Mapping[str, RequestProcessor]:
    """The processors by path for these settings (cached: the execute path asks once per
    message)."""
    key = tuple(sorted(settings.processors.items()))
    found = _tables.get(key)
    if found is not None:
        return found
    with _lock:
        loaded = _loaded.get(key)
        if loaded is None:
            loaded = _loaded[key] = {path: _build(path, spec, settings) for path, spec in key}
        from .responses_loop import PATH, RESPONSES_LOOP

        # Built in: the /v1/responses loop (a single call for models without server-side
        # tools); an application's own processor for the path wins.
        merged = {PATH: RESPONSES_LOOP, **_registered, **loaded}
        _tables[key] = merged
        return merged


def _build(path: str, spec: str, settings: Settings) -> RequestProcessor:
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{ENV_NAME}: {path}={spec}: {why}".replace("\n", " "))

    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever importing it raised, said in one line
        raise refuse(f"cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise refuse(f"{module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise refuse(f"{attr!r} is not callable (expected a factory taking the settings)")
    try:
        processor = target(settings)
    except Exception as exc:  # noqa: BLE001 - the factory's own failure, said in one line
        raise refuse(f"the factory raised {type(exc).__name__}: {exc}") from None
    if not callable(getattr(processor, "process", None)):
        raise refuse(f"the factory returned {type(processor).__name__}, which has no process()")
    return processor


class Dispatch:
    """The job the execute path runs for each request, with ``upstream.attempt``'s
    signature: the processor of the request's path (one dict lookup), given the request's
    cancellation handle."""

    __slots__ = ("_table", "_default", "_watch")

    def __init__(
        self,
        processors: Mapping[str, RequestProcessor],
        default: RequestProcessor,
        watch: CancelWatch,
    ):
        self._table = processors
        self._default = default
        self._watch = watch

    def __call__(self, session: requests.Session, item: WorkItem, settings: Settings) -> Outcome:
        processor = self._table.get(item.url, self._default)
        try:
            return processor.process(
                item, session, settings, BatchCancellation(self._watch, item.batch_id)
            )
        except Aborted:
            raise
        except Exception as exc:  # noqa: BLE001 - one request's failure, not the message's
            # A processor's bug must not take the other requests of the message with it: the
            # request is retried like one whose worker died (fusillade's TaskTerminated).
            log.exception("the processor of %s failed on %r", item.url, item)
            detail = f"the processor of {item.url} raised {type(exc).__name__}: {exc}"
            return Outcome(ErrorKind.TASK_TERMINATED, detail=detail[:500])


def dispatcher(settings: Settings, watch: CancelWatch) -> Callable[..., Outcome]:
    """The per-message ``Dispatch`` (``execute.execute``)."""
    from .default import DEFAULT

    return Dispatch(table(settings), DEFAULT, watch)
