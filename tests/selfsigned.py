"""A self-signed certificate for 127.0.0.1, made with the openssl command line, for tests
that need `wss://` (the npm openai SDK connects with nothing else)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

DAYS = 2  # a test run's certificate; nothing keeps it


def openssl_missing() -> str | None:
    """Why a certificate cannot be made here, or None."""
    return None if shutil.which("openssl") else "the openssl command is not installed"


def make_cert(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """(certificate, key) PEM files for `host` (an IP address), valid for DAYS days. The
    certificate is its own CA: a client trusts it by adding it to its CA list
    (NODE_EXTRA_CA_CERTS for node, `ssl.create_default_context(cafile=...)` for Python)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            str(DAYS),
            "-subj",
            f"/CN={host}",
            "-addext",
            f"subjectAltName=IP:{host}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key
