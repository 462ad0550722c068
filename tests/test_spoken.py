"""What the user heard of an answer: the spoken timeline (which words each stretch of audio
carries, how much went out) and the WebRTC track's output_audio_buffer events."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import numpy as np
import pytest
from fakes import FakeTransport

from voxtral_server.api.speech import OnStart, SampleQueue, Speech
from voxtral_server.api.spoken import SpokenTimeline
from voxtral_server.config import TtsSettings

RATE = 16_000
LEAD, TRAIL = 160, 4800  # silence around each phrase (espeak-ng: up to 300 ms after)
PER_WEIGHT = 800  # loud samples per character of a word, plus one per word (50 ms)
CHUNK = 1600  # the fake engine's chunk: 100 ms


def loud(n: int) -> np.ndarray:
    return np.full(n, 8000, np.int16)


def quiet(n: int) -> np.ndarray:
    return np.zeros(n, np.int16)


def weight(text: str) -> int:
    """The timeline's measure of a phrase: characters of its words plus one per word."""
    return sum(len(w) + 1 for w in text.split())


def phrase_audio(text: str) -> np.ndarray:
    """A phrase as the fake engine says it: silence, one loud stretch as long as its words
    take, silence."""
    return np.concatenate([quiet(LEAD), loud(weight(text) * PER_WEIGHT), quiet(TRAIL)])


def ms(samples: float) -> float:
    return samples * 1000 / RATE


def laid_out(*phrases: str) -> SpokenTimeline:
    timeline = SpokenTimeline(RATE)
    for text in phrases:
        timeline.begin(text)
        timeline.extend(phrase_audio(text))
        timeline.close()
    return timeline


HELLO, FOX = "Hello world, ", "the quick brown fox jumps over the lazy dog."
HELLO_LEN = phrase_audio(HELLO).size


def test_text_until_before_in_and_after_each_phrase() -> None:
    t = laid_out(HELLO, FOX)
    fox_voice = HELLO_LEN + LEAD  # where FOX's first word starts sounding
    assert t.text_until(0) == ""
    assert t.text_until(ms(LEAD)) == ""  # the leading silence carries no word
    # "Hello" is 6 of HELLO's 13 weights: heard once its middle (3 weights in) has played.
    assert t.text_until(ms(LEAD + 3 * PER_WEIGHT - 1)) == ""
    assert t.text_until(ms(LEAD + 3 * PER_WEIGHT + 1)) == "Hello "
    assert t.text_until(ms(LEAD + 6 * PER_WEIGHT)) == "Hello "
    # Its last word's middle reached: the whole phrase, though its silence still plays.
    assert t.text_until(ms(LEAD + 10 * PER_WEIGHT)) == HELLO
    assert t.text_until(ms(HELLO_LEN)) == HELLO
    assert t.text_until(ms(fox_voice + 2 * PER_WEIGHT + 1)) == HELLO + "the "
    assert t.text_until(ms(fox_voice + 7 * PER_WEIGHT - 1)) == HELLO + "the "
    assert t.text_until(ms(fox_voice + 7 * PER_WEIGHT + 1)) == HELLO + "the quick "
    assert t.text_until(t.duration_ms) == HELLO + FOX
    assert t.text_until(ms(t.samples) + 5000) == HELLO + FOX  # past the end: all of it


def test_the_text_heard_only_grows_and_is_always_a_prefix() -> None:
    t = laid_out(HELLO, FOX, " Yes.")
    heard = [t.text_until(m) for m in np.arange(0, t.duration_ms + 20, 7.0)]
    assert all(t.text.startswith(h) for h in heard)
    assert all(len(a) <= len(b) for a, b in zip(heard, heard[1:], strict=False))
    assert len(set(heard)) == len(t.text.split()) + 1  # each word in turn, none skipped


def test_duration_is_exact_to_the_sample() -> None:
    t = SpokenTimeline(24_000)
    t.begin("Hi.")
    t.extend(loud(24_001))
    t.extend(quiet(0))
    assert t.samples == 24_001
    assert t.duration_ms == 24_001 / 24  # 1000.0416..., not rounded either way
    with pytest.raises(ValueError, match="audio_end_ms"):
        t.text_until(-1)


def test_a_phrase_cut_short_is_heard_at_the_pace_of_the_answer() -> None:
    t = laid_out(HELLO)
    t.begin(FOX)
    t.extend(phrase_audio(FOX)[: LEAD + 7 * PER_WEIGHT + 100])  # cancelled mid-"quick"
    # Laid over what it would have lasted at HELLO's pace, not over the audio it got: the
    # audio produced reached "quick"'s middle, not "brown"'s.
    assert t.text_until(t.duration_ms) == HELLO + "the quick "
    assert t.text_until(ms(HELLO_LEN + LEAD + 6 * PER_WEIGHT)) == HELLO + "the "


