"""A real Postgres-XL or Postgres-XC cluster under xcha, end to end: a GTM, two coordinators
(coord1, coord2), datanodes dn1 and dn2 each a master with a synchronous standby under
agents, one controller with the `pgxc` router re-pointing both coordinators. Writers insert
single-row autocommit transactions through every coordinator and record each acknowledged
commit; the faults and checks every scenario of test_xl_cluster.py and test_xc_cluster.py
shares live here.

One cluster serves a whole test module (bringing one up takes 4-6 s): every scenario starts
by waiting until it is settled again and uses ids of its own. It is always stopped by PID
(`Topology.down`), also when a scenario or the start fails.
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.conftest import SESSION_BASE, assert_nothing_lost
from xcha.ctl import find_group
from xcha.errors import XchaError
from xcha.pgxc_nodes import node_order, routed_ids
from xcha.topology import APP_USER, DatanodePlan, Topology, TopologyPlan, settled
from xcha.v1 import xcha_pb2 as pb
from xcha.workload import Outcome, Writer

COORDINATORS = ("coord1", "coord2")
DATANODES = ("dn1", "dn2")
ID_SPAN = 2000  # ids looked at per refill: about half of them go to each datanode
# A coordinator restarting (crash recovery, start-up) refuses connections with these.
RESTARTING = re.compile(r"in recovery mode|is starting up|shutting down|Connection refused|No such file")
# ... or cuts a session off.
CUT_OFF = re.compile(
    r"closed the connection unexpectedly|crash of another server process|" + RESTARTING.pattern
)


def plan(flavor: str) -> TopologyPlan:
    """The demo's XL / XC layout (xcha.demo.pgxc_plan), with a quick reroute retry so that a
    coordinator that comes back is re-pointed within half a second."""
    return TopologyPlan(
        datanodes=(DatanodePlan("dn1", ("dn1a", "dn1b")), DatanodePlan("dn2", ("dn2a", "dn2b"))),
        router="pgxc",
        coordinators=COORDINATORS,
        flavor=flavor,
        router_settings={"retry_initial": 0.1, "retry_max": 0.5},
    )


@dataclass(frozen=True)
class Fault:
    datanode: str
    member: str
    at: float  # wall clock
    epoch: int  # the controller's epoch before it


@dataclass
class Failover:
    """What the controller recorded for one failover (ms from the fault) and what it took."""

    new_master: str
    rerouted: pb.Event
    detect_ms: float | None
    promote_ms: float | None
    reroute_ms: float | None

    @property
    def coordinators(self) -> dict[str, dict[str, object]]:
        value: dict[str, dict[str, object]] = json.loads(self.rerouted.details_json)["coordinators"]
        return value

    def line(self) -> str:
        def ms(value: float | None) -> str:
            return f"+{value:.0f} ms" if value is not None else "?"

        return (
            f"detected {ms(self.detect_ms)}, promoted {ms(self.promote_ms)}, "
            f"every coordinator re-pointed {ms(self.reroute_ms)}"
        )


@dataclass
class Writers:
    """Single-row autocommit inserts through the coordinators, one writer per (coordinator,
    datanode), each with ids that the table's hash sends to that datanode."""

    cluster: "PgxcCluster"
    writers: dict[tuple[str, str], Writer] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    handed_out: set[int] = field(default_factory=set)

    async def start(self, coordinators: tuple[str, ...], datanodes: tuple[str, ...] = DATANODES) -> None:
        for coordinator in coordinators:
            for datanode in datanodes:
                refill = self._refill(datanode)
                writer = Writer(
                    [self.cluster.topology.coordinator_app_conninfo(coordinator)],
                    interval=0.02,
                    ids=iter(await refill()),
                    refill=refill,
                )
                self.writers[(coordinator, datanode)] = writer
                self.tasks.append(asyncio.create_task(writer.run()))
        await self.wait_for_acks(10)

    def _refill(self, datanode: str) -> Callable[[], Awaitable[list[int]]]:
        async def more() -> list[int]:
            ids = await self.cluster.ids(datanode, ID_SPAN)
            self.handed_out.update(ids)
            return ids

        return more

    def to(self, datanode: str) -> dict[str, Writer]:
        """The writers of one datanode's rows, by coordinator."""
        return {c: w for (c, d), w in self.writers.items() if d == datanode}

    async def wait_for_acks(
        self, count: int, coordinator: str | None = None, datanode: str | None = None, timeout: float = 60
    ) -> None:
        """Until each writer (of that coordinator / datanode) had `count` more commits."""
        deadline = time.monotonic() + timeout
        for (c, d), writer in self.writers.items():
            if coordinator in (None, c) and datanode in (None, d):
                await writer.wait_for_acks(count, max(0.0, deadline - time.monotonic()))

    async def recovery_ms(self, fault: Fault, timeout: float = 60) -> dict[str, float]:
        """Per coordinator: from the fault to the first write to the faulty datanode that was
        acknowledged after the first one that failed (0: none failed)."""
        found: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        for coordinator, writer in self.to(fault.datanode).items():
            while (seconds := writer.recovery_seconds(fault.at)) is None:
                writer.check_running()
                if time.monotonic() > deadline:
                    raise XchaError(
                        f"no write through {coordinator} reached {fault.datanode} within {timeout:.0f} s; "
                        f"last failures: {writer.failures[-3:]}"
                    )
                await asyncio.sleep(0.02)
            found[coordinator] = seconds * 1000
        return found

    async def finish(self) -> Outcome:
        """Stop writing, then read the table through a coordinator: every acknowledged id is
        there, no id of these writers is there that they never sent."""
        await self.stop()
        rows = await self.cluster.query(COORDINATORS[0], "SELECT id FROM xcha_writes")
        present = {int(str(row[0])) for row in rows}
        writers = list(self.writers.values())
        acknowledged = set().union(*(w.acknowledged for w in writers))
        sent = set().union(*(w.sent for w in writers))
        mine = present & self.handed_out
        return Outcome(len(acknowledged), len(mine), sorted(acknowledged - present), sorted(mine - sent))

    async def stop(self) -> None:
        for writer in self.writers.values():
            writer.stop()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        for writer in self.writers.values():
            await writer.close()


