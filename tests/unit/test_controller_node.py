"""Controllers that lead or follow (embedded store: the SQLite file's lock elects): a follower
never decides, tells agents and operators who leads, and takes over with a new epoch."""

import asyncio
from pathlib import Path

import grpc
import pytest

from xcha.agent.agent import Agent
from xcha.agent.config import load_agent_config
from xcha.agent.state import StateFile
from xcha.controller.config import load_controller_config
from xcha.controller.node import ControllerNode
from xcha.controller.routing import Router
from xcha.controller.service import ControllerService
from xcha.controller.store import SqliteLeadership, SqliteStore
from xcha.errors import NotLeader
from xcha.pg.instance import PostgresInstance
from xcha.pg.runner import OsUser, Runner
from xcha.rpc import LEADER_METADATA, create_server
from xcha.topology import free_port
from xcha.v1 import xcha_pb2 as pb
from xcha.v1 import xcha_pb2_grpc as pb_grpc


def node(tmp_path: Path, name: str, port: int) -> ControllerNode:
    config = tmp_path / f"{name}.toml"
    config.write_text(f"""
[controller]
listen = "127.0.0.1:{port}"
state_dir = "{tmp_path}/{name}"
name = "{name}"
peers = ["127.0.0.1:7101", "127.0.0.1:7102"]

[[datanode]]
name = "dn1"
members = ["dn1a", "dn1b"]

[tls]
insecure = true
""")
    loaded = load_controller_config(config)
    path = tmp_path / "shared.sqlite3"  # one store for both: the lock on it elects
    leadership = SqliteLeadership(path, name, loaded.advertise)
    return ControllerNode(
        loaded, SqliteStore(path, leadership), leadership, router=lambda: Router("none", [])
    )


