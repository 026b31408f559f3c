"""Injecting one fault at a time and timing the recovery, per fault record."""

import asyncio
import contextlib
import itertools
import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from psycopg import sql

from bench.soak.namespaces import Namespaces
from bench.soak.settings import (
    PARTITION_HOLD,
    POLL,
    PROBE_TABLE,
    STANDBY_DOWN,
    STOP_HOST_SECONDS,
    WRITES_AFTER,
)
from xcha.coordinator import SHARDED_TABLE
from xcha.ctl import find_group
from xcha.errors import XchaError
from xcha.harness import LoadedCluster
from xcha.pg.client import bounded, connect
from xcha.topology import Topology, settled
from xcha.v1 import xcha_pb2 as pb
from xcha.workload import WRITE_ERRORS, Writer


@dataclass
class FaultRecord:
    index: int
    kind: str
    datanode: str  # "" when the fault is the controller's
    target: str  # the member (or "controller") hit
    at_s: float = 0.0  # from the soak's first fault
    detail: str = ""
    master_before: str = ""
    master_after: str = ""
    epoch_before: int = 0
    epoch_after: int = 0
    failover_ms: float | None = None  # the controller showed another master
    left_protected: bool = False  # a group was seen not protected
    write_rto_ms: float | None = None  # first write after the first failed one (faulty datanode)
    failed_writes: int = 0  # on the faulty datanode (all of them for the controller)
    other_failed_writes: int = 0  # on the other datanode
    protected_ms: float | None = None  # back to protected, agents idle and reporting
    returned: bool = False  # within --protected-timeout
    returned_late_s: float | None = None  # when it did not: how long it took after all
    cycle_s: float = 0.0  # fault until writes went through again to every datanode
    checked: int = 0  # acknowledged commits read back after it
    lost: list[int] = field(default_factory=list)
    deposed_writes: list[int] = field(default_factory=list)  # probe commits the old master acknowledged
    probe_attempts: int = 0  # commits the probe tried on the old master
    probe_held: int = 0  # ... that reached it writable and got no answer (held for a standby)
    writable_masters: int = 1  # members of the datanode that took writes at the check
    error: str = ""


@dataclass
class Cycle:
    """What a fault's injection hands to the wait that follows: when it struck (wall clock) and
    what must be true before its group counts as back."""

    at: float
    done: Callable[[pb.ClusterStatus], bool]


# ---- the soak ------------------------------------------------------------------------------------