class PgxcCluster:
    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.flavor = topology.plan.flavor
        self.order: list[str] = []  # the table's datanodes in the order its hash indexes them
        self.stopped_hosts: set[str] = set()
        self._next_id = 1_000_000
        self._next_probe = -1
        self._crashes_reported: set[str] = set()
        self.broken = ""  # why the tests after a failed one cannot use this cluster

    @property
    def product(self) -> str:
        return {"xl": "Postgres-XL 10", "xc": "Postgres-XC 1.2.1"}[self.flavor]

    async def start(self) -> None:
        self.order = [str(row[0]) for row in await self.query(COORDINATORS[0], node_order(), superuser=True)]
        assert sorted(self.order) == sorted(DATANODES), self.order

    # ---- SQL ----------------------------------------------------------------------------------

    def conninfo(self, coordinator: str, superuser: bool = False) -> str:
        if superuser:
            return self.topology.coordinator_conninfo(coordinator)
        return self.topology.coordinator_app_conninfo(coordinator)

    async def connect(
        self, coordinator: str, superuser: bool = False, **options: object
    ) -> psycopg.AsyncConnection[tuple[object, ...]]:
        """An autocommit session on a coordinator for the test's own statements. A connection
        refused while the coordinator restarts after a backend crash (measured on XC around a
        re-point, see `crashes`) is tried again for up to 30 s; the writers under judgement
        never retry."""
        deadline = time.monotonic() + 30
        while True:
            try:
                return await psycopg.AsyncConnection.connect(
                    self.conninfo(coordinator, superuser), autocommit=True, connect_timeout=10, **options
                )
            except psycopg.OperationalError as error:
                if not RESTARTING.search(str(error)) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def query(
        self, coordinator: str, statement: sql.Composable | str, superuser: bool = False
    ) -> list[tuple[object, ...]]:
        """One autocommit statement through a coordinator (as the application, or the
        superuser over the coordinator's private socket). The test's own statements only read,
        so one cut off by a coordinator restart runs again."""
        for attempt in range(3):
            try:
                async with await self.connect(coordinator, superuser) as conn:
                    cursor = await conn.execute(statement)  # type: ignore[arg-type]
                    return await cursor.fetchall() if cursor.description else []
            except psycopg.OperationalError as error:
                if not CUT_OFF.search(str(error)) or attempt == 2:
                    raise
                await asyncio.sleep(0.5)
        raise AssertionError("unreachable")

    async def ids(self, datanode: str, span: int) -> list[int]:
        """Fresh ids (never handed out before in this cluster) that the table's hash sends to
        datanode, from the next `span` numbers."""
        start = self._next_id
        self._next_id += span
        statement = routed_ids(self.flavor, self.order.index(datanode), len(self.order), start, span)
        return [int(str(row[0])) for row in await self.query(COORDINATORS[0], statement, superuser=True)]

    def probe_id(self) -> int:
        """A fresh id for a row written straight to a datanode (negative: no writer's)."""
        self._next_probe -= 1
        return self._next_probe

    def fresh_range(self, span: int) -> range:
        """Consecutive fresh ids: their rows lie on every datanode."""
        start = self._next_id
        self._next_id += span
        return range(start, start + span)

    async def insert(self, coordinator: str, ids: list[int] | range) -> None:
        """Rows through a coordinator; when a coordinator restart cuts the statement off,
        whatever of it is missing is inserted again."""
        wanted = list(ids)
        for attempt in range(3):
            try:
                async with await self.connect(coordinator) as conn:
                    await conn.execute("INSERT INTO xcha_writes (id) SELECT unnest(%s::bigint[])", [wanted])
                return
            except psycopg.OperationalError as error:
                if not CUT_OFF.search(str(error)) or attempt == 2:
                    raise
                await asyncio.sleep(0.5)
                present = set(await self.present(coordinator, wanted))
                wanted = [ident for ident in wanted if ident not in present]
                if not wanted:
                    return

    async def present(self, coordinator: str, ids: list[int] | range) -> list[int]:
        rows = await self.query(
            coordinator,
            sql.SQL("SELECT id FROM xcha_writes WHERE id = ANY({}) ORDER BY id").format(
                sql.Literal(list(ids))
            ),
        )
        return [int(str(row[0])) for row in rows]

    async def routes(self, coordinator: str) -> dict[str, tuple[str, int]]:
        """Where the coordinator's catalog sends each datanode."""
        rows = await self.query(
            coordinator,
            "SELECT node_name, node_host, node_port FROM pgxc_node WHERE node_type = 'D'",
            superuser=True,
        )
        return {str(name): (str(host), int(str(port))) for name, host, port in rows}

    def endpoint(self, member: str) -> tuple[str, int]:
        return (self.topology.address(member), self.topology.members[member].port)

    # ---- status -------------------------------------------------------------------------------

    def status(self) -> pb.ClusterStatus:
        return self.topology.status()

    def group(self, datanode: str) -> pb.GroupView:
        return self.topology.group(datanode)

    def events(self, datanode: str = "", kind: str | None = None, after_epoch: int = 0) -> list[pb.Event]:
        return [e for e in self.topology.events(datanode, kind) if e.epoch > after_epoch]

    async def settled(self, timeout: float = 120) -> pb.ClusterStatus:
        """Every datanode protected and every agent idle: where every scenario starts."""
        return await self.topology.wait_for(settled, timeout, "every datanode protected, every agent idle")

    async def wait_for(
        self, predicate: Callable[[pb.ClusterStatus], bool], what: str, timeout: float = 120
    ) -> pb.ClusterStatus:
        return await self.topology.wait_for(predicate, timeout, what)

    # ---- faults -------------------------------------------------------------------------------

    def master_and_epoch(self, datanode: str) -> tuple[str, int]:
        status = self.status()
        return find_group(status, datanode).master, status.epoch

    def kill_master(self, datanode: str = "dn1") -> Fault:
        """kill -9 of the datanode master's postmaster."""
        member, epoch = self.master_and_epoch(datanode)
        pid = self.topology.postmaster_pid(member)
        assert pid is not None, f"{member} has no postmaster to kill"
        at = time.time()
        os.kill(pid, signal.SIGKILL)
        return Fault(datanode, member, at, epoch)

    def hang_master(self, datanode: str = "dn1") -> Fault:
        """A hung host: SIGSTOP of the master's agent and of all its PostgreSQL processes."""
        member, epoch = self.master_and_epoch(datanode)
        self.stopped_hosts.add(member)
        at = time.time()
        self.topology.host_signal(member, signal.SIGSTOP)
        return Fault(datanode, member, at, epoch)

    def resume(self, member: str) -> None:
        self.topology.host_signal(member, signal.SIGCONT)
        self.stopped_hosts.discard(member)

    async def failover(self, fault: Fault, timeout: float = 120) -> Failover:
        """Until another member is the master and every coordinator acknowledged it (the
        group left `rerouting`), with the controller's marks of that failover."""
        status = await self.wait_for(
            lambda s: (
                find_group(s, fault.datanode).master not in ("", fault.member)
                and find_group(s, fault.datanode).state in ("single", "protected", "unprotected")
            ),
            f"a new master of {fault.datanode} and the reroute barrier",
            timeout,
        )
        new = find_group(status, fault.datanode).master
        rerouted = [e for e in self.events(fault.datanode, "rerouted", fault.epoch)]
        assert rerouted, f"no rerouted event after epoch {fault.epoch}"
        marks = json.loads(rerouted[0].details_json)

        def since(key: str) -> float | None:
            value = marks.get(key)
            return (value - fault.at) * 1000 if isinstance(value, float) and value > 0 else None

        return Failover(new, rerouted[0], since("detected_at"), since("promoted_at"), since("rerouted_at"))

    def crashes(self) -> list[str]:
        """Every "server process ... was terminated by signal" line in the coordinators' logs:
        a backend crash makes the whole coordinator restart (measured on XC under load, around
        the reload of a re-point)."""
        found = []
        for name in COORDINATORS:
            log = self.topology.coordinator_spec(name).log_file
            text = log.read_text(errors="replace") if log.exists() else ""
            found += [f"{name}: {line}" for line in text.splitlines() if "was terminated by signal" in line]
        return found

    def report_crashes(self) -> None:
        """Print the coordinator crashes since the last report, for the log."""
        for line in self.crashes():
            if line not in self._crashes_reported:
                self._crashes_reported.add(line)
                print(f"  coordinator backend crash (the coordinator restarted): {line}")

    @asynccontextmanager
    async def writing(self, coordinators: tuple[str, ...]) -> AsyncIterator[Writers]:
        """Writers through these coordinators, stopped at the end whatever happened (a failed
        scenario must not go on writing into the next one)."""
        writers = Writers(self)
        try:
            await writers.start(coordinators)
            yield writers
        finally:
            await writers.stop()

    # ---- checks -------------------------------------------------------------------------------

    async def assert_routes(
        self, datanode: str, member: str, coordinators: tuple[str, ...] = COORDINATORS
    ) -> None:
        """Every given coordinator's catalog sends datanode to member."""
        for coordinator in coordinators:
            routes = await self.routes(coordinator)
            assert routes[datanode] == self.endpoint(member), (
                f"{coordinator} sends {datanode} to {routes[datanode]}, not to {member} "
                f"{self.endpoint(member)}"
            )

    async def assert_join(self, coordinator: str, ids: range) -> None:
        """A join not on the distribution key (rows are redistributed between the datanodes
        on XL) sees every pair of consecutive ids of the range."""
        statement = sql.SQL(
            "SELECT count(*) FROM xcha_writes a JOIN xcha_writes b ON a.id = b.id - 1 "
            "WHERE a.id BETWEEN {low} AND {high} AND b.id BETWEEN {low} AND {high}"
        ).format(low=sql.Literal(ids.start), high=sql.Literal(ids.stop - 1))
        rows = await self.query(coordinator, statement)
        assert rows == [(len(ids) - 1,)], f"the join through {coordinator} counted {rows}, not {len(ids) - 1}"

    async def assert_rejoined(self, fault: Fault, new_master: str) -> tuple[pb.ClusterStatus, str]:
        """The old master is back as the synchronous standby of the new one; returns the
        status and the follow events that brought it back."""
        status = await self.wait_for(
            lambda s: settled(s) and find_group(s, fault.datanode).master == new_master,
            f"{fault.member} to rejoin {fault.datanode} as the synchronous standby",
        )
        former = next(m for m in find_group(status, fault.datanode).members if m.name == fault.member)
        assert former.status.postgres_status.role == pb.ROLE_STANDBY, former
        assert former.sync_state == "sync", former.sync_state
        follows = [
            e
            for e in self.events(fault.datanode, "follow", fault.epoch)
            if json.loads(e.details_json).get("member") == fault.member
        ]
        assert follows, f"no follow event for {fault.member} after epoch {fault.epoch}"
        # A Follow can be sent again (a standby not streaming yet is re-done): every one counts.
        return status, " / ".join(e.message for e in follows)

    def check_usable(self) -> None:
        """Fail at once when an earlier test left the cluster unsettled (instead of each later
        test waiting out its own timeout)."""
        if self.broken:
            pytest.fail(self.broken)

    async def after_test(self, test: str) -> None:
        """The cluster settles again after every test, or the tests after it cannot use it."""
        self.cleanup()
        try:
            await self.settled(60)
        except XchaError as error:
            self.broken = f"the shared cluster did not settle again after {test}: {error}"

    def cleanup(self) -> None:
        """A host a failed scenario left stopped is resumed (stopped processes would only be
        killed by the teardown, never reaped)."""
        for member in list(self.stopped_hosts):
            self.resume(member)


