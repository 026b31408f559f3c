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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from xcha.coordinator import ID_CHUNK, partition_ids
from xcha.ctl import find_group
from xcha.errors import XchaError
from xcha.topology import StatusCallback, Topology, TopologyPlan
from xcha.v1 import xcha_pb2 as pb
from xcha.workload import Outcome, Writer, verify_all

COORDINATOR = "coord1"


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

    async def start(self, on_status: StatusCallback | None = None, timeout: float = 120) -> pb.ClusterStatus:
        """Bring everything up (`Topology.up`), then write to every datanode's shard."""
        topology = self.topology
        status = await topology.up(on_status, timeout)
        coordinator = [topology.coordinator_app_conninfo(COORDINATOR)]
        for index, datanode in enumerate(self.datanodes):
            more = self._ids_routed_to(index)
            self.writers[datanode] = Writer(coordinator, ids=iter(await more()), refill=more)
        for datanode, writer in self.writers.items():
            self._tasks[datanode] = asyncio.create_task(writer.run())
        await self.wait_for_writes(20)
        return status

    def _ids_routed_to(self, index: int) -> Callable[[], Awaitable[list[int]]]:
        """The next ID_CHUNK ids (at most) the coordinator routes to the index-th datanode, per call."""
        start = 1

        async def more() -> list[int]:
            nonlocal start
            async with await self.topology.coordinator(COORDINATOR).connect() as conn:
                cursor = await conn.execute(partition_ids(index, len(self.datanodes), start))
                ids = [int(str(row[0])) for row in await cursor.fetchall()]
            start += ID_CHUNK
            return ids

        return more

    async def wait_for_writes(self, count: int, datanode: str | None = None, timeout: float = 30) -> None:
        """Until every writer (or datanode's) had `count` more commits acknowledged."""
        writers = [self.writers[datanode]] if datanode else list(self.writers.values())
        deadline = time.monotonic() + timeout
        for writer in writers:
            await writer.wait_for_acks(count, max(0.0, deadline - time.monotonic()))

    def status(self) -> pb.ClusterStatus:
        return self.topology.status()

    def group(self, datanode: str) -> pb.GroupView:
        return self.topology.group(datanode)

    def master(self, datanode: str = "dn1") -> str:
        return self.topology.master(datanode)

    def events(self, datanode: str = "", kind: str | None = None) -> list[pb.Event]:
        return self.topology.events(datanode, kind)

    # ---- faults -------------------------------------------------------------------------------

    def _master_now(self, datanode: str) -> tuple[str, int]:
        """The datanode's master and the controller's epoch, before a fault."""
        status = self.status()
        return find_group(status, datanode).master, status.epoch

    def kill_master(self, datanode: str = "dn1") -> Fault:
        """kill -9 of the master's postmaster."""
        member, epoch = self._master_now(datanode)
        pid = self.topology.postmaster_pid(member)
        if pid is None:
            raise XchaError(f"{member} has no postmaster to kill")
        os.kill(pid, signal.SIGKILL)
        return Fault(datanode, member, time.time(), epoch)

    def hang_master(self, datanode: str = "dn1") -> Fault:
        """A hung host: SIGSTOP of the master's agent and every PostgreSQL process."""
        member, epoch = self._master_now(datanode)
        self.topology.host_signal(member, signal.SIGSTOP)
        return Fault(datanode, member, time.time(), epoch)

    def resume(self, member: str) -> None:
        self.topology.host_signal(member, signal.SIGCONT)

    # ---- recovery -----------------------------------------------------------------------------

    async def wait_failover(self, fault: Fault, timeout: float = 60) -> str:
        """Until another member is master and every coordinator points at it."""
        return await self.topology.wait_new_master(fault.datanode, fault.member, timeout)

    async def recovery(self, fault: Fault, timeout: float = 60) -> Recovery:
        new = await self.wait_failover(fault, timeout)
        writer = self.writers[fault.datanode]
        deadline = time.time() + 30
        while (rto := writer.recovery_seconds(fault.at)) is None:
            writer.check_running()
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

    async def finish(self, conninfos: list[str] | None = None) -> Outcome:
        """Stop writing and check every acknowledged commit: through the coordinator, or where
        `conninfos` say (the first of them that accepts writes)."""
        for writer in self.writers.values():
            writer.stop()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for writer in self.writers.values():
            await writer.close()
        self._tasks.clear()
        return await verify_all(
            list(self.writers.values()), conninfos or [self.topology.coordinator_app_conninfo(COORDINATOR)]
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
