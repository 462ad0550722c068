"""create_app(settings): assembles the server (state, routers, static/); imported by nothing
but the entry points.

`GET /healthz` answers as soon as the process serves HTTP; `GET /readyz` only once the
engine has loaded and warmed up. Shutdown closes every session, peer connection and task,
then the engine's worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from ..config import Settings
from ..models.engine import load_engine
from ..resources import MissingResource, static_dir
from . import rest
from .security import bearer_token, ice_servers, token_matches
from .state import EngineFactory, ServerState
from .transports import peer_tasks, webrtc, websocket

logger = logging.getLogger(__name__)


def create_app(settings: Settings, engine_factory: EngineFactory = load_engine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServerState(settings, engine_factory)
        state.peers = app.state.peers = webrtc.PeerManager(state)
        app.state.server = state
        app.state.server_loop = asyncio.get_running_loop()
        restore_handler = peer_tasks.install(app.state.server_loop)
        state.start()
        try:
            yield
        finally:
            await state.close()
            restore_handler()

    app = FastAPI(title="voxtral-server", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        state: ServerState = app.state.server
        if state.ready:
            # An engine may report more (vLLM: which endpoints are up) and be down as a whole.
            engine = state.engine
            assert engine is not None
            body = {"status": "ready", "sessions": len(state.sessions), **engine.describe()}
            if not engine.ready:
                return JSONResponse({**body, "status": "engine_down"}, status_code=503)
            return JSONResponse(body)
        if state.load_error:
            return JSONResponse({"status": "failed", "error": state.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        state: ServerState = app.state.server
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/client-config")
    async def client_config(request: Request) -> JSONResponse:
        """What the web page needs to connect: never hard-coded in the page.

        It holds TURN credentials: with server.auth_token set, only for the token's holders
        (`Authorization: Bearer TOKEN`); others get 401 and learn only that a token is needed.
        """
        if not token_matches(bearer_token(request.headers), settings):
            error = {"code": "unauthorized", "message": "missing or wrong auth token"}
            return JSONResponse({"error": error, "auth_required": True}, status_code=401)
        w = settings.webrtc
        config = {
            "webrtc": {
                "enabled": w.enabled,
                # Minted per request when webrtc.turn_secret is set: valid turn_ttl_s.
                "ice_servers": ice_servers(settings, time.time()),
                "ice_transport_policy": w.ice_transport_policy,
                "client_timeout_ms": w.client_timeout_ms,
            },
            "auth_required": settings.server.auth_token is not None,
            "mode": settings.mode,
            "language": settings.transcribe.language,
            "model": settings.model.id,
            # Speech out: what the page plays (null: the server answers in text only).
            "speech": ({"engine": settings.tts.engine} if settings.tts.engine != "none" else None),
        }
        return JSONResponse(config, headers={"cache-control": "no-store"})

    app.include_router(websocket.router)
    app.include_router(rest.router)
    app.include_router(webrtc.router)
    try:
        page = static_dir()
    except MissingResource as exc:  # the API still works; say why GET / will be a 404
        logger.error("no web page: %s", exc)
    else:
        app.mount("/", StaticFiles(directory=page, html=True), name="static")
    return app
