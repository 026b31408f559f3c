"""The embedded store: one SQLite file in the controller's state directory, and leadership by
an exclusive lock on a file beside it (one controller per state directory; a second one waits).

Durable: every write commits with synchronous = FULL before the caller acts on it. Fenced:
each write checks, in the same transaction, that the stored term is still the writer's token.
"""

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from xcha.controller.store.base import (
    Conflict,
    Deposed,
    EventRecord,
    GroupRecord,
    Leadership,
    LeaderInfo,
    MemberRecord,
    Snapshot,
)
from xcha.controller.store.codec import decode_group, decode_member, encode_group, encode_member

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS groups (name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    datanode TEXT NOT NULL, name TEXT NOT NULL, record TEXT NOT NULL, PRIMARY KEY (datanode, name));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, datanode TEXT NOT NULL, kind TEXT NOT NULL,
    epoch INTEGER NOT NULL, message TEXT NOT NULL, details TEXT NOT NULL);
"""
CAMPAIGN_POLL = 0.2  # seconds between attempts to take the lock held by another controller


def _connect(path: Path) -> sqlite3.Connection:
    if str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, timeout=10)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.executescript(SCHEMA)
    return db


def _setting(db: sqlite3.Connection, key: str, default: str) -> str:
    row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return str(row[0]) if row else default


def _set(db: sqlite3.Connection, key: str, value: str) -> None:
    db.execute(
        "INSERT INTO settings VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


class SqliteLeadership:
    """Leads while it holds `<database>.lock`; the term (fencing token) counts take-overs."""

    def __init__(self, path: Path, name: str = "controller", address: str = "") -> None:
        self.path = path
        self.name = name
        self.address = address
        self._lock: IO[bytes] | None = None
        self._token = 0
        self._lost = asyncio.Event()

    @property
    def token(self) -> int:
        return self._token

    def _try_lock(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(f"{self.path}.lock", "ab")  # noqa: SIM115 - held open while leading
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._lock = handle
        return True

    async def campaign(self) -> int:
        while not self._try_lock():
            await asyncio.sleep(CAMPAIGN_POLL)
        db = _connect(self.path)
        try:
            db.execute("BEGIN IMMEDIATE")
            self._token = int(_setting(db, "term", "0")) + 1
            _set(db, "term", str(self._token))
            leader = {"name": self.name, "address": self.address, "pid": os.getpid()}
            _set(db, "leader", json.dumps(leader))
            db.execute("COMMIT")
        finally:
            db.close()
        self._lost.clear()
        return self._token

    def leading(self) -> bool:
        return self._lock is not None and not self._lost.is_set()

    async def lost(self) -> None:
        await self._lost.wait()

    async def leader(self) -> LeaderInfo | None:
        db = _connect(self.path)
        try:
            data = json.loads(_setting(db, "leader", "null"))
            term = int(_setting(db, "term", "0"))
        finally:
            db.close()
        return LeaderInfo(data["name"], data["address"], term) if data else None

    async def resign(self) -> None:
        self._lost.set()
        if self._lock is not None:
            self._lock.close()  # closing releases the lock
            self._lock = None

    async def close(self) -> None:
        await self.resign()


class SqliteStore:
    """Writes are fenced by `leadership.token` (a leadership that never campaigns has token 0,
    the term of a file no controller has led yet: fine for one embedded controller in tests)."""

    def __init__(self, path: Path, leadership: Leadership) -> None:
        self.db = _connect(path)
        self.leadership = leadership

    @contextlib.contextmanager
    def _fenced(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            term = int(_setting(self.db, "term", "0"))
            if term != self.leadership.token:
                raise Deposed(f"controller term {term} is not mine ({self.leadership.token}): deposed")
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    async def load(self) -> Snapshot:
        groups = {name: decode_group(text) for name, text in self.db.execute("SELECT name, record FROM groups")}
        members = tuple(
            decode_member(text) for (text,) in self.db.execute("SELECT record FROM members ORDER BY rowid")
        )
        return Snapshot(
            epoch=int(_setting(self.db, "epoch", "0")),
            paused=_setting(self.db, "paused", "false") == "true",
            groups=groups,
            members=members,
        )

    async def set_epoch(self, expected: int, epoch: int) -> None:
        with self._fenced() as db:
            stored = int(_setting(db, "epoch", "0"))
            if stored != expected:
                raise Conflict(f"epoch is {stored}, not {expected}")
            if epoch < stored:
                raise Conflict(f"the epoch only grows: {epoch} < {stored}")
            _set(db, "epoch", str(epoch))

    async def set_cluster_paused(self, paused: bool) -> None:
        with self._fenced() as db:
            _set(db, "paused", "true" if paused else "false")

    async def save_group(self, group: GroupRecord, expected: GroupRecord | None) -> None:
        with self._fenced() as db:
            row = db.execute("SELECT record FROM groups WHERE name = ?", (group.name,)).fetchone()
            stored = decode_group(row[0]) if row else None
            if stored != expected:
                raise Conflict(f"group {group.name} changed under me: {stored} is not {expected}")
            db.execute(
                "INSERT INTO groups VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET record = excluded.record",
                (group.name, encode_group(group)),
            )

    async def save_member(self, member: MemberRecord) -> None:
        with self._fenced() as db:
            db.execute(
                "INSERT INTO members VALUES (?, ?, ?) "
                "ON CONFLICT (datanode, name) DO UPDATE SET record = excluded.record",
                (member.datanode, member.name, encode_member(member)),
            )

    async def add_event(
        self, datanode: str, kind: str, epoch: int, message: str, details: dict[str, object]
    ) -> EventRecord:
        now = time.time()
        with self._fenced() as db:
            cursor = db.execute(
                "INSERT INTO events (time, datanode, kind, epoch, message, details) VALUES (?, ?, ?, ?, ?, ?)",
                (now, datanode, kind, epoch, message, json.dumps(details)),
            )
        return EventRecord(int(cursor.lastrowid or 0), now, datanode, kind, epoch, message, details)

    async def events(
        self, after_id: int = 0, limit: int = 100, datanode: str = "", newest: bool = False
    ) -> list[EventRecord]:
        """Events after `after_id` in order, or with `newest` the last `limit` of them."""
        order = "DESC" if newest else "ASC"
        rows = self.db.execute(
            "SELECT id, time, datanode, kind, epoch, message, details FROM events "
            f"WHERE id > ? AND (? = '' OR datanode = ?) ORDER BY id {order} LIMIT ?",
            (after_id, datanode, datanode, limit),
        )
        events = [EventRecord(i, t, d, k, e, m, json.loads(x)) for i, t, d, k, e, m, x in rows]
        return events[::-1] if newest else events

    async def close(self) -> None:
        self.db.close()
