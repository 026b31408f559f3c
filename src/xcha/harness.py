"""A deployment under write load, with faults to inject and the recovery to measure.

Shared by the demos, the fault-injection tests (tests/chaos/) and the benchmarks (bench/):
a `Topology` with coordinators (postgres_fdw, or Postgres-XL / XC's own), one writer per
datanode and coordinator inserting through that coordinator ids it routes to that datanode,
optionally a transaction writer per coordinator (one row on every datanode per transaction),
and the timings of a failover taken from the fault, the controller's events and the writers.
"""

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from xcha.coordinator import ID_CHUNK, partition_ids
from xcha.ctl import find_group
from xcha.errors import XchaError
from xcha.pgxc_nodes import node_order, routed_ids
from xcha.topology import StatusCallback, Topology, TopologyPlan
from xcha.v1 import xcha_pb2 as pb
from xcha.workload import (
    Crash,
    IdStream,
    Outcome,
    TransactionOutcome,
    TransactionWriter,
    Writer,
    classify,
    judge,
    present_ids,
)

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
    after the first failed one (through the coordinator, on the faulty datanode's shard).
    With several coordinators written through, rto_ms is the last of them to write again."""

    new_master: str
    rto_ms: float | None
    detect_ms: float | None
    promote_ms: float | None
    reroute_ms: float | None  # every coordinator acknowledged (the `rerouted` event)
    first_write_ms: dict[str, float] = field(default_factory=dict)  # per coordinator
    repoint: "Repoint | None" = None


@dataclass(frozen=True)
class Repoint:
    """A re-point barrier, in wall-clock seconds, from the controller's events: when it started
    (its state event), when each coordinator's own route was re-pointed (its acknowledgement
    less the steps it ran after its own check, which its step detail times), and, on the first
    coordinator of a `pgxc` router, when the datanodes' catalogs and the in-doubt cleanup were
    done. Steps of the last attempt only: a retried coordinator is re-pointed no earlier."""

    started: float
    coordinators: dict[str, float]
    attempts: dict[str, int]
    catalogs: float | None = None  # Postgres-XL: every datanode knows the new address
    cleanup: float | None = None  # the in-doubt cleanup finished
    cleanup_said: str = ""  # its last line of output


_STEP = re.compile(r"^(?P<label>.+?) (?P<ms>\d+(?:\.\d+)?) ms\b(?P<rest>.*)$")
_CLEANUP = "in-doubt cleanup "


def _step_ms(detail: str) -> tuple[float, float, str]:
    """From a pgxc coordinator's step detail ("dn1 -> h:p: end open transactions 0.4 ms;
    ALTER NODE 0.3 ms; ...; in-doubt cleanup 120 ms: <its last line>"): the milliseconds of its
    steps on the datanodes' catalogs (EXECUTE DIRECT ... ALTER NODE / pgxc_pool_reload), of the
    cleanup, and what the cleanup said."""
    _, _, steps = detail.partition(": ")
    steps, _, cleanup = steps.partition(_CLEANUP)
    catalogs = 0.0
    for part in steps.split("; "):
        found = _STEP.match(part.strip())
        label = found.group("label") if found else ""
        if (
            found
            and label.startswith("EXECUTE DIRECT")
            and label.endswith(("ALTER NODE", "pgxc_pool_reload"))
        ):
            catalogs += float(found.group("ms"))
    cleaned = re.match(r"(\d+(?:\.\d+)?) ms(?:, \d+ attempts)?: ?(.*)$", cleanup, re.S) if cleanup else None
    return catalogs, float(cleaned.group(1)) if cleaned else 0.0, cleaned.group(2).strip() if cleaned else ""


def repoint_marks(events: list[pb.Event], after_epoch: int) -> Repoint | None:
    """The first re-point barrier of the datanode (its events, oldest first) after after_epoch."""
    started = None
    for event in events:
        if event.epoch <= after_epoch:
            continue
        details = json.loads(event.details_json or "{}")
        if event.kind == "state" and details.get("to") == "rerouting" and started is None:
            started = event.time
        elif event.kind == "rerouted" and started is not None:
            coordinators: dict[str, float] = {}
            attempts: dict[str, int] = {}
            catalogs = cleanup = None
            said = ""
            for name, progress in details.get("coordinators", {}).items():
                acknowledged = started + float(progress.get("acknowledged_after_ms", 0.0)) / 1000
                attempts[name] = int(progress.get("attempts", 1))
                catalog_ms, cleanup_ms, text = _step_ms(str(progress.get("detail", "")))
                coordinators[name] = acknowledged - (catalog_ms + cleanup_ms) / 1000
                if catalog_ms:
                    catalogs = acknowledged - cleanup_ms / 1000
                if text or cleanup_ms:
                    cleanup, said = acknowledged, text
            return Repoint(started, coordinators, attempts, catalogs, cleanup, said)
    return None


class LoadedCluster:
    def __init__(
        self,
        workdir: Path,
        plan: TopologyPlan,
        coordinators: tuple[str, ...] = (),
        transactions: bool = False,
    ) -> None:
        """Writers through `coordinators` (default: the plan's first); with `transactions`, a
        TransactionWriter through each of them too. On Postgres-XL / XC each writer's ids are
        those the distributed table's hash sends to its datanode (xcha.pgxc_nodes.routed_ids);
        on postgres_fdw those of its hash partition."""
        if not plan.coordinators:
            raise XchaError("a loaded cluster writes through a coordinator: the plan needs one")
        self.topology = Topology(workdir, plan)
        self.coordinators = coordinators or plan.coordinators[:1]
        self.transactions = transactions
        self.writers: dict[str, Writer] = {}  # through the first coordinator, per datanode
        self.writers_through: dict[str, dict[str, Writer]] = {}  # coordinator -> datanode -> writer
        self.transaction_writers: dict[str, TransactionWriter] = {}  # per coordinator
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def datanodes(self) -> list[str]:
        return [d.name for d in self.topology.plan.datanodes]

    @property
    def pgxc(self) -> bool:
        return self.topology.plan.flavor in ("xl", "xc")

    def single_writers(self) -> list[Writer]:
        return [w for through in self.writers_through.values() for w in through.values()]

    def all_writers(self) -> list[Writer]:
        return self.single_writers() + list(self.transaction_writers.values())

    def intended_datanodes(self) -> dict[int, str]:
        """Every id sent, with the datanode its writer had it routed to."""
        intended = {}
        for through in self.writers_through.values():
            for datanode, writer in through.items():
                intended.update(dict.fromkeys(writer.sent, datanode))
        for writer in self.transaction_writers.values():
            for transaction in writer.transactions:
                intended.update(zip(transaction.ids, self.datanodes, strict=True))
        return intended

    async def start(self, on_status: StatusCallback | None = None, timeout: float = 120) -> pb.ClusterStatus:
        """Bring everything up (`Topology.up`), then write to every datanode's shard."""
        topology = self.topology
        status = await topology.up(on_status, timeout)
        order = await self._hash_order()
        refills = {datanode: self._ids_routed_to(order.index(datanode)) for datanode in self.datanodes}
        prepare = None if self.pgxc else 5  # see Writer.prepare_threshold
        for coordinator in self.coordinators:
            conninfo = [topology.coordinator_app_conninfo(coordinator)]
            through = self.writers_through.setdefault(coordinator, {})
            for datanode, more in refills.items():
                through[datanode] = Writer(
                    conninfo, ids=iter(await more()), refill=more, prepare_threshold=prepare
                )
            if self.transactions:
                streams = [IdStream(iter(await more()), more) for more in refills.values()]
                self.transaction_writers[coordinator] = TransactionWriter(
                    conninfo, streams=streams, prepare_threshold=prepare
                )
        self.writers = self.writers_through[self.coordinators[0]]
        for coordinator, through in self.writers_through.items():
            for datanode, writer in through.items():
                self._tasks[f"{coordinator}/{datanode}"] = asyncio.create_task(writer.run())
        for coordinator, writer in self.transaction_writers.items():
            self._tasks[f"{coordinator}/transactions"] = asyncio.create_task(writer.run())
        await self.wait_for_writes(20)
        return status

    async def _hash_order(self) -> list[str]:
        """The datanodes in the order the table's distribution indexes them (XL / XC: as
        pgxc_class has them; postgres_fdw: the partitions were made in the plan's order)."""
        if not self.pgxc:
            return self.datanodes
        async with await self.topology.coordinator(self.coordinators[0]).connect() as conn:
            return [str(row[0]) for row in await (await conn.execute(node_order())).fetchall()]

    def _ids_routed_to(self, index: int) -> Callable[[], Awaitable[list[int]]]:
        """The next ID_CHUNK ids (at most) the coordinators route to the index-th datanode, per
        call: writers sharing it never get the same id."""
        start = 1
        flavor, count = self.topology.plan.flavor, len(self.datanodes)

        async def more() -> list[int]:
            nonlocal start
            chunk = start
            start += ID_CHUNK
            query = (
                routed_ids(flavor, index, count, chunk, ID_CHUNK)
                if self.pgxc
                else partition_ids(index, count, chunk)
            )
            async with await self.topology.coordinator(self.coordinators[0]).connect() as conn:
                cursor = await conn.execute(query)
                return [int(str(row[0])) for row in await cursor.fetchall()]

        return more

    async def wait_for_writes(self, count: int, datanode: str | None = None, timeout: float = 30) -> None:
        """Until every writer (or those of one datanode, through every coordinator) had `count`
        more commits acknowledged."""
        writers = [
            writer
            for through in self.writers_through.values()
            for name, writer in through.items()
            if datanode is None or name == datanode
        ]
        if datanode is None:
            writers += list(self.transaction_writers.values())
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
        first_write: dict[str, float] = {}
        deadline = time.time() + 30
        for coordinator, through in self.writers_through.items():
            writer = through[fault.datanode]
            while (rto := writer.recovery_seconds(fault.at)) is None:
                writer.check_running()
                if time.time() > deadline:
                    raise XchaError(
                        f"no write reached {fault.datanode} through {coordinator} within 30 s of its failover"
                    )
                await asyncio.sleep(0.01)
            first_write[coordinator] = rto * 1000
        events = self.events(fault.datanode)
        marks: dict[str, object] = {}
        for event in events:
            if event.kind == "rerouted" and event.epoch > fault.epoch:
                marks = json.loads(event.details_json)
                break

        def since(key: str) -> float | None:
            value = marks.get(key)
            return (value - fault.at) * 1000 if isinstance(value, float) and value > 0 else None

        return Recovery(
            new,
            max(first_write.values()),
            since("detected_at"),
            since("promoted_at"),
            since("rerouted_at"),
            first_write,
            repoint_marks(events, fault.epoch),
        )

    async def wait_protected(self, timeout: float = 90) -> pb.ClusterStatus:
        return await self.topology.wait_protected(timeout)

    async def stop_writing(self) -> None:
        for writer in self.all_writers():
            writer.stop()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for writer in self.all_writers():
            await writer.close()
        self._tasks.clear()

    async def finish(self, conninfos: list[str] | None = None) -> Outcome:
        """Stop writing and check every acknowledged single-row commit: through the first
        coordinator, or where `conninfos` say (the first of them that accepts writes)."""
        outcome, _, _ = await self.finish_all([], conninfos)
        return outcome

    async def finish_all(
        self, crashes: list[Crash], conninfos: list[str] | None = None
    ) -> tuple[Outcome, TransactionOutcome, set[int]]:
        """`finish`, and the transactions judged by their rows (crashes: see `classify`); also
        every id present. A transaction's rows count in `unexpected` when never sent, not in
        `lost`: a missing one is a false commit, counted apart."""
        await self.stop_writing()
        present = await present_ids(
            conninfos or [self.topology.coordinator_app_conninfo(self.coordinators[0])]
        )
        transactions = list(self.transaction_writers.values())
        singles = [w for w in self.all_writers() if w not in transactions]
        outcome = judge(singles, present, (i for w in transactions for i in w.sent))
        judged = classify([t for w in transactions for t in w.transactions], present, crashes)
        return outcome, judged, present

    async def down(self) -> list[str]:
        for writer in self.all_writers():
            writer.stop()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for writer in self.all_writers():
            await writer.close()
        return await self.topology.down()
