"""Simulated agents for `./run bench scale`: one process speaks the real protocol for many
members, each as the real agent does (`xcha.agent.agent.Agent._heartbeats`): its own mTLS
channel with its own certificate (one TLS handshake) and the agent's keep-alive pings every
heartbeat interval, one Heartbeats stream kept open on it (`ReportStream`, the agent's own
class), a report at once when something changed and every report_interval (the controller's
reply says) otherwise, each answered by one reply within max(interval, 0.5 s) or the stream is
opened anew; a stream that ends (a keep-alive ping unanswered) is opened anew at once. It
records the round trips, and serves the node-role messages of "victim" groups so that master
crashes can be injected and their promotions timed.

Run by bench/scale.py as `python -m bench.scale_agents ...`, which signals it: SIGUSR1 opens
the measured window, SIGUSR2 closes it (and crashes the victim masters, one after the other),
SIGTERM stops it; it prints one JSON line then.
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import resource
import signal
import time
import uuid
from pathlib import Path

import grpc

from bench.common import percentile
from xcha import timings
from xcha.agent.stream import ReportFailed, ReportStream, retry_delay
from xcha.authz import Guard
from xcha.config import TlsConfig
from xcha.rpc import RenewingChannel, channel, create_server, liveness_options
from xcha.v1 import xcha_pb2 as pb
from xcha.v1 import xcha_pb2_grpc as pb_grpc

LSN = 50_000_000


def group_name(index: int) -> str:
    return f"g{index:04d}"


def member_tls(directory: Path, member: str) -> TlsConfig:
    """The member's own certificate (bench/scale.py issues one per member, as deployed)."""
    return TlsConfig(directory / "ca.pem", directory / f"{member}.pem", directory / f"{member}.key")


