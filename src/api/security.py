"""Who may talk to the server: the bearer token, the browser Origin check, and the TURN
credentials handed to clients (pure)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ..config import Settings

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
KEY_SUBPROTOCOL = "openai-insecure-api-key."  # how browsers send a key (they cannot set headers)


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


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer ...` header, if any."""
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def subprotocol_token(subprotocols: list[str]) -> str | None:
    """The key a browser put in a WebSocket subprotocol (`openai-insecure-api-key.KEY`)."""
    for proto in subprotocols:
        if proto.startswith(KEY_SUBPROTOCOL):
            return proto[len(KEY_SUBPROTOCOL) :]
    return None


def token_matches(presented: str | None, settings: Settings) -> bool:
    """True when no token is configured, or `presented` is it (constant time)."""
    token = settings.server.auth_token
    if token is None:
        return True
    if presented is None:
        return False
    # Bytes, not str: compare_digest refuses non-ASCII str, and a client may send any.
    return hmac.compare_digest(
        presented.encode("utf-8", "surrogateescape"), token.encode("utf-8", "surrogateescape")
    )


TURN_LABEL = "voxtral"  # the part of a minted TURN username after the expiry time


def turn_credential(secret: str, expires_at: int, label: str = TURN_LABEL) -> tuple[str, str]:
    """coturn's REST-API credential (`use-auth-secret` + `static-auth-secret`): the username
    is `<unix expiry>:<label>`, the password base64(HMAC-SHA1(secret, username)). coturn
    refuses it once the expiry time has passed; a relay already allocated keeps working."""
    username = f"{expires_at}:{label}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def ice_servers(settings: Settings, now: float) -> list[dict[str, Any]]:
    """`webrtc.ice_servers` as RTCIceServer dicts. A server listed without a username gets a
    credential minted from `webrtc.turn_secret`, valid `webrtc.turn_ttl_s` from `now`;
    one with a static username and credential is handed out as configured."""
    w = settings.webrtc
    servers: list[dict[str, Any]] = []
    for server in w.ice_servers:
        entry: dict[str, Any] = server.model_dump(exclude_none=True)
        entry["urls"] = list(server.urls)
        turn = any(url.startswith(("turn:", "turns:")) for url in server.urls)
        if turn and server.username is None and w.turn_secret is not None:
            entry["username"], entry["credential"] = turn_credential(
                w.turn_secret, int(now) + w.turn_ttl_s
            )
        servers.append(entry)
    return servers