async def coordinator_write(host: str, port: int, statement: str, timeout: float = 2.0) -> str | None:
    """Send `statement` to a datanode as a coordinator's pooled session does, and return its
    command tag if the datanode acknowledged it (None: refused, no answer within timeout, or
    the connection ended).

    A plain client session on an XL / XC datanode is read-only; a coordinator's session says
    `remotetype=coordinator` at startup and may write. XL then sends messages of its own
    (`x`, the transaction id) that libpq does not know, so this speaks the wire protocol
    itself. The datanodes trust loopback for the coordinators' poolers: no password."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                return await _simple_query(reader, writer, statement)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        return None


async def _simple_query(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, statement: str
) -> str | None:
    parameters = b"".join(
        key + b"\0" + value + b"\0"
        for key, value in (
            (b"user", APP_USER.encode()),
            (b"database", b"postgres"),
            (b"options", b"-c remotetype=coordinator"),
        )
    )
    body = struct.pack("!i", 196608) + parameters + b"\0"
    writer.write(struct.pack("!i", len(body) + 4) + body)
    await writer.drain()
    while True:  # authentication and startup, until ReadyForQuery
        kind, payload = await _message(reader)
        if kind == b"E":
            return None  # e.g. "the database system is shutting down"
        if kind == b"R" and struct.unpack("!i", payload[:4])[0] != 0:
            raise AssertionError("the datanode asked for a password: loopback is not trusted")
        if kind == b"Z":
            break
    query = statement.encode() + b"\0"
    writer.write(b"Q" + struct.pack("!i", len(query) + 4) + query)
    await writer.drain()
    tag, failed = None, False
    while True:
        kind, payload = await _message(reader)
        if kind == b"C":
            tag = payload.rstrip(b"\0").decode()
        elif kind == b"E":
            failed = True
        elif kind == b"Z":
            writer.write(b"X" + struct.pack("!i", 4))
            return None if failed else tag


async def _message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    kind = await reader.readexactly(1)
    (length,) = struct.unpack("!i", await reader.readexactly(4))
    return kind, await reader.readexactly(length - 4)


@asynccontextmanager
async def running_cluster(flavor: str) -> AsyncIterator[PgxcCluster]:
    """A cluster in a directory of its own under the test session's, stopped by PID at the
    end whatever happened (`Topology.up` stops what it started if the start fails)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{flavor}-", dir=SESSION_BASE))
    workdir.chmod(0o755)
    topology = Topology(workdir / "x", plan(flavor))
    cluster = PgxcCluster(topology)
    started = time.monotonic()
    try:
        await topology.up(timeout=180)
        await cluster.start()
        print(f"\n  {cluster.product} cluster up in {time.monotonic() - started:.1f} s ({workdir})")
        yield cluster
    finally:
        try:
            cluster.cleanup()
            cluster.report_crashes()
        finally:
            await topology.down()


