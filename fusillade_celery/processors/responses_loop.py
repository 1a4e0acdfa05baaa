"""The ``/v1/responses`` processor: a multi-step loop of model calls and server-side tool
calls that ends in one assembled Response (dwctl's processor, seed 003, re-designed here).

For the engine the loop *is* the request's call: one slot of its model, one processing
timeout, one fenced write-back and one abort for the whole chain; tool calls count against no
model limit. A model with no server-side tools (``FUSILLADE_TOOLS``) is sent upstream as one
call, unchanged.

Each model call and tool call is a step recorded in ``response_steps`` before it is sent and
when it ends, so a retry or a reclaim resumes the chain: a completed step is never repeated,
an interrupted model call is sent again, an interrupted tool call is sent again only if the
tool is ``idempotent`` (an ``agent`` resumes inside its own steps); otherwise the request
fails ``step_abandoned`` rather than risk doing the tool's work twice.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import upstream
from ..db import get_engine
from ..settings import Settings
from ..states import ErrorKind
from ..store import NewStep, Step, Store, WorkItem
from ..store.steps import COMPLETED, FAILED, MODEL_CALL, STARTED, TOOL_CALL
from ..toolconfig import Tool
from . import responses_format as fmt
from .tools import call_http, run_all

if TYPE_CHECKING:
    import requests

    from .base import Cancellation

PATH = "/v1/responses"
_NAMESPACE = uuid.UUID("7d4f5f0e-59a4-4c52-9d0f-3a4c1f1b6f21")


class _Stop(Exception):
    """Ends the loop with ``outcome`` (a failed call, a cap, a fence that no longer holds)."""

    def __init__(self, outcome: upstream.Outcome):
        super().__init__(outcome.detail)
        self.outcome = outcome


def _loop_failed(reason: str, detail: str) -> _Stop:
    return _Stop(
        upstream.Outcome(
            ErrorKind.RESPONSE_LOOP_FAILED, detail=f"{reason}: {detail}", reason=reason
        )
    )


@dataclass
class _Level:
    """One loop: the top level, or an agent's nested loop under its tool-call step."""

    parent_id: int | None
    depth: int
    model: str
    visible: frozenset[str]  # the server-side tools offered at this level
    messages: list[dict[str, Any]]
    fields: dict[str, Any]  # the rest of each chat body (tools included)
    item: WorkItem  # the request, routed for this level's model


@dataclass
class _Ended:
    """How a loop ended: its output items and its last reply."""

    items: list[dict[str, Any]]
    message: dict[str, Any]
    reply: dict[str, Any]


class ResponsesLoop:
    """The processor of ``/v1/responses`` (registered for the path by ``base.table``)."""

    def process(
        self,
        item: WorkItem,
        session: requests.Session,
        settings: Settings,
        cancel: Cancellation,
    ) -> upstream.Outcome:
        if not settings.tools or not settings.tools.for_model(item.model):
            return upstream.attempt(session, item, settings, cancel)
        return _Run(item, session, settings, cancel, _store(settings)).run()


#: The store of each engine (``get_engine``: one per process and URL), as the worker's.
_stores: dict[Any, Store] = {}


def _store(settings: Settings) -> Store:
    engine = get_engine(settings.database_url, settings.db_pool_size, pre_ping=False)
    store = _stores.get(engine)
    if store is None:
        store = _stores[engine] = Store(engine)
    return store


RESPONSES_LOOP = ResponsesLoop()


