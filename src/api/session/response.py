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

from ...config import TtsSettings
from ...models.chunking import ChunkSink
from ...models.tts import TtsEngine
from ...models.types import Chunk, RequestHandle, ToolCall, Totals
from .. import protocol as p
from ..protocol import new_id
from ..speech import AudioOut, Speech
from ..spoken import SpokenTimeline
from .items import Item
from .report import TurnClock

ResponseStatus = Literal["completed", "cancelled", "failed"]


@dataclass
class Answer:
    """One run of the model for the client: an answer (response.* events and its output
    items) or, in a transcription session, the written-down words of a user item."""

    id: str
    handle: RequestHandle
    clock: TurnClock
    transport: p.Transport
    user_item: str | None = None  # the user item it answers
    message_id: str = field(default_factory=lambda: new_id("item"))  # its message item's id
    spoken: bool = False  # an audio answer: words as transcript deltas, audio follows
    # The conversation it writes to: its items go in (None: an out-of-band answer).
    add_item: Callable[[Item], str | None] | None = None
    transcribes: Item | None = None  # transcription session: the user item written down
    speech: Speech | None = None  # the answer spoken (chat mode with speech out)
    text: list[str] = field(default_factory=list)  # the words the client was sent
    cut_short: bool = False  # a cancel stopped words from reaching the client
    retracted: bool = False  # taken back: the speaker went on (the turn was not over)
    barged_in: bool = False  # stopped by the user's speech
    item: Item | None = None  # its message item, once its first word came
    output: list[Item] = field(default_factory=list)  # its output items, in order
    response: p.Response | None = None  # what response.created said (None: transcription)
    heard_ms: float | None = None  # a truncate while it was spoken: the audio heard
    already_sent: str = ""  # a caption started again: the words sent by the run before

    def item_timeline(self, timeline: SpokenTimeline) -> None:
        """Keep the speech's timeline on the message item (a later truncate reads it)."""
        if self.item is not None:
            self.item.timeline = timeline

    def deliver(self, chunk: Chunk) -> None:
        """A word chunk (not the final one): to the client, and to the speech."""
        if self.handle.cancelled:
            self.cut_short = True
            return  # already on its way out: no more words
        self.text.append(chunk.text)
        send = self.transport.send
        if self.transcribes is not None:
            skip = max(0, len(self.already_sent) - (len(self.answer_text) - len(chunk.text)))
            if chunk.text[skip:]:
                send(
                    p.InputTranscriptionDelta(item_id=self.transcribes.id, delta=chunk.text[skip:])
                )
        else:
            item = self.item or self._open_message()
            if self.speech is not None:
                self.speech.add(chunk.text)
            ids = self._ids(item)
            extras: dict[str, Any] = {
                "delta": chunk.text,
                "chunk_index": chunk.chunk_index,
                "first_token_latency_ms": chunk.first_token_latency_ms,
                "processing_time_ms": chunk.processing_time_ms,
            }
            send(
                p.TranscriptDelta(**ids, **extras) if self.spoken else p.TextDelta(**ids, **extras)
            )
        clock = self.clock
        if clock.first_delta_at is None:
            clock.first_delta_at = time.perf_counter()
            submitted = self.handle.submitted_at
            clock.first_chunk_out_at = submitted + chunk.processing_time_ms / 1000
            if chunk.first_token_latency_ms is not None:
                clock.first_token_at = submitted + chunk.first_token_latency_ms / 1000

    def _open_message(self) -> Item:
        """The answer's message item appears with its first word (a function call alone has
        none): output_item.added, conversation.item.added, content_part.added."""
        item = Item(
            self.message_id, "message", "assistant", spoken=self.spoken, status="in_progress"
        )
        self.item = item
        self._add(item)
        part = {"type": "audio", "transcript": ""} if self.spoken else {"type": "text", "text": ""}
        self.transport.send(
            p.ContentPartAdded(
                response_id=self.id, item_id=item.id, output_index=self._index(item), part=part
            )
        )
        return item

    def _add(self, item: Item) -> None:
        self.output.append(item)
        send = self.transport.send
        send(
            p.OutputItemAdded(response_id=self.id, output_index=self._index(item), item=item.wire())
        )
        if self.add_item is not None:
            previous = self.add_item(item)
            send(p.ItemAdded(previous_item_id=previous, item=item.wire()))

    def _done(self, item: Item, previous: str | None) -> None:
        send = self.transport.send
        send(
            p.OutputItemDone(response_id=self.id, output_index=self._index(item), item=item.wire())
        )
        if self.add_item is not None:
            send(p.ItemDone(previous_item_id=previous, item=item.wire()))

    def _index(self, item: Item) -> int:
        return self.output.index(item)

    def _ids(self, item: Item) -> dict[str, Any]:
        return {"response_id": self.id, "item_id": item.id, "output_index": self._index(item)}

    def stop(self) -> None:
        """Cancel generation and silence the speech; the final chunk follows."""
        self.handle.cancel()
        if self.speech is not None:
            self.speech.cancel()

    @property
    def answer_text(self) -> str:
        return "".join(self.text)

    def send_done(
        self,
        status: ResponseStatus,
        totals: Totals,
        timings: p.Timings | None,
        previous: Callable[[Item], str | None],
        heard: str | None = None,
    ) -> None:
        """The closing events. `heard`: the words the user heard of a spoken answer cut
        short (its item keeps only those); `previous(item)` the item before it."""
        send = self.transport.send
        if self.transcribes is not None:
            self.transcribes.transcript = self.answer_text
            send(
                p.InputTranscriptionCompleted(
                    item_id=self.transcribes.id,
                    transcript=self.answer_text,
                    usage=usage(totals),
                    timings=timings,
                )
            )
            return
        item = self.item
        if item is not None:
            self._close_message(item, status, heard)
            self._done(item, previous(item))
        if status == "completed":
            for call in totals.tool_calls:
                self._call(call, previous)
        reason = "turn_detected" if self.retracted or self.barged_in else "client_cancelled"
        assert self.response is not None
        response = self.response.model_copy(
            update={
                "status": status,
                "status_details": status_details(totals, reason),
                "output": [i.wire() for i in self.output],
                "usage": usage(totals),
            }
        )
        assert timings is not None
        send(p.ResponseDone(response=response, timings=timings))

    def _close_message(self, item: Item, status: ResponseStatus, heard: str | None) -> None:
        send = self.transport.send
        text = self.answer_text
        ids = self._ids(item)
        if self.spoken:
            speech = self.speech
            if speech is not None and speech.first_audio_at is not None:
                send(p.AudioDone(**ids))
            send(p.TranscriptDone(**ids, transcript=text))
            part = {"type": "audio", "transcript": text}
        else:
            send(p.TextDone(**ids, text=text))
            part = {"type": "text", "text": text}
        send(p.ContentPartDone(**ids, part=part))
        item.text = text if heard is None else heard
        item.status = "completed" if status == "completed" else "incomplete"

    def _call(self, call: ToolCall, previous: Callable[[Item], str | None]) -> None:
        item = Item(
            new_id("item"), "function_call", call_id=call.call_id, name=call.name,
            status="in_progress",
        )  # fmt: skip
        self._add(item)
        ids: dict[str, Any] = {
            "response_id": self.id,
            "item_id": item.id,
            "output_index": self._index(item),
            "call_id": call.call_id,
        }
        self.transport.send(p.FunctionCallArgumentsDelta(**ids, delta=call.arguments))
        self.transport.send(
            p.FunctionCallArgumentsDone(**ids, name=call.name, arguments=call.arguments)
        )
        item.arguments = call.arguments
        item.status = "completed"
        self._done(item, previous(item))


def usage(totals: Totals) -> dict[str, Any]:
    """OpenAI's `usage` of a response (input tokens: as many as the engine reports)."""
    prompt = totals.prompt_tokens or 0
    return {
        "type": "tokens",
        "total_tokens": prompt + totals.tokens,
        "input_tokens": prompt,
        "output_tokens": totals.tokens,
        "input_token_details": {"text_tokens": prompt, "audio_tokens": 0, "cached_tokens": 0},
        "output_token_details": {"text_tokens": totals.tokens, "audio_tokens": 0},
    }


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
    transport: p.Transport | None,
    on_error: Callable[[str, str], None],
) -> Speech:
    """The answer `ids` (response, item) spoken; with a `transport`, each phrase is
    announced to the client (`voxtral.output_audio.spoken`) when its first audio leaves."""

    def spoken(phrase: str) -> None:
        if transport is not None:
            transport.send(p.Spoken(response_id=ids[0], item_id=ids[1], delta=phrase))

    return Speech(tts, out, settings, ids, spoken, on_error)