# ---- scenarios both flavours run ------------------------------------------------------------


async def crash_failover(cluster: PgxcCluster) -> str:
    """kill -9 of dn1's master under writes through both coordinators: a new master, both
    coordinators re-pointed (the barrier), writes to dn1 through each again, a join across
    the datanodes, the old master back as the synchronous standby, nothing acknowledged
    lost. Returns the old master's follow events (how it rejoined)."""
    await cluster.settled()
    joined = cluster.fresh_range(100)
    await cluster.insert(COORDINATORS[0], joined)
    async with cluster.writing(COORDINATORS) as writers:
        fault = cluster.kill_master("dn1")
        failover = await cluster.failover(fault)
        assert sorted(failover.coordinators) == sorted(COORDINATORS), failover.coordinators
        recovered = await writers.recovery_ms(fault)
        await cluster.assert_routes("dn1", failover.new_master)
        await writers.wait_for_acks(10)
        print(
            f"\n  kill -9 of {fault.member}: {failover.line()}; writes to dn1 again through "
            + ", ".join(f"{c} +{ms:.0f} ms" for c, ms in recovered.items())
        )
        _, follow = await cluster.assert_rejoined(fault, failover.new_master)
        print(f"  {follow}")
        for coordinator in COORDINATORS:
            await cluster.assert_join(coordinator, joined)
        assert_nothing_lost(await writers.finish())
        return follow


@dataclass
class HungHost:
    """What a hung master host did to the writes through each coordinator."""

    member: str
    promoted_ms: float  # from SIGSTOP until the status names a new master
    hung_for_ms: float  # from SIGSTOP until SIGCONT
    # Per coordinator, ms from SIGSTOP to the first write to dn1 acknowledged after a failed
    # one while the old master's host was still stopped (None: none was).
    while_hung: dict[str, float | None]
    pending_while_hung: list[str]


def pooler_blocked(hung: HungHost) -> str:
    """Why writes did not resume while the old master's host was stopped, as measured: a
    coordinator's pooler connects to datanodes and cancels their queries with blocking libpq
    calls without a timeout (PQconnectdb, PQcancel). Against a stopped host, which accepts TCP
    in the kernel and never answers, it blocks, and with it every session of that coordinator
    that needs a connection, and the re-point (pgxc_pool_reload waits for the pooler). The
    barrier completes once the old master's host resumes (or dies)."""
    return (
        f"writes to dn1 did not resume through every coordinator while {hung.member}'s host was "
        f"stopped (per coordinator: {hung.while_hung}; reroute pending: {hung.pending_while_hung}): "
        "each coordinator's pooler blocks on the hung old master (PQconnectdb / PQcancel without "
        "a timeout) until its host resumes"
    )


