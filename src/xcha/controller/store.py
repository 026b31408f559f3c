"""What the controller must not forget: the epoch, each group's state and roles, the
members and their modes, and the event history. Written before the controller acts, so a
restarted controller carries on where it stopped.

`Store` is the interface; `SqliteStore` keeps it in one SQLite file in the state directory.
A distributed store (etcd, a Raft log) would implement the same methods.
"""

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from xcha.controller.views import GroupState, Request


@dataclass(frozen=True)
class MemberRecord:
    datanode: str
    name: str
    mode: str = "sync"
    removed: bool = False
    host: str = ""
    port: int = 0
    agent_address: str = ""


@dataclass(frozen=True)
class GroupRecord:
    name: str
    state: GroupState = GroupState.INITIALIZING
    master: str | None = None
    candidate: str | None = None
    sync_set: tuple[str, ...] = ()
    paused: bool = False
    promote_attempts: int = 0
    rerouted_epoch: int = 0
    request: Request | None = None
    reason: str = ""
    takeover_port: int = 0  # router takeover: the port the new master takes
    handover_member: str | None = None  # ... and the former master, rejoining, takes
    handover_port: int = 0  # the new master's former port
    switchover_failed: bool = False  # the switchover under way failed (cleared when leaving it)
    # A Promote went to the switchover's target: the old master may serve again only once the
    # target is known not to be a master (its reply may have been lost after it promoted).
    promote_sent: bool = False


@dataclass(frozen=True)
class EventRecord:
    id: int
    time: float
    datanode: str
    kind: str
    epoch: int
    message: str
    details: dict[str, object] = field(default_factory=dict)


class Store(Protocol):
    def epoch(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def cluster_paused(self) -> bool: ...
    def set_cluster_paused(self, paused: bool) -> None: ...
    def groups(self) -> dict[str, GroupRecord]: ...
    def save_group(self, group: GroupRecord) -> None: ...
    def members(self) -> list[MemberRecord]: ...
    def save_member(self, member: MemberRecord) -> None: ...
    def add_event(
        self, datanode: str, kind: str, epoch: int, message: str, details: dict[str, object] | None = None
    ) -> EventRecord: ...
    def events(
        self, after_id: int = 0, limit: int = 100, datanode: str = "", newest: bool = False
    ) -> list[EventRecord]: ...
    def close(self) -> None: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS groups (name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    datanode TEXT NOT NULL, name TEXT NOT NULL, record TEXT NOT NULL, PRIMARY KEY (datanode, name));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, datanode TEXT NOT NULL, kind TEXT NOT NULL,
    epoch INTEGER NOT NULL, message TEXT NOT NULL, details TEXT NOT NULL);
"""


class SqliteStore:
    """Durable: every write commits with synchronous = FULL before the caller acts on it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.executescript(SCHEMA)

    def _setting(self, key: str, default: str) -> str:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else default

    def _set(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO settings VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def epoch(self) -> int:
        return int(self._setting("epoch", "0"))

    def set_epoch(self, epoch: int) -> None:
        if epoch < self.epoch():
            raise ValueError(f"the epoch only grows: {epoch} < {self.epoch()}")
        self._set("epoch", str(epoch))

    def cluster_paused(self) -> bool:
        return self._setting("paused", "false") == "true"

    def set_cluster_paused(self, paused: bool) -> None:
        self._set("paused", "true" if paused else "false")

    def groups(self) -> dict[str, GroupRecord]:
        found = {}
        for name, text in self.db.execute("SELECT name, record FROM groups"):
            data = json.loads(text)
            request = data.pop("request")
            found[name] = GroupRecord(
                **{
                    **data,
                    "state": GroupState(data["state"]),
                    "sync_set": tuple(data["sync_set"]),
                    "request": Request(**request) if request else None,
                }
            )
        return found

    def save_group(self, group: GroupRecord) -> None:
        data = {
            **group.__dict__,
            "state": group.state.value,
            "sync_set": list(group.sync_set),
            "request": group.request.__dict__ if group.request else None,
        }
        self.db.execute(
            "INSERT INTO groups VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET record = excluded.record",
            (group.name, json.dumps(data)),
        )

    def members(self) -> list[MemberRecord]:
        return [
            MemberRecord(**json.loads(text))
            for (text,) in self.db.execute("SELECT record FROM members ORDER BY rowid")
        ]

    def save_member(self, member: MemberRecord) -> None:
        self.db.execute(
            "INSERT INTO members VALUES (?, ?, ?) "
            "ON CONFLICT (datanode, name) DO UPDATE SET record = excluded.record",
            (member.datanode, member.name, json.dumps(member.__dict__)),
        )

    def add_event(
        self, datanode: str, kind: str, epoch: int, message: str, details: dict[str, object] | None = None
    ) -> EventRecord:
        now = time.time()
        cursor = self.db.execute(
            "INSERT INTO events (time, datanode, kind, epoch, message, details) VALUES (?, ?, ?, ?, ?, ?)",
            (now, datanode, kind, epoch, message, json.dumps(details or {})),
        )
        return EventRecord(int(cursor.lastrowid or 0), now, datanode, kind, epoch, message, details or {})

    def events(
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

    def close(self) -> None:
        self.db.close()
