"""coturn (Debian's `turnserver`) on loopback, TCP only, for the TURN tests."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from patience import LineWatcher, NotReady
from servers import free_port


def own_ipv4() -> str:
    """An address of this machine other than loopback (coturn relays from it)."""
    import ifaddr

    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                return ip.ip
    pytest.skip("no non-loopback IPv4 address for the TURN relay")


@contextmanager
def coturn(*auth: str) -> Iterator[int]:
    """coturn on TCP only (no UDP port is assumed on the way to the GPU host) with the
    given authentication options; yields its port. Skips when coturn is not installed and
    fails, naming it, when it does not come up."""
    turnserver = shutil.which("turnserver")
    if turnserver is None:
        pytest.skip("coturn is not installed (apt-get install coturn)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="voxtral-turn-")
    proc = subprocess.Popen(
        [
            turnserver, "-n", "--no-udp", "--no-tls", "--no-dtls", "--no-cli",
            "-L", "127.0.0.1", "-p", str(port), "--relay-ip", own_ipv4(), *auth,
            "--realm", "voxtral",
            "--log-file", "stdout", "--simple-log", "--pidfile", f"{workdir}/turn.pid",
            "--db", f"{workdir}/turndb", "--min-port", "49152", "--max-port", "49999",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    log = LineWatcher(proc.stdout, f"coturn ({turnserver}) on TCP port {port}")  # keeps reading
    try:  # its own word that the listeners are up
        log.wait_for(lambda line: "Total General servers" in line, base_s=20, cap_s=120)
    except NotReady as exc:
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(str(exc), pytrace=False)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
