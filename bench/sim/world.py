"""The simulated world around the controller: PostgreSQL instances (WAL as a list of
commit ids), the network between hosts, clients that commit, and the invariants, checked
as the world changes.

WAL: a server's WAL is the list of the commit ids it holds, in order; its position is the
list's length (as an LSN: BASE_LSN + length * RECORD). A standby streams from its upstream
only while its WAL is a prefix of the upstream's (otherwise it has diverged and needs
pg_rewind, as after a failover). A commit is acknowledged when the standbys that
synchronous_standby_names makes synchronous (FIRST k in priority order, or ANY k) have
flushed it, or at once when the names are empty.
"""

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from xcha.pg.status import Downstream, PgStatus, WalReceiver
from xcha.pg.syncrep import SyncStandbys

BASE_LSN = 0x3000000
RECORD = 0x40
CHECKPOINT = -1  # a WAL record that is no commit: a clean shutdown's checkpoint
WAL_TIMEOUT = 60.0  # wal_sender_timeout and wal_receiver_timeout: PostgreSQL's defaults
CONTROLLER = "controller"
BASE_DELAY = 0.001  # one way, on a quiet network
RETRANSMIT = 7.0  # TCP retransmits this long before gRPC keepalive declares the connection dead


def lsn(position: int) -> int:
    return BASE_LSN + position * RECORD


@dataclass(frozen=True)
class Violation:
    """An invariant that did not hold: the history stops at the next tick."""

    invariant: str
    detail: str


@dataclass
class Stream:
    """A replication connection: the standby's WAL receiver (pg_stat_wal_receiver) and the
    upstream's WAL sender (its pg_stat_replication row). Stale while no data flows, until
    WAL_TIMEOUT. A standby that closes it across a partition leaves the sender behind."""

    standby: str
    upstream: str
    incarnation: int  # the upstream postmaster's; a restart breaks the connection
    last_data_at: float
    flushed: int  # what the upstream last heard the standby has flushed
    pid: int = 0  # the WAL sender's: each connection is a new one


@dataclass
class Postgres:
    name: str
    host: str
    port: int = 5432
    has_data: bool = False
    running: bool = False
    hung: bool = False  # its host is stopped (SIGSTOP of every process on it)
    in_recovery: bool = False  # also while stopped: pg_controldata's cluster state
    timeline: int = 0
    wal: list[int] = field(default_factory=list)
    sync_names: str = ""
    upstream: str | None = None  # primary_conninfo: the member it streams from
    incarnation: int = 1000  # the postmaster's PID
    stream: Stream | None = None  # its WAL receiver's
    senders: dict[str, Stream] = field(default_factory=dict)  # its WAL senders, by standby
    waiting_from: int = 0  # clients' commits from this position on wait for acknowledgement
    wal_version: int = 0  # bumps whenever WAL is truncated or replaced

    @property
    def writable(self) -> bool:
        return self.running and not self.in_recovery and not self.hung


def is_prefix(short: list[int], long: list[int]) -> bool:
    return len(short) <= len(long) and long[: len(short)] == short


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


@dataclass
class Faults:
    """What the network does to messages now (0: nothing)."""

    cut: Counter[frozenset[str]] = field(default_factory=Counter)  # host pairs that cannot talk
    delay: float = 0.0  # up to this much extra one-way delay (reorders messages)
    loss: float = 0.0  # probability a message is lost
    duplication: float = 0.0  # probability a message is delivered twice