HUNG_WAIT = 6.0  # s after the promotion for the writes to resume while the old host is stopped


async def hung_master(cluster: PgxcCluster) -> HungHost:
    """SIGSTOP of dn1's master host (agent and every PostgreSQL process) under writes through
    both coordinators: a promotion after about failure_timeout; whether writes to dn1 resume
    through each coordinator while the host is still stopped (HUNG_WAIT); then SIGCONT: the
    barrier completes, the old master acknowledges no write sent to it as a coordinator would
    send it, and rejoins as the synchronous standby; nothing acknowledged is lost."""
    await cluster.settled()
    async with cluster.writing(COORDINATORS) as writers:
        master = cluster.group("dn1").master
        host, port = cluster.endpoint(master)
        control = cluster.probe_id()
        assert await coordinator_write(host, port, _insert(control)) == "INSERT 0 1", (
            f"the probe cannot write even to the healthy master {master}: it would prove nothing"
        )
        fault = cluster.hang_master("dn1")
        try:
            await cluster.wait_for(
                lambda s: find_group(s, "dn1").master not in ("", fault.member), "a promotion in dn1"
            )
            promoted_ms = (time.time() - fault.at) * 1000
            to_dn1 = writers.to("dn1")
            deadline = time.monotonic() + HUNG_WAIT
            while time.monotonic() < deadline:
                if all(w.recovery_seconds(fault.at) is not None for w in to_dn1.values()):
                    break
                await asyncio.sleep(0.05)
            while_hung = {
                c: None if (seconds := w.recovery_seconds(fault.at)) is None else seconds * 1000
                for c, w in to_dn1.items()
            }
            pending = list(cluster.group("dn1").reroute_pending)
        finally:
            pid = cluster.topology.postmaster_pid(fault.member)
            resumed = time.monotonic()
            hung_for_ms = (time.time() - fault.at) * 1000
            cluster.resume(fault.member)

        async def probe(delay: float) -> tuple[int, str | None]:
            await asyncio.sleep(delay)
            ident = cluster.probe_id()
            return ident, await coordinator_write(host, port, _insert(ident), timeout=2.0)

        probes = asyncio.gather(*(probe(0.05 * n) for n in range(40)))
        while cluster.topology.postmaster_pid(fault.member) == pid and time.monotonic() - resumed < 30:
            await asyncio.sleep(0.005)
        stopped_ms = (time.monotonic() - resumed) * 1000
        acknowledged = [(ident, tag) for ident, tag in await probes if tag is not None]
        failover = await cluster.failover(fault)
        recovered = await writers.recovery_ms(fault)
        await cluster.assert_routes("dn1", failover.new_master)
        print(
            f"\n  SIGSTOP of {fault.member}'s host: a new master after {promoted_ms:.0f} ms; writes to dn1 "
            "while it was stopped through "
            + ", ".join(f"{c} {_ms(ms)}" for c, ms in while_hung.items())
            + f"; reroute pending then: {pending or 'nothing'}"
        )
        print(
            f"  SIGCONT after {hung_for_ms:.0f} ms: {failover.line()}; writes to dn1 through "
            + ", ".join(f"{c} +{ms:.0f} ms" for c, ms in recovered.items())
        )
        print(
            f"  {fault.member}'s postmaster {pid} gone {stopped_ms:.0f} ms after SIGCONT; "
            f"{len(acknowledged)} of 40 writes sent to it over 2 s acknowledged"
        )
        assert acknowledged == [], f"{fault.member} acknowledged writes after SIGCONT: {acknowledged}"
        assert await cluster.present(COORDINATORS[0], [control]) == [control], (
            "the acknowledged probe is kept"
        )
        _, follow = await cluster.assert_rejoined(fault, failover.new_master)
        print(f"  {follow}")
        assert_nothing_lost(await writers.finish())
        return HungHost(fault.member, promoted_ms, hung_for_ms, while_hung, pending)


def _ms(value: float | None) -> str:
    return "none" if value is None else f"+{value:.0f} ms"


def _insert(ident: int) -> str:
    return f"INSERT INTO xcha_writes (id) VALUES ({int(ident)})"


async def switchover(cluster: PgxcCluster) -> str:
    """A planned switchover of dn1 under writes through both coordinators: the write gap per
    coordinator, the old master following the new one, nothing lost. Returns its follow events."""
    await cluster.settled()
    async with cluster.writing(COORDINATORS) as writers:
        old, epoch = cluster.master_and_epoch("dn1")
        requested = time.time()
        reply = cluster.topology.call(
            lambda stub: stub.Switchover(pb.SwitchoverRequest(datanode="dn1"), timeout=30)
        )
        fault = Fault("dn1", old, requested, epoch)
        failover = await cluster.failover(fault)
        assert json.loads(failover.rerouted.details_json)["switchover"] is True
        await cluster.assert_routes("dn1", failover.new_master)
        await writers.wait_for_acks(10, datanode="dn1")
        gaps = {c: w.write_gap(requested) for c, w in writers.to("dn1").items()}
        print(
            f"\n  switchover {old} -> {failover.new_master} ({reply.detail}): every coordinator re-pointed "
            f"+{failover.reroute_ms or 0:.0f} ms; dn1 write gap "
            + ", ".join(f"{c} {ms:.0f} ms" for c, ms in gaps.items())
        )
        _, follow = await cluster.assert_rejoined(fault, failover.new_master)
        print(f"  {follow}")
        assert_nothing_lost(await writers.finish())
        return follow


