"""The controller's shared state: records, observations, the epoch, tasks. The concerns built
on it live in their own modules: `observing` (what agents and probes report), `steps`
(carrying out the state machine's steps), `loop` (view -> decide -> persist -> dispatch),
`commands` (what operators ask) and `status` (what they are told)."""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from xcha.controller.agents import Agents
from xcha.controller.config import ControllerConfig
from xcha.controller.ledger import Ledger
from xcha.controller.observations import Observation
from xcha.controller.routing import Router
from xcha.controller.store import GroupRecord, MemberRecord, Snapshot, Store
from xcha.errors import NotFound
from xcha.names import Endpoint

log = logging.getLogger(__name__)


@dataclass
class FailoverMarks:
    """Wall-clock marks of a failover or switchover under way (events, metrics, the demo)."""

    old_endpoint: Endpoint | None = None
    switchover: bool = False
    promoted_at: float = 0.0
    promote_seconds: float = 0.0


class ControllerCore:
    def __init__(
        self,
        config: ControllerConfig,
        store: Store,
        snapshot: Snapshot,
        router: Router,
        agents: Agents,
        clock: Callable[[], float] = time.monotonic,
        leading: Callable[[], bool] = lambda: True,
    ) -> None:
        self.config = config
        self.router = router
        self.agents = agents
        self.clock = clock
        self.leading = leading
        self.started = clock()
        # Liveness on Heartbeats streams (`Observation.heard_at`): reports older than this mean
        # a stuck agent however alive its connection; a stream's end says the agent was
        # heard up to stream_silence before it.
        self.stale_after = config.report_interval + config.failure_timeout
        self.stream_silence = config.keepalive.silence
        self.ledger = Ledger(store, snapshot, leading)
        self.epoch = snapshot.epoch + 1  # a controller take-over deposes whoever acted before
        self.ledger.set_epoch(self.epoch)
        self.cluster_paused = snapshot.paused
        self.records: dict[str, MemberRecord] = {record.name: record for record in snapshot.members}
        for datanode in config.datanodes:
            for name in datanode.members:
                if name not in self.records:
                    mode = "async" if name in datanode.async_members else "sync"
                    self.records[name] = MemberRecord(datanode.name, name, mode)
                    self.ledger.save_member(self.records[name])
        self._index_members()
        self.groups = dict(snapshot.groups)
        for datanode in config.datanodes:
            self.groups.setdefault(datanode.name, GroupRecord(datanode.name))
        # A standby is not "missing" from the master's reports for longer than this controller
        # has been listening: after a restart (or a take-over) it gets failure_timeout to
        # reconnect before it is re-done or dropped from the synchronous standbys.
        self.observations: dict[str, Observation] = {
            name: Observation(streaming_seen_at=self.started) for name in self.records
        }
        self.learning = set(self.groups)  # groups still in their start-up grace
        self._endpoints: dict[str, Endpoint] = {}
        self.group_tasks: dict[str, asyncio.Task[object]] = {}
        # When the failure rule first held for a group's master: (self.clock(), time.time()).
        self.failures: dict[str, tuple[float, float]] = {}
        self.marks: dict[str, FailoverMarks] = {}
        self.reasons: dict[str, str] = {}
        self.dirty: set[str] = set()
        self._evaluation_scheduled = False
        self._tasks: set[asyncio.Task[object]] = set()
        self._stopping = asyncio.Event()
        self._sweep_slice = 0  # which slice of the groups the next tick sweeps (loop.tick)
        self.heartbeat_observer: Callable[[float], None] | None = None
        router.on_event = lambda dn, kind, message, details: self.event(dn, kind, message, details)
        self.event("", "controller", f"controller started with epoch {self.epoch}")

    # ---- records and events -------------------------------------------------------------------

    def event(self, datanode: str, kind: str, message: str, details: dict[str, object] | None = None) -> None:
        self.ledger.add_event(datanode, kind, self.epoch, message, details)

    def members_of(self, datanode: str) -> list[MemberRecord]:
        return [self.records[name] for name in self._group_members.get(datanode, ())]

    def _index_members(self) -> None:
        """Member names per group, in the order they were configured or added."""
        self._group_members: dict[str, list[str]] = {}
        for record in self.records.values():
            self._group_members.setdefault(record.datanode, []).append(record.name)

    def _save_member(self, record: MemberRecord) -> None:
        self.records[record.name] = record
        self.ledger.save_member(record)

    def _save_group(self, group: GroupRecord) -> None:
        self.groups[group.name] = group
        self.ledger.save_group(group)

    def _bump_epoch(self) -> None:
        self.epoch += 1
        self.ledger.set_epoch(self.epoch)

    def heard_at(self, name: str, now: float) -> float:
        return self.observations[name].heard_at(now, self.stale_after)

    def _endpoint(self, name: str | None) -> Endpoint | None:
        """Where the member's PostgreSQL is reached, from its record (`observe` keeps the record
        in step with the agent's reports); built again only when the address changes."""
        record = self.records.get(name) if name is not None else None
        if record is None or not record.host:
            return None
        endpoint = self._endpoints.get(record.name)
        if endpoint is None or (endpoint.host, endpoint.port) != (record.host, record.port):
            endpoint = self._endpoints[record.name] = Endpoint(record.host, record.port)
        return endpoint

    def _group(self, datanode: str) -> GroupRecord:
        group = self.groups.get(datanode)
        if group is None:
            raise NotFound(f"unknown datanode {datanode!r}: known are {', '.join(sorted(self.groups))}")
        return group

    def _member(self, datanode: str, member: str) -> MemberRecord:
        self._group(datanode)
        record = self.records.get(member)
        if record is None or record.datanode != datanode:
            raise NotFound(f"{member!r} is not a member of datanode {datanode!r}")
        return record

    # ---- tasks ----------------------------------------------------------------------------------

    def _spawn(self, coroutine: Awaitable[object]) -> asyncio.Task[object]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _group_task(self, datanode: str, work: Awaitable[object]) -> None:
        async def run() -> None:
            try:
                await work
            finally:
                self.mark_dirty(datanode)

        self.group_tasks[datanode] = self._spawn(run())

    def _member_task(self, datanode: str, member: str, work: Awaitable[object]) -> None:
        observation = self.observations[member]
        observation.busy = True

        async def run() -> None:
            try:
                await work
            finally:
                observation.busy = False
                self.mark_dirty(datanode)

        self._spawn(run())

    def mark_dirty(self, datanode: str) -> None:
        if self._stopping.is_set():
            return
        self.dirty.add(datanode)
        if not self._evaluation_scheduled:
            self._evaluation_scheduled = True
            asyncio.get_running_loop().call_soon(self._evaluate_dirty)

    def _evaluate_dirty(self) -> None:
        self._evaluation_scheduled = False
        if self._stopping.is_set():
            return
        dirty, self.dirty = self.dirty, set()
        for datanode in dirty:
            self.evaluate(datanode)

    def evaluate(self, datanode: str) -> str:
        """One decision cycle for one group (`loop.Deciding`)."""
        raise NotImplementedError
