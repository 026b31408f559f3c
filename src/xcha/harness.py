"""A deployment under write load, with faults to inject and the recovery to measure.

Shared by the demo, the fault-injection tests (tests/chaos/) and the benchmarks (bench/):
a `Topology` with a postgres_fdw coordinator, one writer per datanode inserting through the
coordinator into that datanode's shard, and the timings of a failover taken from the fault,
the controller's `rerouted` event and the writer.
"""

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xcha.coordinator import partition_ids
from xcha.ctl import call
from xcha.errors import XchaError
from xcha.topology import Topology, TopologyPlan
from xcha.v1 import xcha_pb2 as pb
from xcha.workload import Outcome, Writer, verify_all

COORDINATOR = "coord1"
RUNNING = ("single", "protected", "unprotected", "degraded")


@dataclass(frozen=True)
class Fault:
    datanode: str
    member: str
    at: float  # wall clock
    epoch: int  # the controller's epoch before it


@dataclass(frozen=True)
class Recovery:
    """Milliseconds from the fault: the controller's marks, and the first acknowledged write
    after the first failed one (through the coordinator, on the faulty datanode's shard)."""

    new_master: str
    rto_ms: float | None
    detect_ms: float | None
    promote_ms: float | None
    reroute_ms: float | None


def settled(status: pb.ClusterStatus) -> bool:
    """Every group protected and every agent done with what it was doing (a standby can be
    confirming commits while its agent still finishes the Follow that started it)."""
    return all(
        g.state == "protected" and all(m.status.activity == "idle" for m in g.members) for g in status.groups
    )


class LoadedCluster:
    def __init__(self, workdir: Path, plan: TopologyPlan) -> None:
        if not plan.coordinators:
            raise XchaError("a loaded cluster writes through a coordinator: the plan needs one")
        self.topology = Topology(workdir, plan)
        self.writers: dict[str, Writer] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def datanodes(self) -> list[str]:
        return [d.name for d in self.topology.plan.datanodes]

    async def start(
        self, on_status: Callable[[pb.ClusterStatus], None] | None = None, timeout: float = 120
    ) -> pb.ClusterStatus:
        """Bring everything up, wait until every group is protected, start writing."""
        topology = self.topology
        topology.write()
        topology.start()
        await topology.start_coordinators()

        def protected(status: pb.ClusterStatus) -> bool:
            if on_status is not None:
                on_status(status)
            return settled(status)

        status = await topology.wait_for(protected, timeout, "every datanode to be protected")
        await topology.setup_sharding()
        coordinator = [topology.coordinator_app_conninfo(COORDINATOR)]
        async with await topology.coordinator(COORDINATOR).connect() as conn:
            for index, datanode in enumerate(self.datanodes):
                cursor = await conn.execute(partition_ids(index, len(self.datanodes)))
                ids = [int(row[0]) for row in await cursor.fetchall()]  # type: ignore[call-overload]
                self.writers[datanode] = Writer(coordinator, ids=iter(ids))
        for datanode, writer in self.writers.items():
            self._tasks[datanode] = asyncio.create_task(writer.run())
        await self.wait_for_writes(20)
        return status

    async def wait_for_writes(self, count: int, datanode: str | None = None, timeout: float = 30) -> None:
        writers = [self.writers[datanode]] if datanode else list(self.writers.values())
        targets = [len(w.acknowledged) + count for w in writers]
        deadline = time.monotonic() + timeout
        while any(len(w.acknowledged) < t for w, t in zip(writers, targets, strict=True)):
            if time.monotonic() > deadline:
                failures = [w.failures[-1] for w in writers if w.failures]
                raise XchaError(
                    f"no {count} acknowledged writes within {timeout:.0f} s (last failures: {failures})"
                )
            await asyncio.sleep(0.02)

    def status(self) -> pb.ClusterStatus:
        return self.topology.status()

    def group(self, datanode: str) -> pb.GroupView:
        return next(g for g in self.status().groups if g.name == datanode)

    def master(self, datanode: str = "dn1") -> str:
        return self.group(datanode).master

    def events(self, datanode: str = "", kind: str | None = None) -> list[pb.Event]:
        events = call(
            self.topology.target,
            lambda stub: stub.ListEvents(pb.EventsRequest(limit=100000, datanode=datanode), timeout=5),
        ).events
        return [e for e in events if kind is None or e.kind == kind]

    # ---- faults -------------------------------------------------------------------------------

    def kill_master(self, datanode: str = "dn1") -> Fault:
        """kill -9 of the master's postmaster."""
        status = self.status()
        member = next(g.master for g in status.groups if g.name == datanode)
        pid = self.topology.postmaster_pid(member)
        if pid is None:
            raise XchaError(f"{member} has no postmaster to kill")
        os.kill(pid, signal.SIGKILL)
        return Fault(datanode, member, time.time(), status.epoch)

    def hang_master(self, datanode: str = "dn1") -> Fault:
        """A hung host: SIGSTOP of the master's agent and every PostgreSQL process."""
        status = self.status()
        member = next(g.master for g in status.groups if g.name == datanode)
        self.topology.host_signal(member, signal.SIGSTOP)
        return Fault(datanode, member, time.time(), status.epoch)

    def resume(self, member: str) -> None:
        self.topology.host_signal(member, signal.SIGCONT)

    # ---- recovery -----------------------------------------------------------------------------

    async def wait_failover(self, fault: Fault, timeout: float = 60) -> str:
        """Until another member is master and every coordinator points at it."""

        def done(status: pb.ClusterStatus) -> bool:
            group = next(g for g in status.groups if g.name == fault.datanode)
            return group.master != fault.member and group.state in RUNNING

        status = await self.topology.wait_for(done, timeout, f"a failover of {fault.datanode}")
        return next(g.master for g in status.groups if g.name == fault.datanode)

    async def recovery(self, fault: Fault, timeout: float = 60) -> Recovery:
        new = await self.wait_failover(fault, timeout)
        writer = self.writers[fault.datanode]
        deadline = time.time() + 30
        while (rto := writer.recovery_seconds(fault.at)) is None:
            if time.time() > deadline:
                raise XchaError(f"no write reached {fault.datanode} within 30 s of its failover")
            await asyncio.sleep(0.01)
        marks: dict[str, object] = {}
        for event in self.events(fault.datanode, "rerouted"):
            if event.epoch > fault.epoch:
                marks = json.loads(event.details_json)
                break

        def since(key: str) -> float | None:
            value = marks.get(key)
            return (value - fault.at) * 1000 if isinstance(value, float) and value > 0 else None

        return Recovery(new, rto * 1000, since("detected_at"), since("promoted_at"), since("rerouted_at"))

    async def wait_protected(self, timeout: float = 90) -> pb.ClusterStatus:
        return await self.topology.wait_protected(timeout)

    async def finish(self) -> Outcome:
        """Stop writing and check every acknowledged commit through the coordinator."""
        for writer in self.writers.values():
            writer.stop()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for writer in self.writers.values():
            await writer.close()
        self._tasks.clear()
        return await verify_all(
            list(self.writers.values()), [self.topology.coordinator_app_conninfo(COORDINATOR)]
        )

    async def down(self) -> list[str]:
        for writer in self.writers.values():
            writer.stop()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for writer in self.writers.values():
            await writer.close()
        return await self.topology.down()
