"""Is a PostgreSQL server answering? A bounded wire-protocol probe.

The probe opens a TCP connection and sends an SSLRequest, the first message of every libpq
connection. The postmaster forks a backend, which answers with one byte ('N' or 'S'); the
probe then closes. A hung server (SIGSTOP, lost host) accepts the TCP connection in the
kernel but never answers, so only an answer within the timeout counts.

Why not libpq's PQping: it waits at least 2 s (connect_timeout below 2 counts as 2) and, as
psycopg calls it, holds the GIL meanwhile (measured: a ping to a hung server froze the whole
agent for 2 s). A full login would answer too, but logs a FATAL line per probe.
"""

import asyncio
import struct
import time
from dataclasses import dataclass

from xcha.names import Endpoint

SSL_REQUEST = struct.pack("!ii", 8, 80877103)


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str
    seconds: float


async def ping(endpoint: Endpoint, timeout: float) -> ProbeResult:
    started = time.monotonic()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
            writer.write(SSL_REQUEST)
            await writer.drain()
            answer = await reader.read(1)
    except TimeoutError:
        return ProbeResult(False, f"no answer within {timeout:.2f} s", time.monotonic() - started)
    except OSError as error:
        return ProbeResult(False, f"cannot connect: {error.strerror or error}", time.monotonic() - started)
    finally:
        if writer is not None:
            writer.close()
    seconds = time.monotonic() - started
    if answer in (b"N", b"S", b"E"):
        return ProbeResult(True, "answers", seconds)
    return ProbeResult(False, "closed the connection without an answer", seconds)