async def until(condition: object, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def heartbeat(member: str = "dn1a") -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(status=pb.MemberStatus(member=member, datanode="dn1", boot_id="b", sequence=1))


async def test_one_leads_the_other_follows_and_takes_over_with_a_new_epoch(tmp_path: Path) -> None:
    first, second = node(tmp_path, "c1", 7101), node(tmp_path, "c2", 7102)
    runs = [asyncio.ensure_future(first.run())]
    try:
        await until(lambda: first.leading() is not None)
        runs.append(asyncio.ensure_future(second.run()))
        await until(lambda: second.leader_info is not None and second.leader_info.name == "c1")
        assert second.leading() is None and second.controller is None, "a follower holds no controller"
        leader = first.leading()
        assert leader is not None
        old_epoch = leader.epoch
        await leader.ledger.flush()

        # A follower's heartbeat reply: where the leader is, nothing to act on.
        reply = ControllerService(second)._not_leading()
        assert reply.not_leader and (reply.leader, reply.leader_address) == ("c1", "127.0.0.1:7101")
        # Its status: the groups as last recorded, and who leads.
        status = await ControllerService(second)._cluster_status()
        assert (status.controller, status.leading, status.leader, status.term) == ("c2", False, "c1", 1)
        assert list(status.controllers) == ["127.0.0.1:7101", "127.0.0.1:7102"]
        assert [g.name for g in status.groups] == ["dn1"] and status.epoch == old_epoch
        # An operator's command is refused with the leader's address.
        with pytest.raises(NotLeader, match=r"the leader is c1 at 127\.0\.0\.1:7101") as refused:
            ControllerService(second)._leader()
        assert refused.value.leader_address == "127.0.0.1:7101"

        await first.stop()
        await runs[0]
        await until(lambda: second.leading() is not None)
        successor = second.leading()
        assert successor is not None and successor.epoch == old_epoch + 1
        await successor.ledger.flush()
        assert (await second.store.load()).epoch == old_epoch + 1
        assert second.leader_info is not None and (second.leader_info.name, second.leader_info.term) == (
            "c2",
            2,
        )
    finally:
        for each in (first, second):
            await each.stop()
        await asyncio.gather(*runs)
        for each in (first, second):
            await each.store.close()


async def test_a_follower_refusal_carries_the_leader_address_to_the_client(tmp_path: Path) -> None:
    """Over gRPC: FAILED_PRECONDITION with the leader's address in the trailing metadata (what
    `xcha ctl` follows)."""
    first, second = node(tmp_path, "c1", 7101), node(tmp_path, "c2", 7102)
    runs = [asyncio.ensure_future(first.run())]
    await until(lambda: first.leading() is not None)
    runs.append(asyncio.ensure_future(second.run()))
    await until(lambda: second.leader_info is not None)
    server, port, _ = create_server("127.0.0.1:0", second.config.tls)
    pb_grpc.add_ControllerServicer_to_server(ControllerService(second), server)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ControllerStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.SetPaused(pb.PauseRequest(paused=True), timeout=5)
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            metadata = dict(error.value.trailing_metadata() or ())
            assert metadata[LEADER_METADATA] == "127.0.0.1:7101"
            reply = await stub.Heartbeat(heartbeat(), timeout=5)
            assert reply.not_leader and reply.leader_address == "127.0.0.1:7101"
            assert first.leading() is not None and not first.leading().observations["dn1a"].status  # type: ignore[union-attr]
            events = await stub.ListEvents(pb.EventsRequest(limit=10), timeout=5)
            assert any("controller started" in e.message for e in events.events)
    finally:
        await server.stop(None)
        for each in (first, second):
            await each.stop()
        await asyncio.gather(*runs)
        for each in (first, second):
            await each.store.close()


def stream_agent(tmp_path: Path, controllers: list[str]) -> Agent:
    """dn1a's agent (no PostgreSQL: only its heartbeat loop runs) reporting to controllers."""
    password = tmp_path / "replication.password"
    password.write_text("secret\n")
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
[agent]
datanode = "dn1"
member = "dn1a"
listen = "127.0.0.1:7001"
controllers = {controllers!r}
state_dir = "{tmp_path}/agent"

[postgres]
data_dir = "{tmp_path}/dn1a/data"
archive_dir = "{tmp_path}/archive"
replication_password_file = "{password}"
socket_dir = "{tmp_path}"

[tls]
insecure = true
""".replace("'", '"')
    )
    config = load_agent_config(path)
    runner = Runner(Path("/nonexistent/bindir"), OsUser.for_postgres())  # runs nothing
    instance = PostgresInstance(config.postgres.instance_spec(config.member), runner, 150000)
    return Agent(config, instance, StateFile(config.state_dir / "agent-state.json"))


async def test_an_agent_streams_its_reports_to_the_leader_a_follower_names(tmp_path: Path) -> None:
    """The agent's Heartbeats stream to a follower is answered not_leader with the leader's
    address; the agent opens its stream to the leader, whose replies alone count as contact."""
    ports = [free_port(), free_port()]
    first, second = node(tmp_path, "c1", ports[0]), node(tmp_path, "c2", ports[1])
    runs = [asyncio.ensure_future(first.run())]
    await until(lambda: first.leading() is not None)
    runs.append(asyncio.ensure_future(second.run()))
    await until(lambda: second.leader_info is not None)
    servers = []
    for each, port in zip((first, second), ports, strict=True):
        server, _, _ = create_server(f"127.0.0.1:{port}", each.config.tls)
        pb_grpc.add_ControllerServicer_to_server(ControllerService(each), server)
        await server.start()
        servers.append(server)
    agent = stream_agent(tmp_path, [f"127.0.0.1:{ports[1]}"])  # only the follower is configured
    heartbeats = asyncio.ensure_future(agent._heartbeats())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[1]}") as channel:
            call = pb_grpc.ControllerStub(channel).Heartbeats()
            await call.write(heartbeat())
            reply = await call.read()
            assert reply.not_leader and reply.leader_address == f"127.0.0.1:{ports[0]}"
            call.cancel()
        leader = first.leading()
        assert leader is not None
        await until(lambda: agent.controller_ok_at is not None)
        await until(lambda: (s := leader.observations["dn1a"].status) is not None and s.sequence >= 3)
        assert agent.state.epoch == leader.epoch
    finally:
        agent.stop()
        heartbeats.cancel()
        await asyncio.gather(heartbeats, return_exceptions=True)
        for server in servers:
            await server.stop(None)
        for each in (first, second):
            await each.stop()
        await asyncio.gather(*runs)
        for each in (first, second):
            await each.store.close()


async def test_a_report_on_a_stream_is_answered_like_a_heartbeat_and_a_bad_one_ends_it(
    tmp_path: Path,
) -> None:
    """Each report on the stream gets its reply, in order; one Heartbeat would refuse (an
    address the controller could not use) ends the stream with that status."""
    port = free_port()
    first = node(tmp_path, "c1", port)
    runs = [asyncio.ensure_future(first.run())]
    await until(lambda: first.leading() is not None)
    server, _, _ = create_server(f"127.0.0.1:{port}", first.config.tls)
    pb_grpc.add_ControllerServicer_to_server(ControllerService(first), server)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.ControllerStub(channel).Heartbeats()
            for sequence in (1, 2, 3):
                request = heartbeat()
                request.status.sequence = sequence
                await call.write(request)
                reply = await call.read()
                assert not reply.not_leader and reply.heartbeat_interval > 0
                leader = first.leading()
                assert leader is not None and leader.observations["dn1a"].status.sequence == sequence  # type: ignore[union-attr]
            bad = heartbeat()
            bad.status.sequence = 4
            bad.status.agent_address = "no port"
            await call.write(bad)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call.read()
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop(None)
        await first.stop()
        await asyncio.gather(*runs)
        await first.store.close()


async def test_an_agent_on_a_stream_reports_on_change_and_is_in_contact_between_reports(
    tmp_path: Path,
) -> None:
    """Once settled, the agent's next report comes report_interval later (nothing changed);
    meanwhile its open stream is contact (controller_silent_for 0). A term's end ends the
    stream: the agent reconnects at once and reports again."""
    port = free_port()
    first = node(tmp_path, "c1", port)
    runs = [asyncio.ensure_future(first.run())]
    await until(lambda: first.leading() is not None)
    server, _, _ = create_server(f"127.0.0.1:{port}", first.config.tls)
    service = ControllerService(first)
    pb_grpc.add_ControllerServicer_to_server(service, server)
    await server.start()
    agent = stream_agent(tmp_path, [f"127.0.0.1:{port}"])
    heartbeats = asyncio.ensure_future(agent._heartbeats())
    try:
        leader = first.leading()
        assert leader is not None
        observation = leader.observations["dn1a"]
        await until(lambda: (s := observation.status) is not None and s.epoch == leader.epoch)
        await asyncio.sleep(0.3)
        settled, since = observation.status.sequence, asyncio.get_running_loop().time()  # type: ignore[union-attr]
        await until(lambda: observation.status.sequence > settled, timeout=first.config.report_interval + 2)  # type: ignore[union-attr]
        assert asyncio.get_running_loop().time() - since > first.config.report_interval - 0.5
        assert agent.controller_silent_for() == 0.0 and observation.streams == 1
        contact = agent._contact
        service._end_streams()  # what the end of a term does
        await until(lambda: agent._contact is not None and agent._contact is not contact)
        await until(lambda: observation.streams == 1)
    finally:
        agent.stop()
        heartbeats.cancel()
        await asyncio.gather(heartbeats, return_exceptions=True)
        await server.stop(None)
        await first.stop()
        await asyncio.gather(*runs)
        await first.store.close()


@pytest.mark.parametrize("controllers", [1, 3])
async def test_an_agent_whose_controllers_are_all_down_waits_between_attempts(
    tmp_path: Path, controllers: int
) -> None:
    """A stream on a channel that cannot connect fails at once: without a wait the agent
    retried thousands of times a second (a core beside PostgreSQL). It tries each controller
    once in turn, then waits half to all of a heartbeat interval, doubling up to 1 s."""
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(controllers)]  # nothing listens
    agent = stream_agent(tmp_path, addresses)
    heartbeats = asyncio.ensure_future(agent._heartbeats())
    try:
        await asyncio.sleep(2.0)
    finally:
        agent.stop()
        heartbeats.cancel()
        await asyncio.gather(heartbeats, return_exceptions=True)
    attempts = next(agent._sequence) - 1
    # rounds start at 0, 0.125-0.25, 0.375-0.75, 0.875-1.75 s (then every 0.5-1 s): 3-5 in 2 s
    assert controllers <= attempts <= 5 * controllers, attempts
    assert agent.controller_ok_at is None
