"""The controller's gRPC service: thin, it converts messages and delegates to `Controller`."""

import time

import grpc

from xcha.authz import Guard, caller
from xcha.controller.controller import Controller, event_to_proto
from xcha.names import Endpoint, check_address
from xcha.rpc import answer
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
    def __init__(self, controller: Controller, guard: Guard | None = None) -> None:
        """guard: the server's interceptor; its refusals and the peer certificates it sees
        expiring become events of the controller's history (`xcha ctl events`), as do the
        controller's own certificate and CA expiring (at start and on every reload)."""
        self.controller = controller
        self.guard = guard
        if guard is not None:
            guard.listeners.append(lambda kind, sentence: controller.event("", kind, sentence))
        if not controller.config.tls.insecure:
            own = material(controller.config.tls)
            for warning in own.files.warnings():  # logged when the files were read
                controller.event("", "certificate", warning)
            own.listeners.append(lambda warning: controller.event("", "certificate", warning))

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatReply:
        def work() -> pb.HeartbeatReply:
            _check_addresses(request.status)
            return self.controller.heartbeat(request)

        return await answer(context, work)

    async def ReportNodeFailure(
        self, request: pb.NodeFailureReport, context: grpc.aio.ServicerContext
    ) -> pb.NodeFailureAck:
        async def work() -> pb.NodeFailureAck:
            # The history says who reported by the certificate, not only by what it claims.
            identity = caller.get()
            reporter = request.reporter
            if identity is not None and reporter != identity.name:
                reporter = f"{reporter} ({identity})" if reporter else str(identity)
            verdict = await self.controller.report_failure(
                request.datanode, request.member, reporter, request.detail
            )
            return pb.NodeFailureAck(verdict=verdict)

        return await answer(context, work)

    async def GetClusterStatus(
        self, request: pb.ClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClusterStatus:
        status = await answer(context, self.controller.cluster_status)
        status.warnings.extend(self.certificate_warnings())
        return status

    def certificate_warnings(self) -> list[str]:
        """Certificates expiring within 30 days: this controller's, its CA's, and the peers'
        its guard has seen (every agent heartbeats, so every agent's is among them)."""
        if self.controller.config.tls.insecure:
            return []
        warnings = material(self.controller.config.tls).files.warnings()
        if self.guard is not None:
            now = time.time()
            for identity, expiry in sorted(self.guard.peer_expiry.items()):
                days = max(0, int((expiry - now) // 86400))
                warnings.append(f"the certificate of {identity} expires in {days} day(s): renew it")
        return warnings

    def _reply(self, detail: str) -> pb.OperationReply:
        return pb.OperationReply(detail=detail, epoch=self.controller.epoch)

    async def Switchover(
        self, request: pb.SwitchoverRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperationReply:
        return await answer(
            context,
            lambda: self._reply(self.controller.request_switchover(request.datanode, request.to_member)),
        )

    async def Failover(
        self, request: pb.FailoverRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperationReply:
        return await answer(
            context,
            lambda: self._reply(
                self.controller.request_failover(request.datanode, request.to_member, request.allow_data_loss)
            ),
        )

    async def SetPaused(
        self, request: pb.PauseRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperationReply:
        return await answer(
            context, lambda: self._reply(self.controller.set_paused(request.datanode, request.paused))
        )

    async def AddStandby(
        self, request: pb.AddStandbyRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperationReply:
        return await answer(
            context,
            lambda: self._reply(
                self.controller.add_standby(request.datanode, request.member, request.mode or "sync")
            ),
        )

    async def RemoveStandby(
        self, request: pb.RemoveStandbyRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperationReply:
        return await answer(
            context, lambda: self._reply(self.controller.remove_standby(request.datanode, request.member))
        )

    async def SetStandbyMode(
        self, request: pb.StandbyModeRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperationReply:
        return await answer(
            context,
            lambda: self._reply(self.controller.set_mode(request.datanode, request.member, request.mode)),
        )

    async def ListEvents(
        self, request: pb.EventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.EventsReply:
        def work() -> pb.EventsReply:
            # Event ids are SQLite integers (signed 64 bits): no event comes after a larger id.
            after_id = min(request.after_id, SQLITE_MAX_INTEGER)
            events = self.controller.events(after_id, request.limit or 100, request.datanode, request.newest)
            return pb.EventsReply(events=[event_to_proto(e) for e in events])

        return await answer(context, work)
