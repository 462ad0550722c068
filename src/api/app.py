"""create_app(settings): the lifespan loads the engine once; routers and static/ are mounted.

`GET /healthz` answers as soon as the process serves HTTP; `GET /readyz` only once the
engine has loaded and warmed up. Shutdown closes every session, peer connection and task,
then the engine's worker thread.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from ..config import Settings
from ..models import vad
from ..models.tts import TtsEngine, load_tts
from .metrics import Metrics
from .session import Engine, Session

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent.parent / "static"
EngineFactory = Callable[[Settings], Engine]


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def origin_allowed(headers: Mapping[str, str], settings: Settings) -> bool:
    """Browsers only: the page's own origin, or one listed in server.allowed_origins.

    Without a token, "own origin" also requires a loopback Host: otherwise a page whose
    name was rebound to 127.0.0.1 (DNS rebinding) would pass as same-origin.
    """
    origin = headers.get("origin")
    if origin is None:
        return True  # not a browser: Origin only protects browser pages
    if origin in settings.server.allowed_origins:
        return True
    host = headers.get("host", "")
    if urlsplit(origin).netloc != host:
        return False
    if settings.server.auth_token is not None:
        return True
    hostname = urlsplit(f"//{host}").hostname or ""
    return hostname in LOOPBACK_NAMES or hostname == settings.server.host


class TooManySessions(RuntimeError):
    pass


class ServerState:
    """Everything the server owns, created in the lifespan and kept on app.state."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.tts: TtsEngine | None = None  # speech out (tts.engine); None = text only
        self.load_error: str | None = None
        self.sessions: set[Session] = set()
        self.metrics = Metrics()
        self.vad_models = vad.ModelPool(max_idle=settings.server.max_sessions)
        self.metrics.queue_depth.set_function(
            lambda: float(getattr(self.engine, "queue_depth", 0) or 0)
        )
        self.idle = asyncio.Event()  # set while no session is open or closing
        self.idle.set()
        self._closing = 0
        self._factory = engine_factory
        self._loader: asyncio.Task[None] | None = None
        from .webrtc import PeerManager  # aiortc is heavy: import with the server only

        self.peers = PeerManager(self)

    def start(self) -> None:
        self._loader = asyncio.create_task(self._load(), name="engine-load")

    async def _load(self) -> None:
        try:
            # One warm VAD model ready for the first conversation (more are made on demand).
            await asyncio.to_thread(self.vad_models.warm_up, 1)
            self.tts = await asyncio.to_thread(load_tts, self.settings)
            if self.tts is not None:
                logger.info("speech out: tts=%s rate=%d Hz", self.tts.name, self.tts.sample_rate)
            self.engine = await asyncio.to_thread(self._factory, self.settings)
            logger.info("engine ready: /readyz answers 200")
        except Exception as exc:
            self.load_error = str(exc)
            logger.error("engine failed to load: %s", exc)

    @property
    def ready(self) -> bool:
        return self.engine is not None

    async def wait_loaded(self) -> None:
        """Until the engine has loaded or failed to."""
        if self._loader is not None:
            await asyncio.shield(self._loader)

    def check_token(self, presented: str | None) -> bool:
        token = self.settings.server.auth_token
        if token is None:
            return True
        return presented is not None and hmac.compare_digest(presented, token)

    def open_session(self, session: Session) -> None:
        limit = self.settings.server.max_sessions
        if len(self.sessions) >= limit:
            raise TooManySessions(f"server.max_sessions = {limit} conversations are open")
        self.sessions.add(session)
        self.metrics.sessions.set(len(self.sessions))
        self.idle.clear()

    async def close_session(self, session: Session) -> None:
        """Close it and wait for what it stopped (speech) to end; idle once none is left."""
        session.close()
        self.sessions.discard(session)
        self.metrics.sessions.set(len(self.sessions))
        self._closing += 1
        try:
            await session.wait_closed()
        finally:
            self._closing -= 1
        if not self.sessions and not self._closing:
            self.idle.set()

    async def close(self) -> None:
        if self._loader is not None:
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
        await self.peers.close()
        for session in list(self.sessions):
            await self.close_session(session)
        close = getattr(self.engine, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
        if self.tts is not None:
            await asyncio.to_thread(self.tts.close)
        logger.info("server stopped")


def _default_engine(settings: Settings) -> Engine:
    """The engine `engine.kind` names; both implement the same `submit` contract."""
    if settings.engine.kind == "vllm":
        from ..models.vllm import VllmEngine

        return VllmEngine.load(settings)
    from ..models.voxtral import VoxtralEngine

    return VoxtralEngine.load(settings)


def create_app(settings: Settings, engine_factory: EngineFactory = _default_engine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServerState(settings, engine_factory)
        app.state.server = state
        app.state.server_loop = asyncio.get_running_loop()
        state.start()
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(title="voxtral-server", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        state: ServerState = app.state.server
        if state.ready:
            # An engine may report more (vLLM: which endpoints are up) and be down as a whole.
            engine = state.engine
            assert engine is not None
            details = engine.describe() if hasattr(engine, "describe") else {}
            body = {"status": "ready", "sessions": len(state.sessions), **details}
            if not getattr(engine, "ready", True):
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
    async def client_config() -> dict[str, object]:
        """What the web page needs to connect: never hard-coded in the page."""
        w = settings.webrtc
        return {
            "webrtc": {
                "enabled": w.enabled,
                "ice_servers": [s.model_dump(exclude_none=True) for s in w.ice_servers],
                "ice_transport_policy": w.ice_transport_policy,
                "client_timeout_ms": w.client_timeout_ms,
            },
            "auth_required": settings.server.auth_token is not None,
            "mode": settings.mode,
            "language": settings.transcribe.language,
            "model": settings.model.id,
            # Speech out: what the page plays (null: the server answers in text only).
            "speech": (
                {"engine": settings.tts.engine, "sample_rate": settings.tts.sample_rate}
                if settings.tts.engine != "none"
                else None
            ),
        }

    from .webrtc import router as webrtc_router
    from .websocket import router as websocket_router

    app.include_router(websocket_router)
    app.include_router(webrtc_router)
    if STATIC_DIR.is_dir():
        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    return app
