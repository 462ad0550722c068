"""The server-to-browser audio track of a WebRTC call: speech in 20 ms frames at 48 kHz.

aiortc's sender pulls frames with `recv()` as fast as it returns them, so the track paces
itself on the clock, like aiortc's own `AudioStreamTrack`. Between answers it sends silence,
so the browser's jitter buffer and the Opus stream stay steady and an answer's first word is
not clipped. `clear()` (barge-in) drops everything queued: the next frame, at most 20 ms
later, is silence.

It announces each response's audio on the events channel, as OpenAI's WebRTC calls do:
`output_audio_buffer.started` as the response's first frame goes out (before the first
phrase's transcript delta), `output_audio_buffer.stopped` one frame after its last samples
went out (they have played by then) once `finish()` said no more will come, and
`output_audio_buffer.cleared` when `clear()` cuts it short (samples dropped, or more were
still to come). Every `started` is followed by exactly one `stopped` or `cleared`; a response
whose queued audio is dropped before any of it went out gets a lone `cleared`.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections.abc import Callable

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from .. import protocol as p
from ..speech import OnStart, SampleQueue
from ..spoken import SpokenTimeline

TRACK_RATE = 48_000
FRAME_MS = 20
FRAME_SAMPLES = TRACK_RATE * FRAME_MS // 1000
_TIME_BASE = fractions.Fraction(1, TRACK_RATE)


class SpeechTrack(MediaStreamTrack):  # type: ignore[misc]
    kind = "audio"
    rate = TRACK_RATE

    def __init__(self, send: Callable[[p.ServerEvent], None]) -> None:
        super().__init__()
        self._send = send  # output_audio_buffer.* events, to the call's events channel
        self._queue = SampleQueue()
        self._playing: str | None = None  # the response whose audio is going out
        self._finished: str | None = None  # the last response all of whose audio is written
        self._started_at: float | None = None
        self._pts = 0
        # perf_counter when a frame with speech first / last left (for logs and tests)
        self.first_speech_at: float | None = None
        self.last_speech_at: float | None = None

    # ----------------------------------------------------------------- AudioOut

    def write(
        self,
        pcm: np.ndarray,
        ids: tuple[str, str],
        on_start: OnStart | None,
        timeline: SpokenTimeline | None = None,
    ) -> None:
        self._queue.write(pcm, ids, on_start, timeline)

    def finish(self, response_id: str) -> None:
        self._finished = response_id

    def clear(self) -> bool:
        dropped = self._queue.clear()
        playing, self._playing = self._playing, None
        cut = playing if playing is not None else dropped[0] if dropped is not None else None
        if cut is not None:
            if dropped is None and cut == self._finished:  # all of it went out: it ends
                self._send(p.OutputAudioBufferStopped(response_id=cut))
            else:
                self._send(p.OutputAudioBufferCleared(response_id=cut))
        return dropped is not None

    def unplayed_ms(self) -> float:
        # Sent at real time: the frame just sent is playing. The browser's jitter buffer
        # (tens of ms) is not known here.
        return 0.0

    async def drained(self) -> None:
        await self._queue.drained.wait()

    def _announce(self) -> None:
        """Events due before the next frame: the previous frame has played by now."""
        playing, upcoming = self._playing, self._queue.next_ids
        if playing is not None and upcoming is None and playing == self._finished:
            self._send(p.OutputAudioBufferStopped(response_id=playing))
            self._playing = None
        elif upcoming is not None and upcoming[0] != playing:
            if playing is not None:  # its audio all went out before this one's
                self._send(p.OutputAudioBufferStopped(response_id=playing))
            self._playing = upcoming[0]
            self._send(p.OutputAudioBufferStarted(response_id=upcoming[0]))

    # ----------------------------------------------------------------- aiortc

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._started_at is None:
            self._started_at = now
        else:
            wait = self._started_at + self._pts / TRACK_RATE - now
            if wait > 0:
                await asyncio.sleep(wait)  # real-time pacing, as aiortc's AudioStreamTrack
        self._announce()
        speech, _ids = self._queue.take(FRAME_SAMPLES)
        if speech.size:
            self.last_speech_at = time.perf_counter()
            if self.first_speech_at is None:
                self.first_speech_at = self.last_speech_at
        samples = np.zeros(FRAME_SAMPLES, np.int16)  # silence between and after answers
        samples[: speech.size] = speech
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = TRACK_RATE
        frame.pts = self._pts
        frame.time_base = _TIME_BASE
        self._pts += FRAME_SAMPLES
        return frame