class _Run:
    """One attempt of one request's loop, resumed from the steps already recorded."""

    def __init__(
        self,
        item: WorkItem,
        session: requests.Session,
        settings: Settings,
        cancel: Cancellation,
        store: Store,
    ):
        self.item = item
        self.session = session
        self.settings = settings
        self.cancel = cancel
        self.store = store
        self.config = settings.tools
        self.until = time.monotonic() + settings.processing_timeout_ms / 1000.0
        self.usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        self._lock = threading.Lock()
        recorded = store.steps_of(item.id)
        self.steps: dict[tuple[int | None, int], Step] = {(s.parent_id, s.seq): s for s in recorded}
        self.created_at = min((s.created_at for s in recorded), default=time.time())

    def run(self) -> upstream.Outcome:
        try:
            body = json.loads(self.item.body)
            if not isinstance(body, dict):
                raise fmt.Unsupported("the body is not a JSON object")
            visible = frozenset(self.config.for_model(self.item.model))
            messages, fields = fmt.translate(body, frozenset(t.name for t in self.config.tools))
        except ValueError as exc:  # Unsupported, or a body that is not JSON
            return upstream.Outcome(ErrorKind.BUILDER_ERROR, detail=f"{PATH} loop: {exc}")
        ours = [t.function() for t in self.config.tools if t.name in visible]  # config order
        fields["tools"] = ours + fields.get("tools", [])
        if self.item.url in self.settings.stream_endpoints:
            fields["stream"] = True  # the operator streams /v1/responses: its model calls too
        top = _Level(None, 0, self.item.model, visible, messages, fields, self.item)
        try:
            ended = self._loop(top)
        except _Stop as stop:
            return stop.outcome
        response = fmt.response_object(
            "resp_" + uuid.uuid5(_NAMESPACE, f"{self.item.batch_id}/{self.item.id}").hex,
            self.created_at,
            body,
            str(ended.reply.get("model") or self.item.model),
            ended.items,
            self.usage,
            ended.message.get("finish_reason"),
        )
        return upstream.Outcome(None, 200, json.dumps(response, ensure_ascii=False))

    def _tool(self, name: str) -> Tool:
        tool = self.config.get(name)
        assert tool is not None  # names were checked when the setting was parsed
        return tool

    def _loop(self, level: _Level) -> _Ended:
        """Model call, the server-side tools it asks for, model call, ... until a reply asks
        for none (or for a tool only the caller has)."""
        items: list[dict[str, Any]] = []
        seq = 0
        cap = self.settings.responses_max_iterations
        for n in range(1, cap + 1):
            reply = self._model_call(level, seq)
            seq += 1
            try:
                message = fmt.reply_message(reply)
            except fmt.BadReply as exc:
                raise _loop_failed("unexpected_model_reply", str(exc)) from None
            level.messages.append(fmt.assistant_message(message))
            text = fmt.message_item(reply, message)
            if text is not None:
                items.append(text)
            calls = message["tool_calls"]
            items += [fmt.function_call_item(c) for c in calls]
            ours = [c for c in calls if c["function"]["name"] in level.visible]
            if not calls:
                return _Ended(items, message, reply)
            if len(ours) == len(calls) and n == cap:
                raise _loop_failed(
                    "max_iterations_exceeded",
                    f"{cap} model calls at depth {level.depth} without a final answer "
                    "(FUSILLADE_RESPONSES_MAX_ITERATIONS)",
                )
            outputs = self._tool_calls(level, seq, ours)
            seq += len(ours)
            for call, output in zip(ours, outputs, strict=True):
                level.messages.append(
                    {"role": "tool", "tool_call_id": call["id"], "content": output}
                )
                items.append(fmt.function_output_item(call["id"], output))
            if len(ours) < len(calls):  # the caller's own tools: its turn
                return _Ended(items, message, reply)
        raise AssertionError("unreachable: the last iteration returns or raises")

    def _check(self) -> None:
        """Before each step sent: a cancel ends the attempt; so do the batch's cutoff (no
        call past it, as for a single call) and the processing timeout (the reaper would take
        the row back; the finished steps are kept for the retry)."""
        self.cancel.check()
        if time.time() >= self.item.deadline - self.settings.stop_before_deadline_ms / 1000.0:
            raise _Stop(
                upstream.Outcome(ErrorKind.BATCH_EXPIRED, detail="batch expired during the loop")
            )
        if time.monotonic() >= self.until:
            raise _Stop(
                upstream.Outcome(
                    ErrorKind.TIMEOUT,
                    detail=f"{PATH} loop outlasted FUSILLADE_PROCESSING_TIMEOUT_MS; "
                    "its finished steps are kept for the retry",
                )
            )

    def _begin(self, steps: list[NewStep]) -> list[int]:
        ids = self.store.begin_steps(self.item.id, self.item.token, steps, time.time())
        if ids is None:
            raise self._taken()
        return ids

    def _end(self, step_id: int, state: str, response: Any) -> None:
        if not self.store.end_step(
            self.item.id, self.item.token, step_id, state, response, time.time()
        ):
            raise self._taken()

    def _taken(self) -> _Stop:
        """The row is no longer this attempt's (reaped, cancelled): stop; the write-back
        would be refused anyway."""
        return _Stop(
            upstream.Outcome(
                ErrorKind.TASK_TERMINATED,
                detail=f"{PATH} loop: the request was taken back from this worker",
            )
        )

    def _model_call(self, level: _Level, seq: int) -> dict[str, Any]:
        """The reply of the level's model call ``seq``: recorded, or sent now (again, if an
        earlier try was interrupted or failed)."""
        step = self.steps.get((level.parent_id, seq))
        if step is not None and step.kind == MODEL_CALL and step.state == COMPLETED:
            reply: dict[str, Any] = step.response
        else:
            self._check()
            body = {"model": level.model, "messages": level.messages, **level.fields}
            earlier = step.id if step is not None else None
            (step_id,) = self._begin(
                [NewStep(level.parent_id, seq, MODEL_CALL, level.model, body, id=earlier)]
            )
            text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
            call = dataclasses.replace(level.item, url=fmt.CHAT_PATH, body=text)
            out = upstream.attempt(self.session, call, self.settings, self.cancel)
            if not out.ok:
                self._end(step_id, FAILED, out.error())
                raise _Stop(out)
            try:
                reply = json.loads(out.body or "")
                if not isinstance(reply, dict):
                    raise ValueError("not an object")
            except ValueError:
                self._end(step_id, FAILED, {"detail": "the reply is not a JSON object"})
                raise _loop_failed("unexpected_model_reply", "the reply is not JSON") from None
            self._end(step_id, COMPLETED, reply)
        with self._lock:
            fmt.add_usage(self.usage, reply)
        return reply

    def _tool_calls(self, level: _Level, seq: int, calls: list[dict[str, Any]]) -> list[str]:
        """The outputs of a reply's server-side calls (steps ``seq``...), the recorded ones
        reused and the others run at once (``responses_tool_concurrency``)."""
        outputs: list[str | None] = [None] * len(calls)
        todo: list[tuple[int, dict[str, Any], Tool, NewStep]] = []
        for i, call in enumerate(calls):
            name = call["function"]["name"]
            tool = self._tool(name)
            step = self.steps.get((level.parent_id, seq + i))
            if step is not None and step.state == COMPLETED:
                outputs[i] = step.response["output"]
                continue
            if step is not None and step.state == STARTED and _unsafe(tool):
                raise _Stop(
                    upstream.Outcome(
                        ErrorKind.STEP_ABANDONED,
                        detail=f"the call {call['id']} of the tool {name} (not idempotent) was "
                        "interrupted and is not sent again",
                    )
                )
            if tool.kind == "agent" and level.depth + 1 > self.settings.responses_max_depth:
                raise _loop_failed(
                    "max_depth_exceeded",
                    f"the agent {name} would nest at depth {level.depth + 1} "
                    f"(FUSILLADE_RESPONSES_MAX_DEPTH={self.settings.responses_max_depth})",
                )
            request = {
                "call_id": call["id"],
                "name": name,
                "arguments": call["function"]["arguments"],
            }
            earlier = step.id if step is not None else None
            new = NewStep(level.parent_id, seq + i, TOOL_CALL, name, request, call["id"], earlier)
            todo.append((i, call, tool, new))
        if todo:
            self._check()
            ids = self._begin([new for _, _, _, new in todo])
            jobs = [
                _job(self, level, call, tool, step_id)
                for (_, call, tool, _), step_id in zip(todo, ids, strict=True)
            ]
            done = run_all(jobs, self.settings.responses_tool_concurrency)
            for (i, _, _, _), output in zip(todo, done, strict=True):
                outputs[i] = output
        return [o or "" for o in outputs]

    def run_tool(self, level: _Level, call: dict[str, Any], tool: Tool, step_id: int) -> str:
        """One server-side call, its output recorded."""
        arguments = call["function"]["arguments"]
        if tool.kind == "agent":
            output = self._agent(level, tool, arguments, step_id)
            self._end(step_id, COMPLETED, {"output": output})
            return output
        headers = {
            "X-Fusillade-Request-Id": str(self.item.id),
            "X-Fusillade-Tool-Call-Id": upstream.header_value(call["id"]),
        }
        result = call_http(self.session, tool, arguments, headers, self.cancel)
        record = {"output": result.output, "status": result.status, "tries": result.tries}
        self._end(step_id, COMPLETED, record)
        return result.output

    def _agent(self, level: _Level, tool: Tool, arguments: str, step_id: int) -> str:
        """An agent tool: a nested loop of its own model, instructions and tools, seeded
        with the call's ``input`` (or its whole arguments); its final text is the output."""
        try:
            args = json.loads(arguments)
        except ValueError:
            args = None
        seed = (
            args["input"]
            if isinstance(args, dict) and isinstance(args.get("input"), str)
            else arguments
        )
        messages: list[dict[str, Any]] = []
        if tool.instructions:
            messages.append({"role": "system", "content": tool.instructions})
        messages.append({"role": "user", "content": seed})
        fields: dict[str, Any] = json.loads(tool.body)
        if tool.tools:
            fields["tools"] = [self._tool(n).function() for n in tool.tools]
        if level.fields.get("stream") is True:
            fields.setdefault("stream", True)
        routed = dataclasses.replace(self.item, model=tool.model, routed_model=tool.model)
        nested = _Level(
            step_id, level.depth + 1, tool.model, frozenset(tool.tools), messages, fields, routed
        )
        ended = self._loop(nested)
        names = [c["function"]["name"] for c in ended.message["tool_calls"]]
        unknown = [n for n in names if n not in nested.visible]
        if unknown:  # an agent has no caller to hand them to
            return json.dumps({"error": f"the agent {tool.name} asked for unknown tools {unknown}"})
        return str(ended.message.get("content") or ended.message.get("refusal") or "")


def _unsafe(tool: Tool) -> bool:
    """Whether an interrupted call of ``tool`` must not be sent again (an agent resumes
    inside its own steps instead)."""
    return tool.kind == "http" and not tool.idempotent


def _job(run: _Run, level: _Level, call: dict[str, Any], tool: Tool, step_id: int) -> Any:
    return lambda: run.run_tool(level, call, tool, step_id)
