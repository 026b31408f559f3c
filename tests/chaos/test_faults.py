"""Every fault the best-tested HA systems inject, against xcha on real processes; each
scenario prints its recovery time and ends by checking that nothing acknowledged was lost."""

import asyncio
import json
import os
import signal
import time

import pytest

from tests.conftest import LoadedFactory, acknowledges_a_write, cmdline, default_plan
from tests.conftest import assert_nothing_lost as assert_outcome
from xcha.ctl import call
from xcha.harness import LoadedCluster
from xcha.topology import DatanodePlan, Topology
from xcha.v1 import xcha_pb2 as pb

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


async def assert_nothing_lost(cluster: LoadedCluster) -> None:
    """Stop writing; every acknowledged id is on the surviving masters, none there unsent."""
    assert_outcome(await cluster.finish())


def failures_since(cluster: LoadedCluster, since: float, datanode: str = "dn1") -> list[tuple[float, str]]:
    return [(t, e) for t, e in cluster.writers[datanode].failures if t >= since]


async def fdw_options(topology: Topology, coordinator: str, server: str) -> list[str]:
    """The coordinator's postgres_fdw server options (host=..., port=..., dbname=...)."""
    async with await topology.coordinator(coordinator).connect() as conn:
        cursor = await conn.execute("SELECT srvoptions FROM pg_foreign_server WHERE srvname = %s", [server])
        row = await cursor.fetchone()
    assert row is not None and isinstance(row[0], list), f"{coordinator} has no server {server}"
    return [str(option) for option in row[0]]


async def test_kill_9_of_the_master_five_times_back_and_forth(loaded: LoadedFactory) -> None:
    cluster = await loaded()
    master = cluster.master()
    for trial in range(1, 6):
        await asyncio.sleep(0.5)
        fault = cluster.kill_master()
        assert fault.member == master, f"the master changed unplanned: {master} before, {fault.member} now"
        recovery = await cluster.recovery(fault)
        print(
            f"\n  kill -9 #{trial} of {fault.member}: writes through the coordinator after "
            f"{recovery.rto_ms:.0f} ms on {recovery.new_master}"
        )
        status = await cluster.wait_protected()
        group = status.groups[0]
        former = next(m for m in group.members if m.name == fault.member)
        assert group.master == recovery.new_master, f"trial {trial}: {group.master} is the master"
        assert former.status.postgres_status.role == pb.ROLE_STANDBY and former.sync_state == "sync", (
            f"trial {trial}: {fault.member} is not back as the synchronous standby before the next kill"
        )
        master = recovery.new_master
    await assert_nothing_lost(cluster)


async def test_kill_9_of_the_masters_agent_only_is_no_failover(loaded: LoadedFactory) -> None:
    cluster = await loaded()
    master = cluster.master()
    postmaster = cluster.topology.postmaster_pid(master)
    epoch = cluster.status().epoch
    killed_at = time.time()
    cluster.topology.kill_process(f"agent:{master}")
    await asyncio.sleep(3 * cluster.topology.plan.failure_timeout)
    assert failures_since(cluster, killed_at) == [], "writes go on uninterrupted"
    group = cluster.group("dn1")
    assert group.master == master and group.state == "protected" and cluster.status().epoch == epoch
    cluster.topology.start_agent(master)
    await cluster.topology.wait_for(
        lambda s: next(m for m in s.groups[0].members if m.name == master).heartbeat_age < 1,
        30,
        "the restarted agent to re-attach",
    )
    assert cluster.topology.postmaster_pid(master) == postmaster, "it adopted the running postmaster"
    assert not [e for e in cluster.events("dn1", "failover") if e.epoch > epoch]
    print(f"\n  agent of {master} killed: 0 failed writes, no failover; it re-attached to PID {postmaster}")
    await assert_nothing_lost(cluster)


