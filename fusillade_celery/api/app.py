"""The FastAPI application of ``fusillade-celery serve``: OpenAI's Files and Batches under
``/v1``, the page at ``/``, ``/healthz`` and ``/metrics``. It holds no state of its own: with
PostgreSQL and Redis any number of replicas serve the same batches; on the embedded default
the in-process worker runs beside it for the server's lifetime (``embedded.Background``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..embedded import Background
from ..submit import Client
from . import batches, errors, files, page
from .auth import Auth
from .context import Api, api_of

log = logging.getLogger(__name__)


def create_app(client: Client, auth: bool = True, background: Background | None = None) -> FastAPI:
    """The application over ``client``'s database; ``auth=False`` lets every caller see
    everything (``serve --no-auth``, loopback only)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if background is not None:
            background.start()
        try:
            yield
        finally:
            if background is not None:
                background.stop()

    app = FastAPI(
        title="fusillade-celery",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.api = Api(client, Auth(client.store, auth), background)
    errors.install(app)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(page.router)
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    return app


def healthz(request: Request) -> JSONResponse:
    """200 when the database answers and the broker (if any) accepts a connection."""
    api = api_of(request)
    checks = {"database": "ok", "broker": "in-process"}
    try:
        api.client.store.ping()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        checks["database"] = f"unreachable ({type(exc).__name__})"
    if not api.client.settings.embedded:
        from ..app import app as celery_app

        try:
            with celery_app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            checks["broker"] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            checks["broker"] = f"unreachable ({type(exc).__name__})"
    healthy = checks["database"] == "ok" and checks["broker"] in ("ok", "in-process")
    if healthy:
        return JSONResponse({"status": "ok", **checks})
    problems = ", ".join(f"{k} {v}" for k, v in checks.items() if v not in ("ok", "in-process"))
    return errors.error_response(503, f"unhealthy: {problems}", "server_error", code="unhealthy")


def metrics(_: Request) -> Response:
    """This process's Prometheus metrics (an embedded server's worker counts here too)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from ..metrics import registry

    return Response(generate_latest(registry()), media_type=CONTENT_TYPE_LATEST)
