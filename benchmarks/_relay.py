"""An impairing UDP relay between two aiortc peers on one machine (no netem needed).

Each peer's SDP gets its ICE candidates replaced by one relay socket, so the peers can only
reach each other through the relay: the client's only remote candidate is `client_side`,
the server's is `server_side`. The relay forwards both ways and passes what the client
sends as RTP (the microphone audio, not STUN, DTLS, RTCP or the data channel) through an
`Impairment` once `warmup_packets` have gone through clean (so ICE, DTLS and the first
RTP timestamp are never disturbed).

    relay = Relay(Impairment(loss=0.02))
    await relay.start(host)
    offer = relay.offer_for_server(pc.localDescription.sdp)
    answer = relay.answer_for_client(reply_sdp)
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass
from typing import Any

_CANDIDATE = re.compile(r"^a=candidate:\S+ 1 udp \d+ (\d+\.\d+\.\d+\.\d+) (\d+) typ host", re.M)


@dataclass(frozen=True)
class Impairment:
    """What happens to each client->server RTP packet (independently, seeded).

    loss: probability it is dropped. reorder: probability it is held back `reorder_ms`
    (so the next one overtakes it). jitter_ms: an extra delay uniform in [0, jitter_ms],
    first in first out, as a queue on the path would add.
    """

    name: str = "clean"
    loss: float = 0.0
    reorder: float = 0.0
    reorder_ms: float = 30.0
    jitter_ms: float = 0.0
    seed: int = 1


def _only_candidate(sdp: str, host: str, port: int) -> str:
    """`sdp` with every candidate line replaced by one host candidate at host:port per
    media section."""
    lines, seen = [], False
    for line in sdp.splitlines():
        if line.startswith("m="):
            seen = False
        if line.startswith("a=candidate:"):
            if not seen:
                lines.append(f"a=candidate:1 1 udp 2130706431 {host} {port} typ host")
                seen = True
            continue
        lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _address(sdp: str) -> tuple[str, int]:
    match = _CANDIDATE.search(sdp)
    if match is None:
        raise ValueError("no IPv4 UDP host candidate in the SDP")
    return match.group(1), int(match.group(2))


def _is_rtp(data: bytes) -> bool:
    # SRTP (first byte 128-191), not SRTCP (payload types 200-204 in the second byte).
    return len(data) > 1 and 127 < data[0] < 192 and not 192 <= data[1] <= 223


class _Side(asyncio.DatagramProtocol):
    def __init__(self, forward: Any) -> None:
        self.forward = forward
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.forward(data)


class Relay:
    def __init__(self, impairment: Impairment = Impairment(), warmup_packets: int = 50) -> None:
        self.impairment = impairment
        self.warmup_packets = warmup_packets
        self._random = random.Random(impairment.seed)
        self.client: tuple[str, int] | None = None  # the client's real address
        self.server: tuple[str, int] | None = None  # the server's real address
        self.rtp_seen = 0
        self.dropped = 0
        self.reordered = 0
        self._last_departure = 0.0

    @staticmethod
    def host_of(sdp: str) -> str:
        """The address of the SDP's IPv4 host candidate: where the relay can listen too."""
        return _address(sdp)[0]

    async def start(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._client_side, _ = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_client), local_addr=(host, 0)
        )
        self._server_side, _ = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_server), local_addr=(host, 0)
        )
        self.host = host

    def offer_for_server(self, offer: str) -> str:
        """The client's offer, as the server must see it: the relay's server side only."""
        self.client = _address(offer)
        return _only_candidate(offer, self.host, self._server_side.get_extra_info("sockname")[1])

    def answer_for_client(self, answer: str) -> str:
        """The server's answer, as the client must see it: the relay's client side only."""
        self.server = _address(answer)
        return _only_candidate(answer, self.host, self._client_side.get_extra_info("sockname")[1])

    def close(self) -> None:
        self._client_side.close()
        self._server_side.close()

    def _from_server(self, data: bytes) -> None:
        if self.client is not None:
            self._client_side.sendto(data, self.client)

    def _from_client(self, data: bytes) -> None:
        if self.server is None:
            return
        if not _is_rtp(data):
            self._server_side.sendto(data, self.server)
            return
        self.rtp_seen += 1
        if self.rtp_seen <= self.warmup_packets:
            self._server_side.sendto(data, self.server)
            return
        imp, rng = self.impairment, self._random
        if rng.random() < imp.loss:
            self.dropped += 1
            return
        now = self._loop.time()
        departure = now
        if imp.jitter_ms:
            # Strictly after the previous one: timers due at the same time may run in any order.
            departure = max(now + rng.uniform(0, imp.jitter_ms) / 1000, self._last_departure + 1e-6)
            self._last_departure = departure
        if rng.random() < imp.reorder:
            self.reordered += 1
            departure = now + imp.reorder_ms / 1000
        if departure <= now:
            self._server_side.sendto(data, self.server)
        else:
            self._loop.call_at(departure, self._send_late, data)

    def _send_late(self, data: bytes) -> None:
        if not self._server_side.is_closing():  # the call may have ended meanwhile
            self._server_side.sendto(data, self.server)
