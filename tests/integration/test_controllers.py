"""Three controllers, one leader elected on a real three-member etcd cluster, real agents and
PostgreSQL, a writer that records every acknowledged commit: a controller failover never
causes a datanode failover, a deposed leader never acts again, losing etcd only stops
decisions, and a failover caught in a leadership change completes without loss."""

import asyncio
import json
import os
import re
import signal
import time
from dataclasses import replace

import pytest

from tests.integration.conftest import Cluster, ClusterFactory
from xcha.ctl import call, get_status
from xcha.errors import InvalidInput, XchaError
from xcha.etcd_cluster import find_etcd
from xcha.topology import DatanodePlan, TopologyPlan
from xcha.v1 import xcha_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
try:
    find_etcd()
except InvalidInput as missing:
    pytestmark.append(pytest.mark.skip(reason=str(missing)))

TTL = 5.0  # the default leader lease


def plan() -> TopologyPlan:
    return TopologyPlan(datanodes=(DatanodePlan("dn1", ("dn1a", "dn1b")),), controllers=3)


def leader(cluster: Cluster) -> pb.ClusterStatus:
    """The status as the leading controller answers it (raises while none leads)."""
    status = cluster.status()
    if not status.leading:
        raise XchaError(f"no leader answers: {status.controller} says the leader is {status.leader!r}")
    return status


async def wait_leader(
    cluster: Cluster, other_than: str = "", timeout: float = 30
) -> tuple[pb.ClusterStatus, float]:
    """Until a controller (not other_than) leads and answers; (its status, seconds waited)."""
    started = time.monotonic()
    while True:
        try:
            status = leader(cluster)
            if status.leader != other_than:
                return status, time.monotonic() - started
        except XchaError:
            pass
        assert time.monotonic() - started < timeout, f"no new leader within {timeout} s"
        await asyncio.sleep(0.05)


def controller_log(cluster: Cluster, name: str) -> str:
    return (cluster.topology.workdir / "logs" / f"controller-{name}.log").read_text(errors="replace")


def answer_of(cluster: Cluster, name: str) -> pb.ClusterStatus:
    """What one controller itself answers (no redirect, no fallback)."""
    target = replace(cluster.topology.target, address=cluster.topology.controller_address(name), fallbacks=())
    status: pb.ClusterStatus = call(
        target, lambda stub: stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=3)
    )
    return status


async def test_kill_9_of_the_leader_at_rest_a_new_leader_within_ttl_and_no_datanode_failover(
    make_cluster: ClusterFactory,
) -> None:
    cluster = await make_cluster(plan())
    before, _ = await wait_leader(cluster)
    master = cluster.group().master
    killed = time.monotonic()
    cluster.topology.kill_process(cluster.topology.controller_key(before.leader))
    after, _ = await wait_leader(cluster, other_than=before.leader)
    took = time.monotonic() - killed
    print(f"\nleader {before.leader} killed: {after.leader} (term {after.term}) leads after {took:.2f} s")
    assert took < TTL + 1, f"a new leader after {took:.2f} s (lease {TTL} s)"
    assert after.term > before.term and after.epoch > before.epoch
    await cluster.wait_for_acks(50)
    await asyncio.sleep(TTL)  # the new leader's whole grace and more
    group = cluster.group()
    assert group.master == master and group.state == "protected", group.reason
    assert not cluster.events("failover"), "a controller failover caused a datanode failover"
    cluster.topology.start_controller(before.leader)  # it comes back as a follower
    await cluster.wait_for(lambda s: True, "any answer")
    await asyncio.sleep(1)
    assert not answer_of(cluster, before.leader).leading
    await cluster.assert_nothing_lost()