async def coordinator_down_during_the_barrier(cluster: PgxcCluster) -> None:
    """coord2 stopped, then a crash of dn1's master: coord1 is re-pointed and carries writes
    while the group stays `rerouting` with coord2 pending; once coord2 is started again the
    barrier completes and coord2 routes to the new master too."""
    await cluster.settled()
    topology = cluster.topology
    await topology.coordinator("coord2").stop("fast")
    try:
        async with cluster.writing(("coord1",)) as writers:
            fault = cluster.kill_master("dn1")

            def waiting(status: pb.ClusterStatus) -> bool:
                group = find_group(status, "dn1")
                # coord1's re-point runs beside coord2's failing attempts: wait until coord1 is
                # through (pending at most for the in-doubt cleanup, which needs coord2 too).
                coord1_busy = any(
                    p.startswith("coord1 ") and "pgxc_clean" not in p for p in group.reroute_pending
                )
                return (
                    group.state == "rerouting"
                    and group.master != fault.member
                    and any(p.startswith("coord2 ") for p in group.reroute_pending)
                    and not coord1_busy
                )

            status = await cluster.wait_for(waiting, "coord1 re-pointed and the barrier waiting for coord2")
            new = find_group(status, "dn1").master
            await cluster.assert_routes("dn1", new, ("coord1",))
            recovered = await writers.recovery_ms(fault)
            steady = time.time()
            await asyncio.sleep(3.0)  # coord1 carries writes all along; the barrier keeps waiting
            await writers.wait_for_acks(20, datanode="dn1")
            group = cluster.group("dn1")
            assert group.state == "rerouting", group.reason
            pending = {p.split()[0]: p for p in group.reroute_pending}
            assert "coord2" in pending, pending
            # coord1 is re-pointed; it may stay pending only for the in-doubt cleanup, which asks
            # every coordinator (pgxc_clean -a) and cannot finish while coord2 is down.
            assert set(pending) <= {"coord1", "coord2"}, pending
            assert "coord1" not in pending or "pgxc_clean" in pending["coord1"], pending["coord1"]
            ended = [
                (c, d, round(t - steady, 1), e)
                for (c, d), w in writers.writers.items()
                for t, e in w.failures
                if t > steady and ("administrator command" in e or "closed the connection" in e)
            ]
            assert ended == [], f"coord1's sessions were ended again after its re-point: {ended}"
            print(
                f"\n  coord2 down, kill -9 of {fault.member}: writes to dn1 through coord1 again "
                f"+{recovered['coord1']:.0f} ms; pending: {list(group.reroute_pending)}"
            )
            back = time.monotonic()
            await topology.start_coordinators()
            started_ms = (time.monotonic() - back) * 1000
            failover = await cluster.failover(fault)
            completed_ms = (time.monotonic() - back) * 1000
            coord2 = failover.coordinators["coord2"]
            assert int(str(coord2["attempts"])) > 1 and "ALTER NODE" in str(coord2["detail"]), coord2
            retries = [
                e for e in cluster.events("dn1", "reroute_retry", fault.epoch) if "coord2" in e.message
            ]
            assert retries, "no reroute_retry event for coord2"
            await cluster.assert_routes("dn1", new)
            ids = (await cluster.ids("dn1", 20))[:5]
            await cluster.insert("coord2", ids)
            assert await cluster.present("coord2", ids) == ids
            print(
                f"  coord2 started again in {started_ms:.0f} ms; the barrier completed {completed_ms:.0f} "
                f"ms after the start began ({coord2['attempts']} attempts on coord2); writes to dn1 "
                "through coord2 work"
            )
            await cluster.assert_rejoined(fault, new)
            assert_nothing_lost(await writers.finish())
    finally:  # the next scenario needs it
        if topology.coordinator("coord2").postmaster_pid() is None:
            await topology.start_coordinators()


@dataclass
class OpenTransaction:
    """A transaction opened through a coordinator before the fault and committed after the
    re-point, and what its COMMIT answered."""

    coordinator: str
    ids: list[int]
    conn: psycopg.AsyncConnection[tuple[object, ...]]
    answer: str = ""
    failed: bool = False


async def transactions_across_the_repoint(cluster: PgxcCluster) -> list[OpenTransaction]:
    """Write transactions open on the coordinators while dn1 fails over (one row on dn1 and one
    on dn2 through each coordinator; one with a row on dn2 only), committed once every
    coordinator is re-pointed: every COMMIT must fail, and none of their rows may exist (a
    COMMIT that kept only the dn2 row is the trap the router's first step guards against).
    A read-only transaction is open too; what its COMMIT answered is returned for the flavour's
    own check (the last one)."""
    await cluster.settled()
    one, two = await cluster.ids("dn1", 40), await cluster.ids("dn2", 40)
    # The last one only reads: it holds no transaction id (XL leaves it alone).
    plans = [("coord1", [one[0], two[0]]), ("coord2", [one[1], two[1]]), ("coord1", [two[2]]), ("coord2", [])]
    opened: list[OpenTransaction] = []
    try:
        for coordinator, ids in plans:
            conn = await cluster.connect(coordinator)
            opened.append(OpenTransaction(coordinator, ids, conn))
            await conn.execute("BEGIN")
            for ident in ids:
                await conn.execute(_insert(ident))
            if not ids:
                await conn.execute("SELECT count(*) FROM xcha_writes")
        fault = cluster.kill_master("dn1")
        failover = await cluster.failover(fault)
        for transaction in opened:
            try:
                cursor = await transaction.conn.execute("COMMIT")
                transaction.answer = str(cursor.statusmessage)
            except psycopg.Error as error:
                transaction.failed = True
                transaction.answer = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
    finally:
        for transaction in opened:
            await transaction.conn.close()
    print(f"\n  kill -9 of {fault.member} with transactions open; {failover.line()}")
    for transaction in opened:
        if not transaction.ids:
            print(f"  {transaction.coordinator} read-only transaction: COMMIT -> {transaction.answer}")
            continue
        present = await cluster.present(transaction.coordinator, transaction.ids)
        print(
            f"  {transaction.coordinator} rows {transaction.ids}: COMMIT -> {transaction.answer}; "
            f"present {present}"
        )
        assert transaction.failed, f"COMMIT through {transaction.coordinator} answered {transaction.answer!r}"
        assert present == [], f"rows {present} of a transaction whose COMMIT failed exist"
    ended = {c: str(d["detail"]) for c, d in failover.coordinators.items()}
    for coordinator in COORDINATORS:
        assert "ended)" in ended[coordinator], ended[coordinator]
    await cluster.assert_rejoined(fault, failover.new_master)
    return opened


