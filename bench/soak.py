"""`./run bench soak --faults N [--seed S]`: a long soak of random faults, one at a time, on the
deployment `xcha up` starts (a supervisor running the controller and an agent per PostgreSQL
instance; datanodes dn1 and dn2, each a master with a synchronous standby; a postgres_fdw
coordinator) under continuous writes through the coordinator to both datanodes.

Faults come in rounds, each round every kind once in a seeded random order, each on a datanode
drawn at random (the seed also draws the stall lengths); after each the soak waits until every
group is `protected` again, every agent idle and reporting, and writes go through the
coordinator to both datanodes (bounded by --protected-timeout: a group that does not come back is
counted, and the soak goes on once it is back, or stops when it is not within another bound).

Kinds: kill -9 of a master's postmaster, of a standby's postmaster, of an agent, of the controller
(agents and controller are restarted by the supervisor, as `xcha up` runs them); SIGSTOP of a
master host (its agent and every PostgreSQL process) for 0.5-5 s; a master's network namespace
cut off (link down) until the controller moved the master, then healed; a planned switchover
(the controller's Switchover RPC); a lost synchronous standby (SIGSTOP of its host for 1.25-2.5 x
failure_timeout, so that the group degrades per its policy before it comes back).

For the partition fault every process runs on an address of 192.0.2.0/24 in a network namespace
of its own (tests/chaos/netns.py), the benchmark itself (writers, coordinator) in a "client"
namespace; the namespaces are the benchmark's own and are removed however it ends. Without
root or iproute2 the soak runs on loopback and leaves the partition fault out, and says so.

Checked independently of the controller: after every fault, the commits acknowledged since the
last check are read back on the datanode's writable member (asked directly: pg_is_in_recovery()
on each member), and at the end every acknowledged commit is read back through the coordinator
and on each datanode's final master (lost must be 0, nothing present that was never sent).
Writes accepted by a deposed master: from the moment the controller shows a new master until the
fault's cycle ends, a probe keeps trying to commit on the old master directly (its Unix socket,
which no partition cuts); every commit it acknowledges is counted (must be 0).

Per kind: count, failovers, writes interrupted, RTO (fault -> first acknowledged write through
the coordinator after the first failed one, on the faulty datanode), time back to protected (from
the fault's start), groups that did not come back, lost, deposed-master writes, and how long a
cycle (fault, recovery, writes again) takes.
"""

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import os
import random
import secrets
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from psycopg import sql

from bench.common import RESULTS, Result, say, summary, table
from tests.chaos.netns import NamespacesUnavailable, Network
from xcha.coordinator import SHARDED_TABLE, shard_table
from xcha.ctl import find_group
from xcha.demo import demo_plan
from xcha.errors import XchaError
from xcha.harness import LoadedCluster
from xcha.pg.client import bounded, connect
from xcha.topology import Topology, TopologyPlan, settled
from xcha.v1 import xcha_pb2 as pb
from xcha.workload import WRITE_ERRORS, Writer, judge, present_ids

KINDS = {
    "kill_master": "kill -9 of a master's postmaster",
    "kill_standby": "kill -9 of a standby's postmaster",
    "kill_agent": "kill -9 of an agent (the supervisor restarts it)",
    "kill_controller": "kill -9 of the controller (the supervisor restarts it)",
    "stop_master_host": "SIGSTOP of a master host (agent + every PostgreSQL process) for 0.5-5 s",
    "partition_master": "a master's network namespace cut off until the master moved, then healed",
    "switchover": "a planned switchover (the controller's Switchover RPC)",
    "lost_sync_standby": "the synchronous standby's host down for 1.25-2.5 x failure_timeout: its agent "
    "stopped (SIGSTOP), every PostgreSQL process of it killed; then the agent resumed",
    "hang_sync_standby": "SIGSTOP of the synchronous standby's host (agent + every PostgreSQL process) for "
    "1.25-2.5 x failure_timeout",
}
NEEDS_NAMESPACES = ("partition_master",)

