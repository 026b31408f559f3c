"""The controller: hears the agents, asks the state machine, does what it decides.

Each evaluation of a group returns the state machine's one-line reason, logged when it
changes. Decisions are persisted before any message is sent. Group operations (promote,
switchover, reroute) and member operations (follow, fence, synchronous standbys) run as
tasks; while one runs, the state machine sees the group or member as busy.
"""

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import grpc

from xcha import __version__
from xcha.agent.service import sync_to_proto
from xcha.config import TlsConfig
from xcha.controller.config import ControllerConfig
from xcha.controller.fsm import (
    RUNNING_STATES,
    Action,
    Decision,
    Step,
    confirming_standbys,
    decide,
    master_failure,
    requested_candidate,
)
from xcha.controller.routing import Router
from xcha.controller.store import EventRecord, GroupRecord, MemberRecord, Store
from xcha.controller.views import NEVER, GroupState, GroupView, MemberView, Request
from xcha.errors import InvalidInput, NotFound, Refused, XchaError
from xcha.names import Endpoint, check_name
from xcha.pg.lsn import format_lsn
from xcha.pg.probe import ping
from xcha.pg.status import PgStatus
from xcha.rpc import channel, endpoint_to_proto, status_from_proto
from xcha.v1 import xcha_pb2 as pb
from xcha.v1 import xcha_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

FOLLOW_BACKOFF = 5.0
SWEEP_INTERVAL = 1.0
FENCE_TIMEOUT = 60.0
BEST_EFFORT_FENCE_TIMEOUT = 2.0  # the old master while its successor is promoted
CLEAN_STOP_TIMEOUT = 120.0  # a switchover's master: every WAL record reaches the standbys


@dataclass
class Observation:
    """What the controller knows of one member, from its agent and its own probes."""

    status: pb.MemberStatus | None = None
    received_at: float = -NEVER
    probe_ok: bool | None = None
    probe_detail: str = "not probed"
    probe_at: float = -NEVER
    probing: bool = False
    busy: bool = False
    follow_failed_at: float = -NEVER
    streaming_seen_at: float = -NEVER
    fingerprint: tuple[object, ...] = ()
    _pg: PgStatus | None = None

    @property
    def pg(self) -> PgStatus:
        """The status as a PgStatus, converted when first needed (most heartbeats of a large
        cluster are never looked at: converting each one would cost the controller)."""
        if self._pg is None:
            self._pg = (
                status_from_proto(self.status.postgres_status) if self.status else PgStatus(running=False)
            )
        return self._pg


@dataclass
class FailoverMarks:
    """Wall-clock marks of a failover or switchover under way (events, metrics, the demo)."""

    old_endpoint: Endpoint | None = None
    switchover: bool = False
    promoted_at: float = 0.0
    promote_seconds: float = 0.0


class AgentClient:
    def __init__(self, address: str, tls: TlsConfig) -> None:
        self.address = address
        self.channel = channel(address, tls)
        self.stub = pb_grpc.AgentStub(self.channel)


def _fingerprint(status: pb.MemberStatus) -> tuple[object, ...]:
    pg = status.postgres_status
    return (
        pg.running,
        pg.role,
        pg.timeline,
        pg.port,
        pg.wal_receiver.status,
        pg.wal_receiver.upstream.port,
        tuple((d.name, d.state, d.sync_state) for d in pg.downstreams),
        pg.synchronous_standby_names,
        status.activity,
        status.fenced,
        status.upstream.ok,
        status.epoch,
        status.has_data,
        status.postmaster_died,
    )