class World:
    """PostgreSQL, the network and the clients. `step()` runs every TICK of virtual time."""

    def __init__(
        self,
        rng: random.Random,
        members: list[Postgres],
        clock: Callable[[], float],
        trace: Callable[[str], None],
        allow_data_loss: bool,
    ) -> None:
        self.rng = rng
        self.members = {m.name: m for m in members}
        self.by_endpoint = {(m.host, m.port): m for m in members}
        self.clock = clock
        self.trace = trace
        self.allow_data_loss = allow_data_loss
        self.net = Faults()
        self.next_commit = 1
        self.next_timeline = 2
        self.acked: dict[int, int] = {}  # position -> commit id, every acknowledged commit
        self.ack_source: tuple[str, int, int] | None = None  # (member, incarnation, wal_version)
        self.commits = 0
        self.next_pid = 20000
        self._sync_cache: dict[str, SyncStandbys] = {}
        self.violation: Violation | None = None

    # ---- the network ---------------------------------------------------------------------

    def up(self, a: str, b: str) -> bool:
        return a == b or not self.net.cut[frozenset((a, b))]

    def send(
        self,
        source: str,
        target: str,
        deliver: Callable[[], None],
        lossy: bool = True,
        broken: Callable[[], None] | None = None,
    ) -> None:
        """Deliver later. lossy (a heartbeat or its reply): lost when cut at sending or at
        arrival, lost or duplicated as the faults say. Otherwise (a message on a TCP
        connection): retransmitted until the cut heals, for up to RETRANSMIT seconds; then
        the connection is dead (gRPC keepalive) and `broken` is called: a message on a TCP
        connection is never silently lost while the connection lives on."""
        if lossy and (not self.up(source, target) or (self.net.loss and self.rng.random() < self.net.loss)):
            return
        copies = 2 if lossy and self.net.duplication and self.rng.random() < self.net.duplication else 1
        loop = asyncio.get_running_loop()
        give_up = loop.time() + RETRANSMIT

        def arrive() -> None:
            if self.up(source, target):
                deliver()
            elif not lossy and loop.time() < give_up:
                loop.call_later(0.2, arrive)
            elif not lossy and broken is not None:
                broken()

        for _ in range(copies):
            loop.call_later(
                BASE_DELAY + (self.rng.random() * self.net.delay if self.net.delay else 0.0), arrive
            )

    def pg_reachable(self, host: str, member: str) -> bool:
        """A connection from host to member's PostgreSQL is answered."""
        pg = self.members[member]
        return self.up(host, pg.host) and pg.running and not pg.hung

    # ---- PostgreSQL as its agent sees it --------------------------------------------------

    def _sync(self, names: str) -> SyncStandbys:
        parsed = self._sync_cache.get(names)
        if parsed is None:
            parsed = self._sync_cache[names] = SyncStandbys.parse(names)
        return parsed

    def downstreams(self, pg: Postgres) -> list[Stream]:
        return list(pg.senders.values()) if pg.running else []

    def sync_states(self, pg: Postgres, downstreams: list[Stream]) -> dict[str, str]:
        sync = self._sync(pg.sync_names)
        connected = {s.standby for s in downstreams}
        states = {name: "async" for name in connected}
        if pg.in_recovery:
            return states
        if sync.policy.method == "any":
            states.update({n: "quorum" for n in sync.names if n in connected})
        else:
            ordered = [n for n in sync.names if n in connected]
            for index, name in enumerate(ordered):
                states[name] = "sync" if index < sync.required else "potential"
        return states

    def status(self, pg: Postgres) -> PgStatus:
        now = self.clock()
        if not pg.running:
            return PgStatus(running=False, port=pg.port)
        receiver = None
        if pg.in_recovery and pg.stream is not None:
            upstream = self.members[pg.stream.upstream]
            receiver = WalReceiver("streaming", upstream.host, upstream.port, now - pg.stream.last_data_at)
        downstreams = self.downstreams(pg)
        states = self.sync_states(pg, downstreams)
        position = lsn(len(pg.wal))
        return PgStatus(
            running=True,
            postmaster_pid=pg.incarnation,
            in_recovery=pg.in_recovery,
            timeline=pg.timeline,
            system_identifier=1,
            current_lsn=None if pg.in_recovery else position,
            receive_lsn=position if pg.in_recovery else None,
            flush_lsn=position if pg.in_recovery else None,
            replay_lsn=position if pg.in_recovery else None,
            wal_receiver=receiver,
            downstreams=tuple(
                Downstream(
                    s.standby,
                    "streaming",
                    states[s.standby],
                    lsn(s.flushed),
                    lsn(s.flushed),
                    now - s.last_data_at,
                    s.pid,
                )
                for s in downstreams
            ),
            synchronous_standby_names=pg.sync_names,
            port=pg.port,
            position_after_senders=None if pg.in_recovery else position,  # one instant: nothing moved
            taken_at=now,
        )

    # ---- what happens to PostgreSQL --------------------------------------------------------

    def start(self, pg: Postgres, standby: bool) -> None:
        self._close_receiver(pg)
        pg.running, pg.in_recovery = True, standby
        pg.senders.clear()
        pg.incarnation += 1
        pg.waiting_from = len(pg.wal)
        self.trace(f"pg {pg.name}: started as {'standby' if standby else 'master'} (TL{pg.timeline})")
        if standby:
            self._replicate(pg, self.clock())  # the WAL receiver connects as the server starts
        else:
            self._became_master(pg, "started as master")

    def stop(self, pg: Postgres, why: str) -> None:
        if pg.running:
            self.trace(f"pg {pg.name}: {why}")
        self._close_receiver(pg)
        pg.running = False
        pg.senders.clear()
        pg.waiting_from = len(pg.wal)  # waiting clients get an error: nothing acknowledged

    def clean_stop(self, pg: Postgres) -> int:
        """A fast shutdown: the shutdown checkpoint goes to every standby still streaming
        (the WAL senders wait for it). Returns the checkpoint's position."""
        position = len(pg.wal)
        pg.wal.append(CHECKPOINT)
        for stream in self.downstreams(pg):
            standby = self.members[stream.standby]
            if standby.stream is stream and self._flowing(standby, pg):
                standby.wal.extend(pg.wal[len(standby.wal) :])
                stream.flushed = len(standby.wal)
        self.stop(pg, "stopped cleanly")
        return lsn(position)

    def bootstrap(self, pg: Postgres) -> None:
        pg.has_data, pg.timeline, pg.wal, pg.sync_names = True, 1, [], ""
        pg.wal_version += 1
        self.start(pg, standby=False)

    def promote(self, pg: Postgres) -> None:
        self._close_receiver(pg)
        pg.in_recovery = False
        pg.timeline = self.next_timeline
        self.next_timeline += 1
        pg.waiting_from = len(pg.wal)
        self.trace(f"pg {pg.name}: promoted at position {len(pg.wal)} (TL{pg.timeline})")
        self._became_master(pg, "promoted")

    def detach(self, pg: Postgres) -> None:
        """primary_conninfo emptied: the WAL receiver stops and no other starts."""
        pg.upstream = None
        if pg.stream is not None:
            self.trace(f"pg {pg.name}: WAL receiver stopped (detached from {pg.stream.upstream})")
        self._close_receiver(pg)

    def rewrite_wal(self, pg: Postgres, wal: list[int], why: str) -> None:
        """pg_rewind (truncated to the fork point) or a clone (the upstream's WAL)."""
        pg.wal = wal
        pg.wal_version += 1
        self.trace(f"pg {pg.name}: {why}: WAL now at position {len(wal)}")
        self._check_acknowledged_kept(f"{why} of {pg.name}")

    # ---- each tick: replication, clients, acknowledgements ----------------------------

    def _close_receiver(self, standby: Postgres) -> None:
        """The upstream's WAL sender ends with it only when the connection's end reaches it."""
        stream, standby.stream = standby.stream, None
        if stream is not None and self.up(standby.host, self.members[stream.upstream].host):
            self.members[stream.upstream].senders.pop(standby.name, None)

    def _prune_senders(self, pg: Postgres, now: float) -> None:
        for name, stream in list(pg.senders.items()):
            standby = self.members[name]
            ghost = standby.stream is not stream
            if (ghost and self.up(standby.host, pg.host)) or now - stream.last_data_at > WAL_TIMEOUT:
                del pg.senders[name]
                if not ghost:
                    standby.stream = None

    def _flowing(self, standby: Postgres, upstream: Postgres) -> bool:
        return not upstream.hung and not standby.hung and self.up(standby.host, upstream.host)

    def step(self) -> None:
        now = self.clock()
        for pg in self.members.values():
            if pg.senders:
                self._prune_senders(pg, now)
        for pg in self.members.values():
            if pg.running and pg.in_recovery and not pg.hung:
                self._replicate(pg, now)
        for pg in self.members.values():
            if pg.writable:
                pg.wal.append(self.next_commit)
                self.next_commit += 1
                self.commits += 1
        for pg in self.members.values():
            if pg.writable and pg.waiting_from < len(pg.wal):
                self._acknowledge(pg)

    def _replicate(self, standby: Postgres, now: float) -> None:
        stream = standby.stream
        upstream = self.members[standby.upstream] if standby.upstream else None
        if stream is not None:
            source = self.members[stream.upstream]
            if upstream is not source or not source.running or source.incarnation != stream.incarnation:
                self._close_receiver(standby)
                stream = None
        if stream is None:
            if (
                upstream is None
                or not upstream.running
                or not self._flowing(standby, upstream)
                or not is_prefix(standby.wal, upstream.wal)
            ):
                return  # the WAL receiver retries (or has diverged: it needs pg_rewind)
            self.next_pid += 1
            stream = Stream(
                standby.name, upstream.name, upstream.incarnation, now, len(standby.wal), self.next_pid
            )
            standby.stream = upstream.senders[standby.name] = stream
        source = self.members[stream.upstream]
        if not self._flowing(standby, source) or self.rng.random() < 0.2:
            return  # a stale connection, or a standby a tick behind
        if len(standby.wal) < len(source.wal):
            standby.wal.extend(source.wal[len(standby.wal) :])
        stream.last_data_at, stream.flushed = now, len(standby.wal)

    def _acknowledge(self, pg: Postgres) -> None:
        sync = self._sync(pg.sync_names)
        position = len(pg.wal)
        if sync.names:
            connected = {s.standby: s.flushed for s in self.downstreams(pg)}
            flushed = [connected[n] for n in sync.names if n in connected]
            if len(flushed) < sync.required:
                return
            if sync.policy.method == "any":
                position = sorted(flushed, reverse=True)[sync.required - 1]
            else:
                position = min(flushed[: sync.required])
        position = min(position, len(pg.wal))
        if position <= pg.waiting_from:
            return
        source = (pg.name, pg.incarnation, pg.wal_version)
        start = pg.waiting_from if source == self.ack_source else 0
        for index in range(start, position):
            held = self.acked.get(index)
            if index >= pg.waiting_from and pg.wal[index] != CHECKPOINT and held is None:
                self.acked[index] = pg.wal[index]
            elif held is not None and held != pg.wal[index] and not self.allow_data_loss:
                self.fail(
                    "acknowledged commit lost",
                    f"{pg.name} acknowledges commit {pg.wal[position - 1]} at position {position - 1} "
                    f"on a history without acknowledged commit {held} (position {index})",
                )
                return
        if source != self.ack_source and not self.allow_data_loss:
            missing = [i for i in self.acked if i >= len(pg.wal)]
            if missing:
                self.fail(
                    "acknowledged commit lost",
                    f"{pg.name} acknowledges commits while missing acknowledged commit "
                    f"{self.acked[missing[0]]} (position {missing[0]}; it has {len(pg.wal)})",
                )
                return
        self.ack_source = source
        pg.waiting_from = position

    # ---- invariants ----------------------------------------------------------------------

    def fail(self, invariant: str, detail: str) -> None:
        """Record the first violation (the history stops at its next tick)."""
        if self.violation is None:
            self.violation = Violation(invariant, detail)
            self.trace(f"INVARIANT VIOLATED: {invariant}: {detail}")

    def _became_master(self, pg: Postgres, how: str) -> None:
        """No promotion (or start as master) of a server missing an acknowledged commit."""
        missing = self._missing(pg)
        if missing is None:
            return
        if self.allow_data_loss:
            self.trace(f"pg {pg.name}: {how} without acknowledged commit {missing[1]} (allow_data_loss)")
            return
        self.fail(
            "promotion missing an acknowledged commit",
            f"{pg.name} {how} at position {len(pg.wal)} without acknowledged commit {missing[1]} "
            f"(position {missing[0]})",
        )
        return

    def _missing(self, pg: Postgres) -> tuple[int, int] | None:
        for index, commit in self.acked.items():
            if index >= len(pg.wal) or pg.wal[index] != commit:
                return index, commit
        return None

    def _check_acknowledged_kept(self, what: str) -> None:
        """Every acknowledged commit is still held by some server."""
        if self.allow_data_loss:
            return
        holders = [m.wal for m in self.members.values() if m.has_data]
        for index, commit in self.acked.items():
            if not any(index < len(wal) and wal[index] == commit for wal in holders):
                self.fail(
                    "acknowledged commit lost",
                    f"after {what}, no server holds acknowledged commit {commit} (position {index})",
                )
                return

    def check_split_brain(self, epochs: dict[str, int], fencing: frozenset[str] = frozenset()) -> None:
        """Never two servers that accept writes whose agents believe in the same epoch. A
        server whose agent saved `fenced` is being stopped by it (fenced is saved before the
        kill, after the epoch that deposed it): its agent claims no epoch as master, and a host
        that hangs between the two resumes with both for the few ms the kill takes."""
        seen: dict[int, str] = {}
        for pg in self.members.values():
            if pg.writable and pg.name not in fencing:
                epoch = epochs[pg.name]
                if epoch in seen:
                    self.fail(
                        "two masters",
                        f"{seen[epoch]} and {pg.name} both accept writes at epoch {epoch}",
                    )
                    return
                seen[epoch] = pg.name

    def check_final(self, master: str | None) -> None:
        if self.allow_data_loss:
            return
        pg = self.members.get(master or "")
        if pg is None:
            self.fail("acknowledged commit lost", "no master at the end")
            return
        missing = self._missing(pg)
        if missing is not None:
            self.fail(
                "acknowledged commit lost",
                f"the final master {pg.name} lacks acknowledged commit {missing[1]} (position {missing[0]})",
            )