POLL = 0.05  # s between two looks at the controller's status
PROBE_TABLE = "xcha_soak_probe"  # on every datanode: what the deposed-master probe commits
WRITES_AFTER = 5  # acknowledged writes per datanode, through the coordinator, that end a cycle
STOP_HOST_SECONDS = (0.5, 5.0)
STANDBY_DOWN = (1.25, 2.5)  # x failure_timeout: past it, the group degrades per its policy
PARTITION_HOLD = (0.0, 1.0)  # s the cut stays after the master moved

# Network namespaces: the benchmark's own client namespace, the controller's, one per member.
CLIENT_ADDRESS = "192.0.2.100"
CONTROLLER_ADDRESS = "192.0.2.101"
CLONE_NEWNET = 0x40000000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--faults", type=int, default=1000, help="how many faults (default 1000)")
    parser.add_argument("--seed", type=int, help="the random seed (default: drawn, and recorded)")
    parser.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help=f"comma-separated fault kinds (default all): {', '.join(KINDS)}",
    )
    parser.add_argument(
        "--protected-timeout",
        type=float,
        default=60.0,
        help="s from a fault until every group must be protected again (default 60)",
    )
    parser.add_argument(
        "--loopback",
        action="store_true",
        help="no network namespaces: everything on 127.0.0.1, without the partition fault",
    )
    parser.add_argument(
        "--workdir", type=Path, help="the deployment's directory (default: a temporary one, removed)"
    )
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS, help=f"where soak-DATE.md/.json go (default {RESULTS})"
    )


# ---- network namespaces ----------------------------------------------------------------------------


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


class Namespaces:
    """tests/chaos/netns.py's hosts for the controller and every member, and one more, "client",
    that this process (its main thread, and every thread and process it starts afterwards: the
    writers, the coordinator, the supervisor) enters: so the coordinator reaches the datanodes
    on 192.0.2.0/24 while nothing is added to the machine's own network namespace."""

    def __init__(self) -> None:
        self.network = Network(f"xs{secrets.token_hex(3)}")
        self._home: int | None = None

    def create(self, members: Sequence[Sequence[str]]) -> dict[str, tuple[str, str]]:
        addresses = {"client": CLIENT_ADDRESS, "controller": CONTROLLER_ADDRESS}
        for index, group in enumerate(members):
            for position, member in enumerate(group):
                addresses[member] = f"192.0.2.{110 + 10 * index + position + 1}"
        try:
            hosts = self.network.create(addresses)
        except BaseException:
            self.network.destroy()
            raise
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        client = os.open(f"/var/run/netns/{hosts['client'][1]}", os.O_RDONLY)
        try:
            _setns(client)
            self._home = home
        except OSError:
            os.close(home)
            self.network.destroy()
            raise
        finally:
            os.close(client)
        return {name: host for name, host in hosts.items() if name != "client"}

    def destroy(self) -> None:
        """Back to the machine's namespace, then every namespace made here removed."""
        if self._home is not None:
            with contextlib.suppress(OSError):
                _setns(self._home)
            os.close(self._home)
            self._home = None
        self.network.destroy()


# ---- records ---------------------------------------------------------------------------------------


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


@dataclass
class FinalCheck:
    acknowledged: int = 0
    lost_via_coordinator: list[int] = field(default_factory=list)
    unexpected_via_coordinator: list[int] = field(default_factory=list)
    lost_on_masters: dict[str, list[int]] = field(default_factory=dict)
    unexpected_on_masters: dict[str, list[int]] = field(default_factory=dict)
    masters: dict[str, list[str]] = field(default_factory=dict)  # writable members at the end
    error: str = ""


async def final_check(soak: Soak) -> FinalCheck:
    cluster = soak.cluster
    check = FinalCheck()
    await soak.steady(soak.protected_timeout)
    await cluster.stop_writing()
    writers = cluster.single_writers()
    sent = set().union(*(w.sent for w in writers))
    try:
        present = await present_ids([cluster.topology.coordinator_app_conninfo(cluster.coordinators[0])])
        outcome = judge(writers, present)
        check.acknowledged = outcome.acknowledged
        check.lost_via_coordinator, check.unexpected_via_coordinator = outcome.lost, outcome.unexpected
    except (*WRITE_ERRORS, XchaError) as error:
        check.error += f"through the coordinator: {error}; "
        check.acknowledged = len(set().union(*(w.acknowledged for w in writers)))
    for datanode, writer in cluster.writers.items():
        masters = await soak.writable(datanode)
        check.masters[datanode] = masters
        if len(masters) != 1:
            check.error += f"{datanode}: writable members {masters}; "
            continue
        try:
            ids = await soak.read_ids(masters[0])
        except WRITE_ERRORS as error:
            check.error += f"{datanode} on {masters[0]}: {error}; "
            continue
        check.lost_on_masters[datanode] = sorted(set(writer.acknowledged) - ids)
        check.unexpected_on_masters[datanode] = sorted(ids - sent)
    return check


