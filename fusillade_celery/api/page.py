"""The page at ``/``: the key's batches, newest first, with status, a progress bar, counts,
timestamps and links to the output and error files; per model, the limit and what these
batches have in flight. Server-rendered HTML; a dozen lines of script re-fetch the table
every ``POLL_MS``. The key is typed once into a form that POSTs it; the reply sets it as an
HttpOnly, SameSite=Strict cookie, so it is never in a URL (nor readable by script)."""

from __future__ import annotations

import time
from html import escape
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import live
from .auth import COOKIE, MAX_KEY_CHARS
from .context import Api, api_of
from .files import content_response

router = APIRouter(include_in_schema=False)
POLL_MS = 2000
SHOWN_BATCHES = 50

_STYLE = """
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}
th,td{padding:.35em .7em;border-bottom:1px solid #ddd;text-align:left;vertical-align:middle}
.bar{width:220px;height:14px;background:#e6e6e6;border-radius:3px;overflow:hidden;display:flex}
.bar .done{background:#2e9d46}.bar .failed{background:#d9473f}
.status{font-weight:600}.muted{color:#777}code{font-size:12px}
"""
_SCRIPT = f"""
setInterval(async () => {{
  try {{
    const reply = await fetch('/page/batches', {{credentials: 'same-origin'}});
    if (reply.ok) document.getElementById('live').innerHTML = await reply.text();
  }} catch (e) {{}}
}}, {POLL_MS});
"""


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "-"


def _document(body: str, script: bool = False) -> HTMLResponse:
    js = f"<script>{_SCRIPT}</script>" if script else ""
    return HTMLResponse(
        "<!doctype html><html><head><meta charset=utf-8><title>fusillade batches</title>"
        f"<style>{_STYLE}</style></head><body><h1>Batches</h1>{body}{js}</body></html>"
    )


def _login(message: str = "", status: int = 200) -> HTMLResponse:
    note = f"<p class=error role=alert>{escape(message)}</p>" if message else ""
    form = (
        f"{note}<form method=post action=/login>"
        f"<label>API key <input id=key name=key type=password maxlength={MAX_KEY_CHARS} "
        "autocomplete=off required></label> <button id=enter type=submit>Show my batches</button>"
        "</form><p class=muted>The key is kept in an HttpOnly cookie of this site.</p>"
    )
    reply = _document(form)
    reply.status_code = status
    return reply


def _batch_row(b: dict[str, Any]) -> str:
    counts = b["request_counts"]
    total = max(counts["total"], 1)
    done = 100.0 * counts["completed"] / total
    failed = 100.0 * counts["failed"] / total
    finished = b["completed_at"] or b["failed_at"] or b["expired_at"] or b["cancelled_at"]
    links = " ".join(
        f'<a href="/page/files/{escape(b[k])}/content" download>{label}</a>'
        for k, label in (("output_file_id", "output"), ("error_file_id", "errors"))
        if b.get(k)
    )
    return (
        f'<tr class=batch id="{escape(b["id"])}" data-status="{escape(b["status"])}">'
        f"<td><code>{escape(b['id'])}</code><br><span class=muted>"
        f"{escape(b['model'] or '')} {escape(b['endpoint'])}</span></td>"
        f"<td class=status>{escape(b['status'])}</td>"
        f'<td><div class=bar role=progressbar aria-valuenow="{done:.0f}">'
        f'<div class=done style="width:{done:.2f}%"></div>'
        f'<div class=failed style="width:{failed:.2f}%"></div></div></td>'
        f"<td class=counts><span class=completed>{counts['completed']}</span> / "
        f"<span class=total>{counts['total']}</span> completed, "
        f"<span class=failed-count>{counts['failed']}</span> failed</td>"
        f"<td class=times>{_when(b['created_at'])} UTC<br><span class=muted>"
        f"started {_when(b['in_progress_at'])}"
        f"{', ended ' + _when(finished) if finished else ''}</span></td>"
        f"<td>{links}</td></tr>"
    )


def _live(api: Api, owner: str | None) -> str:
    """The part the script re-fetches: the model table and the batch table."""
    rows = api.client.store.list_batch_page(owner, SHOWN_BATCHES)
    batches = [api.batch_view(r, POLL_MS / 1000.0) for r in rows]
    running = [b["id"] for b in batches if b["status"] not in _ENDED]
    flying = api.client.store.in_flight_by_model(running)
    config = live.current(api.client.store, api.client.settings)
    models = sorted({m for r in rows for m in _models(r)} | set(flying))
    model_rows = "".join(
        f"<tr class=model><td>{escape(m)}</td><td class=limit>{config.limit_for(m)}</td>"
        f"<td class=in-flight>{flying.get(m, 0)}</td></tr>"
        for m in models
    )
    batch_rows = "".join(_batch_row(b) for b in batches) or (
        "<tr><td colspan=6 class=muted>no batches yet</td></tr>"
    )
    return (
        "<h2>Models</h2><table id=models><tr><th>model</th><th>limit</th>"
        f"<th>in flight (these batches)</th></tr>{model_rows}</table>"
        "<h2>Newest batches</h2><table id=batches><tr><th>batch</th><th>status</th>"
        "<th>progress</th><th>requests</th><th>created</th><th>files</th></tr>"
        f"{batch_rows}</table>"
    )


_ENDED = {"completed", "failed", "expired", "cancelled"}


def _models(row: dict[str, Any]) -> list[str]:
    import json

    return list(json.loads(row["models"] or "[]"))


@router.get("/")
def dashboard(request: Request) -> Response:
    api = api_of(request)
    signed_in, owner = api.auth.cookie(request)
    if not signed_in:
        return _login()
    who = f"signed in as <b>{escape(owner)}</b>" if owner else "no authentication (--no-auth)"
    logout = (
        "<form method=post action=/logout style=display:inline><button>sign out</button></form>"
    )
    body = (
        f"<p class=muted>{who} {logout if owner else ''}</p><div id=live>{_live(api, owner)}</div>"
    )
    return _document(body, script=True)


@router.get("/page/batches")
def live_part(request: Request) -> Response:
    api = api_of(request)
    signed_in, owner = api.auth.cookie(request)
    if not signed_in:
        return HTMLResponse("<p>signed out: reload the page</p>", status_code=401)
    return HTMLResponse(_live(api, owner))


@router.get("/page/files/{file_id}/content")
def page_file(file_id: str, request: Request) -> Response:
    api = api_of(request)
    signed_in, owner = api.auth.cookie(request)
    if not signed_in:
        return _login("sign in to download files", 401)
    return content_response(api.client, file_id, owner)


@router.post("/login")
async def login(request: Request) -> Response:
    api = api_of(request)
    form = await request.form(max_files=0, max_fields=4)
    key = str(form.get("key") or "").strip()
    if api.auth.enabled and await run_in_threadpool(api.auth.owner_of_key, key) is None:
        return _login("incorrect or revoked API key", 401)
    reply = RedirectResponse("/", status_code=303)
    if api.auth.enabled:
        secure = request.url.scheme == "https"
        reply.set_cookie(COOKIE, key, httponly=True, samesite="strict", secure=secure)
    return reply


@router.post("/logout")
def logout() -> Response:
    reply = RedirectResponse("/", status_code=303)
    reply.delete_cookie(COOKIE)
    return reply
