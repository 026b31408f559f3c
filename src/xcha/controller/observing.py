"""What agents and probes report: heartbeats (answered with the member's goal), whether their
Heartbeats streams are open, status replies, and the controller's own connection probes of a
master that is silent."""

import time
from dataclasses import replace

from xcha.controller.agents import AgentStub
from xcha.controller.core import ControllerCore
from xcha.controller.store import MemberRecord
from xcha.controller.views import GroupState
from xcha.errors import Refused
from xcha.pg.probe import ping
from xcha.reports import fingerprint
from xcha.rpc import endpoint_to_proto
from xcha.v1 import xcha_pb2 as pb


class Observing(ControllerCore):
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
                epoch=self.ledger.epoch,
                goal=pb.GOAL_WAIT,
                heartbeat_interval=self.config.heartbeat_interval,
                failure_timeout=self.config.failure_timeout,
                report_interval=self.config.report_interval,
                keepalive_interval=self.config.keepalive_interval,
                detail=f"{status.member!r} is not a member of datanode {status.datanode!r}: "
                "add it with `xcha ctl add-standby`",
            )
        self.observe(status.member, status, request.reason)
        return self.goal(record)

    def is_member(self, datanode: str, name: str) -> bool:
        record = self.records.get(name)
        return record is not None and record.datanode == datanode

    def stream_opened(self, name: str) -> None:
        """A Heartbeats stream of the member's agent delivered its first report."""
        observation = self.observations.get(name)
        if observation is not None:
            observation.streams += 1

    def stream_closed(self, name: str) -> None:
        """That stream ended (the agent closed it, or its connection failed a keep-alive ping)."""
        observation = self.observations.get(name)
        record = self.records.get(name)
        if observation is None or record is None:
            return
        observation.closed(self.clock(), self.stream_silence, self.stale_after)
        self.mark_dirty(record.datanode)

    def observe(self, name: str, status: pb.MemberStatus, reason: str = "interval") -> None:
        now = self.clock()
        observation = self.observations[name]
        previous = observation.status
        heard_before = observation.heard_at(now, self.stale_after)
        if not observation.update(status, now):
            return  # an older report that arrived late
        record = self.records[name]
        if (status.postgres.host, status.postgres.port, status.agent_address) != (
            record.host,
            record.port,
            record.agent_address,
        ):
            self._save_member(
                replace(
                    record,
                    host=status.postgres.host,
                    port=status.postgres.port,
                    agent_address=status.agent_address,
                )
            )
        # The master's report says who streams; with no master recorded yet, the report of a
        # master about to be adopted counts too (else its healthy standbys look missing). A
        # report holds until the next (an agent reports when it changes): who streamed in the
        # previous one streamed until the master was last heard before this one.
        if self.groups[record.datanode].master in (name, None):
            for earlier, seen_at in ((previous, heard_before), (status, now)):
                for downstream in earlier.postgres_status.downstreams if earlier is not None else ():
                    follower = self.observations.get(downstream.name)
                    if downstream.state == "streaming" and follower is not None:
                        follower.streaming_seen_at = max(follower.streaming_seen_at, seen_at)
        seen = fingerprint(status)
        if seen != observation.fingerprint or reason != "interval":
            observation.fingerprint = seen
            self.mark_dirty(record.datanode)

    def goal(self, record: MemberRecord) -> pb.HeartbeatReply:
        """What the member should be, from the durable records only: a decision not yet
        written must not reach an agent."""
        group = self.ledger.groups.get(record.datanode) or self.groups[record.datanode]
        reply = pb.HeartbeatReply(
            epoch=self.ledger.epoch,
            heartbeat_interval=self.config.heartbeat_interval,
            failure_timeout=self.config.failure_timeout,
            report_interval=self.config.report_interval,
            keepalive_interval=self.config.keepalive_interval,
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

    async def _get_status(self, member: str, timeout: float, reason: str) -> pb.MemberStatus:
        """The member's status asked of its agent, observed like a heartbeat. Raises
        grpc.aio.AioRpcError or XchaError when the agent cannot be asked."""
        status: pb.MemberStatus = await self._stub(member).GetStatus(pb.GetStatusRequest(), timeout=timeout)
        self._check_reply(member, status)
        self.observe(member, status, reason)
        return status

    def _stub(self, member: str) -> AgentStub:
        address = self.records[member].agent_address
        if not address:
            raise Refused(f"the agent of {member} has never reported its address")
        return self.agents.stub(member, address)

    def _check_reply(self, member: str, status: pb.MemberStatus) -> None:
        """A reply must come from the member's own agent: one agent reporting itself with
        another's address would otherwise answer in the other's name."""
        record = self.records[member]
        if (status.member, status.datanode) != (member, record.datanode):
            raise Refused(
                f"the agent at {record.agent_address} answered as {status.datanode}/{status.member}, "
                f"not {record.datanode}/{member}"
            )

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