async def prepare_probe(soak: Soak) -> None:
    """The probe's table on every datanode, and the probe shown to catch a writable master: it
    commits on each master now (else a deposed master's writes would go unseen)."""
    topology = soak.topology
    for group in topology.status().groups:
        async with await topology.superuser(group.master) as conn:
            await conn.execute(shard_table(PROBE_TABLE))
        await soak._start_probe(group.master).wait_for_acks(1, timeout=10)
        await soak._stop_probe()


def leftovers(workdir: Path) -> dict[str, object]:
    """What the run left on disk: the deployment's size, the data directories xcha set aside
    (a failed pg_rewind is followed by a fresh clone; the old directory is kept), and how many
    rejoins the agents' logs say took that way."""
    size = 0
    for path in workdir.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                size += path.stat().st_size
    reclones = 0
    for log in (workdir / "logs").glob("agent-*.log"):
        with contextlib.suppress(OSError):
            lines = log.read_text(errors="replace").splitlines()
            reclones += sum(1 for line in lines if ": rewind failed (" in line)
    return {
        "workdir_gib": round(size / 2**30, 2),
        "set_aside_data_dirs": len(list(workdir.glob("*/*/data.old-*"))),
        "rewinds_failed_then_recloned": reclones,
    }


def soak_plan(hosts: dict[str, tuple[str, str]]) -> TopologyPlan:
    return replace(demo_plan("fdw"), hosts=hosts)


