"""A writer that inserts unique ids and remembers which commits were acknowledged.

It is the judge of "nothing lost": every id it saw committed must be on the surviving
master(s) afterwards, and no id may be there that it never sent. It also measures the
write gap of a failover: from the fault to the first acknowledged insert after the first
failed one (an insert already in flight can be acknowledged just after the fault).

`TransactionWriter` writes one id to each of several datanodes in one transaction (through a
Postgres-XL / XC coordinator: a two-phase commit) and judges each COMMIT by the rows, not by
its answer: a COMMIT that returned without an error while rows are missing is a false commit.
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

WRITE_ERRORS = (psycopg.Error, TimeoutError, OSError, ConnectionError)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
    # psycopg's default; None never prepares a statement on the server (an XC coordinator's
    # pgxc_pool_reload() drops every session's prepared statements).
    prepare_threshold: int | None = 5
    error: str = ""  # why run() ended early, if it did
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None

    async def _writable(self, conninfo: str) -> psycopg.AsyncConnection[tuple[object, ...]]:
        conn = await connect(
            conninfo, self.attempt_timeout, autocommit=True, prepare_threshold=self.prepare_threshold
        )
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
        stream = IdStream(self.ids, self.refill)
        ident = await stream.take()
        self.ids = stream.ids
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
        except WRITE_ERRORS as error:
            await self._failed(error)
            return False
        self.acknowledged[ident] = time.time()
        return True

    async def _failed(self, error: BaseException) -> str:
        """Record a failed write and drop the connection; returns the error's first line."""
        text = first_line(error)
        self.failures.append((time.time(), text))
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await close(self._conn)
        self._conn = None
        return text

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


async def present_ids(conninfos: list[str], table: str = SHARDED_TABLE) -> set[int]:
    """Every id in the table, read where writes go now (the first of conninfos that accepts them)."""
    reader = Writer(conninfos, table=table)
    conn = await reader._connect()
    async with conn:
        cur = await conn.execute(sql.SQL("SELECT id FROM {}").format(sql.Identifier(table)))
        return {int(row[0]) for row in await cur.fetchall()}  # type: ignore[call-overload]


def judge(writers: Sequence[Writer], present: set[int], also_sent: Iterable[int] = ()) -> Outcome:
    """Every id any writer saw acknowledged is present; no id is present that none of them (nor
    also_sent: other writers to the same table) sent."""
    acknowledged = set().union(*(w.acknowledged for w in writers))
    sent = set().union(*(w.sent for w in writers), also_sent)
    return Outcome(len(acknowledged), len(present), sorted(acknowledged - present), sorted(present - sent))


async def verify_all(writers: Sequence[Writer], conninfos: list[str]) -> Outcome:
    """For writers sharing one table: every id any of them saw acknowledged is there, and no id
    is there that none of them sent."""
    return judge(writers, await present_ids(conninfos, writers[0].table))


# ---- transactions over several datanodes ------------------------------------------------------


@dataclass
class IdStream:
    """Ids to insert: the given ones, then what `refill` gives when they run out."""

    ids: Iterator[int]
    refill: Callable[[], Awaitable[Iterable[int]]] | None = None

    async def take(self) -> int:
        ident = next(self.ids, None)
        if ident is None and self.refill is not None:
            self.ids = iter(await self.refill())
            ident = next(self.ids, None)
        if ident is None:
            raise XchaError("the writer ran out of ids to insert (and has no refill, or it gave none)")
        return ident


@dataclass
class Transaction:
    """One BEGIN; INSERT ...; COMMIT, as its client saw it (wall-clock times)."""

    ids: tuple[int, ...]
    began: float
    commit_sent: float = 0.0  # 0: it failed before its COMMIT was sent
    ended: float = 0.0
    answer: str = ""  # the COMMIT's command tag ("COMMIT", or "ROLLBACK" for an aborted one), or the error

    @property
    def returned(self) -> bool:
        """COMMIT returned without an error, whatever its tag: what psycopg's conn.commit() and
        most drivers report as committed."""
        return self.commit_sent > 0 and self.answer in ("COMMIT", "ROLLBACK")


# A failover as the transaction check sees it: (the fault, the start of the first re-point after it).
Crash = tuple[float, float]


@dataclass
class TransactionOutcome:
    """Every transaction whose COMMIT was sent, judged by its rows. A false commit: COMMIT returned
    without an error while rows are missing; torn: some rows present and others not, whatever the
    COMMIT answered. Each split by whether its COMMIT raced a crash (see `classify`)."""

    transactions: int = 0
    committed: int = 0  # COMMIT answered COMMIT and every row is present
    false_commits: list[Transaction] = field(default_factory=list)  # xcha's to prevent
    false_commits_at_crash: list[Transaction] = field(default_factory=list)
    torn: list[Transaction] = field(default_factory=list)
    torn_at_crash: list[Transaction] = field(default_factory=list)


def raced_a_crash(transaction: Transaction, crashes: Sequence[Crash]) -> bool:
    """Its COMMIT was sent before a re-point started and answered after the crash before it."""
    return any(transaction.commit_sent < repoint and transaction.ended >= fault for fault, repoint in crashes)


def classify(
    transactions: Sequence[Transaction], present: set[int], crashes: Sequence[Crash]
) -> TransactionOutcome:
    """A COMMIT that raced a crash met the cluster's own two-phase commit at its weakest (the
    node crashed between PREPARE and COMMIT PREPARED); any other false commit or torn
    transaction spans a re-point, or none, and is xcha's to prevent."""
    outcome = TransactionOutcome()
    for transaction in transactions:
        if not transaction.commit_sent:
            continue
        outcome.transactions += 1
        found = [ident in present for ident in transaction.ids]
        if all(found):
            outcome.committed += transaction.answer == "COMMIT"
            continue
        racing = raced_a_crash(transaction, crashes)
        if transaction.returned:
            (outcome.false_commits_at_crash if racing else outcome.false_commits).append(transaction)
        if any(found):
            (outcome.torn_at_crash if racing else outcome.torn).append(transaction)
    return outcome


@dataclass
class TransactionWriter(Writer):
    """BEGIN; one INSERT per stream (ids the coordinator routes to one datanode each); COMMIT.
    COMMIT is sent as a statement so that its tag is seen: a transaction the server aborted
    answers ROLLBACK without an error. `acknowledged` holds the ids of those answered COMMIT."""

    streams: list[IdStream] = field(default_factory=list)
    transactions: list[Transaction] = field(default_factory=list)

    async def write_one(self) -> bool:
        ids = tuple([await stream.take() for stream in self.streams])
        transaction = Transaction(ids, time.time())
        self.transactions.append(transaction)
        insert = sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(sql.Identifier(self.table))
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await self._connect()
            conn = self._conn
            self.sent.update(ids)
            await bounded(conn, conn.execute("BEGIN"), self.statement_timeout)
            for ident in ids:
                await bounded(conn, conn.execute(insert, [ident]), self.statement_timeout)
            transaction.commit_sent = time.time()
            cursor = await bounded(conn, conn.execute("COMMIT"), self.statement_timeout)
            transaction.answer = cursor.statusmessage or ""
        except WRITE_ERRORS as error:
            transaction.answer = "error: " + await self._failed(error)
            return False
        finally:
            transaction.ended = time.time()
        if transaction.answer != "COMMIT":
            self.failures.append((transaction.ended, f"COMMIT answered {transaction.answer}"))
            return False
        for ident in ids:
            self.acknowledged[ident] = transaction.ended
        return True