async def test_hung_master_host_fails_over_and_comes_back_as_a_standby(loaded: LoadedFactory) -> None:
    cluster = await loaded()
    fault = cluster.hang_master()
    try:
        recovery = await cluster.recovery(fault)
    finally:
        cluster.resume(fault.member)
    print(
        f"\n  SIGSTOP of {fault.member}'s host: writes through the coordinator after "
        f"{recovery.rto_ms:.0f} ms "
        f"(detected +{recovery.detect_ms or 0:.0f} ms)"
    )
    # Resumed, the old master must not acknowledge a write.
    acknowledged = await acknowledges_a_write(
        cluster.topology.app_conninfo(fault.member), "INSERT INTO xcha_writes VALUES (-1, now())"
    )
    assert not acknowledged, f"{fault.member} acknowledged a write after SIGCONT"
    status = await cluster.topology.wait_for(
        lambda s: s.groups[0].state == "protected" and s.groups[0].master == recovery.new_master,
        60,
        "the old master to rejoin",
    )
    former = next(m for m in status.groups[0].members if m.name == fault.member)
    assert former.status.postgres_status.role == pb.ROLE_STANDBY and former.sync_state == "sync"
    await assert_nothing_lost(cluster)


async def test_controller_killed_in_steady_state_is_no_failover(loaded: LoadedFactory) -> None:
    cluster = await loaded()
    master = cluster.master()
    killed_at = time.time()
    cluster.topology.kill_process("controller")
    await asyncio.sleep(2 * cluster.topology.plan.failure_timeout)
    assert failures_since(cluster, killed_at) == [], "writes do not need the controller"
    cluster.topology.start_controller()
    await cluster.topology.wait_for(
        lambda s: s.groups[0].state == "protected", 30, "the controller to be back"
    )
    await asyncio.sleep(2 * cluster.topology.plan.failure_timeout)
    assert cluster.master() == master
    assert not cluster.events("dn1", "failover")
    print(f"\n  controller killed and restarted: 0 failed writes, {master} still the master")
    await assert_nothing_lost(cluster)


async def test_controller_killed_right_after_it_sent_promote_finishes_safely(loaded: LoadedFactory) -> None:
    cluster = await loaded()
    topology = cluster.topology
    fault = cluster.kill_master()
    deadline = time.monotonic() + 30
    while not any("promoting" in e.message for e in cluster.events("dn1", "failover")):
        assert time.monotonic() < deadline, "no promotion decided"
        await asyncio.sleep(0.002)
    topology.kill_process("controller")
    killed_at = time.time()
    topology.start_controller()
    recovery = await cluster.recovery(fault)
    status = await topology.wait_for(
        lambda s: (
            s.groups[0].state == "protected" and all(m.status.epoch == s.epoch for m in s.groups[0].members)
        ),
        60,
        "one master, the same epoch everywhere",
    )
    masters = [m.name for m in status.groups[0].members if m.status.postgres_status.role == pb.ROLE_MASTER]
    assert masters == [recovery.new_master], f"exactly one master: {masters}"
    print(
        f"\n  controller killed {(killed_at - fault.at) * 1000:.0f} ms after the kill of {fault.member} "
        f"(right after deciding the promotion); writes after {recovery.rto_ms:.0f} ms; "
        f"epoch {status.epoch} everywhere"
    )
    await assert_nothing_lost(cluster)


@pytest.mark.parametrize("policy", ["available", "strict"])
async def test_sync_standby_killed(loaded: LoadedFactory, policy: str) -> None:
    cluster = await loaded(
        default_plan(datanodes=(DatanodePlan("dn1", ("dn1a", "dn1b"), sync_policy=policy),))
    )
    topology = cluster.topology
    standby = next(m.name for m in cluster.group("dn1").members if m.name != cluster.master())
    topology.kill_process(f"agent:{standby}")
    await topology.instance(standby).kill()
    killed_at = time.time()
    writer = cluster.writers["dn1"]
    if policy == "available":
        await topology.wait_for(lambda s: s.groups[0].state == "unprotected", 30, "unprotected")
        await cluster.wait_for_writes(50, "dn1")
        resumed = min(t for t in writer.acknowledged.values() if t > killed_at + 0.05)
        print(
            f"\n  available: writes acknowledged again {(resumed - killed_at) * 1000:.0f} ms "
            "after the standby died"
        )
    else:
        await topology.wait_for(lambda s: s.groups[0].state == "degraded", 30, "degraded")
        await asyncio.sleep(1.0)
        blocked_from = time.time()
        await asyncio.sleep(3.0)
        assert not [t for t in writer.acknowledged.values() if t > blocked_from], (
            "strict: no commit without it"
        )
        print("\n  strict: no write acknowledged while the synchronous standby is down")
    topology.start_agent(standby)
    restored = time.time()
    status = await cluster.wait_protected()
    assert next(m for m in status.groups[0].members if m.name == standby).sync_state == "sync"
    print(f"  {standby} back and synchronous {time.time() - restored:.1f} s after its agent restarted")
    await cluster.wait_for_writes(20, "dn1")
    await assert_nothing_lost(cluster)


