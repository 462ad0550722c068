"""TLS for `serve`: the certificate and key uvicorn serves with, checked before it starts.

uvicorn takes `ssl_certfile` / `ssl_keyfile` itself; what this adds is an error an operator
can act on (which file, and what is wrong with it) instead of a traceback from deep inside
the server's start-up.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from ..config import ServerSettings


class TlsError(ValueError):
    """The TLS files cannot be used; the message names the file and why."""


def tls_options(server: ServerSettings) -> dict[str, Any]:
    """uvicorn's `ssl_certfile` / `ssl_keyfile` for `server.tls_cert` / `server.tls_key`
    (empty: plain HTTP), or TlsError."""
    cert, key = server.tls_cert, server.tls_key
    if cert is None or key is None:  # config validation allows both or neither
        return {}
    for what, path in (("certificate (server.tls_cert)", cert), ("key (server.tls_key)", key)):
        try:
            Path(path).read_bytes()
        except FileNotFoundError:
            raise TlsError(f"TLS {what} {path}: no such file") from None
        except OSError as exc:
            raise TlsError(f"TLS {what} {path}: cannot read it ({exc.strerror})") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsError(
            f"TLS certificate {cert} and key {key} cannot be used together: "
            f"{exc.reason or exc} (both must be PEM, the key unencrypted and matching)"
        ) from None
    return {"ssl_certfile": cert, "ssl_keyfile": key}
