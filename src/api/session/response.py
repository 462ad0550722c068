"""One answer on its way to the client: engine chunks -> text deltas (and speech), cancel,
and the closing events.

The engine calls the sink on its own thread; `sink()` hops each chunk to the event loop with
`call_soon_threadsafe`, where `Answer.deliver` turns it into a `response.output_text.delta`
and feeds the speech. The session decides when the answer is over (`Answer.send_done`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from ...config import TtsSettings
from ...models.chunking import ChunkSink
from ...models.tts import TtsEngine
from ...models.types import Chunk, RequestHandle, Totals
from .. import protocol as p
from ..speech import AudioOut, Speech
from .report import TurnClock

ResponseStatus = Literal["completed", "cancelled", "failed"]


@dataclass
class Answer:
    id: str
    item_id: str
    handle: RequestHandle
    audio: np.ndarray  # what the user said (kept for the conversation's history)
    clock: TurnClock
    transport: p.Transport
    speech: Speech | None = None  # the answer spoken (chat mode with speech out)
    text: list[str] = field(default_factory=list)  # the words the client was sent
    cut_short: bool = False  # a cancel stopped words from reaching the client
    retracted: bool = False  # taken back: the speaker went on (the turn was not over)
    barged_in: bool = False  # stopped by the user's speech

    def deliver(self, chunk: Chunk) -> None:
        """A word chunk (not the final one): to the client, and to the speech."""
        if self.handle.cancelled:
            self.cut_short = True
            return  # already on its way out: no more words
        self.text.append(chunk.text)
        if self.speech is not None:
            self.speech.add(chunk.text)
        self.transport.send(
            p.TextDelta(
                response_id=self.id,
                item_id=self.item_id,
                delta=chunk.text,
                chunk_index=chunk.chunk_index,
                first_token_latency_ms=chunk.first_token_latency_ms,
                processing_time_ms=chunk.processing_time_ms,
            )
        )
        clock = self.clock
        if clock.first_delta_at is None:
            clock.first_delta_at = time.perf_counter()
            submitted = self.handle.submitted_at
            clock.first_chunk_out_at = submitted + chunk.processing_time_ms / 1000
            if chunk.first_token_latency_ms is not None:
                clock.first_token_at = submitted + chunk.first_token_latency_ms / 1000

    def stop(self) -> None:
        """Cancel generation and silence the speech; the final chunk follows."""
        self.handle.cancel()
        if self.speech is not None:
            self.speech.cancel()

    @property
    def answer_text(self) -> str:
        return "".join(self.text)

    def send_done(self, status: ResponseStatus, totals: Totals, timings: p.Timings) -> None:
        """The closing events: text done, audio done (if it was spoken), response.done."""
        text = self.answer_text
        send = self.transport.send
        send(p.TextDone(response_id=self.id, item_id=self.item_id, text=text))
        speech = self.speech
        if speech is not None and speech.first_audio_at is not None:
            send(p.AudioDone(response_id=self.id, item_id=self.item_id))
            spoken = "".join(speech.spoken)
            send(p.TranscriptDone(response_id=self.id, item_id=self.item_id, transcript=spoken))
        output = [
            {
                "id": self.item_id,
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text}],
            }
        ]
        # OpenAI's reasons: the user's speech (a barge-in, or a turn taken back) or the client.
        reason = "turn_detected" if self.retracted or self.barged_in else "client_cancelled"
        details = status_details(totals, reason)
        response = p.Response(id=self.id, status=status, status_details=details, output=output)
        send(p.ResponseDone(response=response, timings=timings))


def settled(answer: Answer, totals: Totals) -> Totals:
    """The engine's totals as the client saw them: an answer the engine completed but whose
    words a cancel held back (it landed after generation ended, before delivery) was cut
    short for the client, so it ends `cancelled` (and stays out of the history)."""
    if totals.status == "completed" and answer.cut_short:
        return replace(totals, status="cancelled")
    return totals


def status_of(totals: Totals) -> ResponseStatus:
    return "failed" if totals.status == "error" else totals.status


def status_details(totals: Totals, reason: str = "client_cancelled") -> dict[str, Any] | None:
    if totals.status == "error":
        return {"type": "failed", "error": {"code": totals.error_code, "message": totals.error}}
    if totals.status == "cancelled":
        return {"type": "cancelled", "reason": reason}
    return None


def sink(
    loop: asyncio.AbstractEventLoop,
    on_chunk: Callable[[str, Chunk], None],
    response_id: str,
    handle: Callable[[], RequestHandle | None],
) -> ChunkSink:
    """The engine's sink for one response: each chunk hops to `on_chunk` on `loop`.

    `handle()` gives the response's handle once submitted: if the loop is gone (nobody
    listens any more), generation is cancelled.
    """

    def deliver(chunk: Chunk) -> None:  # on the engine's worker thread
        try:
            loop.call_soon_threadsafe(on_chunk, response_id, chunk)
        except RuntimeError:  # the event loop is gone
            h = handle()
            if h is not None:
                h.cancel()

    return deliver


def speak(
    tts: TtsEngine,
    out: AudioOut,
    settings: TtsSettings,
    ids: tuple[str, str],
    transport: p.Transport,
    on_error: Callable[[str, str], None],
) -> Speech:
    """The answer `ids` (response, item) spoken: each phrase is announced to the client as
    a transcript delta when its first audio leaves."""

    def spoken(phrase: str) -> None:
        transport.send(p.TranscriptDelta(response_id=ids[0], item_id=ids[1], delta=phrase))

    return Speech(tts, out, settings, ids, spoken, on_error)
