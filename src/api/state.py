"""What the server owns, created in the app's lifespan and kept on `app.state.server`: the
engine (loaded off the event loop), speech out, the warm VAD models, the open sessions and
their limit, metrics. Transports ask it for a session; the app closes it on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from ..config import Settings
from ..models import vad
from ..models.engine import Engine
from ..models.steps import ObservableEngine
from ..models.tts import TtsEngine, load_tts
from ..models.turn.worker import JudgeWorker, load_judge
from .metrics import Metrics
from .session import Session, Transport

logger = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], Engine]


class Closeable(Protocol):
    async def close(self) -> None: ...


class TooManySessions(RuntimeError):
    """server.max_sessions conversations are open."""

    code = "too_many_sessions"


class TooManySessionsFromClient(TooManySessions):
    """server.max_sessions_per_client conversations are open from this client's address."""

    code = "too_many_sessions_from_client"


class EngineNotReady(RuntimeError):
    """The engine has not loaded (yet)."""


class ServerState:
    """Everything the server owns, created in the lifespan and kept on app.state."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.tts: TtsEngine | None = None  # speech out (tts.engine); None = text only
        self.load_error: str | None = None
        self.sessions: set[Session] = set()
        self._client_of: dict[Session, str] = {}  # the address each session came from
        self.metrics = Metrics()
        self.vad: vad.VadWorker | None = None  # every session's VAD, loaded with the engine
        self.judge: JudgeWorker | None = None  # semantic_vad's end-of-turn judge
        self.metrics.queue_depth.set_function(
            lambda: float(self.engine.queue_depth if self.engine is not None else 0)
        )
        self.idle = asyncio.Event()  # set while no session is open or closing
        self.idle.set()
        self._closing = 0
        self._factory = engine_factory
        self._loader: asyncio.Task[None] | None = None
        # The WebRTC peer manager (set by the app): closed before the sessions it carries.
        self.peers: Closeable | None = None

    def start(self) -> None:
        self._loader = asyncio.create_task(self._load(), name="engine-load")

    async def _load(self) -> None:
        try:
            # One VAD model and thread for every conversation, warmed up.
            self.vad = await asyncio.to_thread(vad.VadWorker)
            v = self.settings.vad
            required = v.type == "semantic_vad" and not v.judge_fallback
            self.judge, why = await asyncio.to_thread(load_judge, v.judge, required)
            if self.judge is None:
                logger.warning(
                    "semantic_vad is unavailable (%s)%s",
                    why,
                    "; sessions use server_vad (vad.judge_fallback)"
                    if v.type == "semantic_vad"
                    else "",
                )
            self.tts = await asyncio.to_thread(load_tts, self.settings)
            if self.tts is not None:
                logger.info("speech out: tts=%s rate=%d Hz", self.tts.name, self.tts.sample_rate)
            self.engine = await asyncio.to_thread(self._factory, self.settings)
            if isinstance(self.engine, ObservableEngine):  # batch sizes and step times
                self.engine.observe_steps(self.metrics)
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

    def sessions_from(self, client: str) -> int:
        return sum(1 for address in self._client_of.values() if address == client)

    def open_session(self, transport: Transport, client: str | None = None) -> Session:
        """A new conversation over `transport` for the client at address `client`; raises
        TooManySessions at server.max_sessions, TooManySessionsFromClient at
        server.max_sessions_per_client, and EngineNotReady before the engine has loaded."""
        if self.engine is None:
            raise EngineNotReady("the model is still loading; retry shortly")
        limit = self.settings.server.max_sessions
        if len(self.sessions) >= limit:
            raise TooManySessions(f"server.max_sessions = {limit} conversations are open")
        per_client = self.settings.server.max_sessions_per_client
        if (
            client is not None
            and per_client is not None
            and self.sessions_from(client) >= per_client
        ):
            raise TooManySessionsFromClient(
                f"server.max_sessions_per_client = {per_client} conversations are open "
                "from your address"
            )
        session = Session(
            self.engine, self.settings, transport, self.metrics, self.vad, self.tts, self.judge
        )
        self.sessions.add(session)
        if client is not None:
            self._client_of[session] = client
        self.metrics.sessions.set(len(self.sessions))
        self.idle.clear()
        return session

    async def close_session(self, session: Session) -> None:
        """Close it and wait for what it stopped (speech) to end; idle once none is left."""
        session.close()
        self.sessions.discard(session)
        self._client_of.pop(session, None)
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
        if self.peers is not None:
            await self.peers.close()
        for session in list(self.sessions):
            await self.close_session(session)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)
        if self.tts is not None:
            await asyncio.to_thread(self.tts.close)
        if self.vad is not None:
            await asyncio.to_thread(self.vad.close)
        if self.judge is not None:
            await asyncio.to_thread(self.judge.close)
        logger.info("server stopped")
