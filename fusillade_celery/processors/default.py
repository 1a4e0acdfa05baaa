"""The default processor: one upstream call per attempt (``upstream.attempt``), streamed when
the path, the route or the request asks for it (``sse.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import upstream
from ..settings import Settings
from ..store import WorkItem
from .base import Cancellation

if TYPE_CHECKING:
    import requests


class DefaultProcessor:
    """What every path without a processor of its own runs."""

    def process(
        self,
        item: WorkItem,
        session: requests.Session,
        settings: Settings,
        cancel: Cancellation,
    ) -> upstream.Outcome:
        return upstream.attempt(session, item, settings, cancel)


DEFAULT = DefaultProcessor()