def test_heard_is_what_was_sent_less_what_the_client_has_not_played() -> None:
    t = laid_out(HELLO)
    assert t.heard_ms(0) == 0
    t.sent(4000)
    assert t.heard_ms(0) == 250 and t.heard_ms(100.5) == 149
    assert t.heard_ms(1000) == 0  # never negative
    t.sent(HELLO_LEN)  # more than produced (cannot happen): still within the audio
    assert t.heard_ms(0) == int(t.duration_ms)


def test_the_queue_counts_the_samples_it_sends_of_each_answer() -> None:
    first, second = SpokenTimeline(RATE), SpokenTimeline(RATE)
    queue = SampleQueue()
    queue.write(loud(500), ("r1", "i1"), None, first)
    queue.write(loud(300), ("r2", "i2"), None, second)
    assert queue.next_ids == ("r1", "i1")
    assert queue.take(400)[1] == ("r1", "i1")
    assert queue.take(400)[0].size == 100  # one piece never mixes two responses
    assert (first.sent_samples, second.sent_samples) == (500, 0)
    queue.take(100)
    assert queue.clear() == ("r2", "i2")  # what was dropped, and whose
    assert second.sent_samples == 100 and queue.clear() is None


class ScriptedTts:
    """Speaks each phrase as `phrase_audio`, in CHUNK pieces, at the out's rate."""

    name = "scripted"
    sample_rate = RATE

    def stream(self, text: str) -> Iterator[np.ndarray]:
        pcm = phrase_audio(text)
        for start in range(0, pcm.size, CHUNK):
            yield pcm[start : start + CHUNK]

    def close(self) -> None:
        pass


class InstantOut:
    """An audio out that sends whatever it is given at once; `cut_at` cancels the speech
    once the answer's audio reaches that many samples."""

    rate = RATE

    def __init__(self, cut_at: int | None = None) -> None:
        self.written: list[np.ndarray] = []
        self.finished: list[str] = []
        self.speech: Speech | None = None
        self.cut_at = cut_at

    def write(
        self,
        pcm: np.ndarray,
        ids: tuple[str, str],
        on_start: OnStart | None,
        timeline: SpokenTimeline | None = None,
    ) -> None:
        self.written.append(pcm)
        if on_start is not None:
            on_start()
        if timeline is not None:
            timeline.sent(pcm.size)
            if self.cut_at is not None and timeline.samples >= self.cut_at:
                assert self.speech is not None
                self.speech.cancel()

    def finish(self, response_id: str) -> None:
        self.finished.append(response_id)

    def clear(self) -> bool:
        return False

    def unplayed_ms(self) -> float:
        return 0.0

    async def drained(self) -> None:
        pass


def speak(out: InstantOut, text: str) -> Speech:
    """`text` spoken word by word (two phrases: up to the comma, then the rest)."""
    settings = TtsSettings(first_phrase_min_words=2, phrase_min_words=4)

    def failed(code: str, message: str) -> None:
        raise AssertionError(f"speech failed: {code}: {message}")

    speech = Speech(ScriptedTts(), out, settings, ("resp_1", "item_1"), lambda _: None, failed)
    out.speech = speech
    for word in re.findall(r"\S+\s*", text):
        speech.add(word)
    speech.end()
    return speech


@pytest.mark.asyncio
async def test_speech_lays_its_phrases_on_the_audio_it_writes() -> None:
    out = InstantOut()
    speech = speak(out, HELLO + FOX)
    assert await speech.finished()
    t = speech.timeline
    assert t.samples == sum(pcm.size for pcm in out.written)  # exact: what the client got
    assert t.duration_ms == t.samples * 1000 / RATE
    assert t.text == "".join(speech.spoken) == HELLO + FOX
    assert t.text_until(ms(HELLO_LEN)) == HELLO  # the first phrase's audio ends there
    assert t.text_until(ms(HELLO_LEN + LEAD + 2 * PER_WEIGHT)) == HELLO + "the "
    assert speech.heard_ms() == int(t.duration_ms)  # all of it went out, none unplayed
    assert out.finished == ["resp_1"]


@pytest.mark.asyncio
async def test_a_cancelled_answer_keeps_the_words_its_audio_reached() -> None:
    out = InstantOut(cut_at=HELLO_LEN + 3 * CHUNK)  # into "quick": 4800 samples of FOX
    speech = speak(out, HELLO + FOX)
    assert not await speech.finished()
    await speech.task
    t = speech.timeline
    assert t.samples == HELLO_LEN + 3 * CHUNK == sum(pcm.size for pcm in out.written)
    assert t.text == HELLO + FOX  # begun, not all spoken
    assert t.text_until(t.duration_ms) == HELLO + "the "
    assert out.finished == []  # a cancelled answer is cleared, never finished


