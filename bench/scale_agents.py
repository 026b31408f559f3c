"""Simulated agents for `./run bench scale`: one process speaks the real protocol for many
members (heartbeats with plausible PostgreSQL status), records heartbeat round trips, and
serves the node-role messages of one "victim" group so that a failure can be injected.

Run by bench/scale.py as `python -m bench.scale_agents ...`; prints one JSON line at exit.
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import signal
import time
import uuid

import grpc

from bench.common import percentile
from xcha.config import TlsConfig
from xcha.rpc import create_server
from xcha.v1 import xcha_pb2 as pb
from xcha.v1 import xcha_pb2_grpc as pb_grpc


def group_name(index: int) -> str:
    return f"g{index:04d}"


class SimulatedMember:
    def __init__(self, datanode: str, member: str, master: bool, port: int, agent_address: str) -> None:
        self.datanode = datanode
        self.member = member
        self.master = master
        self.port = port
        self.agent_address = agent_address
        self.epoch = 0
        self.running = True
        self.boot_id = uuid.uuid4().hex
        self.sequence = itertools.count(1)

    def status(self, upstream_port: int, standby: str) -> pb.MemberStatus:
        if not self.running:
            pg = pb.PostgresStatus(running=False, role=pb.ROLE_STOPPED, port=self.port)
        elif self.master:
            pg = pb.PostgresStatus(
                running=True,
                role=pb.ROLE_MASTER,
                postmaster_pid=1,
                timeline=1,
                system_identifier=42,
                current_lsn=50_000_000,
                flush_lsn=50_000_000,
                port=self.port,
                synchronous_standby_names=f"FIRST 1 ({standby})",
                downstreams=[
                    pb.Downstream(
                        name=standby,
                        state="streaming",
                        sync_state="sync",
                        flush_lsn=50_000_000,
                        replay_lsn=50_000_000,
                        reply_age=0.2,
                    )
                ],
            )
        else:
            pg = pb.PostgresStatus(
                running=True,
                role=pb.ROLE_STANDBY,
                postmaster_pid=1,
                timeline=1,
                system_identifier=42,
                receive_lsn=50_000_000,
                flush_lsn=50_000_000,
                replay_lsn=50_000_000,
                port=self.port,
                wal_receiver=pb.WalReceiver(
                    status="streaming",
                    upstream=pb.Endpoint(host="127.0.0.1", port=upstream_port),
                    last_message_age=0.1,
                ),
            )
        return pb.MemberStatus(
            datanode=self.datanode,
            member=self.member,
            postgres=pb.Endpoint(host="127.0.0.1", port=self.port),
            agent_address=self.agent_address,
            postgres_status=pg,
            epoch=self.epoch,
            agent_version="simulated",
            activity="idle",
            has_data=True,
            boot_id=self.boot_id,
            sequence=next(self.sequence),
            upstream=pb.UpstreamCheck(checked=not self.master, ok=True),
        )


class VictimAgent(pb_grpc.AgentServicer):
    """The node-role messages of the group whose master is made to fail."""

    def __init__(
        self, member: SimulatedMember, upstream_port: int, standby: str, promoted: asyncio.Event
    ) -> None:
        self.member = member
        self.upstream_port = upstream_port
        self.standby = standby
        self.promoted = promoted
        self.promoted_at = 0.0

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemberStatus:
        return self.member.status(self.upstream_port, self.standby)

    async def Promote(self, request: pb.PromoteRequest, context: grpc.aio.ServicerContext) -> pb.RoleReply:
        self.promoted_at = time.monotonic()
        self.member.epoch = max(self.member.epoch, request.epoch)
        self.member.master = True
        self.promoted.set()
        return pb.RoleReply(status=self.member.status(self.upstream_port, ""), detail="simulated promotion")

    async def Fence(self, request: pb.FenceRequest, context: grpc.aio.ServicerContext) -> pb.RoleReply:
        self.member.running = False
        return pb.RoleReply(status=self.member.status(self.upstream_port, self.standby), detail="fenced")

    async def _not_simulated(self, context: grpc.aio.ServicerContext) -> pb.RoleReply:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not simulated")
        raise AssertionError("unreachable")

    async def Follow(self, request: pb.FollowRequest, context: grpc.aio.ServicerContext) -> pb.RoleReply:
        return await self._not_simulated(context)

    async def SetSynchronousStandbys(
        self, request: pb.SetSynchronousStandbysRequest, context: grpc.aio.ServicerContext
    ) -> pb.RoleReply:
        return await self._not_simulated(context)

    async def Checkpoint(
        self, request: pb.CheckpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.RoleReply:
        return await self._not_simulated(context)

    async def Remove(self, request: pb.RemoveRequest, context: grpc.aio.ServicerContext) -> pb.RoleReply:
        return await self._not_simulated(context)


async def main(args: argparse.Namespace) -> dict[str, object]:
    insecure = TlsConfig(insecure=True)
    promoted = asyncio.Event()
    members: list[tuple[SimulatedMember, int, str]] = []
    servers = []
    for index in range(args.first, args.first + args.groups):
        name = group_name(index)
        master_port, standby_port = 20000 + 2 * index, 20001 + 2 * index
        victim = args.victim == index
        addresses = []
        for role in ("a", "b"):
            if victim:
                server, port, _ = create_server("127.0.0.1:0", insecure)
                servers.append((server, role))
                addresses.append(f"127.0.0.1:{port}")
            else:
                addresses.append(args.dummy_agent)
        master = SimulatedMember(name, f"{name}a", True, master_port, addresses[0])
        standby = SimulatedMember(name, f"{name}b", False, standby_port, addresses[1])
        members.append((master, standby_port, standby.member))
        members.append((standby, master_port, standby.member))
        if victim:
            victims = {
                "a": VictimAgent(master, standby_port, standby.member, promoted),
                "b": VictimAgent(standby, master_port, standby.member, promoted),
            }
            for server, role in servers:
                pb_grpc.add_AgentServicer_to_server(victims[role], server)
                await server.start()
    round_trips: list[tuple[float, float]] = []  # (sent at, round trip) of answered heartbeats
    errors = 0  # failed Heartbeat calls of any kind, the crash report's retries included
    deadline_exceeded = 0  # of which: no answer within the 5 s deadline
    stopping = asyncio.Event()
    started_at = time.monotonic()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    channels = [grpc.aio.insecure_channel(args.controller) for _ in range(args.channels)]
    stubs = [pb_grpc.ControllerStub(c) for c in channels]
    crash_sent = 0.0

    async def beat(
        member: SimulatedMember, upstream: int, standby: str, stub: pb_grpc.ControllerStub, offset: float
    ) -> None:
        nonlocal errors, deadline_exceeded
        await asyncio.sleep(offset)
        while not stopping.is_set():
            started = time.monotonic()
            try:
                reply = await stub.Heartbeat(
                    pb.HeartbeatRequest(status=member.status(upstream, standby), reason="interval"), timeout=5
                )
                member.epoch = max(member.epoch, reply.epoch)
                round_trips.append((started, time.monotonic() - started))
            except grpc.aio.AioRpcError as error:
                errors += 1
                deadline_exceeded += error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.sleep(max(0.0, args.interval - (time.monotonic() - started)))

    tasks = [
        asyncio.create_task(beat(m, up, sb, stubs[i % len(stubs)], args.interval * i / len(members)))
        for i, (m, up, sb) in enumerate(members)
    ]
    result: dict[str, object] = {}
    if args.victim >= 0:
        await asyncio.sleep(args.crash_after)
        victim_master = next(m for m, _, _ in members if m.datanode == group_name(args.victim) and m.master)
        victim_master.running = False
        crash_sent = time.monotonic()
        up, sb = next((u, s) for m, u, s in members if m is victim_master)
        for _ in range(20):  # the next regular heartbeat would report it too; this one is immediate
            try:
                await stubs[0].Heartbeat(
                    pb.HeartbeatRequest(status=victim_master.status(up, sb), reason="postmaster died"),
                    timeout=5,
                )
                break
            except grpc.aio.AioRpcError as error:
                errors += 1
                deadline_exceeded += error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        try:
            await asyncio.wait_for(promoted.wait(), 30)
            result["detect_to_promote_ms"] = (time.monotonic() - crash_sent) * 1000
        except TimeoutError:
            result["detect_to_promote_ms"] = None
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), max(0.0, args.run_for - (time.monotonic() - started_at)))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    for server, _ in servers:
        await server.stop(0)
    # only heartbeats sent within the controller's measured window (time.monotonic() is the
    # machine's CLOCK_MONOTONIC, the same in every process), in every simulator alike
    ms = [rtt * 1000 for sent, rtt in round_trips if args.measure_start <= sent < args.measure_end]
    result.update(
        {
            "heartbeats": len(round_trips),
            "errors": errors,
            "deadline_exceeded": deadline_exceeded,
            "rtt_samples": len(ms),
            "rtt_p99_ms": percentile(ms, 0.99) if ms else None,
        }
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--controller", required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--groups", type=int, required=True)
    parser.add_argument("--interval", type=float, required=True)
    parser.add_argument("--victim", type=int, default=-1)
    parser.add_argument("--crash-after", type=float, default=10.0)
    parser.add_argument("--dummy-agent", default="127.0.0.1:9")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--run-for", type=float, default=60.0, help="stop after this many seconds")
    parser.add_argument(
        "--measure-start", type=float, default=0.0, help="time.monotonic() the round trips count from"
    )
    parser.add_argument(
        "--measure-end", type=float, default=float("inf"), help="time.monotonic() they count until"
    )
    print(json.dumps(asyncio.run(main(parser.parse_args()))), flush=True)
