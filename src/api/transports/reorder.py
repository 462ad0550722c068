"""Incoming RTP audio put back in order, each packet released as soon as it can be.

aiortc's `JitterBuffer` (1.16) releases a frame only once the next packet has arrived
(prefetch 0) or `prefetch` frames more, one frame per packet added: a packet that is lost,
or late, stalls the audio until the buffer overflows, and the stall never drains (measured
in benchmarks/jitter.py: 2% loss kept every later frame ~260 ms late). This buffer releases
a packet the moment every packet before it has arrived, waits behind a missing one only
until `window` later packets have come, then gives it up (the decoder conceals it), and
releases everything that was waiting at once.

It stands in for the receiver's jitter buffer through the same `add(packet)`, which can
return one frame; any further frames ready at the same time wait in `ready`, which the
decoder drains (`audio_in.DirectDecoder`). Frame timestamps count from the first packet
(aiortc's TimestampMapper then leaves them as they are) and never wrap.
"""

from __future__ import annotations

from collections import deque

from aiortc.jitterbuffer import JitterFrame
from aiortc.rtp import RtpPacket

MAX_WINDOW = 32
# A packet further behind or ahead than this starts a new stream (the sender restarted);
# RFC 3550's A.1 uses the same bounds.
MAX_MISORDER = 100
MAX_DROPOUT = 3000


def _unwrap(value: int, near: int, bits: int) -> int:
    """The integer congruent to `value` modulo 2**bits that is closest to `near`."""
    span = 1 << bits
    return near + (value - near + span // 2) % span - span // 2


class ReorderBuffer:
    """Packets in sequence order; a gap waits for at most `window` packets behind it."""

    def __init__(self, window: int) -> None:
        if not 0 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be 0 to {MAX_WINDOW}, got {window}")
        self.window = window
        self.ready: deque[JitterFrame] = deque()
        self.late = 0  # packets that came after their turn (dropped)
        self.given_up = 0  # packets never received in time (the decoder conceals them)
        self._next: int | None = None  # the sequence number due next (unwrapped)
        self._waiting: dict[int, JitterFrame] = {}
        self._first_timestamp = 0
        self._last_timestamp = 0

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        """(False: no picture to ask for, the first frame now ready or None)."""
        if self._next is None:
            self._next = packet.sequence_number
            self._first_timestamp = packet.timestamp
        seq = _unwrap(packet.sequence_number, self._next, 16)
        if not self._next - MAX_MISORDER <= seq <= self._next + MAX_DROPOUT:
            self._restart(seq, packet.timestamp)
        if seq < self._next or seq in self._waiting:
            self.late += 1
        else:
            timestamp = _unwrap(packet.timestamp - self._first_timestamp, self._last_timestamp, 32)
            self._last_timestamp = max(self._last_timestamp, timestamp)  # the newest so far
            data: bytes = packet._data  # set by the receiver (depayloaded)
            self._waiting[seq] = JitterFrame(data=data, timestamp=timestamp)
            self._release()
        return False, self.ready.popleft() if self.ready else None

    def _restart(self, seq: int, timestamp: int) -> None:
        """A new stream: what waits goes out, and its timestamps go on after the last."""
        for waiting in sorted(self._waiting):
            self.ready.append(self._waiting.pop(waiting))
        self._next = seq
        self._first_timestamp = timestamp - self._last_timestamp - 1

    def _release(self) -> None:
        assert self._next is not None
        while self._waiting:
            frame = self._waiting.pop(self._next, None)
            if frame is not None:
                self.ready.append(frame)
                self._next += 1
            elif len(self._waiting) > self.window:
                first = min(self._waiting)  # waited long enough: give the gap up
                self.given_up += first - self._next
                self._next = first
            else:
                return
