"""The controller's gRPC service: thin, it converts messages and delegates to `Controller`."""

from typing import TypeVar

import grpc

from xcha.controller.controller import Controller, event_to_proto
from xcha.rpc import answer
from xcha.v1 import xcha_pb2 as pb
from xcha.v1 import xcha_pb2_grpc as pb_grpc

T = TypeVar("T")


class ControllerService(pb_grpc.ControllerServicer):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatReply:
        return await answer(context, lambda: self.controller.heartbeat(request))

    async def ReportNodeFailure(
        self, request: pb.NodeFailureReport, context: grpc.aio.ServicerContext
    ) -> pb.NodeFailureAck:
        async def work() -> pb.NodeFailureAck:
            verdict = await self.controller.report_failure(
                request.datanode, request.member, request.reporter, request.detail
            )
            return pb.NodeFailureAck(verdict=verdict)

        return await answer(context, work)

    async def GetClusterStatus(
        self, request: pb.ClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClusterStatus:
        return await answer(context, self.controller.cluster_status)

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
            events = self.controller.events(
                request.after_id, request.limit or 100, request.datanode, request.newest
            )
            return pb.EventsReply(events=[event_to_proto(e) for e in events])

        return await answer(context, work)
