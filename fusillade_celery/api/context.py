"""What every route of one server shares: the Client (the same submit and store code as the
CLI), the key check, and the embedded worker when there is one."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ..embedded import Background
from ..states import RequestState
from ..submit import Client
from .auth import Auth

#: A running batch's ``usage`` is summed again at most this often (a scan of its results)...
USAGE_MAX_AGE_S = 5.0
#: ... and at most once per this many times what the last sum took.
USAGE_COST_FACTOR = 20.0
#: How many batches' request counts and usage one server keeps.
CACHE_ENTRIES = 1024
#: A poller's view of a running batch's counts may be this old (``Client.get_batch``).
COUNTS_MAX_AGE_S = 0.5


@dataclass
class Api:
    client: Client
    auth: Auth
    background: Background | None = None
    #: batch id -> (monotonic time summed, seconds it took, finish stamp or None, usage)
    _usage: dict[str, tuple[float, float, Any, dict[str, Any]]] = field(default_factory=dict)
    _summing: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def batch_view(
        self, row: dict[str, Any], counts_max_age_s: float = COUNTS_MAX_AGE_S
    ) -> dict[str, Any]:
        """The Batch object with OpenAI's ``model`` and ``usage`` besides."""
        from ..output import batch_object

        obj = batch_object(row, self.client.counts_of(row, counts_max_age_s))
        models = json.loads(row["models"] or "[]")
        obj["model"] = models[0] if len(models) == 1 else None
        obj["usage"] = self.usage(row)
        return obj

    def usage(self, row: dict[str, Any]) -> dict[str, Any]:
        """Token usage summed from the completed responses' ``usage`` (chat/completions
        name it prompt/completion, responses input/output). Kept once the batch ends (until
        a retry ends it again). While it runs, summed again at most every USAGE_MAX_AGE_S,
        or USAGE_COST_FACTOR times what the last sum took (a million results take seconds),
        by one thread at a time: the others answer with the last sum meanwhile."""
        from ..intake import finish_stamp

        batch_id = row["id"]
        stamp = finish_stamp(row)
        now = time.monotonic()
        with self._lock:
            hit = self._usage.get(batch_id)
            if hit is not None:
                at, cost, hit_stamp, total = hit
                fresh = now - at < max(USAGE_MAX_AGE_S, USAGE_COST_FACTOR * cost)
                if (stamp is not None and hit_stamp == stamp) or (
                    stamp is None and hit_stamp is None and fresh
                ):
                    return total
                if batch_id in self._summing:
                    return total
            self._summing.add(batch_id)
        try:
            rows = self.client.store.iter_result_rows(batch_id, [RequestState.COMPLETED])
            total = sum_usage(r["response_body"] for r in rows)
        finally:
            with self._lock:
                self._summing.discard(batch_id)
        with self._lock:
            if len(self._usage) >= CACHE_ENTRIES:
                self._usage.pop(next(iter(self._usage)))
            self._usage[batch_id] = (now, time.monotonic() - now, stamp, total)
        return total


def sum_usage(bodies: Iterator[str | None]) -> dict[str, Any]:
    inp = out = total = cached = reasoning = 0
    for text in bodies:
        if not text or '"usage"' not in text:
            continue
        try:
            usage = json.loads(text).get("usage")
        except (ValueError, AttributeError):
            continue
        if not isinstance(usage, dict):
            continue
        i = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
        o = _int(usage.get("completion_tokens", usage.get("output_tokens")))
        inp += i
        out += o
        total += _int(usage.get("total_tokens")) or i + o
        details_in = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
        details_out = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
        if isinstance(details_in, dict):
            cached += _int(details_in.get("cached_tokens"))
        if isinstance(details_out, dict):
            reasoning += _int(details_out.get("reasoning_tokens"))
    return {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": total,
    }


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def api_of(request: Request) -> Api:
    api: Api = request.app.state.api
    return api
