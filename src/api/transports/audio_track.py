"""The server-to-browser audio track of a WebRTC call: speech in 20 ms frames at 48 kHz.

aiortc's sender pulls frames with `recv()` as fast as it returns them, so the track paces
itself on the clock, like aiortc's own `AudioStreamTrack`. Between answers it sends silence,
so the browser's jitter buffer and the Opus stream stay steady and an answer's first word is
not clipped. `clear()` (barge-in) drops everything queued: the next frame, at most 20 ms
later, is silence.
"""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from ..speech import OnStart, SampleQueue

TRACK_RATE = 48_000
FRAME_MS = 20
FRAME_SAMPLES = TRACK_RATE * FRAME_MS // 1000
_TIME_BASE = fractions.Fraction(1, TRACK_RATE)


class SpeechTrack(MediaStreamTrack):  # type: ignore[misc]
    kind = "audio"
    rate = TRACK_RATE

    def __init__(self) -> None:
        super().__init__()
        self._queue = SampleQueue()
        self._started_at: float | None = None
        self._pts = 0
        # perf_counter when a frame with speech first / last left (for logs and tests)
        self.first_speech_at: float | None = None
        self.last_speech_at: float | None = None

    # ----------------------------------------------------------------- AudioOut

    def write(self, pcm: np.ndarray, ids: tuple[str, str], on_start: OnStart | None) -> None:
        self._queue.write(pcm, ids, on_start)

    def clear(self) -> None:
        self._queue.clear()

    async def drained(self) -> None:
        await self._queue.drained.wait()

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