class SimulatedMember:
    def __init__(
        self,
        datanode: str,
        member: str,
        master: bool,
        port: int,
        upstream_port: int,
        standby: str,
        agent_address: str,
    ) -> None:
        self.datanode = datanode
        self.member = member
        self.master = master
        self.port = port
        self.upstream_port = upstream_port
        self.standby = standby
        self.agent_address = agent_address
        self.epoch = 0
        self.running = True
        self.detached = False  # Detach: no WAL receiver until promoted
        self.boot_id = uuid.uuid4().hex
        self.sequence = itertools.count(1)
        self.changed = asyncio.Event()
        self.reason = ""
        self._report: pb.MemberStatus | None = None

    def change(self, reason: str) -> None:
        """What the real agent's signal_change does: report at once."""
        self._report = None
        self.reason = reason
        self.changed.set()

    def status(self) -> pb.MemberStatus:
        """The next report, numbered. The same message is sent again with the next number while
        nothing changed (what the real agent sends then too, built once: the simulators' own CPU
        goes to the protocol, not to building identical messages)."""
        if self._report is None:
            self._report = self._build()
        self._report.sequence = next(self.sequence)
        return self._report

    def _build(self) -> pb.MemberStatus:
        if not self.running:
            pg = pb.PostgresStatus(running=False, role=pb.ROLE_STOPPED, port=self.port)
        elif self.master:
            pg = pb.PostgresStatus(
                running=True,
                role=pb.ROLE_MASTER,
                postmaster_pid=1,
                timeline=1,
                system_identifier=42,
                current_lsn=LSN,
                flush_lsn=LSN,
                port=self.port,
                synchronous_standby_names=f"FIRST 1 ({self.standby})" if self.standby else "",
                downstreams=[
                    pb.Downstream(
                        name=self.standby,
                        state="streaming",
                        sync_state="sync",
                        flush_lsn=LSN,
                        replay_lsn=LSN,
                        reply_age=0.2,
                        caught_up=True,
                    )
                ]
                if self.standby
                else [],
            )
        else:
            pg = pb.PostgresStatus(
                running=True,
                role=pb.ROLE_STANDBY,
                postmaster_pid=1,
                timeline=1,
                system_identifier=42,
                receive_lsn=LSN,
                flush_lsn=LSN,
                replay_lsn=LSN,
                port=self.port,
                wal_receiver=None
                if self.detached
                else pb.WalReceiver(
                    status="streaming",
                    upstream=pb.Endpoint(host="127.0.0.1", port=self.upstream_port),
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
            upstream=pb.UpstreamCheck(checked=not self.master, ok=True),
            postmaster_died=not self.running,
            detached=self.detached and not self.master,
        )


class VictimAgent(pb_grpc.AgentServicer):
    """The node-role messages of the group whose master is made to fail."""

    def __init__(self, member: SimulatedMember, promoted: asyncio.Event) -> None:
        self.member = member
        self.promoted = promoted

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemberStatus:
        status = pb.MemberStatus()
        status.CopyFrom(self.member.status())
        return status

    async def Promote(self, request: pb.PromoteRequest, context: grpc.aio.ServicerContext) -> pb.RoleReply:
        self.promoted.set()
        self.member.epoch = max(self.member.epoch, request.epoch)
        self.member.master, self.member.standby = True, ""
        self.member.change("promoting done")
        return pb.RoleReply(status=await self.GetStatus(pb.GetStatusRequest(), context), detail="simulated")

    async def Fence(self, request: pb.FenceRequest, context: grpc.aio.ServicerContext) -> pb.RoleReply:
        self.member.running = False
        self.member.change("fencing done")
        return pb.RoleReply(status=await self.GetStatus(pb.GetStatusRequest(), context), detail="fenced")

    async def Detach(self, request: pb.DetachRequest, context: grpc.aio.ServicerContext) -> pb.RoleReply:
        self.member.epoch = max(self.member.epoch, request.epoch)
        self.member.detached = True
        self.member.change("detaching done")
        return pb.RoleReply(status=await self.GetStatus(pb.GetStatusRequest(), context), detail="detached")

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


class Counts:
    def __init__(self) -> None:
        self.measuring = False  # SIGUSR1 .. SIGUSR2
        self.round_trips: list[float] = []  # ms, of the reports sent within the window
        self.answered = 0
        self.failed = 0  # reports without a reply in time, streams ended unasked (opened anew)
        self.failed_in_window = 0
        self.failed_before_window = 0  # while the agents connect and the groups settle
        self.window_opened = False
        self.reasons: dict[str, int] = {}

    def answer(self, measured: bool, seconds: float) -> None:
        self.answered += 1
        if measured:
            self.round_trips.append(seconds * 1000)

    def failure(self, measured: bool, why: str) -> None:
        self.failed += 1
        self.failed_before_window += not self.window_opened
        self.failed_in_window += measured
        kind = why.split(":")[0][:60]
        self.reasons[kind] = self.reasons.get(kind, 0) + 1


async def heartbeats(
    member: SimulatedMember,
    opened: "grpc.aio.Channel | RenewingChannel",
    address: str,
    interval: float,
    keepalive: timings.Keepalive,
    offset: float,
    counts: Counts,
    stopping: asyncio.Event,
    protocol: str,
) -> None:
    """The real agent's loop (`Agent._heartbeats`) for one member and one controller; with
    `unary`, one Heartbeat call every interval instead (agents of earlier versions)."""
    await asyncio.sleep(offset)
    stream: ReportStream | None = None
    unary = pb_grpc.ControllerStub(opened) if protocol == "unary" else None
    report_interval = interval  # until the controller's reply says
    sent_at = -float("inf")
    failures = 0  # in a row: the agent waits `retry_delay` after each

    def ended(which: ReportStream) -> None:
        if which is stream and not stopping.is_set():
            counts.failure(counts.measuring, "stream ended")
            member.change("controller stream ended")

    try:
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await member.changed.wait()
            member.changed.clear()
            reason, member.reason = member.reason or "interval", ""
            if unary is None and stream is not None and not stream.usable(address, opened):
                stream = None
            due = unary is not None or stream is None or reason != "interval"
            if not due and time.monotonic() - sent_at < report_interval:
                continue
            sent, measured = time.monotonic(), counts.measuring
            sent_at = sent
            request = pb.HeartbeatRequest(status=member.status(), reason=reason)
            if unary is not None:  # the earlier agents' protocol, for comparison
                try:
                    reply = await unary.Heartbeat(request, timeout=max(interval, 0.5))
                except grpc.aio.AioRpcError as error:
                    counts.failure(measured, error.code().name)
                    failures += 1
                    await asyncio.sleep(retry_delay(failures, interval))
                    continue
            else:
                if stream is None:
                    stream = ReportStream(address, opened, keepalive.silence, ended)
                try:
                    reply = await stream.exchange(request, max(interval, 0.5))
                except ReportFailed as error:
                    counts.failure(measured, str(error))
                    failed, stream = stream, None
                    failed.close()
                    failures += 1
                    await asyncio.sleep(retry_delay(failures, interval))
                    continue
            failures = 0
            counts.answer(measured, time.monotonic() - sent)
            if reply.report_interval > 0:
                report_interval = reply.report_interval
            if reply.epoch > member.epoch:
                member.epoch = reply.epoch
                member.change(f"epoch {reply.epoch}")
    finally:
        if stream is not None:
            stream.close()


async def main(args: argparse.Namespace) -> dict[str, object]:
    certificates = Path(args.certificates)
    promoted = {group_name(index): asyncio.Event() for index in range(args.victims)}
    members: list[SimulatedMember] = []
    servers = []
    for index in range(args.first, args.first + args.groups):
        name = group_name(index)
        master_port, standby_port = 20000 + 2 * index, 20001 + 2 * index
        names = (f"{name}a", f"{name}b")
        addresses = [args.dummy_agent, args.dummy_agent]
        victims = []
        if index < args.victims:
            for slot, own in enumerate(names):
                server, port, _ = create_server("127.0.0.1:0", member_tls(certificates, own), Guard())
                servers.append(server)
                victims.append(server)
                addresses[slot] = f"127.0.0.1:{port}"
        master = SimulatedMember(name, names[0], True, master_port, standby_port, names[1], addresses[0])
        standby = SimulatedMember(name, names[1], False, standby_port, master_port, names[1], addresses[1])
        members += [master, standby]
        for server, member in zip(victims, (master, standby), strict=False):
            pb_grpc.add_AgentServicer_to_server(VictimAgent(member, promoted[name]), server)
            await server.start()
    counts = Counts()
    stopping = asyncio.Event()
    window_closed = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)

    def open_window() -> None:
        counts.measuring = counts.window_opened = True

    loop.add_signal_handler(signal.SIGUSR1, open_window)

    def close_window() -> None:
        counts.measuring = False
        window_closed.set()

    loop.add_signal_handler(signal.SIGUSR2, close_window)
    # One channel per member, with the member's own certificate: as many TLS connections to
    # the controller as there are agents, as deployed.
    keepalive = timings.Keepalive.of(args.interval, timings.KEEPALIVE_INTERVAL, timings.FAILURE_TIMEOUT)
    channels = [
        channel(
            args.controller,
            member_tls(certificates, m.member),
            liveness_options(keepalive),
        )
        for m in members
    ]
    tasks = [
        asyncio.create_task(
            heartbeats(
                m,
                channels[i],
                args.controller,
                args.interval,
                keepalive,
                args.ramp * i / len(members) + args.interval * random.random(),
                counts,
                stopping,
                args.protocol,
            )
        )
        for i, m in enumerate(members)
    ]
    result: dict[str, object] = {}
    if promoted:
        await window_closed.wait()
        timed: list[float | None] = []
        for datanode, done in promoted.items():
            victim = next(m for m in members if m.datanode == datanode and m.master)
            victim.running = False
            crash_sent = time.monotonic()
            victim.change("postmaster died")  # reported at once on its stream, as the agent does
            try:
                await asyncio.wait_for(done.wait(), 30)
                timed.append((time.monotonic() - crash_sent) * 1000)
            except TimeoutError:
                timed.append(None)
            await asyncio.sleep(max(0.0, crash_sent + args.crash_every - time.monotonic()))
        result["crash_to_promote_ms"] = timed
    await stopping.wait()
    stopping.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for each in channels:
        await each.close()
    for server in servers:
        await server.stop(0)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    ms = counts.round_trips
    result.update(
        {
            "answered": counts.answered,
            "failed": counts.failed,
            "failed_in_window": counts.failed_in_window,
            "failed_before_window": counts.failed_before_window,
            "failure_reasons": counts.reasons,
            "rtt_samples": len(ms),
            "rtt_p50_ms": percentile(ms, 0.5) if ms else None,
            "rtt_p99_ms": percentile(ms, 0.99) if ms else None,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
        }
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--controller", required=True)
    parser.add_argument("--certificates", required=True, help="the CA's and each member's files")
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--groups", type=int, required=True)
    parser.add_argument("--interval", type=float, required=True)
    parser.add_argument("--victims", type=int, default=0, help="the first N groups: crashed in turn")
    parser.add_argument("--crash-every", type=float, default=1.0, help="seconds between the crashes")
    parser.add_argument("--dummy-agent", default="127.0.0.1:9")
    parser.add_argument("--protocol", choices=("stream", "unary"), default="stream")
    parser.add_argument("--ramp", type=float, default=0.0, help="members start over this many seconds")
    print(json.dumps(asyncio.run(main(parser.parse_args()))), flush=True)
