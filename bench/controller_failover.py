"""`./run bench controller-failover`: three controllers on a three-member etcd cluster, one
datanode pair under writes through a postgres_fdw coordinator.

1. The leading controller is killed (kill -9) at rest, N times: milliseconds until another
   controller leads and answers, and until every agent has heard its new epoch; datanode
   failovers caused (must be 0).
2. The leading controller and dn1's master postmaster are killed together, N times: RTO of the
   writes through the coordinator while the leadership moves; lost commits (must be 0).
Target: a new leader within TTL + 1 s; a datanode crash during a take-over recovered within
TTL + 1 s (TTL: the leader lease, 5 s by default)."""

import argparse
import asyncio
import os
import signal
import time

from bench.common import (
    QUIET_BEFORE_TRIAL,
    Result,
    add_workdir_argument,
    optional_ms,
    running_deployment,
    say,
    summary,
    table,
)
from xcha.controller.store.config import DEFAULT_LEASE_TTL
from xcha.errors import XchaError
from xcha.harness import Fault, LoadedCluster
from xcha.topology import DatanodePlan, TopologyPlan
from xcha.v1 import xcha_pb2 as pb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, default=10, help="trials of each kind")
    add_workdir_argument(parser)


def plan() -> TopologyPlan:
    return TopologyPlan(
        datanodes=(DatanodePlan("dn1", ("dn1a", "dn1b")),),
        router="fdw",
        coordinators=("coord1",),
        controllers=3,
    )


async def leader_status(cluster: LoadedCluster, other_than: str, timeout: float = 60) -> pb.ClusterStatus:
    """The status once a controller other than `other_than` leads and answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = cluster.topology.status()
            if status.leading and status.leader != other_than:
                return status
        except XchaError:
            pass
        await asyncio.sleep(0.01)
    raise XchaError(f"no controller but {other_than} led within {timeout} s")


async def agents_at(cluster: LoadedCluster, epoch: int, timeout: float = 60) -> pb.ClusterStatus:
    """Until every member reports at `epoch` or later (each agent has heard the new leader)."""
    return await cluster.topology.wait_for(
        lambda s: s.leading and all(m.status.epoch >= epoch for g in s.groups for m in g.members),
        timeout,
        f"every agent to report epoch {epoch}",
    )


def kill_leader(cluster: LoadedCluster) -> tuple[str, float]:
    status = cluster.topology.status()
    assert status.leading, "the status is the leader's"
    cluster.topology.kill_process(cluster.topology.controller_key(status.leader))
    return status.leader, time.monotonic()


async def restart(cluster: LoadedCluster, name: str) -> None:
    """The killed controller back, as a follower."""
    cluster.topology.start_controller(name)
    await asyncio.sleep(1.0)


async def run(args: argparse.Namespace) -> int:
    leader_ms: list[float] = []
    agents_ms: list[float] = []
    rto_ms: list[float] = []
    takeover_ms: list[float] = []
    rows_rest: list[tuple[object, ...]] = []
    rows_crash: list[tuple[object, ...]] = []
    async with running_deployment("controller-failover", args.workdir, plan=plan()) as cluster:
        failovers_before = len(cluster.events(kind="failover"))
        for trial in range(1, args.trials + 1):
            await cluster.wait_protected()
            await asyncio.sleep(QUIET_BEFORE_TRIAL)
            old, killed = kill_leader(cluster)
            status = await leader_status(cluster, old)
            led = (time.monotonic() - killed) * 1000
            await agents_at(cluster, status.epoch)
            heard = (time.monotonic() - killed) * 1000
            leader_ms.append(led)
            agents_ms.append(heard)
            rows_rest.append((trial, old, status.leader, status.term, f"{led:.0f}", f"{heard:.0f}"))
            say(
                f"rest {trial}: {old} killed: {status.leader} leads after {led:.0f} ms, "
                f"agents at its epoch {heard:.0f} ms"
            )
            await restart(cluster, old)
        await cluster.wait_protected()
        caused = len(cluster.events(kind="failover")) - failovers_before
        for trial in range(1, args.trials + 1):
            await cluster.wait_protected()
            await asyncio.sleep(QUIET_BEFORE_TRIAL)
            member, epoch = cluster.topology.group("dn1").master, cluster.topology.status().epoch
            old, killed = kill_leader(cluster)
            pid = cluster.topology.postmaster_pid(member)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            fault = Fault("dn1", member, time.time(), epoch)
            status = await leader_status(cluster, old)
            takeover = (time.monotonic() - killed) * 1000
            recovery = await cluster.recovery(fault)
            takeover_ms.append(takeover)
            if recovery.rto_ms is not None:
                rto_ms.append(recovery.rto_ms)
            rows_crash.append(
                (
                    trial,
                    old,
                    status.leader,
                    member,
                    recovery.new_master,
                    f"{takeover:.0f}",
                    optional_ms(recovery.rto_ms),
                )
            )
            say(
                f"crash {trial}: {old} and {member} killed: {status.leader} leads after {takeover:.0f} ms, "
                f"writes through the coordinator after {optional_ms(recovery.rto_ms)} ms "
                f"on {recovery.new_master}"
            )
            await restart(cluster, old)
        await cluster.wait_protected()
        outcome = await cluster.finish()
    ttl_ms = DEFAULT_LEASE_TTL * 1000
    stats = {
        "new_leader_ms": summary(leader_ms),
        "agents_at_new_epoch_ms": summary(agents_ms),
        "takeover_during_crash_ms": summary(takeover_ms),
        "crash_rto_ms": summary(rto_ms),
    }
    result = Result(
        "controller-failover",
        {
            "trials": args.trials,
            "controllers": 3,
            "etcd_members": 3,
            "lease_ttl_s": DEFAULT_LEASE_TTL,
            "router": "fdw (one postgres_fdw coordinator)",
            "writer": "an insert every 10 ms",
        },
    )
    met = (
        stats["new_leader_ms"].get("max", 1e9) <= ttl_ms + 1000
        and stats["crash_rto_ms"].get("max", 1e9) <= ttl_ms + 1000
        and caused == 0
        and not outcome.lost
    )
    result.figures = {
        **stats,
        "datanode_failovers_caused": caused,
        "acknowledged": outcome.acknowledged,
        "lost": len(outcome.lost),
        "targets_met": met,
    }
    result.tables.append(
        table(
            ("trial", "killed leader", "new leader", "term", "leads ms", "agents at its epoch ms"), rows_rest
        )
    )
    result.tables.append(
        table(
            (
                "trial",
                "killed leader",
                "new leader",
                "killed master",
                "new master",
                "new leader ms",
                "writes again ms",
            ),
            rows_crash,
        )
    )
    result.tables.append(
        table(
            ("measure (ms from the kill)", "p50", "p95", "max"),
            [(name, s.get("p50"), s.get("p95"), s.get("max")) for name, s in stats.items()],
        )
    )
    result.notes.append(f"Datanode failovers caused by the {args.trials} leader kills at rest: {caused}.")
    result.notes.append(
        f"{outcome.acknowledged} commits acknowledged, {len(outcome.lost)} lost, "
        f"{len(outcome.unexpected)} present but never sent."
    )
    result.notes.append(
        f"Target: new leader and crash recovery within TTL + 1 s = {ttl_ms + 1000:.0f} ms, "
        "0 failovers caused, 0 lost: " + ("met." if met else "NOT met.")
    )
    path = result.write()
    say("\n" + path.read_text())
    return 0 if met else 1