async def add_and_remove_standby(cluster: PgxcCluster, datanode: str = "dn2", member: str = "dn2c") -> str:
    """`xcha ctl add-standby` (a new member's agent, then AddStandby): the agent clones the
    master (pg_basebackup of an XL / XC datanode) and streams as a potential synchronous
    standby that replays rows written through a coordinator; then `remove-standby`: it leaves
    synchronous_standby_names and stops. Returns its follow events (how it was cloned)."""
    await cluster.settled()
    topology = cluster.topology
    topology.add_member(datanode, member)
    topology.save()
    topology.start_agent(member)
    requested = time.monotonic()
    reply = topology.call(
        lambda stub: stub.AddStandby(
            pb.AddStandbyRequest(datanode=datanode, member=member, mode="sync"), timeout=10
        )
    )

    def view(status: pb.ClusterStatus) -> pb.MemberView | None:
        return next((m for m in find_group(status, datanode).members if m.name == member), None)

    def streaming(status: pb.ClusterStatus) -> bool:
        found = view(status)
        return (
            found is not None
            and found.status.activity == "idle"
            and found.status.postgres_status.role == pb.ROLE_STANDBY
            and found.sync_state == "potential"
        )

    status = await cluster.wait_for(streaming, f"{member} to stream as a potential synchronous standby")
    joined_ms = (time.monotonic() - requested) * 1000
    master = find_group(status, datanode).master
    names = next(m for m in find_group(status, datanode).members if m.name == master)
    assert member in names.status.postgres_status.synchronous_standby_names, names.status
    follows = [
        e for e in cluster.events(datanode, "follow") if json.loads(e.details_json).get("member") == member
    ]
    assert follows, f"no follow event for {member}"
    ids = (await cluster.ids(datanode, 40))[:10]
    await cluster.insert(COORDINATORS[0], ids)
    deadline = time.monotonic() + 60
    statement = sql.SQL("SELECT count(*) FROM xcha_writes WHERE id = ANY({})").format(sql.Literal(ids))
    row: object = None
    while True:  # a direct session to a datanode standby reads its own rows
        with contextlib.suppress(psycopg.OperationalError, TimeoutError):  # a Follow sent again restarts it
            async with await topology.superuser(member) as conn:
                row = await (await conn.execute(statement)).fetchone()
        if row == (len(ids),):
            break
        assert time.monotonic() < deadline, f"{member} has {row} of the {len(ids)} rows written to {datanode}"
        await asyncio.sleep(0.1)
    joined = " / ".join(e.message for e in follows)
    print(f"\n  {reply.detail}; a potential sync standby after {joined_ms:.0f} ms: {joined}")

    topology.call(
        lambda stub: stub.RemoveStandby(pb.RemoveStandbyRequest(datanode=datanode, member=member), timeout=10)
    )

    def removed(status: pb.ClusterStatus) -> bool:
        group = find_group(status, datanode)
        sync_names = next(m for m in group.members if m.name == group.master).status.postgres_status
        return member not in sync_names.synchronous_standby_names and group.state == "protected"

    await cluster.wait_for(removed, f"{member} to leave synchronous_standby_names")
    deadline = time.monotonic() + 60
    while topology.postgres_pids(member):
        assert time.monotonic() < deadline, f"the removed standby {member} still runs"
        await asyncio.sleep(0.1)
    await cluster.insert(COORDINATORS[1], (await cluster.ids(datanode, 20))[:3])  # writes go on
    return joined


def render(flavor: str, *options: str) -> str:
    """`xcha pg render --flavor FLAVOR OPTIONS...`, as an operator runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "xcha", "pg", "render", "--flavor", flavor, *options],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def setting(text: str, name: str) -> str | None:
    """The value of `name = value` in a rendered file (quotes kept, comment dropped); None when
    the setting is not there."""
    found = re.search(rf"^{re.escape(name)}\s*=\s*('(?:[^']|'')*'|\S+)", text, re.MULTILINE)
    return found.group(1) if found else None


def rendered_file(text: str, name: str) -> str:
    """One file's part of `xcha pg render` output (`==> name` up to the next file)."""
    parts = re.split(r"^==> ", text, flags=re.MULTILINE)
    return next(part for part in parts if part.startswith(name))


async def running_settings(cluster: PgxcCluster, member: str, names: list[str]) -> dict[str, str]:
    """What a running member's server says of these settings."""
    async with await cluster.topology.superuser(member) as conn:
        cursor = await conn.execute(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s)", [names]
        )
        return {
            str(name): str(value) + (str(unit) if unit in ("ms", "s") else "")
            for name, value, unit in await cursor.fetchall()
        }


@dataclass
class Rendered:
    """`xcha pg render --role standby` for the cluster's flavour, and what a running standby
    of the cluster has: its include file, its recovery.conf and its server's settings."""

    conf: str
    recovery: str
    running_conf: str
    running_recovery: str
    settings: dict[str, str]


