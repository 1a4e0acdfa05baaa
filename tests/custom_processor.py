"""Request processors for the tests, named by ``FUSILLADE_PROCESSORS`` as
``tests.custom_processor:<factory>`` (and the README's example, working)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import requests

from fusillade_celery import upstream
from fusillade_celery.processors import Cancellation
from fusillade_celery.settings import Settings
from fusillade_celery.store import WorkItem


class Annotating:
    """The default call, its reply marked with who processed it."""

    def __init__(self, settings: Settings):
        self.name = "annotating"

    def process(
        self, item: WorkItem, session: requests.Session, settings: Settings, cancel: Cancellation
    ) -> upstream.Outcome:
        out = upstream.attempt(session, item, settings, cancel)
        if not out.ok:
            return out  # retried or failed as any call
        body = json.loads(out.body or "{}")
        body["processed_by"] = self.name
        return dataclasses.replace(out, body=json.dumps(body))


class Echo:
    """No upstream call at all: the request's own body is the reply."""

    def process(
        self, item: WorkItem, session: requests.Session, settings: Settings, cancel: Cancellation
    ) -> upstream.Outcome:
        cancel.check()
        return upstream.Outcome(None, 200, json.dumps({"object": "echo", "request": item.body}))


def factory(settings: Settings) -> Annotating:
    return Annotating(settings)


def failing_factory(settings: Settings) -> Any:
    raise RuntimeError("cannot start\nat all")


def without_process(settings: Settings) -> Any:
    return object()


NOT_CALLABLE = 42


class Crashing:
    """A processor with a bug."""

    def process(
        self, item: WorkItem, session: requests.Session, settings: Settings, cancel: Cancellation
    ) -> upstream.Outcome:
        raise RuntimeError("a bug in the processor")
