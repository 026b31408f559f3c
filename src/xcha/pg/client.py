"""Client-side deadlines for talking to a server that may hang.

A hung server (SIGSTOP, lost host) accepts TCP and then says nothing. Cancelling a psycopg
query makes psycopg send a cancel request and wait for it (up to 10 s); past a deadline
xcha shuts the connection's socket down instead, which a hung server cannot delay.
"""

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable
from typing import TypeVar

import psycopg

T = TypeVar("T")
Conn = psycopg.AsyncConnection[tuple[object, ...]]


async def bounded(conn: Conn, operation: Awaitable[T], timeout: float) -> T:
    """Await operation on conn; past timeout, shut the connection's socket down and raise
    TimeoutError (conn is unusable afterwards; close it).

    The socket is shut down rather than the libpq connection finished: the suspended query
    still holds libpq's connection, and freeing it under the query corrupts memory. With its
    socket shut down, libpq fails the query by itself, without a cancel request. The same
    happens when the caller is cancelled."""
    task = asyncio.ensure_future(operation)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        await _abandon(conn, task)
        raise
    if task in done:
        return task.result()
    await _abandon(conn, task)
    raise TimeoutError(f"no answer within {timeout:.2f} s")


def _shut_down(conn: Conn) -> None:
    """End the connection at the socket: whatever waits on it fails at once."""
    with (
        contextlib.suppress(OSError, psycopg.Error),
        socket.socket(fileno=os.dup(conn.pgconn.socket)) as duplicate,
    ):
        duplicate.shutdown(socket.SHUT_RDWR)


async def close(conn: Conn, timeout: float = 2.0) -> None:
    """Close conn, also while another task's query is suspended on it (psycopg's close frees
    libpq's connection under such a query): shut the socket down so that query ends, wait
    until it lets go of the connection, then close. A query that never lets go keeps the
    connection (leaked rather than freed under it)."""
    if conn.closed:
        return
    _shut_down(conn)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout), conn.lock:
            await conn.close()


async def _abandon(conn: Conn, task: "asyncio.Future[T]") -> None:
    """End a query that must not be waited for, and wait until it has let go of libpq."""
    _shut_down(conn)
    finished, _ = await asyncio.wait({task}, timeout=1.0)
    if not finished:
        task.cancel()
    with contextlib.suppress(BaseException):
        await task


async def connect(conninfo: str, timeout: float, **options: object) -> Conn:
    """A connection attempt bounded by timeout (libpq's connect_timeout cannot go below 2 s)."""
    return await asyncio.wait_for(psycopg.AsyncConnection.connect(conninfo, **options), timeout)  # type: ignore[arg-type]