class TrackEvents:
    """A speech track whose output_audio_buffer events (and phrase starts) are logged."""

    def __init__(self) -> None:
        from voxtral_server.api.transports.audio_track import SpeechTrack

        self.transport = FakeTransport()
        self.track = SpeechTrack(self.transport.send)

    def phrase(self, name: str) -> OnStart:
        return lambda: self.transport.events.append({"type": "phrase", "response_id": name})

    @property
    def log(self) -> list[tuple[str, str]]:
        return [(e["type"].split(".")[-1], e["response_id"]) for e in self.transport.events]

    async def frames(self, n: int) -> list[bool]:
        """The next `n` frames: True for each that carries speech."""
        return [bool((await self.track.recv()).to_ndarray().any()) for _ in range(n)]


FRAME = 960  # 20 ms at 48 kHz


@pytest.mark.asyncio
async def test_the_track_announces_an_answer_started_then_stopped() -> None:
    t = TrackEvents()
    try:
        t.track.write(loud(2 * FRAME), ("r1", "i1"), t.phrase("r1"))
        t.track.write(loud(FRAME // 2), ("r1", "i1"), None)
        assert t.log == []  # nothing went out yet
        assert await t.frames(2) == [True, True]
        assert t.log == [("started", "r1"), ("phrase", "r1")]  # started before its words
        t.track.finish("r1")
        assert await t.frames(1) == [True]  # the last half frame
        assert t.log[-1] == ("phrase", "r1")  # it is still playing
        assert await t.frames(1) == [False]
        assert t.log[2:] == [("stopped", "r1")]
        # An answer written while the previous one's last frame plays: stopped, then started.
        t.track.write(loud(FRAME), ("r2", "i2"), None)
        t.track.finish("r2")
        t.track.write(loud(FRAME), ("r3", "i3"), None)
        await t.frames(3)
        assert t.log[3:] == [("started", "r2"), ("stopped", "r2"), ("started", "r3")]
        assert not t.track.clear()  # nothing dropped: r3 was not finished, so cut short
        assert t.log[6:] == [("cleared", "r3")]
    finally:
        t.track.stop()
    # The OpenAI SDK reads them as its own events.
    from openai.types.realtime.realtime_server_event import RealtimeServerEvent
    from pydantic import TypeAdapter

    sdk: TypeAdapter[RealtimeServerEvent] = TypeAdapter(RealtimeServerEvent)
    for event in t.transport.events:
        if event["type"] != "phrase":
            assert sdk.validate_python(event).model_dump(exclude_none=True) == event


@pytest.mark.asyncio
async def test_the_track_announces_audio_cleared_by_a_barge_in() -> None:
    t = TrackEvents()
    try:
        assert not t.track.clear() and t.log == []  # nothing playing, nothing to say
        t.track.write(loud(10 * FRAME), ("r1", "i1"), None)
        await t.frames(1)
        assert t.track.clear()  # 9 frames dropped
        assert t.log == [("started", "r1"), ("cleared", "r1")]
        assert await t.frames(2) == [False, False]
        assert t.log[2:] == []  # once cleared, never stopped
        # Queued but not yet sent when dropped: a lone cleared names the response.
        t.track.write(loud(FRAME), ("r2", "i2"), None)
        assert t.track.clear()
        assert t.log[2:] == [("cleared", "r2")]
        # All of it sent and finished, its last frame playing: it simply stops.
        t.track.write(loud(FRAME), ("r3", "i3"), None)
        t.track.finish("r3")
        await t.frames(1)
        assert not t.track.clear()
        assert t.log[3:] == [("started", "r3"), ("stopped", "r3")]
    finally:
        t.track.stop()


@pytest.mark.asyncio
async def test_the_websocket_out_counts_what_it_sent_ahead_as_unplayed() -> None:
    from voxtral_server.api.audio_formats import PCM16K
    from voxtral_server.api.speech import WebSocketAudioOut

    transport = FakeTransport()
    out = WebSocketAudioOut(transport.send, lambda: PCM16K, lead_s=0.25)
    timeline = SpokenTimeline(RATE)
    timeline.begin("Hi.")
    timeline.extend(loud(RATE))  # 1 s of audio
    loop = asyncio.get_running_loop()
    try:
        assert out.unplayed_ms() == 0
        began = loop.time()
        out.write(loud(RATE), ("r1", "i1"), None, timeline)
        # The pump sends at once up to its lead: the client holds that much, unplayed.
        await transport.wait_for("response.output_audio.delta", count=7)
        unplayed, elapsed_ms = out.unplayed_ms(), (loop.time() - began) * 1000
        assert timeline.sent_ms - elapsed_ms <= unplayed <= (out.lead_s + out.PIECE_S) * 1000
        # Never more heard than the time the client has had to play it.
        assert timeline.heard_ms(unplayed) <= elapsed_ms
        assert out.clear() and not out.clear()
        assert transport.of("output_audio_buffer.cleared") == []  # WebRTC only
    finally:
        await out.close()
