"""A writer that inserts unique ids and remembers which commits were acknowledged.

It is the judge of "nothing lost": every id it saw committed must be on the surviving
master(s) afterwards, and no id may be there that it never sent. It also measures the
write gap of a failover: from the fault to the first acknowledged insert after the first
failed one (an insert already in flight can be acknowledged just after the fault).
"""

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from xcha.coordinator import SHARDED_TABLE, shard_table
from xcha.errors import XchaError
from xcha.pg.client import bounded, close, connect


@dataclass
class Outcome:
    acknowledged: int
    present: int
    lost: list[int]
    unexpected: list[int]

    @property
    def ok(self) -> bool:
        return not self.lost and not self.unexpected


@dataclass
class Writer:
    """Inserts ids (1, 2, 3, ... or the given ones, then what `refill` gives when they run out)
    into `table` through whichever of `conninfos` accepts writes."""

    conninfos: list[str]
    table: str = SHARDED_TABLE
    interval: float = 0.01
    attempt_timeout: float = 0.3
    statement_timeout: float = 0.5  # a client that gives up on a statement after 0.5 s
    sent: set[int] = field(default_factory=set)
    acknowledged: dict[int, float] = field(default_factory=dict)
    failures: list[tuple[float, str]] = field(default_factory=list)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    refill: Callable[[], Awaitable[Iterable[int]]] | None = None
    error: str = ""  # why run() ended early, if it did
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None

    async def _writable(self, conninfo: str) -> psycopg.AsyncConnection[tuple[object, ...]]:
        conn = await connect(conninfo, self.attempt_timeout, autocommit=True)
        try:
            cur = await bounded(conn, conn.execute("SELECT pg_is_in_recovery()"), self.attempt_timeout)
            row = await cur.fetchone()
            if row is not None and not row[0]:
                return conn
        except BaseException:
            await close(conn)
            raise
        await conn.close()
        raise ConnectionError("read-only")

    async def _connect(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        """The first server that accepts writes. All are tried at once, each attempt bounded:
        a hung server must not delay finding the one that answers."""
        attempts = [asyncio.ensure_future(self._writable(c)) for c in self.conninfos]
        for attempt in attempts:  # a cancelled attempt's own error is of no interest
            attempt.add_done_callback(lambda done: done.cancelled() or done.exception())
        errors = []
        winner = None
        try:
            for finished in asyncio.as_completed(attempts):
                try:
                    winner = await finished
                    return winner
                except (psycopg.Error, TimeoutError, OSError, ConnectionError) as error:
                    errors.append(str(error).strip().splitlines()[0] if str(error).strip() else "timeout")
        finally:
            for attempt in attempts:
                if not attempt.done():
                    attempt.cancel()
                elif (
                    not attempt.cancelled() and attempt.exception() is None and attempt.result() is not winner
                ):
                    await attempt.result().close()  # a second writable server: not used
        raise ConnectionError("; ".join(errors) or "no server")

    async def prepare(self) -> None:
        """Create the table (as a datanode's shard of the sharded table is made)."""
        conn = await self._connect()
        async with conn:
            await conn.execute(shard_table(self.table))

    async def next_id(self) -> int:
        ident = next(self.ids, None)
        if ident is None and self.refill is not None:
            self.ids = iter(await self.refill())
            ident = next(self.ids, None)
        if ident is None:
            raise XchaError("the writer ran out of ids to insert (and has no refill, or it gave none)")
        return ident

    async def write_one(self) -> bool:
        """Insert the next id; True when the commit was acknowledged."""
        ident = await self.next_id()
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await self._connect()
            self.sent.add(ident)
            insert = sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(sql.Identifier(self.table))
            await bounded(self._conn, self._conn.execute(insert, [ident]), self.statement_timeout)
        except (psycopg.Error, TimeoutError, OSError, ConnectionError) as error:
            self.failures.append(
                (
                    time.time(),
                    str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
                )
            )
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await close(self._conn)
            self._conn = None
            return False
        self.acknowledged[ident] = time.time()
        return True

    async def run(self) -> None:
        try:
            while not self._stopping.is_set():
                started = time.monotonic()
                ok = await self.write_one()
                pause = self.interval - (time.monotonic() - started)
                if not ok:
                    pause = max(pause, 0.005)
                if pause > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), pause)
        except Exception as error:
            self.error = f"{type(error).__name__}: {error}"
            raise

    def stop(self) -> None:
        self._stopping.set()

    def check_running(self) -> None:
        """Raise when run() ended by an error: waiting for its writes would be waiting for nothing."""
        if self.error:
            raise XchaError(f"the writer stopped: {self.error}")

    async def wait_for_acks(self, count: int, timeout: float = 30) -> None:
        """Until `count` more commits were acknowledged."""
        target = len(self.acknowledged) + count
        deadline = time.monotonic() + timeout
        while len(self.acknowledged) < target:
            self.check_running()
            if time.monotonic() > deadline:
                raise XchaError(
                    f"no {count} acknowledged writes within {timeout:.0f} s; "
                    f"last failures: {self.failures[-3:]}"
                )
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await close(self._conn)
            self._conn = None

    def recovery_seconds(self, fault_at: float) -> float | None:
        """From the fault to the first acknowledged write after the first failure after it
        (or, with no failure at all, 0)."""
        failed = [t for t, _ in self.failures if t >= fault_at]
        if not failed:
            return 0.0
        first_failure = failed[0]
        after = [t for t in self.acknowledged.values() if t > first_failure]
        return (min(after) - fault_at) if after else None

    def write_gap(self, since: float) -> float:
        """Milliseconds without an acknowledged write around the first failure after `since`
        (0 when nothing failed)."""
        failures = [t for t, _ in self.failures if t >= since]
        if not failures:
            return 0.0
        acks = sorted(self.acknowledged.values())
        before = max((t for t in acks if t < failures[0]), default=since)
        after = min((t for t in acks if t > failures[0]), default=float("nan"))
        return (after - before) * 1000

    async def verify(self, conninfos: list[str] | None = None) -> Outcome:
        """Read the table where writes go now: every acknowledged id present, nothing unsent."""
        return await verify_all([self], conninfos or self.conninfos)


async def verify_all(writers: Sequence[Writer], conninfos: list[str]) -> Outcome:
    """For writers sharing one table: every id any of them saw acknowledged is there, and no id
    is there that none of them sent."""
    reader = Writer(conninfos, table=writers[0].table)
    conn = await reader._connect()
    async with conn:
        cur = await conn.execute(sql.SQL("SELECT id FROM {}").format(sql.Identifier(reader.table)))
        present = {int(row[0]) for row in await cur.fetchall()}  # type: ignore[call-overload]
    acknowledged = set().union(*(w.acknowledged for w in writers))
    sent = set().union(*(w.sent for w in writers))
    return Outcome(len(acknowledged), len(present), sorted(acknowledged - present), sorted(present - sent))
