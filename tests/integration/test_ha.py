"""Agents and controller as separate OS processes over mTLS, real PostgreSQL, a writer that
records every acknowledged commit; each test ends by checking nothing acknowledged was lost."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from tests.conftest import acknowledges_a_write
from tests.integration.conftest import Cluster, ClusterFactory
from xcha.config import TlsConfig
from xcha.rpc import channel
from xcha.topology import DatanodePlan, TopologyPlan
from xcha.v1 import xcha_pb2 as pb
from xcha.v1 import xcha_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]


def ctl(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "xcha", "ctl", *args, "--workdir", str(cluster.topology.workdir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


async def test_kill_9_of_the_master_postmaster_fails_over_without_losing_a_commit(
    make_cluster: ClusterFactory,
) -> None:
    cluster = await make_cluster()
    old = cluster.group().master
    killed_at = time.time()
    os.kill(cluster.topology.postmaster_pid(old), signal.SIGKILL)  # type: ignore[arg-type]
    new = await cluster.wait_master_changed(old)
    await cluster.wait_for_acks(20)
    recovery = cluster.writer.recovery_seconds(killed_at)
    print(f"\nkill -9 of {old}: writes accepted on {new} {recovery * 1000 if recovery else -1:.0f} ms later")
    assert any("postmaster gone" in e.message and e.kind == "failover" for e in cluster.events())
    status = await cluster.wait_protected()
    group = status.groups[0]
    assert group.master == new
    former = next(m for m in group.members if m.name == old)
    assert former.sync_state == "sync" and former.status.postgres_status.role == pb.ROLE_STANDBY
    await cluster.assert_nothing_lost()


async def test_killing_only_the_masters_agent_is_no_failover(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster()
    master = cluster.group().master
    epoch = cluster.status().epoch
    cluster.topology.kill_process(f"agent:{master}")
    acked = len(cluster.writer.acknowledged)
    await asyncio.sleep(3 * cluster.topology.plan.failure_timeout)
    group = cluster.group()
    assert group.master == master and group.state == "protected", group.reason
    assert cluster.status().epoch == epoch
    assert len(cluster.writer.acknowledged) > acked + 50, "writes must go on while the agent is down"
    assert "answers" in group.failure_inputs
    cluster.topology.start_agent(master)  # it adopts the running PostgreSQL
    await cluster.wait_for(
        lambda s: next(m for m in s.groups[0].members if m.name == master).heartbeat_age < 1,
        "the restarted agent to report",
    )
    assert cluster.group().master == master and not cluster.events("failover")
    await cluster.assert_nothing_lost()


async def test_controller_restart_is_no_failover_and_older_epochs_are_refused(
    make_cluster: ClusterFactory,
) -> None:
    cluster = await make_cluster()
    master = cluster.group().master
    old_epoch = cluster.status().epoch
    cluster.topology.kill_process("controller")
    await asyncio.sleep(1.0)
    cluster.topology.start_controller()
    status = await cluster.wait_for(
        lambda s: s.epoch > old_epoch and s.groups[0].state == "protected",
        "the restarted controller to take over",
    )
    await asyncio.sleep(2 * cluster.topology.plan.failure_timeout)
    assert cluster.group().master == master and not cluster.events("failover")
    # Agents learn the new epoch from heartbeats; a message from the deposed controller's epoch is refused.
    new_epoch = cluster.status().epoch
    await cluster.wait_for(
        lambda s: all(m.status.epoch == new_epoch for m in s.groups[0].members),
        "every agent to persist the new epoch",
    )
    info = cluster.topology.members[master]
    tls = cluster.topology.workdir / "tls"  # only a controller's certificate may send node-role messages
    as_controller = TlsConfig(tls / "ca.pem", tls / "controller.pem", tls / "controller.key")
    async with channel(f"127.0.0.1:{info.agent_port}", as_controller) as agent_channel:
        stub = pb_grpc.AgentStub(agent_channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Fence(
                pb.FenceRequest(epoch=old_epoch, member=master, reason="stale controller"), timeout=10
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "older than epoch" in (refused.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as misaddressed:
            await stub.Fence(
                pb.FenceRequest(epoch=new_epoch, member="dn9z", reason="wrong member"), timeout=10
            )
        assert misaddressed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert status.epoch == new_epoch
    await cluster.wait_for_acks(20)
    assert cluster.group().master == master
    await cluster.assert_nothing_lost()


async def test_hung_master_host_fails_over_and_the_old_master_rejoins_without_serving_writes(
    make_cluster: ClusterFactory,
) -> None:
    cluster = await make_cluster()
    topology = cluster.topology
    old = cluster.group().master
    stopped = topology.host_signal(old, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        new = await cluster.wait_master_changed(old)
        await cluster.wait_for_acks(20)
    finally:
        topology.host_signal(old, signal.SIGCONT)
    recovery = cluster.writer.recovery_seconds(stopped_at)
    print(
        f"\nSIGSTOP of {old} (agent + {len(stopped) - 1} PostgreSQL processes): writes on {new} after "
        f"{recovery * 1000 if recovery else -1:.0f} ms"
    )
    failover = next(e for e in cluster.events("failover") if "promoting" in e.message)
    assert "probe no answer" in failover.message and "receives no WAL" in failover.message
    # Resumed, the old master must not acknowledge a write: it learns the epoch and fences itself.
    info = topology.members[old]
    acknowledged = await acknowledges_a_write(
        topology.app_conninfo(old), "INSERT INTO xcha_writes (id) VALUES (-1)"
    )
    assert not acknowledged, f"{old} on port {info.port} acknowledged a write after SIGCONT"
    status = await cluster.wait_protected()
    former = next(m for m in status.groups[0].members if m.name == old)
    assert former.sync_state == "sync" and former.status.postgres_status.role == pb.ROLE_STANDBY
    await cluster.assert_nothing_lost()


@pytest.mark.parametrize("policy", ["available", "strict"])
async def test_losing_the_sync_standby(make_cluster: ClusterFactory, policy: str) -> None:
    plan = TopologyPlan(datanodes=(DatanodePlan("dn1", ("dn1a", "dn1b"), sync_policy=policy),))
    cluster = await make_cluster(plan)
    topology = cluster.topology
    standby = next(m.name for m in cluster.group().members if m.name != cluster.group().master)
    topology.kill_process(f"agent:{standby}")
    await topology.instance(standby).kill()
    lost_at = time.monotonic()
    await asyncio.sleep(0.3)
    acked = len(cluster.writer.acknowledged)
    if policy == "available":
        await cluster.wait_for(lambda s: s.groups[0].state == "unprotected", "the group to be unprotected")
        await cluster.wait_for_acks(50, timeout=topology.plan.failure_timeout + 10)
        print(f"\nwrites continue {time.monotonic() - lost_at:.1f} s after the standby died (available)")
    else:
        await cluster.wait_for(lambda s: s.groups[0].state == "degraded", "the group to be degraded")
        await asyncio.sleep(3)
        assert len(cluster.writer.acknowledged) <= acked + 1, "strict: no commit without a sync standby"
    topology.start_agent(standby)  # it starts its standby again
    status = await cluster.wait_protected()
    assert next(m for m in status.groups[0].members if m.name == standby).sync_state == "sync"
    await cluster.wait_for_acks(20)
    await cluster.assert_nothing_lost()


async def test_switchover_round_trip_under_writes(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster()
    first = cluster.group().master
    output = ctl(cluster, "switchover", "dn1").stdout
    second = cluster.group().master
    assert second != first and f"{second} is the master" in output
    await cluster.wait_protected()
    await cluster.wait_for_acks(20)
    ctl(cluster, "switchover", "dn1", "--to", first)
    assert cluster.group().master == first
    status = await cluster.wait_protected()
    assert next(m for m in status.groups[0].members if m.name == second).sync_state == "sync"
    assert len([e for e in cluster.events("rerouted") if json.loads(e.details_json).get("switchover")]) == 2
    await cluster.wait_for_acks(20)
    await cluster.assert_nothing_lost()


async def test_add_standby_set_mode_and_remove_standby(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster()
    topology = cluster.topology
    topology.add_member("dn1", "dn1c")
    topology.save()
    topology.start_agent("dn1c")
    await asyncio.sleep(1.0)
    assert "dn1c" not in [m.name for m in cluster.group().members], "not a member until an operator adds it"
    assert "added" in ctl(cluster, "add-standby", "dn1", "dn1c", "--mode", "async").stdout

    def downstream(status: pb.ClusterStatus, name: str) -> str:
        return next((m.sync_state for m in status.groups[0].members if m.name == name), "")

    await cluster.wait_for(lambda s: downstream(s, "dn1c") == "async", "dn1c to stream as an async standby")
    ctl(cluster, "set-mode", "dn1", "dn1c", "sync")
    await cluster.wait_for(
        lambda s: downstream(s, "dn1c") == "potential", "dn1c to be a potential sync standby"
    )
    master = cluster.group().master
    async with await topology.superuser(master) as conn:
        names = (await (await conn.execute("SHOW synchronous_standby_names")).fetchone())[0]  # type: ignore[index]
    assert "dn1c" in str(names)
    ctl(cluster, "remove-standby", "dn1", "dn1c")
    await cluster.wait_for(
        lambda s: (
            "dn1c"
            not in next(
                m.status.postgres_status.synchronous_standby_names
                for m in s.groups[0].members
                if m.name == s.groups[0].master
            )
        ),
        "dn1c to leave synchronous_standby_names",
    )
    deadline = time.monotonic() + 30
    while topology.postgres_pids("dn1c") and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not topology.postgres_pids("dn1c"), "a removed standby is stopped"
    await cluster.wait_for_acks(20)
    await cluster.assert_nothing_lost()


async def test_mtls_refuses_callers_without_a_valid_client_certificate(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster(write=False)
    topology = cluster.topology
    ca = (topology.workdir / "tls" / "ca.pem").read_bytes()
    agent_address = f"127.0.0.1:{topology.members['dn1a'].agent_port}"
    controller_address = f"127.0.0.1:{topology.controller_port}"
    from xcha.tls import Identity, create_ca, issue

    rogue = topology.workdir / "rogue-ca"
    create_ca(rogue)
    cert, key = issue(rogue, Identity("operator", "intruder"))
    attempts = {
        "no client certificate": grpc.ssl_channel_credentials(root_certificates=ca),
        "certificate from another CA": grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
        ),
    }
    for what, credentials in attempts.items():
        async with grpc.aio.secure_channel(agent_address, credentials) as unauthenticated:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.AgentStub(unauthenticated).GetStatus(pb.GetStatusRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, what
        async with grpc.aio.secure_channel(controller_address, credentials) as unauthenticated:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.ControllerStub(unauthenticated).Heartbeat(
                    pb.HeartbeatRequest(status=pb.MemberStatus(datanode="dn1", member="dn1a")), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, what
    async with grpc.aio.insecure_channel(agent_address) as plaintext:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.AgentStub(plaintext).GetStatus(pb.GetStatusRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, "agent, plaintext"
    async with grpc.aio.insecure_channel(controller_address) as plaintext:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.ControllerStub(plaintext).GetClusterStatus(pb.ClusterStatusRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, "controller, plaintext"
    async with channel(controller_address, topology.operator_tls) as trusted:
        cluster_status = await pb_grpc.ControllerStub(trusted).GetClusterStatus(
            pb.ClusterStatusRequest(), timeout=5
        )
    assert [g.name for g in cluster_status.groups] == ["dn1"]
    async with channel(agent_address, topology.operator_tls) as trusted:
        status = await pb_grpc.AgentStub(trusted).GetStatus(pb.GetStatusRequest(), timeout=5)
    assert status.member == "dn1a"


async def test_a_coordinator_report_contradicted_by_the_controllers_checks_is_no_failover(
    make_cluster: ClusterFactory,
) -> None:
    cluster = await make_cluster()
    master = cluster.group().master
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xcha",
            "report-failure",
            "--datanode",
            "dn1",
            "--reporter",
            "coord1",
            "--detail",
            "could not connect to server",
            "--workdir",
            str(cluster.topology.workdir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "probe: answers" in result.stdout and "reported just now" in result.stdout
    await asyncio.sleep(2 * cluster.topology.plan.failure_timeout)
    assert cluster.group().master == master and not cluster.events("failover")
    assert any(e.kind == "report" and "coord1" in e.message for e in cluster.events())
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "xcha",
            "report-failure",
            "--datanode",
            "dn9",
            "--workdir",
            str(cluster.topology.workdir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "unknown datanode 'dn9'" in bad.stderr and "Traceback" not in bad.stderr
    await cluster.assert_nothing_lost()


async def test_pause_stops_automatic_failover_until_resume(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster()
    old = cluster.group().master
    assert "dn1 paused" in ctl(cluster, "pause", "dn1").stdout
    os.kill(cluster.topology.postmaster_pid(old), signal.SIGKILL)  # type: ignore[arg-type]
    await asyncio.sleep(2 * cluster.topology.plan.failure_timeout)
    group = cluster.group()
    assert group.master == old and group.paused and "paused" in group.reason
    assert "paused" in ctl(cluster, "status").stdout
    ctl(cluster, "resume", "dn1")
    await cluster.wait_master_changed(old)
    await cluster.wait_protected()
    await cluster.assert_nothing_lost()