async def run(args: argparse.Namespace) -> int:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds or args.faults < 1:
        say(f"unknown fault kinds {unknown}; known: {', '.join(KINDS)}" if unknown else "nothing to do")
        return 2
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    rng = random.Random(seed)
    notes: list[str] = []
    temporary = args.workdir is None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="xcha-bench-soak-"))
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    namespaces: Namespaces | None = None
    cluster: LoadedCluster | None = None
    soak: Soak | None = None
    faults_task: asyncio.Task[None] | None = None
    interrupted = ""
    check: FinalCheck | None = None
    error = ""
    setup_s = wall_s = 0.0
    disk: dict[str, object] = {}

    def interrupt(signum: int) -> None:
        """The first Ctrl-C (or SIGTERM): no more faults, the check, then everything stopped;
        the second: everything stopped at once; later ones wait for that."""
        nonlocal interrupted
        name = signal.Signals(signum).name
        if not interrupted:
            interrupted = name
            if faults_task is not None and not faults_task.done():
                say(f"{name}: no more faults; checking, then stopping everything (again: stop at once)")
                faults_task.cancel()
                return
        if interrupted != "twice" and main is not None:
            interrupted = "twice"
            say(f"{name}: stopping everything now")
            main.cancel()
        else:
            say(f"{name}: stopping already")

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupt, signum)
    try:
        plan = demo_plan("fdw")
        hosts: dict[str, tuple[str, str]] = {}
        if not args.loopback:
            namespaces = Namespaces()
            try:
                hosts = namespaces.create([d.members for d in plan.datanodes])
            except (NamespacesUnavailable, OSError, RuntimeError) as unavailable:
                namespaces = None
                notes.append(
                    f"No network namespaces ({unavailable}): everything on loopback, no partition fault."
                )
        elif any(k in NEEDS_NAMESPACES for k in kinds):
            notes.append("--loopback: everything on 127.0.0.1, no partition fault.")
        if namespaces is None:
            kinds = [k for k in kinds if k not in NEEDS_NAMESPACES]
        cluster = LoadedCluster(workdir, soak_plan(hosts))
        cluster.topology.supervise = True  # as `xcha up` runs it: a supervisor restarts what dies
        soak = Soak(cluster, rng, args.protected_timeout)
        soak.namespaces = namespaces
        say(
            f"soak: {args.faults} faults ({', '.join(kinds)}), seed {seed}, deployment in {workdir}"
            + (f", network namespaces {namespaces.network.prefix}-*" if namespaces else ", loopback")
        )
        began = time.monotonic()
        await cluster.start(timeout=180)
        await prepare_probe(soak)
        setup_s = time.monotonic() - began
        say(f"deployment protected and under writes after {setup_s:.1f} s")
        soak.started = time.time()
        schedule = rounds(rng, kinds)

        async def faults(soak: Soak) -> None:
            for index in range(1, args.faults + 1):
                record = await soak.cycle(index, next(schedule))
                say(_line(record))

        faults_task = asyncio.create_task(faults(soak))
        try:
            await faults_task
        except asyncio.CancelledError:
            if not faults_task.cancelled() or not interrupted:
                raise
        except Exception as failure:
            error = f"{type(failure).__name__}: {failure}"
            say(f"the soak stopped: {error}")
        wall_s = time.time() - soak.started
        check = await final_check(soak)
    except asyncio.CancelledError:
        if not interrupted:
            raise
        error = error or f"interrupted ({interrupted}) before the check"
    except Exception as failure:
        error = error or f"{type(failure).__name__}: {failure}"
        say(f"the soak stopped: {error}")
    finally:
        if soak is not None:
            soak.resume_hosts()
            soak.heal()
            with contextlib.suppress(Exception):
                await soak._stop_probe()
        if cluster is not None:
            stopped = await cluster.down()
            say(f"stopped {len(stopped)} processes by PID")
        if namespaces is not None:
            namespaces.destroy()
            say(f"removed the network namespaces {namespaces.network.prefix}-*")
        records = soak.records if soak is not None else []
        if workdir.is_dir():
            disk = leftovers(workdir)
        if temporary and not error and not _bad(records, check):
            shutil.rmtree(workdir, ignore_errors=True)
        elif temporary:
            say(f"kept {workdir} (logs, data) for a look")
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    result = report(args, seed, kinds, records, check, setup_s, wall_s, notes, error, interrupted)
    result.figures["disk"] = disk
    loads = soak.loads if soak is not None else []
    if loads:
        result.figures["load_average_1min"] = {"mean": round(statistics.fmean(loads), 2), "max": max(loads)}
        result.notes.append(
            f"The machine's 1-minute load average after each fault: mean {statistics.fmean(loads):.1f}, "
            f"max {max(loads):.1f} ({os.cpu_count()} cores): timings stretch with it."
        )
    if disk:
        result.notes.append(
            f"On disk at the end: {disk['workdir_gib']} GiB in the deployment's directory; "
            f"{disk['rewinds_failed_then_recloned']} rejoins whose pg_rewind failed were re-cloned "
            f"instead (agents' logs), leaving {disk['set_aside_data_dirs']} set-aside data directories."
        )
    path = result.write(args.results_dir)
    say("\n" + path.read_text())
    if interrupted:
        return 130
    return 0 if not _bad(records, check) and not error else 1


