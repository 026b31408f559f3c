"""The agent's gRPC service: thin, it converts messages and delegates to `Agent`."""

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from xcha.agent.agent import Agent
from xcha.errors import InvalidInput
from xcha.rpc import answer, endpoint_from_proto, sync_from_proto
from xcha.v1 import xcha_pb2 as pb
from xcha.v1 import xcha_pb2_grpc as pb_grpc

T = TypeVar("T")


async def _call(context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]) -> T:
    """A message whose deadline has passed is not carried out: it may have waited in a socket
    while this agent was stopped, and the controller that sent it has moved on."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED, "the message expired before it could be carried out"
        )
    return await answer(context, work)


class AgentService(pb_grpc.AgentServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemberStatus:
        await self.agent.refresh()
        return self.agent.member_status()

    async def _reply(self, detail: str, seconds: float = 0.0, final_lsn: int = 0) -> pb.RoleReply:
        return pb.RoleReply(
            status=self.agent.member_status(), detail=detail, seconds=seconds, final_lsn=final_lsn
        )

    async def Promote(self, request: pb.PromoteRequest, context: grpc.aio.ServicerContext) -> pb.RoleReply:
        async def work() -> pb.RoleReply:
            sync = (
                sync_from_proto(request.synchronous_standbys)
                if request.HasField("synchronous_standbys")
                else None
            )
            detail, seconds = await self.agent.promote(
                request.epoch, request.member, request.takeover_port, sync
            )
            return await self._reply(detail, seconds)

        return await _call(context, work)

    async def Follow(self, request: pb.FollowRequest, context: grpc.aio.ServicerContext) -> pb.RoleReply:
        async def work() -> pb.RoleReply:
            upstream = endpoint_from_proto(request.upstream)
            if upstream is None:
                raise InvalidInput("Follow needs the upstream's host and port")
            detail, seconds = await self.agent.follow(request.epoch, request.member, upstream, request.port)
            return await self._reply(detail, seconds)

        return await _call(context, work)

    async def Fence(self, request: pb.FenceRequest, context: grpc.aio.ServicerContext) -> pb.RoleReply:
        async def work() -> pb.RoleReply:
            detail, final_lsn, seconds = await self.agent.fence(
                request.epoch, request.member, request.reason, request.clean
            )
            return await self._reply(detail, seconds, final_lsn)

        return await _call(context, work)

    async def SetSynchronousStandbys(
        self, request: pb.SetSynchronousStandbysRequest, context: grpc.aio.ServicerContext
    ) -> pb.RoleReply:
        async def work() -> pb.RoleReply:
            sync = sync_from_proto(request.synchronous_standbys)
            return await self._reply(
                await self.agent.set_synchronous_standbys(request.epoch, request.member, sync)
            )

        return await _call(context, work)

    async def Checkpoint(
        self, request: pb.CheckpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.RoleReply:
        async def work() -> pb.RoleReply:
            return await self._reply(await self.agent.checkpoint(request.epoch, request.member))

        return await _call(context, work)

    async def Detach(self, request: pb.DetachRequest, context: grpc.aio.ServicerContext) -> pb.RoleReply:
        async def work() -> pb.RoleReply:
            detail, seconds = await self.agent.detach(request.epoch, request.member, request.reason)
            return await self._reply(detail, seconds)

        return await _call(context, work)

    async def Remove(self, request: pb.RemoveRequest, context: grpc.aio.ServicerContext) -> pb.RoleReply:
        async def work() -> pb.RoleReply:
            return await self._reply(await self.agent.remove(request.epoch, request.member))

        return await _call(context, work)
