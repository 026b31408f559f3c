"""The controller's gRPC service: thin, it converts messages and delegates to the `Controller`
of this term when this process leads; a follower answers status and event questions from the
store, tells agents and operators who leads, and refuses everything else (`NotLeader`)."""

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc

from xcha.authz import Guard, caller
from xcha.controller.controller import Controller
from xcha.controller.node import ControllerNode
from xcha.controller.store import GroupRecord, StoreError
from xcha.errors import InvalidInput, NotFound, NotLeader, XchaError
from xcha.names import Endpoint, check_address
from xcha.rpc import answer, event_to_proto, refuse
from xcha.tls import material
from xcha.v1 import xcha_pb2 as pb
from xcha.v1 import xcha_pb2_grpc as pb_grpc

SQLITE_MAX_INTEGER = 2**63 - 1


def _check_addresses(status: pb.MemberStatus) -> None:
    """The controller keeps a report's addresses and hands them on (upstreams, its status): one
    it cannot use would fail every status answer after it."""
    if status.postgres.host or status.postgres.port:
        Endpoint(status.postgres.host, status.postgres.port)
    if status.agent_address:
        check_address(status.agent_address, "agent address")


class ControllerService(pb_grpc.ControllerServicer):
    def __init__(self, node: ControllerNode, guard: Guard | None = None) -> None:
        """guard: the server's interceptor; its refusals and the peer certificates it sees
        expiring become events of the leader's history (`xcha ctl events`), as do the
        controller's own certificate and CA expiring (at start of each term and on reload)."""
        self.node = node
        self.guard = guard
        self.config = node.config
        if guard is not None:
            guard.listeners.append(lambda kind, sentence: self._event(kind, sentence))
        if not self.config.tls.insecure:
            material(self.config.tls).listeners.append(lambda warning: self._event("certificate", warning))
        node.term_listeners.append(self._term_started)
        node.term_end_listeners.append(self._end_streams)
        self._streams: set[asyncio.Task[object]] = set()

    def _term_started(self, controller: Controller) -> None:
        if not self.config.tls.insecure:
            for warning in material(self.config.tls).files.warnings():
                controller.event("", "certificate", warning)

    def _end_streams(self) -> None:
        """A term ended: every agent's stream to this process ends too, so that no agent takes
        its open stream here for contact with the leader (it reconnects and is redirected)."""
        for task in list(self._streams):
            task.cancel()

    def _event(self, kind: str, sentence: str) -> None:
        controller = self.node.leading()
        if controller is not None:
            controller.event("", kind, sentence)

    def _leader(self) -> Controller:
        """The controller of this term, or NotLeader saying where the leader is."""
        controller = self.node.leading()
        if controller is not None:
            return controller
        leader = self.node.leader_info
        if leader is None or leader.name == self.node.name:
            raise NotLeader(f"controller {self.node.name} does not lead and no leader is known now: retry")
        raise NotLeader(
            f"controller {self.node.name} does not lead: the leader is {leader.name} at {leader.address}",
            leader.address,
        )

    def _heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        _check_addresses(request.status)
        controller = self.node.leading()
        if controller is None:
            return self._not_leading()
        return controller.heartbeat(request)

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatReply:
        return await answer(context, lambda: self._heartbeat(request))

    async def Heartbeats(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.HeartbeatRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """Each report on the stream answered as Heartbeat answers it, in order, written through
        the context (a servicer that yields its replies costs the controller an async generator
        step per report). A report that Heartbeat would refuse ends the stream with that status
        (the agent opens a new one). From its first report answered by the leader on, the open
        stream stands for the member's heartbeats (`Observation.heard_at`); it ends with the
        term."""
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        member = ""
        counted: Controller | None = None  # the term's controller that counts this stream open
        try:
            async for request in request_iterator:
                status = request.status
                if member and status.member != member:
                    await refuse(
                        context, InvalidInput(f"this stream reports {member}, not {status.member!r}")
                    )
                try:
                    reply = self._heartbeat(request)
                except XchaError as error:
                    await refuse(context, error)
                controller = None if reply.not_leader else self.node.leading()
                if (
                    counted is None
                    and controller is not None
                    and controller.is_member(status.datanode, status.member)
                ):
                    counted, member = controller, status.member
                    controller.stream_opened(member)
                await context.write(reply)
        finally:
            self._streams.discard(task)
            if counted is not None:
                counted.stream_closed(member)

    async def ReportNodeFailure(
        self, request: pb.NodeFailureReport, context: grpc.aio.ServicerContext
    ) -> pb.NodeFailureAck:
        async def work() -> pb.NodeFailureAck:
            # The history says who reported by the certificate, not only by what it claims.
            identity = caller.get()
            reporter = request.reporter
            if identity is not None and reporter != identity.name:
                reporter = f"{reporter} ({identity})" if reporter else str(identity)
            verdict = await self._leader().report_failure(
                request.datanode, request.member, reporter, request.detail
            )
            return pb.NodeFailureAck(verdict=verdict)

        return await answer(context, work)

    async def GetClusterStatus(
        self, request: pb.ClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClusterStatus:
        status: pb.ClusterStatus = await answer(context, self._cluster_status)
        status.warnings.extend(self.certificate_warnings())
        return status

    async def _cluster_status(self) -> pb.ClusterStatus:
        controller = self.node.leading()
        if controller is not None:
            status = controller.cluster_status()
        else:
            status = await self._recorded_status()
        status.controller = self.node.name
        status.leading = controller is not None
        leader = self.node.leader_info
        if leader is not None:
            status.leader, status.leader_address, status.term = leader.name, leader.address, leader.term
        status.controllers.extend(self.config.peers or (self.config.advertise,))
        return status

    async def _recorded_status(self) -> pb.ClusterStatus:
        """A follower's answer: the groups as the leader last recorded them."""
        try:
            snapshot = await self.node.store.load()
        except StoreError as error:
            return pb.ClusterStatus(warnings=[f"the store does not answer: {error}"])
        status = pb.ClusterStatus(epoch=snapshot.epoch, paused=snapshot.paused)
        for datanode in self.config.datanodes:
            record = snapshot.groups.get(datanode.name, GroupRecord(datanode.name))
            status.groups.append(
                pb.GroupView(
                    name=record.name,
                    state=record.state.value,
                    master=record.master or "",
                    paused=record.paused or snapshot.paused,
                    reason=f"as the leader last recorded it: {record.reason}",
                )
            )
        return status

    def _not_leading(self) -> pb.HeartbeatReply:
        """A follower's heartbeat reply: where the leader is, and nothing to act on."""
        leader = self.node.leader_info
        reply = pb.HeartbeatReply(
            not_leader=True,
            goal=pb.GOAL_WAIT,
            heartbeat_interval=self.config.heartbeat_interval,
            failure_timeout=self.config.failure_timeout,
            detail=f"controller {self.node.name} does not lead",
        )
        if leader is not None and leader.name != self.node.name:
            reply.leader, reply.leader_address = leader.name, leader.address
        return reply

    def certificate_warnings(self) -> list[str]:
        """Certificates expiring within 30 days: this controller's, its CA's, and the peers'
        its guard has seen (every agent heartbeats, so every agent's is among them)."""
        if self.config.tls.insecure:
            return []
        warnings = material(self.config.tls).files.warnings()
        if self.guard is not None:
            now = time.time()
            for identity, expiry in sorted(self.guard.peer_expiry.items()):
                days = max(0, int((expiry - now) // 86400))
                warnings.append(f"the certificate of {identity} expires in {days} day(s): renew it")
        return warnings

    async def _operation(self, command: Callable[[Controller], str]) -> pb.OperationReply:
        """An operator's command, answered once what it changed is durable."""
        controller = self._leader()
        detail = command(controller)
        await controller.ledger.flush()
        return pb.OperationReply(detail=detail, epoch=controller.epoch)

    async def Switchover(
        self, request: pb.SwitchoverRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperationReply:
        return await answer(
            context,
            lambda: self._operation(lambda c: c.request_switchover(request.datanode, request.to_member)),
        )

    async def Failover(
        self, request: pb.FailoverRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperationReply:
        return await answer(
            context,
            lambda: self._operation(
                lambda c: c.request_failover(request.datanode, request.to_member, request.allow_data_loss)
            ),
        )

    async def SetPaused(
        self, request: pb.PauseRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperationReply:
        return await answer(
            context, lambda: self._operation(lambda c: c.set_paused(request.datanode, request.paused))
        )

    async def AddStandby(
        self, request: pb.AddStandbyRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperationReply:
        return await answer(
            context,
            lambda: self._operation(
                lambda c: c.add_standby(request.datanode, request.member, request.mode or "sync")
            ),
        )

    async def RemoveStandby(
        self, request: pb.RemoveStandbyRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperationReply:
        return await answer(
            context, lambda: self._operation(lambda c: c.remove_standby(request.datanode, request.member))
        )

    async def SetStandbyMode(
        self, request: pb.StandbyModeRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperationReply:
        return await answer(
            context,
            lambda: self._operation(lambda c: c.set_mode(request.datanode, request.member, request.mode)),
        )

    async def ListEvents(
        self, request: pb.EventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.EventsReply:
        async def work() -> pb.EventsReply:
            # Event ids are SQLite integers (signed 64 bits): no event comes after a larger id.
            after_id = min(request.after_id, SQLITE_MAX_INTEGER)
            if request.datanode and self.config.datanode(request.datanode) is None:
                known = ", ".join(sorted(d.name for d in self.config.datanodes))
                raise NotFound(f"unknown datanode {request.datanode!r}: known are {known}")
            limit = request.limit or 100
            events = await self.node.store.events(after_id, limit, request.datanode, request.newest)
            return pb.EventsReply(events=[event_to_proto(e) for e in events])

        return await answer(context, work)