RENDER_OPTIONS = (
    "--role", "standby", "--name", "dn1b", "--node-name", "dn1", "--port", "6433", "--pooler-port", "6668",
    "--gtm-host", "10.0.0.5", "--gtm-port", "6666", "--primary-host", "10.0.0.4", "--primary-port", "6432",
)  # fmt: skip
SETTINGS = [
    "port",
    "pooler_port",
    "gtm_host",
    "gtm_port",
    "pgxc_node_name",
    "max_prepared_transactions",
    "synchronous_standby_names",
    "wal_level",
    "hot_standby",
    "wal_retrieve_retry_interval",
]


async def rendered_standby(cluster: PgxcCluster) -> Rendered:
    """The key lines of a rendered XL / XC standby, both from the command and on a running
    standby of this cluster (the agents write the same rendering): its ports, the GTM, the
    node name, prepared transactions for the implicit two-phase commit, no synchronous
    standbys of its own, and recovery.conf streaming from its master."""
    text = render(cluster.flavor, *RENDER_OPTIONS)
    conf, recovery = rendered_file(text, "postgresql.xcha.conf"), rendered_file(text, "recovery.conf")
    expected = {
        "port": "6433",
        "pooler_port": "6668",
        "gtm_host": "'10.0.0.5'",
        "gtm_port": "6666",
        "pgxc_node_name": "'dn1'",
        "synchronous_standby_names": "''",
        "hot_standby": "on",
    }
    assert {name: setting(conf, name) for name in expected} == expected, conf
    assert int(str(setting(conf, "max_prepared_transactions"))) > 0, conf
    assert setting(recovery, "standby_mode") == "'on'", recovery
    assert setting(recovery, "recovery_target_timeline") == "'latest'", recovery
    conninfo = str(setting(recovery, "primary_conninfo"))
    for part in ("host=10.0.0.4", "port=6432", "application_name=dn1b"):
        assert part in conninfo, conninfo
    assert "%f %p'" in str(setting(recovery, "restore_command")), recovery

    status = await cluster.settled()
    group = find_group(status, "dn2")
    member = next(m.name for m in group.members if m.name != group.master)
    topology = cluster.topology
    data = topology.instance(member).data_dir
    running_conf = (data / "postgresql.xcha.conf").read_text()
    running_recovery = (data / "recovery.conf").read_text()
    layout = {
        "port": str(topology.members[member].port),
        "pooler_port": str(topology.pooler_ports[member]),
        "gtm_port": str(topology.gtm_port),
        "pgxc_node_name": "'dn2'",
        "synchronous_standby_names": "''",
    }
    assert {name: setting(running_conf, name) for name in layout} == layout, running_conf
    conninfo = str(setting(running_recovery, "primary_conninfo"))
    for part in (f"port={topology.members[group.master].port}", f"application_name={member}"):
        assert part in conninfo, running_recovery
    settings = await running_settings(cluster, member, SETTINGS)
    assert settings["synchronous_standby_names"] == "", settings
    assert (settings["port"], settings["pooler_port"], settings["gtm_port"]) == (
        layout["port"],
        layout["pooler_port"],
        layout["gtm_port"],
    ), settings
    assert int(settings["max_prepared_transactions"]) > 0, settings
    return Rendered(conf, recovery, running_conf, running_recovery, settings)


@dataclass
class PreparedClients:
    """What each client connection answered after the re-point, statement by statement."""

    prepared: list[str]  # opened before the fault, psycopg's default prepare_threshold (5)
    unprepared: list[str]  # opened before the fault, prepare_threshold=None
    new: list[str]  # opened after the re-point, default prepare_threshold


async def prepared_statements_across_the_repoint(cluster: PgxcCluster, tries: int = 8) -> PreparedClients:
    """Clients of coord1 that inserted into dn1 often enough for psycopg to prepare the INSERT
    (and one that never prepares), across a crash failover of dn1: what each of `tries`
    further inserts answers on the same connection, and on a new one."""
    await cluster.settled()
    ids = iter(await cluster.ids("dn1", 400))
    insert = "INSERT INTO xcha_writes (id) VALUES (%s)"
    connections: list[psycopg.AsyncConnection[tuple[object, ...]]] = []
    try:
        prepared = await cluster.connect(COORDINATORS[0])
        connections.append(prepared)
        unprepared = await cluster.connect(COORDINATORS[0], prepare_threshold=None)
        connections.append(unprepared)
        for _ in range(8):  # past the threshold: psycopg prepares it as _pg3_0
            await prepared.execute(insert, [next(ids)])
            await unprepared.execute(insert, [next(ids)])
        fault = cluster.kill_master("dn1")
        failover = await cluster.failover(fault)

        async def answers(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> list[str]:
            found = []
            for _ in range(tries):
                try:
                    found.append(str((await conn.execute(insert, [next(ids)])).statusmessage))
                except psycopg.Error as error:
                    found.append(f"{type(error).__name__}: {str(error).strip().splitlines()[0]}")
            return found

        new = await cluster.connect(COORDINATORS[0])
        connections.append(new)
        clients = PreparedClients(await answers(prepared), await answers(unprepared), await answers(new))
    finally:
        for conn in connections:
            await conn.close()
    print(f"\n  kill -9 of {fault.member}: {failover.line()}; then {tries} inserts each through coord1:")
    for label, found in (
        ("connection that prepared the INSERT", clients.prepared),
        ("connection with prepare_threshold=None", clients.unprepared),
        ("new connection", clients.new),
    ):
        print(f"    {label}: " + "; ".join(f"{n} x {a}" for a, n in Counter(found).items()))
    await cluster.assert_rejoined(fault, failover.new_master)
    return clients
