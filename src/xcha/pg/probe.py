"""Is a PostgreSQL server answering? libpq's own PQping (what pg_isready uses), bounded.

libpq waits at least 2 s for a connection (connect_timeout below 2 counts as 2), and a hung
server accepts the TCP connection but never answers, so the ping runs in a worker thread
and the caller stops waiting after its own timeout. At most one ping per target is in flight:
while an earlier one still hangs, the target counts as not answering.
"""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from psycopg import pq
from psycopg.conninfo import make_conninfo

from xcha.names import Endpoint

_executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="xcha-ping")
_in_flight: dict[Endpoint, asyncio.Future[int]] = {}

PING_MEANING = {0: "accepting connections", 1: "rejecting connections", 2: "no response", 3: "no attempt"}


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str
    seconds: float


def _ping(conninfo: bytes) -> int:
    return int(pq.PGconn.ping(conninfo))


async def ping(endpoint: Endpoint, timeout: float) -> ProbeResult:
    """ok when the postmaster answers (accepting, or rejecting because it is starting up or
    shutting down): the server is alive. Not ok on refusal, silence or timeout."""
    started = time.monotonic()
    pending = _in_flight.get(endpoint)
    if pending is not None and not pending.done():
        return ProbeResult(False, "no answer (an earlier probe is still waiting)", 0.0)
    conninfo = make_conninfo(
        "",
        host=endpoint.host,
        port=endpoint.port,
        dbname="postgres",
        user="xcha_probe",
        connect_timeout=2,
        sslmode="disable",
    )
    future = asyncio.get_running_loop().run_in_executor(_executor, _ping, conninfo.encode())
    _in_flight[endpoint] = future
    try:
        code = await asyncio.wait_for(asyncio.shield(future), timeout)
    except TimeoutError:
        return ProbeResult(False, f"no answer within {timeout:.2f} s", time.monotonic() - started)
    seconds = time.monotonic() - started
    return ProbeResult(code in (0, 1), PING_MEANING.get(code, f"ping code {code}"), seconds)
