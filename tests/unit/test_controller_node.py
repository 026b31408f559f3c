"""Controllers that lead or follow (embedded store: the SQLite file's lock elects): a follower
never decides, tells agents and operators who leads, and takes over with a new epoch."""

import asyncio
from pathlib import Path

import grpc
import pytest

from xcha.controller.config import load_controller_config
from xcha.controller.node import ControllerNode
from xcha.controller.routing import Router
from xcha.controller.service import ControllerService
from xcha.controller.store import SqliteLeadership, SqliteStore
from xcha.errors import NotLeader
from xcha.rpc import LEADER_METADATA, create_server
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
