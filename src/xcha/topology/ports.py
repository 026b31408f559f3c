"""Free loopback ports for a deployment on one machine."""

import secrets
import socket
from pathlib import Path

from xcha.errors import XchaError

_handed_out: set[int] = set()


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port(count: int = 1) -> int:
    """First of `count` consecutive loopback ports that are free now and were never handed out
    by this process. They lie outside the kernel's ephemeral range: a port taken from there can
    become some client connection's local port before its server binds it."""
    ephemeral = _ephemeral_ports()
    if ephemeral.start > 25000:
        low, high = 20000, ephemeral.start - count
    else:
        low, high = ephemeral.stop, 65535 - count
    for _ in range(1000):
        start = low + secrets.randbelow(high - low + 1)
        block = range(start, start + count)
        if _handed_out.isdisjoint(block) and all(map(_bindable, block)):
            _handed_out.update(block)
            return block.start
    raise XchaError(f"no {count} free consecutive loopback port(s) found in {low}-{high}")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
