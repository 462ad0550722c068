"""The contract between a session and whatever runs the model, and the factory for it.

Both engines (`voxtral.VoxtralEngine`, transformers in this process; `vllm.VllmEngine`, remote
vLLM servers) satisfy `Engine`; mypy checks that through `load_engine`'s return type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from .chunking import ChunkSink
from .types import Request, RequestHandle

if TYPE_CHECKING:
    from ..config import Settings


class Engine(Protocol):
    def submit(self, request: Request, sink: ChunkSink) -> RequestHandle:
        """Queue a request; chunks go to `sink` (on the engine's thread), the last one with
        `Totals`. Raises `AudioInputError` for audio the model cannot answer and `EngineError`
        when the engine cannot take it (`engine_busy`, `engine_closed`, `no_endpoint`)."""
        ...

    def promote(self, handle: RequestHandle) -> None:
        """A speculative request's turn was confirmed: from now on it is served like any
        other (no-op for one that is not speculative)."""
        ...

    @property
    def ready(self) -> bool:
        """True while the engine can answer (loaded, not closed, a backend up)."""
        ...

    @property
    def queue_depth(self) -> int:
        """Requests waiting or running."""
        ...

    def describe(self) -> dict[str, Any]:
        """What /readyz shows about the engine (kind, model, backends)."""
        ...

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what runs or waits (each ends `cancelled`) and stop (idempotent)."""
        ...


def load_engine(settings: Settings) -> Engine:
    """The engine `engine.kind` names, loaded and warmed up (blocking: call off the loop)."""
    if settings.engine.kind == "vllm":
        from .vllm import VllmEngine

        return VllmEngine.load(settings)
    from .voxtral import VoxtralEngine

    return VoxtralEngine.load(settings)