async def test_a_leader_stopped_for_two_leases_never_acts_again(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster(plan())
    before, _ = await wait_leader(cluster)
    old = before.leader
    key = cluster.topology.controller_key(old)
    cluster.topology.signal(key, signal.SIGSTOP)
    try:
        after, waited = await wait_leader(cluster, other_than=old, timeout=3 * TTL)
        print(f"\nleader {old} stopped: {after.leader} leads after {waited * 1000:.0f} ms")
        await asyncio.sleep(max(0.0, 2 * TTL - waited))
        offset = len(controller_log(cluster, old))
    finally:
        cluster.topology.signal(key, signal.SIGCONT)
    await asyncio.sleep(2)
    resumed = controller_log(cluster, old)[offset:]
    assert f"{old} no longer leads" in resumed or "term over" in resumed or "ended" in resumed, resumed
    assert not re.search(r"(Promote|Fence|Follow|SetSynchronousStandbys) to ", resumed), resumed
    assert not answer_of(cluster, old).leading
    status = leader(cluster)
    assert status.leader == after.leader and status.epoch >= after.epoch
    for member in cluster.group().members:
        assert member.status.epoch >= after.epoch, "every agent has seen the new leader's epoch"
    assert not cluster.events("failover")
    await cluster.assert_nothing_lost()


async def test_killing_the_etcd_raft_leader_changes_no_controller(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster(plan())
    before, _ = await wait_leader(cluster)
    etcd = cluster.topology.etcd()
    raft_leader = await etcd.raft_leader()
    assert raft_leader is not None
    etcd.kill(raft_leader)
    await asyncio.sleep(2 * TTL)
    new_raft_leader = await etcd.raft_leader()
    print(f"\netcd raft leader {raft_leader} killed: raft leader now {new_raft_leader}")
    after = leader(cluster)
    assert (after.leader, after.term) == (before.leader, before.term), "the controller leadership moved"
    etcd.start_member(raft_leader)
    await etcd.wait_ready()
    assert not cluster.events("failover")
    await cluster.assert_nothing_lost()


async def test_without_etcd_nothing_is_decided_writes_go_on_and_a_crash_then_fails_over(
    make_cluster: ClusterFactory,
) -> None:
    """All etcd members down: no controller leads (within the lease), PostgreSQL keeps serving
    writes. The master then crashes: nothing happens until etcd is back and a controller
    leads, then the failover completes and nothing acknowledged is lost."""
    cluster = await make_cluster(plan())
    await wait_leader(cluster)
    master = cluster.group().master
    etcd = cluster.topology.etcd()
    stopped = time.monotonic()
    await etcd.stop()
    while any(answer_of(cluster, name).leading for name in cluster.topology.controller_names):
        assert time.monotonic() - stopped < TTL + 1, "a controller still leads past its lease"
        await asyncio.sleep(0.1)
    print(f"\netcd stopped: no controller leads after {(time.monotonic() - stopped) * 1000:.0f} ms")
    acked = len(cluster.writer.acknowledged)
    await asyncio.sleep(2)
    assert len(cluster.writer.acknowledged) > acked + 50, "writes must go on without etcd"
    postmaster = cluster.topology.postmaster_pid(master)
    assert postmaster is not None
    os.kill(postmaster, signal.SIGKILL)
    await asyncio.sleep(3 * cluster.topology.plan.failure_timeout)
    assert not any(answer_of(cluster, name).leading for name in cluster.topology.controller_names)
    etcd.start()
    await etcd.wait_ready()
    restarted = time.monotonic()
    new = await cluster.wait_master_changed(master, timeout=60)
    print(f"etcd back: {new} is the master {(time.monotonic() - restarted) * 1000:.0f} ms later")
    await cluster.wait_protected()
    await cluster.assert_nothing_lost()


async def test_the_leader_killed_during_a_failover_the_next_finishes_it(make_cluster: ClusterFactory) -> None:
    """The master crashes; as soon as the leader has recorded the failover it is killed. The
    next leader finishes it: one candidate only, the old master rejoins, nothing lost."""
    cluster = await make_cluster(plan())
    before, _ = await wait_leader(cluster)
    master = cluster.group().master
    epoch = before.epoch
    postmaster = cluster.topology.postmaster_pid(master)
    assert postmaster is not None
    os.kill(postmaster, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not [e for e in cluster.events("failover") if e.epoch > epoch]:
        assert time.monotonic() < deadline, "the leader never started the failover"
        await asyncio.sleep(0.01)
    cluster.topology.kill_process(cluster.topology.controller_key(before.leader))
    promoted = [e for e in cluster.events("failover") if e.epoch > epoch]
    after, waited = await wait_leader(cluster, other_than=before.leader)
    new = await cluster.wait_master_changed(master)
    status = await cluster.wait_protected()
    print(f"\nleader killed after: {promoted[0].message}; {after.leader} led {waited * 1000:.0f} ms later")
    candidates = {json_member(e) for e in cluster.events("failover")}
    assert candidates == {new}, f"promotions of {candidates}, the master is {new}"
    rerouted = cluster.events("rerouted")
    assert rerouted and rerouted[-1].epoch > before.epoch
    assert status.groups[0].master == new
    await cluster.assert_nothing_lost()


def json_member(event: pb.Event) -> str:
    return str(json.loads(event.details_json).get("member"))


async def test_ctl_given_any_controller_reaches_the_leader(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster(plan(), write=False)
    status, _ = await wait_leader(cluster)
    for name in cluster.topology.controller_names:
        target = replace(
            cluster.topology.target, address=cluster.topology.controller_address(name), fallbacks=()
        )
        answered = get_status(target)
        assert answered.leading and answered.leader == status.leader, name
        assert list(answered.controllers) == cluster.topology.controller_addresses
