"""How the controller reaches agents: one `Agents` interface that hands out a stub per member,
so that tests and the simulator can put their own agents behind it."""

from typing import Protocol

from xcha.config import TlsConfig
from xcha.rpc import channel
from xcha.v1 import xcha_pb2 as pb
from xcha.v1 import xcha_pb2_grpc as pb_grpc


class AgentStub(Protocol):
    """The role messages and status question the controller sends (the generated gRPC stub
    has exactly these)."""

    async def Promote(self, request: pb.PromoteRequest, timeout: float) -> pb.RoleReply: ...
    async def Fence(self, request: pb.FenceRequest, timeout: float) -> pb.RoleReply: ...
    async def Follow(self, request: pb.FollowRequest, timeout: float) -> pb.RoleReply: ...
    async def Checkpoint(self, request: pb.CheckpointRequest, timeout: float) -> pb.RoleReply: ...
    async def Detach(self, request: pb.DetachRequest, timeout: float) -> pb.RoleReply: ...
    async def SetSynchronousStandbys(
        self, request: pb.SetSynchronousStandbysRequest, timeout: float
    ) -> pb.RoleReply: ...
    async def Remove(self, request: pb.RemoveRequest, timeout: float) -> pb.RoleReply: ...
    async def GetStatus(self, request: pb.GetStatusRequest, timeout: float) -> pb.MemberStatus: ...


class Agents(Protocol):
    def stub(self, member: str, address: str) -> AgentStub: ...
    async def close(self) -> None: ...


class GrpcAgents:
    """One channel per member, opened again when the member's agent reports a new address."""

    def __init__(self, tls: TlsConfig) -> None:
        self.tls = tls
        self._channels: dict[str, tuple[str, object, AgentStub]] = {}
        self._closing: list[object] = []

    def stub(self, member: str, address: str) -> AgentStub:
        known = self._channels.get(member)
        if known is not None and known[0] == address:
            return known[2]
        if known is not None:
            self._closing.append(known[1])
        opened = channel(address, self.tls)
        stub: AgentStub = pb_grpc.AgentStub(opened)
        self._channels[member] = (address, opened, stub)
        return stub

    async def close(self) -> None:
        for opened in [*self._closing, *(c for _, c, _ in self._channels.values())]:
            await opened.close()  # type: ignore[attr-defined]
        self._channels.clear()
        self._closing.clear()