async def test_a_hung_sync_standby_holds_commits_only_until_its_wal_sender_gives_up(
    loaded: LoadedFactory,
) -> None:
    """SIGSTOP of the synchronous standby's host (agent and PostgreSQL) for 20 s: the master's
    WAL sender gives up after wal_sender_timeout (5 s), the standby leaves
    pg_stat_replication, the controller drops it (available) and writes go on; they did not
    for 61 s with PostgreSQL's default of 60 s (found by the soak)."""
    cluster = await loaded()
    topology = cluster.topology
    standby = next(m.name for m in cluster.group("dn1").members if m.name != cluster.master())
    writer = cluster.writers["dn1"]
    topology.host_signal(standby, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        await topology.wait_for(lambda s: s.groups[0].state == "unprotected", 30, "unprotected")
        await cluster.wait_for_writes(20, "dn1")
        resumed = min(t for t in writer.acknowledged.values() if t > stopped_at + 0.05)
        print(f"\n  writes acknowledged again {(resumed - stopped_at) * 1000:.0f} ms after the standby hung")
        assert resumed - stopped_at < 15, "commits waited for a hung standby for too long"
        await asyncio.sleep(max(0.0, stopped_at + 20 - time.time()))
    finally:
        topology.host_signal(standby, signal.SIGCONT)
    await cluster.wait_protected()
    await assert_nothing_lost(cluster)


async def test_lagging_async_standby_is_never_promoted_and_a_lost_pair_waits(loaded: LoadedFactory) -> None:
    plan = default_plan(datanodes=(DatanodePlan("dn1", ("dn1a", "dn1b", "dn1c"), async_members=("dn1c",)),))
    cluster = await loaded(plan)
    topology = cluster.topology
    master = cluster.master()
    sync_standby = next(m.name for m in cluster.group("dn1").members if m.sync_state == "sync")
    assert sync_standby != "dn1c"
    receiver = next(pid for pid in topology.postgres_pids("dn1c") if "walreceiver" in cmdline(pid))
    os.kill(receiver, signal.SIGSTOP)  # dn1c stops receiving WAL: it lags
    try:
        await cluster.wait_for_writes(50, "dn1")
        for member in (master, sync_standby):  # both hosts lost together
            topology.kill_process(f"agent:{member}")
            await topology.instance(member).kill()
        status = await topology.wait_for(lambda s: s.groups[0].state == "no_candidate", 30, "no candidate")
        reason = status.groups[0].reason
        print(f"\n  {master} and {sync_standby} lost together: {reason}")
        assert f"no synchronous standby ({sync_standby})" in reason
        await asyncio.sleep(3 * plan.failure_timeout)
        group = cluster.group("dn1")
        assert group.master == master and group.state == "no_candidate"
        dn1c = next(m for m in group.members if m.name == "dn1c")
        assert dn1c.status.postgres_status.role == pb.ROLE_STANDBY, (
            "the lagging async standby is not promoted"
        )
        for member in (master, sync_standby):  # the hosts come back
            topology.start_agent(member)
        status = await topology.wait_for(
            lambda s: s.groups[0].state in ("single", "protected", "unprotected"),
            60,
            "a master that holds every commit",
        )
        assert status.groups[0].master in (master, sync_standby), "never the lagging async standby"
        print(f"  the hosts are back: {status.groups[0].master} is the master")
    finally:
        os.kill(receiver, signal.SIGCONT)
    await cluster.wait_protected()
    await cluster.wait_for_writes(20, "dn1")
    await assert_nothing_lost(cluster)


async def test_a_coordinator_unreachable_during_reroute_holds_the_barrier_until_it_is_back(
    loaded: LoadedFactory,
) -> None:
    cluster = await loaded(
        default_plan(
            coordinators=("coord1", "coord2"), router_settings={"retry_initial": 0.1, "retry_max": 0.5}
        )
    )
    topology = cluster.topology
    await topology.coordinator("coord2").kill()
    fault = cluster.kill_master()
    recovery = await asyncio.wait_for(_barrier_waits(cluster, fault.member), 30)
    new_port = f"port={topology.members[recovery].port}"
    # coord1 is re-pointed and carries writes; the failover is not complete while coord2 is down.
    assert new_port in await fdw_options(topology, "coord1", "dn1")
    writer = cluster.writers["dn1"]
    acked = len(writer.acknowledged)
    await asyncio.sleep(2)
    assert len(writer.acknowledged) > acked + 20, f"coord1 carried no writes: {writer.failures[-3:]}"
    group = cluster.group("dn1")
    assert group.state == "rerouting" and any("coord2" in p for p in group.reroute_pending), group.reason
    down_for = time.time()
    await topology.coordinator("coord2").start()
    status = await topology.wait_for(
        lambda s: s.groups[0].state in ("single", "protected"), 30, "the barrier"
    )
    print(
        f"\n  coord2 down during the failover: coord1 carried writes, the barrier completed "
        f"{(time.time() - down_for) * 1000:.0f} ms after coord2 came back"
    )
    assert new_port in await fdw_options(topology, "coord2", "dn1")
    events = [e for e in cluster.events("dn1") if e.epoch > fault.epoch]
    assert any(e.kind == "reroute_retry" and "coord2" in e.message for e in events), events
    rerouted = next(e for e in events if e.kind == "rerouted")
    coord2 = json.loads(rerouted.details_json)["coordinators"]["coord2"]
    assert coord2["attempts"] > 1 and "ALTER SERVER dn1" in coord2["detail"], coord2
    assert status.groups[0].master == recovery
    await cluster.wait_protected()
    await assert_nothing_lost(cluster)


async def _barrier_waits(cluster: LoadedCluster, old: str) -> str:
    while True:
        group = cluster.group("dn1")
        if (
            group.state == "rerouting"
            and any("coord2" in p for p in group.reroute_pending)
            and group.master != old
        ):
            return group.master
        await asyncio.sleep(0.05)


async def test_a_stall_shorter_than_failure_timeout_is_no_failover(loaded: LoadedFactory) -> None:
    cluster = await loaded()
    master = cluster.master()
    epoch = cluster.status().epoch
    stall = 0.8 * cluster.topology.plan.failure_timeout
    cluster.topology.host_signal(master, signal.SIGSTOP)
    await asyncio.sleep(stall)
    cluster.topology.host_signal(master, signal.SIGCONT)
    resumed = time.time()
    await asyncio.sleep(2 * cluster.topology.plan.failure_timeout)
    assert cluster.master() == master and cluster.status().epoch == epoch
    assert not cluster.events("dn1", "failover")
    writer = cluster.writers["dn1"]
    first = min(t for t in writer.acknowledged.values() if t > resumed - 0.05)
    print(
        f"\n  {stall:.1f} s stall of {master}'s host: no failover; writes again "
        f"{(first - resumed) * 1000:.0f} ms "
        "after SIGCONT"
    )
    await assert_nothing_lost(cluster)


async def test_repeated_planned_switchovers_under_writes(loaded: LoadedFactory) -> None:
    cluster = await loaded()
    topology = cluster.topology
    for trial in range(1, 6):
        await cluster.wait_protected()
        await asyncio.sleep(0.3)
        old = cluster.master()
        requested = time.time()
        call(topology.target, lambda stub: stub.Switchover(pb.SwitchoverRequest(datanode="dn1"), timeout=10))
        await topology.wait_for(
            lambda s, old=old: (
                s.groups[0].master != old  # type: ignore[misc]
                and s.groups[0].state in ("single", "protected")
            ),
            60,
            "the switchover",
        )
        await cluster.wait_for_writes(10, "dn1")
        print(
            f"\n  switchover #{trial} from {old}: "
            f"write gap {cluster.writers['dn1'].write_gap(requested):.0f} ms"
        )
    await cluster.wait_protected()
    await assert_nothing_lost(cluster)
