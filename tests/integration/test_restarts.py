"""Calm across restarts: a deployment stopped and started again, an agent restarted while its
master was stopped, and a standby that is still being cloned, on real processes."""

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import cmdline
from tests.integration.conftest import ClusterFactory
from xcha.ctl import find_group
from xcha.topology import DatanodePlan, Topology, TopologyPlan
from xcha.v1 import xcha_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _kinds(events: list[pb.Event], *kinds: str) -> list[str]:
    return [f"{e.kind}: {e.message}" for e in events if e.kind in kinds]


async def test_a_clean_restart_of_the_whole_deployment_keeps_every_master(
    make_cluster: ClusterFactory,
) -> None:
    """`xcha down`, then `xcha up` on the same work directory: every agent finds its PostgreSQL
    stopped; no datanode fails over and no old master is rewound."""
    plan = TopologyPlan(
        datanodes=(DatanodePlan("dn1", ("dn1a", "dn1b")), DatanodePlan("dn2", ("dn2a", "dn2b"))),
        coordinators=("coord1",),
    )
    cluster = await make_cluster(plan, write=False)
    topology = cluster.topology
    masters = {dn: topology.master(dn) for dn in ("dn1", "dn2")}
    seen = len(topology.events())
    await topology.down()
    await topology.up(fresh=False)
    assert {dn: topology.master(dn) for dn in ("dn1", "dn2")} == masters
    after = topology.events()[seen:]
    assert not _kinds(after, "failover", "follow"), "\n".join(
        f"{e.time:.3f} {e.kind}: {e.message}" for e in after
    )
    started = _kinds(after, "start_master")
    assert len([m for m in started if "found stopped" in m]) == 2, "\n".join(started)


async def test_an_agent_restarted_while_its_master_is_stopped_starts_it_in_place(
    make_cluster: ClusterFactory,
) -> None:
    """Maintenance: the group paused, the master's agent and PostgreSQL stopped, the agent
    started again, the group resumed. The master is started in place, nothing fails over."""
    cluster = await make_cluster(write=False)
    topology = cluster.topology
    master = topology.master("dn1")
    epoch = topology.status().epoch
    boot = _boot_id(topology.status(), master)
    topology.call(lambda stub: stub.SetPaused(pb.PauseRequest(datanode="dn1", paused=True), timeout=5))
    topology.stop_process(f"agent:{master}")
    await topology.instance(master).stop("fast")
    topology.start_agent(master)
    await cluster.wait_for(
        lambda s: (
            _boot_id(s, master) not in (boot, "")
            and next(m for m in _members(s) if m.name == master).status.postgres_status.role
            == pb.ROLE_STOPPED
        ),
        "the new agent's report of its stopped PostgreSQL",
    )
    topology.call(lambda stub: stub.SetPaused(pb.PauseRequest(datanode="dn1", paused=False), timeout=5))
    await topology.wait_protected(60)
    assert topology.master("dn1") == master
    assert topology.status().epoch == epoch, "no promotion, no new epoch"
    events = topology.events()
    assert not _kinds(events, "failover")
    assert any("found stopped" in m for m in _kinds(events, "start_master"))


def _members(status: pb.ClusterStatus) -> list[pb.MemberView]:
    return [m for g in status.groups for m in g.members]


def _boot_id(status: pb.ClusterStatus, member: str) -> str:
    """Which agent process reported last (a restarted agent has a new one)."""
    return next(m for m in _members(status) if m.name == member).status.boot_id


def _descendants(root: int) -> list[int]:
    """Every process below root (by /proc parent links), deepest last."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as handle:
                parents[int(entry)] = int(handle.read().rpartition(")")[2].split()[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


async def test_a_standby_still_being_cloned_does_not_make_the_group_protected(workdir: Path) -> None:
    """pg_basebackup's WAL stream shows on the master while the copy runs: it must not count
    as the synchronous standby. The clone is held (SIGSTOP) to make it slow."""
    topology = Topology(workdir / "x", TopologyPlan(datanodes=(DatanodePlan("dn1", ("dn1a", "dn1b")),)))
    stopped: list[int] = []
    try:
        topology.write()
        topology.start_controller()
        topology.start_agent("dn1a")
        await topology.wait_for(
            lambda s: find_group(s, "dn1").state == "single", 90, "dn1a bootstrapped as the master"
        )
        agent = topology.start_agent("dn1b")
        deadline = time.monotonic() + 30
        while not stopped and time.monotonic() < deadline:
            clone = [p for p in _descendants(agent) if "pg_basebackup" in cmdline(p)]
            if clone:
                stopped = [*clone, *(d for p in clone for d in _descendants(p))]
                for pid in stopped:
                    os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(0.002)
        assert stopped, "pg_basebackup was not seen"
        held_until = time.monotonic() + 3  # longer than the sync grace (failure_timeout / 2)
        group = find_group(topology.status(), "dn1")
        while time.monotonic() < held_until:
            group = find_group(topology.status(), "dn1")
            assert group.state == "single", f"{group.state}: {group.reason}"
            await asyncio.sleep(0.1)
        assert "not confirming: dn1b (following)" in group.reason, group.reason
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        stopped = []
        await topology.wait_protected(90)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        await topology.down()