class Controller:
    def __init__(
        self,
        config: ControllerConfig,
        store: Store,
        router: Router,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.store = store
        self.router = router
        self.clock = clock
        self.started = clock()
        self.epoch = store.epoch() + 1  # a controller take-over deposes whoever acted before
        store.set_epoch(self.epoch)
        self.cluster_paused = store.cluster_paused()
        self.records: dict[str, MemberRecord] = {}
        for record in store.members():
            self.records[record.name] = record
        for datanode in config.datanodes:
            for name in datanode.members:
                if name not in self.records:
                    mode = "async" if name in datanode.async_members else "sync"
                    self.records[name] = MemberRecord(datanode.name, name, mode)
                    store.save_member(self.records[name])
        self._index_members()
        self.groups = store.groups()
        for datanode in config.datanodes:
            self.groups.setdefault(datanode.name, GroupRecord(datanode.name))
        # A standby is not "missing" from the master's reports for longer than this controller
        # has been listening: after a restart of the deployment it gets failure_timeout to
        # reconnect before it is re-done or dropped from the synchronous standbys.
        self.observations: dict[str, Observation] = {
            name: Observation(streaming_seen_at=self.started) for name in self.records
        }
        self.learning = set(self.groups)  # groups still in their start-up grace
        self.clients: dict[str, AgentClient] = {}
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
        self._last_sweep = -NEVER
        self.on_event: Callable[[EventRecord], None] = lambda event: None
        self.heartbeat_observer: Callable[[float], None] | None = None
        router.on_event = lambda dn, kind, message, details: self.event(dn, kind, message, details)
        self.event("", "controller", f"controller started with epoch {self.epoch}")

    # ---- records and events -------------------------------------------------------------------

    def event(self, datanode: str, kind: str, message: str, details: dict[str, object] | None = None) -> None:
        record = self.store.add_event(datanode, kind, self.epoch, message, details)
        self.on_event(record)

    def members_of(self, datanode: str) -> list[MemberRecord]:
        return [self.records[name] for name in self._group_members.get(datanode, ())]

    def _index_members(self) -> None:
        """Member names per group, in the order they were configured or added."""
        self._group_members: dict[str, list[str]] = {}
        for record in self.records.values():
            self._group_members.setdefault(record.datanode, []).append(record.name)

    def _save_group(self, group: GroupRecord) -> None:
        self.groups[group.name] = group
        self.store.save_group(group)

    def _bump_epoch(self) -> None:
        self.epoch += 1
        self.store.set_epoch(self.epoch)

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

    def _client(self, name: str) -> AgentClient:
        address = self.records[name].agent_address
        if not address:
            raise Refused(f"the agent of {name} has never reported its address")
        client = self.clients.get(name)
        if client is None or client.address != address:
            if client is not None:
                self._spawn(client.channel.close())
            client = self.clients[name] = AgentClient(address, self.config.tls)
        return client

    # ---- heartbeats ---------------------------------------------------------------------------

    def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        started = time.perf_counter()
        try:
            return self._heartbeat(request)
        finally:
            if self.heartbeat_observer is not None:
                self.heartbeat_observer(time.perf_counter() - started)

    def _heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        status = request.status
        record = self.records.get(status.member)
        if record is None or record.datanode != status.datanode:
            return pb.HeartbeatReply(
                epoch=self.epoch,
                goal=pb.GOAL_WAIT,
                heartbeat_interval=self.config.heartbeat_interval,
                failure_timeout=self.config.failure_timeout,
                detail=f"{status.member!r} is not a member of datanode {status.datanode!r}: "
                "add it with `xcha ctl add-standby`",
            )
        self.observe(status.member, status, request.reason)
        return self.goal(record)

    def observe(self, name: str, status: pb.MemberStatus, reason: str = "interval") -> None:
        now = self.clock()
        observation = self.observations[name]
        previous = observation.status
        if (
            previous is not None
            and previous.boot_id == status.boot_id
            and status.sequence <= previous.sequence
        ):
            return  # an older report that arrived late
        observation.status = status
        observation._pg = None
        observation.received_at = now
        record = self.records[name]
        if (status.postgres.host, status.postgres.port, status.agent_address) != (
            record.host,
            record.port,
            record.agent_address,
        ):
            self.records[name] = replace(
                record,
                host=status.postgres.host,
                port=status.postgres.port,
                agent_address=status.agent_address,
            )
            self.store.save_member(self.records[name])
        # The master's report says who streams; with no master recorded yet, the report of a
        # master about to be adopted counts too (else its healthy standbys look missing).
        if self.groups[record.datanode].master in (name, None):
            for downstream in status.postgres_status.downstreams:
                if downstream.state == "streaming" and downstream.name in self.observations:
                    self.observations[downstream.name].streaming_seen_at = now
        fingerprint = _fingerprint(status)
        if fingerprint != observation.fingerprint or reason != "interval":
            observation.fingerprint = fingerprint
            self.mark_dirty(record.datanode)

    def goal(self, record: MemberRecord) -> pb.HeartbeatReply:
        group = self.groups[record.datanode]
        reply = pb.HeartbeatReply(
            epoch=self.epoch,
            heartbeat_interval=self.config.heartbeat_interval,
            failure_timeout=self.config.failure_timeout,
            detail=group.state.value,
        )
        if record.removed:
            reply.goal = pb.GOAL_REMOVED
        elif group.master == record.name or (
            group.state in (GroupState.SWITCHOVER, GroupState.FAILOVER) and group.candidate == record.name
        ):
            # A switchover's target is the master from its promotion on, before the group
            # record names it: told "standby" meanwhile, its agent would fence it.
            reply.goal = pb.GOAL_MASTER
        elif group.master is None or (upstream := self._endpoint(group.master)) is None:
            reply.goal = pb.GOAL_WAIT
        else:
            reply.goal = pb.GOAL_STANDBY
            reply.upstream.CopyFrom(endpoint_to_proto(upstream))
            reply.upstream_member = group.master
        return reply

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

    # ---- the control loop -----------------------------------------------------------------

    def view(self, datanode: str) -> GroupView:
        now = self.clock()
        group = self.groups[datanode]
        config = self.config.datanode(datanode)
        assert config is not None
        # How long a standby has been missing from the master's reports, in the master's report
        # time: when the master stops reporting (it may hang), nothing is "missing" for longer.
        master_observation = self.observations.get(group.master) if group.master else None
        master_reported_at = master_observation.received_at if master_observation else -NEVER
        members = []
        for record in self.members_of(datanode):
            observation = self.observations[record.name]
            status = observation.status
            members.append(
                MemberView(
                    name=record.name,
                    mode=record.mode,
                    heartbeat_age=now - observation.received_at,
                    pg=observation.pg,
                    endpoint=self._endpoint(record.name),
                    epoch=status.epoch if status else 0,
                    activity=status.activity if status else "unknown",
                    fenced=status.fenced if status else False,
                    has_data=status.has_data if status else False,
                    postmaster_died=status.postmaster_died if status else False,
                    upstream_checked=status.upstream.checked if status else False,
                    upstream_ok=status.upstream.ok if status else True,
                    probe_ok=observation.probe_ok,
                    probe_age=now - observation.probe_at,
                    busy=observation.busy,
                    follow_backoff=now - observation.follow_failed_at < FOLLOW_BACKOFF,
                    streaming_missing_for=master_reported_at - observation.streaming_seen_at,
                    removed=record.removed,
                )
            )
        failure = self.failures.get(datanode)
        task = self.group_tasks.get(datanode)
        return GroupView(
            name=datanode,
            state=group.state,
            members=tuple(members),
            master=group.master,
            candidate=group.candidate,
            sync_set=group.sync_set,
            policy=config.policy,
            on_sync_failure=config.on_sync_failure,
            allow_data_loss=config.allow_data_loss,
            paused=group.paused or self.cluster_paused,
            epoch=self.epoch,
            failure_timeout=self.config.failure_timeout,
            in_grace=self._learning(datanode, now),
            busy=task is not None and not task.done(),
            master_failed_for=now - failure[0] if failure is not None else 0.0,
            promote_attempts=group.promote_attempts,
            rerouted=group.rerouted_epoch >= self.epoch,
            switchover_failed=group.switchover_failed,
            request=group.request,
            takeover_port=group.takeover_port,
        )

    def _learning(self, datanode: str, now: float) -> bool:
        """After a start, silence and persisted states prove nothing until every member has
        reported at this controller's epoch (or startup_grace, at least failure_timeout, has
        passed): an agent that has not reported yet is not a failed one."""
        if datanode not in self.learning:
            return False
        if now - self.started < self.config.startup_grace and any(
            (status := self.observations[record.name].status) is None or status.epoch < self.epoch
            for record in self.members_of(datanode)
            if not record.removed
        ):
            return True
        self.learning.discard(datanode)
        return False

    def evaluate(self, datanode: str) -> str:
        """One cycle for one group: decide, persist, act. Returns the decision's reason."""
        view = self.view(datanode)
        verdict = master_failure(view)
        if verdict.failed and datanode not in self.failures:
            self.failures[datanode] = (self.clock(), time.time())  # the view has 0 s failed
        elif not verdict.failed and view.state in RUNNING_STATES:
            self.failures.pop(datanode, None)
        decision = decide(view)
        self._apply(view, decision)
        return decision.reason

    def _apply(self, view: GroupView, decision: Decision) -> None:
        group = self.groups[view.name]
        if decision.bump_epoch:
            self._bump_epoch()
        updated = replace(
            group,
            state=decision.next_state,
            master=decision.new_master if decision.new_master is not None else group.master,
            candidate=decision.new_candidate if decision.new_candidate is not None else group.candidate,
            sync_set=decision.sync_set if decision.sync_set is not None else group.sync_set,
            promote_attempts=(
                decision.promote_attempts if decision.promote_attempts is not None else group.promote_attempts
            ),
            request=None if decision.clear_request else group.request,
            reason=decision.reason if decision.steps or decision.next_state != group.state else group.reason,
            switchover_failed=group.switchover_failed and decision.next_state == GroupState.SWITCHOVER,
            promote_sent=group.promote_sent and decision.next_state == GroupState.SWITCHOVER,
        )
        if updated != group:
            self._save_group(updated)  # before any message goes out
        if self.reasons.get(view.name) != decision.reason:
            self.reasons[view.name] = decision.reason
            log.info("%s: %s", view.name, decision.reason)
        if decision.next_state != group.state:
            self.event(
                view.name,
                "state",
                f"{group.state} -> {decision.next_state}: {decision.reason}",
                {"from": group.state.value, "to": decision.next_state.value},
            )
        refresh = [step.member for step in decision.steps if step.action == Action.REFRESH and step.member]
        if refresh:
            # One group task asks every standby the state machine named, at once.
            self._group_task(view.name, self._refresh(refresh))
        for step in decision.steps:
            if step.action != Action.REFRESH:
                self._start(view, step, decision.reason)

    # ---- carrying out steps -------------------------------------------------------------------

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

    def _start(self, view: GroupView, step: Step, reason: str) -> None:
        datanode = view.name
        member = step.member
        assert member is not None
        match step.action:
            case Action.BOOTSTRAP | Action.START_MASTER:
                self.event(datanode, "start_master", reason, {"member": member})
                self._group_task(datanode, self._promote(datanode, member, None, failover=False))
            case Action.PROMOTE:
                self.marks[datanode] = FailoverMarks(old_endpoint=self._endpoint(view.master))
                self._plan_takeover(datanode, view.master, member)
                self.event(datanode, "failover", reason, {"member": member, "epoch": self.epoch})
                self._group_task(datanode, self._promote(datanode, member, step.sync, failover=True))
            case Action.RESEND_PROMOTE:
                self._group_task(datanode, self._promote(datanode, member, step.sync, failover=True))
            case Action.FENCE:
                self.event(datanode, "fence", f"fencing {member}", {"member": member})
                if step.best_effort:
                    why = "a standby is being promoted"
                    self._spawn(self._fence(member, why, timeout=BEST_EFFORT_FENCE_TIMEOUT))
                else:
                    self._member_task(datanode, member, self._fence(member, reason))
            case Action.SWITCHOVER:
                self.event(datanode, "switchover", reason, {"member": member})
                self._group_task(datanode, self._switchover(datanode, member))
            case Action.REROUTE:
                self._group_task(datanode, self._reroute(datanode, member))
            case Action.FOLLOW:
                self.event(datanode, "follow", reason, {"member": member})
                self._member_task(datanode, member, self._follow(datanode, member))
            case Action.SET_SYNC:
                assert step.sync is not None
                self.event(datanode, "sync", reason, {"names": list(step.sync.names)})
                self._member_task(datanode, member, self._set_sync(member, step))

    async def _call(
        self,
        member: str,
        what: str,
        call: Callable[[pb_grpc.AgentStub], Awaitable[pb.RoleReply]],
    ) -> pb.RoleReply | None:
        """A role message; a failure is logged and recorded, and returns None."""
        try:
            reply = await call(self._client(member).stub)
        except (grpc.aio.AioRpcError, XchaError) as error:
            message = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
            log.warning("%s to %s failed: %s", what, member, message)
            self.event(
                self.records[member].datanode,
                "error",
                f"{what} to {member} failed: {message}",
                {"member": member},
            )
            return None
        try:
            self._check_reply(member, reply.status)
        except Refused as error:
            log.warning("%s to %s: %s", what, member, error)
            self.event(
                self.records[member].datanode, "error", f"{what} to {member}: {error}", {"member": member}
            )
            return None
        self.observe(member, reply.status, what)
        return reply

    def _plan_takeover(self, datanode: str, old: str | None, new: str) -> None:
        """Router takeover: the new master takes the old master's port and the old master,
        when it rejoins, the new master's former port (same host only)."""
        old_endpoint, new_endpoint = self._endpoint(old), self._endpoint(new)
        group = self.groups[datanode]
        if self.router.kind != "takeover" or old_endpoint is None or new_endpoint is None:
            return
        if old_endpoint.host != new_endpoint.host:
            self.event(datanode, "error", f"port takeover impossible: {old} and {new} are on different hosts")
            return
        self._save_group(
            replace(
                group, takeover_port=old_endpoint.port, handover_member=old, handover_port=new_endpoint.port
            )
        )

    async def _promote(self, datanode: str, member: str, sync: object, failover: bool) -> None:
        group = self.groups[datanode]
        takeover = group.takeover_port if failover and self.router.kind == "takeover" else 0
        request = pb.PromoteRequest(epoch=self.epoch, member=member, takeover_port=takeover)
        if sync is not None:
            request.synchronous_standbys.CopyFrom(sync_to_proto(sync))  # type: ignore[arg-type]
        started = time.time()
        reply = await self._call(member, "Promote", lambda stub: stub.Promote(request, timeout=120))
        if reply is None:
            # The group stays busy a moment: an agent that refuses at once (it is restarting)
            # would otherwise be asked again hundreds of times a second, an event each time.
            await asyncio.sleep(self.config.heartbeat_interval)
        if reply is not None and failover:
            marks = self.marks.setdefault(datanode, FailoverMarks())
            marks.promoted_at = time.time()
            marks.promote_seconds = reply.seconds
            log.info(
                "%s: %s promoted in %.0f ms (%s)",
                datanode,
                member,
                (time.time() - started) * 1000,
                reply.detail,
            )
        elif reply is not None:
            self.event(datanode, "start_master", f"{member}: {reply.detail}", {"member": member})
        if reply is not None and takeover and reply.status.postgres.port != takeover:
            # The old master still holds its port (a hung host): clients on that port reach
            # nothing writable, and the old master must not take the new master's port either.
            self._save_group(
                replace(self.groups[datanode], takeover_port=0, handover_member=None, handover_port=0)
            )
            self.event(
                datanode,
                "error",
                f"port takeover failed, {member} stays on port {reply.status.postgres.port}: {reply.detail}",
                {"member": member},
            )

    async def _fence(
        self, member: str, reason: str, *, clean: bool = False, timeout: float = FENCE_TIMEOUT
    ) -> pb.RoleReply | None:
        """Stop the member (clean: a clean shutdown, every WAL record sent to its standbys)."""
        request = pb.FenceRequest(epoch=self.epoch, member=member, reason=reason, clean=clean)
        return await self._call(member, "Fence", lambda stub: stub.Fence(request, timeout=timeout))

    async def _get_status(self, member: str, timeout: float, reason: str) -> pb.MemberStatus:
        """The member's status asked of its agent, observed like a heartbeat. Raises
        grpc.aio.AioRpcError or XchaError when the agent cannot be asked."""
        status: pb.MemberStatus = await self._client(member).stub.GetStatus(
            pb.GetStatusRequest(), timeout=timeout
        )
        self._check_reply(member, status)
        self.observe(member, status, reason)
        return status

    def _check_reply(self, member: str, status: pb.MemberStatus) -> None:
        """A reply must come from the member's own agent: one agent reporting itself with
        another's address would otherwise answer in the other's name."""
        record = self.records[member]
        if (status.member, status.datanode) != (member, record.datanode):
            raise Refused(
                f"the agent at {record.agent_address} answered as {status.datanode}/{status.member}, "
                f"not {record.datanode}/{member}"
            )

    async def _refresh(self, members: list[str]) -> None:
        async def one(member: str) -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, XchaError):
                await self._get_status(member, self.config.probe_timeout, "refresh")

        await asyncio.gather(*(one(m) for m in members))

    async def _reroute(self, datanode: str, master: str) -> None:
        new = self._endpoint(master)
        if new is None:
            raise Refused(f"no address known for {master}")
        epoch = self.epoch
        marks = self.marks.setdefault(datanode, FailoverMarks())
        barrier = await self.router.reroute(datanode, new, marks.old_endpoint, epoch)
        self._save_group(replace(self.groups[datanode], rerouted_epoch=epoch, takeover_port=0))
        details: dict[str, object] = {
            "master": master,
            "address": str(new),
            "router": self.router.kind,
            "coordinators": {
                name: {
                    "attempts": p.attempts,
                    "acknowledged_after_ms": round(p.seconds * 1000, 1),
                    "detail": p.detail,
                }
                for name, p in barrier.targets.items()
            },
            "rerouted_at": time.time(),
            "promoted_at": marks.promoted_at,
            "promote_seconds": marks.promote_seconds,
            "switchover": marks.switchover,
        }
        failure = self.failures.get(datanode)
        if failure is not None and not marks.switchover:
            details["detected_at"] = failure[1]
        self.event(datanode, "rerouted", f"every coordinator points {datanode} at {master} ({new})", details)
        self.marks.pop(datanode, None)

    async def _follow(self, datanode: str, member: str) -> None:
        master = self.groups[datanode].master
        upstream = self._endpoint(master)
        if master is None or upstream is None:
            return
        checkpoint = pb.CheckpointRequest(epoch=self.epoch, member=master)
        await self._call(master, "Checkpoint", lambda stub: stub.Checkpoint(checkpoint, timeout=60))
        group = self.groups[datanode]
        port = group.handover_port if group.handover_member == member else 0
        request = pb.FollowRequest(
            epoch=self.epoch,
            member=member,
            upstream=endpoint_to_proto(upstream),
            upstream_member=master,
            port=port,
        )
        reply = await self._call(member, "Follow", lambda stub: stub.Follow(request, timeout=900))
        if reply is None:
            self.observations[member].follow_failed_at = self.clock()
        else:
            if port:
                self._save_group(replace(self.groups[datanode], handover_member=None, handover_port=0))
            self.event(
                datanode, "follow", f"{member}: {reply.detail}", {"member": member, "seconds": reply.seconds}
            )

    async def _set_sync(self, member: str, step: Step) -> None:
        assert step.sync is not None
        request = pb.SetSynchronousStandbysRequest(
            epoch=self.epoch, member=member, synchronous_standbys=sync_to_proto(step.sync)
        )
        await self._call(
            member, "SetSynchronousStandbys", lambda stub: stub.SetSynchronousStandbys(request, timeout=5)
        )

    async def _switchover(self, datanode: str, target: str) -> None:
        """Wait until the target has caught up with the master (stopping the master earlier
        can recycle WAL the target still needs); stop the master cleanly (every WAL record
        reaches the streaming standbys); wait until the target has flushed past the shutdown
        checkpoint; then promote it."""
        group = self.groups[datanode]
        old = group.master
        assert old is not None
        self.marks[datanode] = FailoverMarks(old_endpoint=self._endpoint(old), switchover=True)
        self._plan_takeover(datanode, old, target)
        try:
            master = await self._get_status(old, 2, "switchover")
        except (grpc.aio.AioRpcError, XchaError) as error:
            await self._switchover_failed(datanode, target, f"cannot read {old}'s position: {error}")
            return
        if not await self._reaches(target, master.postgres_status.current_lsn, 10):
            await self._switchover_failed(
                datanode, target, f"{target} did not catch up with {old} within 10 s"
            )
            return
        reply = await self._fence(old, f"switchover to {target}", clean=True, timeout=CLEAN_STOP_TIMEOUT)
        if reply is None:
            await self._switchover_failed(datanode, target, f"could not stop {old} cleanly")
            return
        if not await self._reaches(target, reply.final_lsn + 1, 30):
            position = self.observations[target].pg.position
            await self._switchover_failed(
                datanode,
                target,
                f"{target} did not receive WAL past {format_lsn(reply.final_lsn)} "
                f"(it has {format_lsn(position)})",
            )
            return
        self._save_group(replace(self.groups[datanode], promote_sent=True))  # before it goes out
        await self._promote(datanode, target, None, failover=True)
        if not self.observations[target].pg.running or self.observations[target].pg.in_recovery:
            await self._switchover_failed(datanode, target, f"{target} did not become master")

    async def _still_standby(self, member: str, attempts: int = 3) -> bool:
        """Whether the member's agent says, now, that its PostgreSQL runs in recovery."""
        for _ in range(attempts):
            with contextlib.suppress(grpc.aio.AioRpcError, XchaError):
                status = await self._get_status(member, 2, "switchover")
                return status.postgres_status.role == pb.ROLE_STANDBY
            await asyncio.sleep(0.1)
        return False

    async def _reaches(self, member: str, position: int, timeout: float) -> bool:
        """Whether member reports (flushed or replayed) WAL up to position within timeout."""
        deadline = self.clock() + timeout
        while self.clock() < deadline:
            with contextlib.suppress(grpc.aio.AioRpcError, XchaError):
                await self._get_status(member, 2, "switchover")
                if self.observations[member].pg.position >= position:
                    return True
            await asyncio.sleep(0.01)
        return False

    async def _switchover_failed(self, datanode: str, target: str, why: str) -> None:
        """The state machine's switchover_failed row starts the old master again (a no-op when
        it was never stopped) and returns the group to service. Once a Promote went to the
        target, only when the target says it is a standby: its reply may have been lost after
        it promoted, and two masters at one epoch would each acknowledge commits."""
        if self.groups[datanode].promote_sent and not await self._still_standby(target):
            message = (
                f"switchover stalled: {why}; {target} may have been promoted (it does not say "
                "it is a standby): the old master stays stopped until it answers"
            )
            log.warning("%s: %s", datanode, message)
            self.event(datanode, "error", message)
            return
        message = f"switchover failed: {why}"
        self._save_group(replace(self.groups[datanode], reason=message, switchover_failed=True))
        self.event(datanode, "error", message)
        log.error("%s: %s", datanode, message)

    # ---- probes and ticks ---------------------------------------------------------------------

    async def _probe(self, member: str) -> None:
        observation = self.observations[member]
        endpoint = self._endpoint(member)
        if endpoint is None:
            return
        observation.probing = True
        try:
            result = await ping(endpoint, self.config.probe_timeout)
        finally:
            observation.probing = False
        observation.probe_ok = result.ok
        observation.probe_detail = result.detail
        observation.probe_at = self.clock()
        self.mark_dirty(self.records[member].datanode)

    def tick(self) -> None:
        """Timers. Heartbeats that change something and probe results evaluate their group at
        once; a tick probes a master whose heartbeats are late and evaluates only the groups
        where time alone can change a decision (a member is late, the group is not at rest),
        plus every group once a second (grace, back-off and the like)."""
        now = self.clock()
        late = 1.5 * self.config.heartbeat_interval
        sweep = now - self._last_sweep >= SWEEP_INTERVAL
        if sweep:
            self._last_sweep = now
        for datanode, group in self.groups.items():
            master = group.master
            if master is not None:
                observation = self.observations[master]
                if (
                    now - observation.received_at > late
                    and not observation.probing
                    and now - observation.probe_at >= self.config.heartbeat_interval
                ):
                    self._spawn(self._probe(master))
            if (
                sweep
                or group.state not in RUNNING_STATES
                or any(now - self.observations[r.name].received_at > late for r in self.members_of(datanode))
            ):
                self.evaluate(datanode)

    async def run(self) -> None:
        while not self._stopping.is_set():
            self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.tick_interval)

    async def stop(self) -> None:
        self._stopping.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in self.clients.values():
            await client.channel.close()
        await self.router.close()

    # ---- what operators and coordinators ask ------------------------------------------------

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

    def _request(self, datanode: str, request: Request) -> str:
        group = self._group(datanode)
        if request.target is not None:
            self._member(datanode, request.target)
            if request.target == group.master:
                raise Refused(f"{request.target} is already the master of {datanode}")
        if group.state not in RUNNING_STATES and not (
            request.kind == "failover" and group.state == GroupState.NO_CANDIDATE
        ):
            raise Refused(f"{datanode} is {group.state.value}: {group.reason or 'wait until it is running'}")
        view = replace(self.view(datanode), request=request)
        choice = requested_candidate(view)
        if choice.member is None:
            raise Refused(f"no {request.kind} for {datanode}: {choice.reason}")
        if (
            request.kind == "switchover"
            and choice.member.name not in confirming_standbys(view)
            and not request.allow_data_loss
        ):
            raise Refused(
                f"{choice.member.name} is not a synchronous standby that confirms every commit: "
                "it may lag; a switchover waits for it only when it is synchronous"
            )
        self._save_group(replace(group, request=request))
        self.event(datanode, request.kind, f"{request.kind} to {choice.member.name} requested")
        self.mark_dirty(datanode)
        return f"{request.kind} of {datanode} to {choice.member.name} started"

    def request_switchover(self, datanode: str, target: str | None) -> str:
        return self._request(datanode, Request("switchover", target or None))

    def request_failover(self, datanode: str, target: str | None, allow_data_loss: bool) -> str:
        return self._request(datanode, Request("failover", target or None, allow_data_loss))

    def set_paused(self, datanode: str | None, paused: bool) -> str:
        word = "paused" if paused else "resumed"
        if not datanode:
            self.cluster_paused = paused
            self.store.set_cluster_paused(paused)
            for group in self.groups.values():
                if group.paused != paused:
                    self._save_group(replace(group, paused=paused))
            self.event("", "pause", f"cluster {word}")
            return f"cluster {word}"
        group = self._group(datanode)
        self._save_group(replace(group, paused=paused))
        if not paused and self.cluster_paused:
            self.cluster_paused = False
            self.store.set_cluster_paused(False)
        self.event(datanode, "pause", f"{datanode} {word}")
        self.mark_dirty(datanode)
        return f"{datanode} {word}"

    def add_standby(self, datanode: str, member: str, mode: str) -> str:
        self._group(datanode)
        check_name(member, "member name")
        if mode not in ("sync", "async"):
            raise InvalidInput(f"invalid mode {mode!r}: expected sync or async")
        existing = self.records.get(member)
        if existing is not None and not existing.removed:
            raise Refused(f"{member} is already a member of datanode {existing.datanode}")
        record = MemberRecord(datanode, member, mode)
        if existing is not None:  # removed before: where its agent reported to be stays known
            record = replace(
                record, host=existing.host, port=existing.port, agent_address=existing.agent_address
            )
        self.records[member] = record
        self.observations.setdefault(member, Observation())
        self._index_members()
        self.store.save_member(record)
        self.event(
            datanode, "add_standby", f"{member} added as {mode} standby", {"member": member, "mode": mode}
        )
        self.mark_dirty(datanode)
        return f"{member} added to {datanode} as a {mode} standby: its agent clones it at its next heartbeat"

    def remove_standby(self, datanode: str, member: str) -> str:
        record = self._member(datanode, member)
        if self.groups[datanode].master == member:
            raise Refused(f"{member} is the master of {datanode}: switch over first")
        self.records[member] = replace(record, removed=True)
        self.store.save_member(self.records[member])
        self.event(datanode, "remove_standby", f"{member} removed", {"member": member})
        request = pb.RemoveRequest(epoch=self.epoch, member=member)
        self._spawn(self._call(member, "Remove", lambda stub: stub.Remove(request, timeout=60)))
        self.mark_dirty(datanode)
        return f"{member} removed from {datanode}: its agent stops it"

    def set_mode(self, datanode: str, member: str, mode: str) -> str:
        record = self._member(datanode, member)
        if mode not in ("sync", "async"):
            raise InvalidInput(f"invalid mode {mode!r}: expected sync or async")
        self.records[member] = replace(record, mode=mode)
        self.store.save_member(self.records[member])
        self.event(datanode, "mode", f"{member} is now a {mode} standby", {"member": member, "mode": mode})
        self.mark_dirty(datanode)
        return f"{member} set to {mode}"

    async def report_failure(self, datanode: str, member: str, reporter: str, detail: str) -> str:
        """A coordinator's report is a suspicion: check at once, never act on it alone."""
        group = self._group(datanode)
        target = member or group.master
        if target is None:
            raise Refused(f"{datanode} has no master yet")
        self._member(datanode, target)
        self.event(
            datanode,
            "report",
            f"{reporter or 'someone'} reports {target} failing: {detail}",
            {"member": target, "reporter": reporter},
        )
        await self._probe(target)
        with contextlib.suppress(grpc.aio.AioRpcError, XchaError):
            await self._get_status(target, self.config.probe_timeout, "report check")
        reason = self.evaluate(datanode)
        observation = self.observations[target]
        verdict = (
            f"probe: {observation.probe_detail}; agent: "
            f"{'reported just now' if self.clock() - observation.received_at < 1 else 'silent'}; {reason}"
        )
        self.event(datanode, "report", f"checked {target}: {verdict}", {"member": target})
        return verdict

    # ---- status ---------------------------------------------------------------------------------

    def cluster_status(self) -> pb.ClusterStatus:
        status = pb.ClusterStatus(
            epoch=self.epoch,
            paused=self.cluster_paused,
            controller_version=__version__,
            uptime=self.clock() - self.started,
        )
        for datanode in self.groups:
            status.groups.append(self.group_status(datanode))
        return status

    def group_status(self, datanode: str) -> pb.GroupView:
        view = self.view(datanode)
        group = self.groups[datanode]
        master = view.master_view
        master_position = master.pg.position if master else 0
        message = pb.GroupView(
            name=datanode,
            state=group.state.value,
            master=group.master or "",
            paused=view.paused,
            reason=self.reasons.get(datanode, group.reason),
            synchronous=str(view.policy),
            sync_policy=view.on_sync_failure.value,
            allow_data_loss=view.allow_data_loss,
            reroute_pending=self.router.pending(datanode),
            failure_inputs=master_failure(view).inputs,
        )
        for member in view.members:
            observation = self.observations[member.name]
            record = self.records[member.name]
            downstream = master.pg.downstream(member.name) if master else None
            goal = self.goal(record)
            lag = (
                max(0, master_position - member.pg.position)
                if member.name != group.master and member.pg.running
                else 0
            )
            message.members.append(
                pb.MemberView(
                    name=member.name,
                    goal=pb.Goal.Name(goal.goal).removeprefix("GOAL_").lower(),
                    mode=member.mode,
                    status=observation.status or pb.MemberStatus(member=member.name, datanode=datanode),
                    heartbeat_age=member.heartbeat_age if member.heartbeat_age != NEVER else -1,
                    probe=observation.probe_detail if observation.probe_ok is not None else "not probed",
                    probe_age=member.probe_age if member.probe_age != NEVER else -1,
                    lag_bytes=lag,
                    sync_state=downstream.sync_state if downstream else "",
                    receiving_wal=member.receiving_wal(),
                )
            )
        return message

    def events(self, after_id: int, limit: int, datanode: str, newest: bool = False) -> list[EventRecord]:
        if datanode:
            self._group(datanode)
        return self.store.events(after_id, limit, datanode, newest)


def event_to_proto(event: EventRecord) -> pb.Event:
    return pb.Event(
        id=event.id,
        time=event.time,
        datanode=event.datanode,
        kind=event.kind,
        epoch=event.epoch,
        message=event.message,
        details_json=json.dumps(event.details),
    )