class Soak:
    def __init__(self, cluster: LoadedCluster, rng: random.Random, protected_timeout: float) -> None:
        self.cluster = cluster
        self.topology: Topology = cluster.topology
        self.rng = rng
        self.protected_timeout = protected_timeout
        self.failure_timeout = self.topology.plan.failure_timeout
        self.records: list[FaultRecord] = []
        self.loads: list[float] = []  # the machine's 1-minute load average after each fault
        self.checked: dict[str, int] = {}  # per datanode: acknowledged ids already read back
        self.probe_ids = itertools.count(1)
        self.started = time.time()
        self._stopped: list[int] = []  # PIDs under SIGSTOP, resumed whatever happens
        self._cut = ""  # a member whose link is down, healed whatever happens
        self.namespaces: Namespaces | None = None
        # per cycle
        self._record: FaultRecord | None = None
        self._probe: tuple[Writer, asyncio.Task[None]] | None = None
        self._fault_at = 0.0

    # ---- the controller's view ----------------------------------------------------------------

    def strike(self) -> float:
        """Now, as the moment the running fault struck (wall clock)."""
        self._fault_at = time.time()
        return self._fault_at

    async def poll(self) -> pb.ClusterStatus | None:
        """The controller's status (None while it does not answer), noting what the running
        fault did: the master moved (the deposed-master probe starts), a group not protected."""
        try:
            status = await asyncio.to_thread(self.topology.status)
        except XchaError:
            self.topology.close_channel()  # a new one next time, not gRPC's reconnect back-off
            return None
        record = self._record
        if record is not None:
            if any(g.state != "protected" for g in status.groups):
                record.left_protected = True
            if record.datanode and record.master_before:
                master = find_group(status, record.datanode).master
                if master and master != record.master_before and record.failover_ms is None:
                    record.failover_ms = round((time.time() - self._fault_at) * 1000, 1)
                    self._start_probe(record.master_before)
        return status

    async def polling(self, seconds: float) -> None:
        """Sleep `seconds`, looking at the status meanwhile."""
        end = time.monotonic() + seconds
        while end - time.monotonic() > 0:
            await self.poll()
            await asyncio.sleep(min(POLL, max(0.0, end - time.monotonic())))

    def member(self, status: pb.ClusterStatus, name: str) -> pb.MemberView:
        return next(m for g in status.groups for m in g.members if m.name == name)

    def back(self, status: pb.ClusterStatus) -> bool:
        """Every group protected, every agent idle and reporting."""
        return settled(status) and all(0 <= m.heartbeat_age < 1 for g in status.groups for m in g.members)

    # ---- the deposed-master probe -------------------------------------------------------------

    def _start_probe(self, old: str) -> Writer:
        if self._probe is not None:
            return self._probe[0]
        probe = Writer(
            [self.topology.superuser_conninfo(old)],
            table=PROBE_TABLE,
            interval=0.05,
            ids=self.probe_ids,
            prepare_threshold=None,
        )
        self._probe = (probe, asyncio.create_task(probe.run()))
        return probe

    async def _stop_probe(self, record: FaultRecord | None = None) -> list[int]:
        """Stop the probe; the commits the old master acknowledged (and, into record, how many
        it tried and how many an old master still writable held unanswered)."""
        if self._probe is None:
            return []
        probe, task = self._probe
        self._probe = None
        probe.stop()
        await asyncio.gather(task, return_exceptions=True)
        await probe.close()
        if record is not None:
            record.probe_attempts += len(probe.failures) + len(probe.acknowledged)
            record.probe_held += sum(1 for _, text in probe.failures if text.startswith("no answer within"))
        return sorted(probe.acknowledged)

    # ---- hosts --------------------------------------------------------------------------------

    def host_pids(self, member: str) -> list[int]:
        """The member's "host": every PostgreSQL process of its instance and its agent (which
        the supervisor runs)."""
        pids = self.topology.postgres_pids(member)
        agent = self.topology.supervised().get(f"agent:{member}")
        return pids + ([agent] if agent else [])

    def stop_host(self, member: str) -> int:
        pids = self.host_pids(member)
        self._stopped.extend(pids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        return len(pids)

    def resume_hosts(self) -> None:
        stopped, self._stopped = self._stopped, []
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def heal(self) -> None:
        if self._cut and self.namespaces is not None:
            cut, self._cut = self._cut, ""
            self.namespaces.network.heal(cut)

    # ---- faults -------------------------------------------------------------------------------
    # Each injects its fault into record's datanode (status: the controller's before it) and
    # returns when its active part is over (a stall resumed, a cut healed).

    def _moved(self, record: FaultRecord) -> Callable[[pb.ClusterStatus], bool]:
        return lambda s: find_group(s, record.datanode).master not in ("", record.master_before)

    def _reporting(self, member: str) -> Callable[[pb.ClusterStatus], bool]:
        return lambda s: 0 <= self.member(s, member).heartbeat_age < 1

    def _standby(self, status: pb.ClusterStatus, datanode: str) -> str:
        group = find_group(status, datanode)
        members = [m.name for m in group.members if m.name != group.master]
        synchronous = [m.name for m in group.members if m.name != group.master and m.sync_state == "sync"]
        return (synchronous or members)[0]

    async def kill_master(self, record: FaultRecord, status: pb.ClusterStatus) -> Cycle:
        record.target = record.master_before
        pid = self.topology.postmaster_pid(record.target)
        if pid is None:
            raise XchaError(f"{record.target} has no postmaster to kill")
        os.kill(pid, signal.SIGKILL)
        return Cycle(self.strike(), self._moved(record))

    async def kill_standby(self, record: FaultRecord, status: pb.ClusterStatus) -> Cycle:
        record.target = self._standby(status, record.datanode)
        pid = self.topology.postmaster_pid(record.target)
        if pid is None:
            raise XchaError(f"{record.target} has no postmaster to kill")
        os.kill(pid, signal.SIGKILL)
        member = record.target
        return Cycle(self.strike(), lambda s: self.topology.postmaster_pid(member) not in (None, pid))

    async def kill_agent(self, record: FaultRecord, status: pb.ClusterStatus) -> Cycle:
        group = find_group(status, record.datanode)
        record.target = self.rng.choice([m.name for m in group.members])
        record.detail = "the master's" if record.target == group.master else "a standby's"
        key = f"agent:{record.target}"
        pid = self.topology.supervised().get(key)
        if pid is None:
            raise XchaError(f"the supervisor runs no {key}")
        boot = self.member(status, record.target).status.boot_id
        os.kill(pid, signal.SIGKILL)
        member = record.target
        return Cycle(
            self.strike(),
            lambda s: (
                self.topology.supervised().get(key) not in (None, pid)
                and self.member(s, member).status.boot_id not in ("", boot)
            ),
        )

    async def kill_controller(self, record: FaultRecord, status: pb.ClusterStatus) -> Cycle:
        record.target = "controller"
        pid = self.topology.supervised().get("controller")
        if pid is None:
            raise XchaError("the supervisor runs no controller")
        os.kill(pid, signal.SIGKILL)
        return Cycle(self.strike(), lambda s: self.topology.supervised().get("controller") not in (None, pid))

    async def stop_master_host(self, record: FaultRecord, status: pb.ClusterStatus) -> Cycle:
        record.target = record.master_before
        seconds = self.rng.uniform(*STOP_HOST_SECONDS)
        stopped = self.stop_host(record.target)
        at = self.strike()
        record.detail = f"{seconds:.2f} s, {stopped} processes"
        try:
            await self.polling(seconds)
        finally:
            self.resume_hosts()
        return Cycle(at, self._reporting(record.target))

    async def partition_master(self, record: FaultRecord, status: pb.ClusterStatus) -> Cycle:
        if self.namespaces is None:
            raise XchaError("no network namespaces: no partition")
        record.target = record.master_before
        self.namespaces.network.cut(record.target)
        self._cut = record.target
        at = self.strike()
        try:
            deadline = time.monotonic() + self.protected_timeout
            while record.failover_ms is None and time.monotonic() < deadline:
                await self.polling(POLL)
            hold = self.rng.uniform(*PARTITION_HOLD)
            record.detail = f"healed {hold:.2f} s after the master moved"
            if record.failover_ms is None:
                record.detail = f"no failover within {self.protected_timeout:.0f} s: healed"
            else:
                await self.polling(hold)
        finally:
            self.heal()
        moved = self._moved(record)
        reporting = self._reporting(record.target)
        return Cycle(at, lambda s: moved(s) and reporting(s))

    async def switchover(self, record: FaultRecord, status: pb.ClusterStatus) -> Cycle:
        record.target = record.master_before
        at = self.strike()
        request = pb.SwitchoverRequest(datanode=record.datanode)
        await asyncio.to_thread(self.topology.call, lambda stub: stub.Switchover(request, timeout=10))
        return Cycle(at, self._moved(record))

    async def lost_sync_standby(self, record: FaultRecord, status: pb.ClusterStatus) -> Cycle:
        """Its host down: the agent stopped (a killed one would be restarted by the supervisor at
        once) and PostgreSQL gone, so the master sees it go; up again when the agent resumes."""
        record.target = self._standby(status, record.datanode)
        seconds = self.rng.uniform(*STANDBY_DOWN) * self.failure_timeout
        agent = self.topology.supervised().get(f"agent:{record.target}")
        if agent is None:
            raise XchaError(f"the supervisor runs no agent:{record.target}")
        postgres = self.topology.postgres_pids(record.target)
        killed = self.topology.postmaster_pid(record.target)
        self._stopped.append(agent)
        os.kill(agent, signal.SIGSTOP)
        for pid in postgres:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        at = self.strike()
        try:
            await self.polling(seconds)
        finally:
            self.resume_hosts()
        record.detail = f"{seconds:.2f} s, {len(postgres)} PostgreSQL processes killed"
        member, reporting = record.target, self._reporting(record.target)
        return Cycle(
            at, lambda s: reporting(s) and self.topology.postmaster_pid(member) not in (None, killed)
        )

    async def hang_sync_standby(self, record: FaultRecord, status: pb.ClusterStatus) -> Cycle:
        record.target = self._standby(status, record.datanode)
        seconds = self.rng.uniform(*STANDBY_DOWN) * self.failure_timeout
        stopped = self.stop_host(record.target)
        at = self.strike()
        try:
            await self.polling(seconds)
        finally:
            self.resume_hosts()
        record.detail = f"{seconds:.2f} s, {stopped} processes"
        return Cycle(at, self._reporting(record.target))

    # ---- one cycle ----------------------------------------------------------------------------

    async def steady(self, timeout: float) -> pb.ClusterStatus | None:
        """The status once every group is back (None when not within timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await self.poll()
            if status is not None and self.back(status):
                return status
            await asyncio.sleep(POLL)
        return None

    async def cycle(self, index: int, kind: str) -> FaultRecord:
        status = await self.steady(self.protected_timeout)
        if status is None:
            raise XchaError(f"the deployment is not back to protected within {self.protected_timeout:.0f} s")
        datanode = "" if kind == "kill_controller" else self.rng.choice([g.name for g in status.groups])
        record = FaultRecord(index, kind, datanode, "", epoch_before=status.epoch)
        if datanode:
            record.master_before = find_group(status, datanode).master
        self._record = record
        started = time.monotonic()
        cycle = Cycle(self.strike(), lambda s: True)
        interrupted = False
        try:
            try:
                cycle = await getattr(self, kind)(record, status)
            except (XchaError, OSError) as error:
                record.error = f"not injected: {error}"
            record.at_s = round(cycle.at - self.started, 3)
            await self._recover(record, cycle)
            record.deposed_writes = await self._stop_probe(record)
            await self._check(record)
        except asyncio.CancelledError:
            interrupted = True  # not recorded: it did not run its course
            raise
        finally:
            self._record = None
            self.resume_hosts()
            self.heal()
            record.deposed_writes += await self._stop_probe(record)
            record.cycle_s = round(time.monotonic() - started, 3)
            self._write_marks(record, cycle.at)
            if not interrupted:
                self.records.append(record)
                self.loads.append(os.getloadavg()[0])
        return record

    async def _recover(self, record: FaultRecord, cycle: Cycle) -> None:
        deadline = cycle.at + self.protected_timeout
        status = None
        while time.time() < deadline:
            status = await self.poll()
            if status is not None and self.back(status) and cycle.done(status):
                record.protected_ms = round((time.time() - cycle.at) * 1000, 1)
                record.returned = True
                break
            await asyncio.sleep(POLL)
        else:
            late = await self.steady(self.protected_timeout)
            if late is None:
                raise XchaError(
                    f"fault {record.index} ({record.kind} of {record.target}): not back to protected "
                    f"within {2 * self.protected_timeout:.0f} s; last status: "
                    + "; ".join(f"{g.name} {g.state}: {g.reason}" for g in (status.groups if status else ()))
                )
            record.returned_late_s = round(time.time() - cycle.at, 1)
            status = late
        if status is not None:
            record.epoch_after = status.epoch
            if record.datanode:
                record.master_after = find_group(status, record.datanode).master
        await self.cluster.wait_for_writes(WRITES_AFTER, timeout=self.protected_timeout)

    def _write_marks(self, record: FaultRecord, at: float) -> None:
        """RTO and failed writes, from the writers' own records."""
        for datanode, writer in self.cluster.writers.items():
            failures = [t for t, _ in writer.failures if t >= at]
            mine = not record.datanode or datanode == record.datanode
            if mine:
                record.failed_writes += len(failures)
            else:
                record.other_failed_writes += len(failures)
            if mine and failures:
                after = [t for t in writer.acknowledged.values() if t > failures[0]]
                if after:
                    rto = round((min(after) - at) * 1000, 1)
                    record.write_rto_ms = max(record.write_rto_ms or 0.0, rto)

    # ---- the independent check ------------------------------------------------------------------

    async def writable(self, datanode: str) -> list[str]:
        """The datanode's members that take writes, each asked directly (pg_is_in_recovery)."""
        found = []
        for name, info in self.topology.members.items():
            if info.datanode != datanode:
                continue
            with contextlib.suppress(*WRITE_ERRORS):
                conn = await connect(self.topology.superuser_conninfo(name), 2.0, autocommit=True)
                async with conn:
                    cursor = await bounded(conn, conn.execute("SELECT pg_is_in_recovery()"), 2.0)
                    row = await cursor.fetchone()
                    if row is not None and row[0] is False:
                        found.append(name)
        return found

    async def read_ids(self, member: str, ids: list[int] | None = None) -> set[int]:
        """The ids of the sharded table on a member (only those of `ids` when given)."""
        conn = await connect(self.topology.superuser_conninfo(member), 5.0, autocommit=True)
        async with conn:
            query = sql.SQL("SELECT id FROM {}").format(sql.Identifier(SHARDED_TABLE))
            if ids is None:
                cursor = await bounded(conn, conn.execute(query), 60.0)
            else:
                query += sql.SQL(" WHERE id = ANY(%s)")
                cursor = await bounded(conn, conn.execute(query, [ids]), 30.0)
            return {int(str(row[0])) for row in await cursor.fetchall()}

    async def _check(self, record: FaultRecord) -> None:
        """Every commit acknowledged since the last check, on its datanode's writable member."""
        for datanode, writer in self.cluster.writers.items():
            acknowledged = writer.acknowledged
            count = len(acknowledged)
            new = list(itertools.islice(reversed(acknowledged), count - self.checked.get(datanode, 0)))
            masters = await self.writable(datanode)
            if len(masters) != 1:
                record.writable_masters = max(record.writable_masters, len(masters)) if masters else 0
                record.error += f"{datanode}: writable members {masters}, not checked; "
                continue
            present = await self.read_ids(masters[0], new)
            record.lost += sorted(set(new) - present)
            record.checked += len(new)
            self.checked[datanode] = count


# ---- the run --------------------------------------------------------------------------------------


def rounds(rng: random.Random, kinds: Sequence[str]) -> Iterator[str]:
    """Every kind once per round, in a random order."""
    while True:
        order = list(kinds)
        rng.shuffle(order)
        yield from order