def _bad(records: Sequence[FaultRecord], check: FinalCheck | None) -> bool:
    if check is None or check.error:
        return True
    return bool(
        check.lost_via_coordinator
        or check.unexpected_via_coordinator
        or any(check.lost_on_masters.values())
        or any(check.unexpected_on_masters.values())
        or any(r.lost or r.deposed_writes or not r.returned or r.writable_masters > 1 for r in records)
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _line(record: FaultRecord) -> str:
    parts = [
        f"fault {record.index} {record.kind}",
        f"{record.target}" + (f" ({record.detail})" if record.detail else ""),
    ]
    if record.master_after and record.master_after != record.master_before:
        parts.append(f"master {record.master_before} -> {record.master_after}")
    if record.left_protected:
        parts.append("left protected")
    parts.append(f"writes again {_ms(record.write_rto_ms)} ms ({record.failed_writes} failed)")
    parts.append(
        f"protected {_ms(record.protected_ms)} ms"
        if record.returned
        else f"NOT protected in time ({record.returned_late_s} s)"
    )
    parts.append(f"cycle {record.cycle_s:.1f} s")
    if record.lost:
        parts.append(f"LOST {len(record.lost)}")
    if record.deposed_writes:
        parts.append(f"DEPOSED-MASTER WRITES {len(record.deposed_writes)}")
    if record.error:
        parts.append(record.error)
    return ": ".join(parts[:2]) + "; " + ", ".join(parts[2:])


def _spread(values: Sequence[float]) -> str:
    s = summary(values)
    return f"{s['p50']:.1f} / {s['mean']:.1f} / {s['max']:.1f}"


def _range(values: Sequence[float]) -> str:
    s = summary(values)
    return f"{s['p50']:.0f} / {s['max']:.0f}" if s.get("n") else "-"


def report(
    args: argparse.Namespace,
    seed: int,
    kinds: Sequence[str],
    records: Sequence[FaultRecord],
    check: FinalCheck | None,
    setup_s: float,
    wall_s: float,
    notes: list[str],
    error: str,
    interrupted: str,
) -> Result:
    plan = demo_plan("fdw")
    result = Result(
        "soak",
        {
            "faults": args.faults,
            "seed": seed,
            "kinds": ",".join(kinds),
            "protected_timeout_s": args.protected_timeout,
            "heartbeat_interval": plan.heartbeat_interval,
            "failure_timeout": plan.failure_timeout,
            "deployment": "xcha up's: supervisor, controller, dn1 and dn2 (master + synchronous standby, "
            "FIRST 1, available), a postgres_fdw coordinator",
            "writers": "through the coordinator: an insert every 10 ms into dn1 and into dn2",
        },
    )
    per_kind: dict[str, dict[str, object]] = {}
    rows = []
    for kind in kinds:
        mine = [r for r in records if r.kind == kind]
        if not mine:
            continue
        rto = [r.write_rto_ms for r in mine if r.write_rto_ms is not None]
        protected = [r.protected_ms for r in mine if r.protected_ms is not None]
        cycles = [r.cycle_s for r in mine]
        figures: dict[str, object] = {
            "count": len(mine),
            "failovers": sum(1 for r in mine if r.master_after and r.master_after != r.master_before),
            "left_protected": sum(1 for r in mine if r.left_protected),
            "writes_interrupted": sum(1 for r in mine if r.failed_writes),
            "write_rto_ms": summary(rto),
            "protected_ms": summary(protected),
            "not_returned": sum(1 for r in mine if not r.returned),
            "cycle_s": summary(cycles),
            "lost": sum(len(r.lost) for r in mine),
            "deposed_writes": sum(len(r.deposed_writes) for r in mine),
            "errors": sum(1 for r in mine if r.error),
        }
        per_kind[kind] = figures
        rows.append(
            (
                kind,
                len(mine),
                figures["failovers"],
                figures["left_protected"],
                figures["writes_interrupted"],
                _range(rto),
                _range(protected),
                figures["not_returned"],
                _spread(cycles),
                figures["lost"],
                figures["deposed_writes"],
            )
        )
    cycles_all = [r.cycle_s for r in records]
    mean_cycle = statistics.fmean(cycles_all) if cycles_all else 0.0
    lost_incremental = sum(len(r.lost) for r in records)
    lost_final = (
        f"{len(check.lost_via_coordinator)} / {sum(len(v) for v in check.lost_on_masters.values())}"
        if check
        else "- / -"
    )
    result.figures = {
        "faults_done": len(records),
        "interrupted": interrupted,
        "error": error,
        "setup_s": round(setup_s, 1),
        "wall_s": round(wall_s, 1),
        "mean_cycle_s": round(mean_cycle, 2),
        "projected_1000_faults_min": round((setup_s + 1000 * mean_cycle) / 60, 1),
        "per_kind": per_kind,
        "acknowledged": check.acknowledged if check else None,
        "lost_after_each_fault": lost_incremental,
        "lost_via_coordinator": len(check.lost_via_coordinator) if check else None,
        "lost_on_masters": {d: len(v) for d, v in check.lost_on_masters.items()} if check else None,
        "unexpected_via_coordinator": len(check.unexpected_via_coordinator) if check else None,
        "unexpected_on_masters": {d: len(v) for d, v in check.unexpected_on_masters.items()}
        if check
        else None,
        "final_masters": check.masters if check else None,
        "final_check_error": check.error if check else "not run",
        "deposed_writes": sum(len(r.deposed_writes) for r in records),
        "probe_attempts": sum(r.probe_attempts for r in records),
        "probe_held_by_a_writable_old_master": sum(r.probe_held for r in records),
        "not_returned": sum(1 for r in records if not r.returned),
        "two_writable_masters": sum(1 for r in records if r.writable_masters > 1),
        "faults": [asdict(r) for r in records],
    }
    result.tables.append(
        table(
            (
                "fault",
                "count",
                "failovers",
                "left protected",
                "writes interrupted",
                "write RTO p50 / max ms",
                "back to protected p50 / max ms",
                f"not protected within {args.protected_timeout:.0f} s",
                "cycle p50 / mean / max s",
                "lost",
                "deposed-master writes",
            ),
            rows,
        )
    )
    result.tables.append(
        table(
            (
                "faults",
                "wall time",
                "mean cycle",
                "acknowledged",
                "lost (after each fault / coordinator / masters)",
                "present but never sent",
                "deposed-master writes",
                "not back in time",
            ),
            [
                (
                    len(records),
                    f"{wall_s / 60:.1f} min (+ {setup_s:.0f} s setup)",
                    f"{mean_cycle:.2f} s",
                    check.acknowledged if check else "-",
                    f"{lost_incremental} / {lost_final}",
                    (
                        len(check.unexpected_via_coordinator)
                        + sum(len(v) for v in check.unexpected_on_masters.values())
                        if check
                        else "-"
                    ),
                    result.figures["deposed_writes"],
                    result.figures["not_returned"],
                )
            ],
        )
    )
    anomalies = [
        r
        for r in records
        if r.lost or r.deposed_writes or not r.returned or r.error or r.writable_masters > 1
    ]
    if anomalies:
        result.tables.append(
            table(
                ("#", "fault", "target", "detail", "at s", "protected ms", "lost", "deposed writes", "error"),
                [
                    (
                        r.index,
                        r.kind,
                        r.target,
                        r.detail,
                        r.at_s,
                        _ms(r.protected_ms) if r.returned else f"not in time ({r.returned_late_s} s)",
                        len(r.lost),
                        len(r.deposed_writes),
                        r.error,
                    )
                    for r in anomalies
                ],
            )
        )
    result.notes.extend(notes)
    result.notes.extend(
        [
            "Kinds: " + "; ".join(f"{k}: {KINDS[k]}" for k in kinds) + ".",
            "Write RTO: from the fault (SIGSTOP, kill, cut, switchover request) to the first write "
            "acknowledged through the coordinator after the first failed one, on the faulty datanode "
            "(all datanodes for the controller); faults that failed no write have none. Back to "
            "protected: from the fault's start until every group is protected, every agent idle and "
            "reporting (heartbeat < 1 s) and the fault's own mark is seen (a new master, a restarted "
            "process's new PID or boot id, the stopped member reporting again); SIGSTOP lengths count in it.",
            f"Cycle: from the fault until that, then {WRITES_AFTER} more acknowledged writes through the "
            "coordinator to every datanode, and the check; the next fault follows at once. "
            f"Mean {mean_cycle:.2f} s here: 1000 faults would take about "
            f"{result.figures['projected_1000_faults_min']} min with the setup.",
            "Lost, checked without the controller: after each fault the commits acknowledged since the "
            "last check are read back on the datanode's writable member (pg_is_in_recovery() asked on "
            "each member); at the end every acknowledged commit through the coordinator and on each "
            "datanode's final master. Deposed-master writes: from the moment the controller showed a "
            "new master until the cycle ended, a probe committing on the old master directly (Unix "
            "socket) every 50 ms; each commit it saw acknowledged counts. "
            f"It tried {result.figures['probe_attempts']} commits; "
            f"{result.figures['probe_held_by_a_writable_old_master']} of them reached an old master "
            "still writable and got no answer within 0.5 s (held, waiting for a synchronous standby); "
            "before the soak it committed once on every master, to show that it sees a writable one.",
        ]
    )
    if interrupted:
        result.notes.append(f"Interrupted ({interrupted}) after {len(records)} faults.")
    if error:
        result.notes.append(f"Stopped by an error: {error}")
    return result
