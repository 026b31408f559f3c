"""Network partitions between hosts in network namespaces (tests/chaos/netns.py).

The test process stays in the machine's own network namespace: it writes to the datanode
group through the members' Unix sockets (the writer tries every member and writes to the one
that is not in recovery) and reads the controller's status by running `xcha ctl` inside the
controller's namespace. Where namespaces cannot be created the tests skip, saying why."""

import asyncio
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from psycopg.conninfo import make_conninfo

from tests.chaos.netns import NamespacesUnavailable, Network
from tests.conftest import assert_nothing_lost as assert_outcome
from xcha.topology import Topology, TopologyPlan
from xcha.workload import Writer

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

HOSTS = {"controller": "192.0.2.101", "dn1a": "192.0.2.111", "dn1b": "192.0.2.112"}
Status = dict[str, object]


class Partitioned:
    def __init__(self, network: Network, topology: Topology) -> None:
        self.network = network
        self.topology = topology
        self.writer = Writer([])
        self.task: asyncio.Task[None] | None = None

    def socket_conninfo(self, member: str) -> str:
        info = self.topology.members[member]
        return make_conninfo(
            "", host=str(Path(info.directory) / "run"), port=info.port, user="postgres", dbname="postgres"
        )

    def status(self) -> Status:
        result = self.network.run(
            "controller",
            [
                sys.executable,
                "-m",
                "xcha",
                "ctl",
                "status",
                "--json",
                "--workdir",
                str(self.topology.workdir),
            ],
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip())
        group: Status = json.loads(result.stdout)["groups"][0]
        return group

    async def wait(self, predicate: Callable[[Status], bool], what: str, timeout: float = 90) -> Status:
        deadline = time.monotonic() + timeout
        last: Status | str = "no status"
        while time.monotonic() < deadline:
            try:
                last = await asyncio.to_thread(self.status)
                if predicate(last):
                    return last
            except RuntimeError as error:
                last = str(error)
            await asyncio.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}: {last}")

    def acks_since(self, since: float) -> int:
        return len([t for t in self.writer.acknowledged.values() if t > since])


@pytest.fixture
async def partitioned(workdir: Path) -> AsyncIterator[Partitioned]:
    network = Network(f"xc{secrets.token_hex(3)}")
    try:
        hosts = network.create(HOSTS)
    except NamespacesUnavailable as error:
        network.destroy()
        print(f"\nSKIPPED: partition tests need network namespaces: {error}")
        pytest.skip(f"network namespaces unavailable: {error}")
    topology = Topology(workdir / "x", TopologyPlan(hosts=hosts))
    cluster = Partitioned(network, topology)
    try:
        topology.write()
        cluster.writer.conninfos = [cluster.socket_conninfo(m) for m in ("dn1a", "dn1b")]
        topology.start()
        await cluster.wait(lambda g: g["state"] == "protected", "the group to be protected")
        await cluster.writer.prepare()
        cluster.task = asyncio.create_task(cluster.writer.run())
        yield cluster
    finally:
        cluster.writer.stop()
        if cluster.task is not None:
            await asyncio.gather(cluster.task, return_exceptions=True)
        await cluster.writer.close()
        await topology.down()
        network.destroy()


async def assert_nothing_lost(cluster: Partitioned) -> None:
    cluster.writer.stop()
    if cluster.task is not None:
        await cluster.task
        cluster.task = None
    assert_outcome(await cluster.writer.verify())


async def test_master_cut_from_the_controller_only_is_no_failover(partitioned: Partitioned) -> None:
    cluster, network = partitioned, partitioned.network
    master = str(cluster.status()["master"])
    network.blackhole(master, "controller")
    network.blackhole("controller", master)
    cut_at = time.time()
    await asyncio.sleep(4 * cluster.topology.plan.failure_timeout)
    group = cluster.status()
    assert group["master"] == master and group["state"] == "protected", group["reason"]
    assert "receives WAL" in str(group["failure_inputs"]), group["failure_inputs"]
    assert cluster.acks_since(cut_at + 1) > 100, "the master keeps serving: its standby still confirms"
    assert cluster.topology.instance(master).postmaster_pid() is not None, "it did not fence itself"
    print(
        f"\n  {master} cut from the controller for {time.time() - cut_at:.1f} s: no failover, "
        f"{cluster.acks_since(cut_at)} writes acknowledged meanwhile; "
        f"controller saw: {group['failure_inputs']}"
    )
    network.unblackhole(master, "controller")
    network.unblackhole("controller", master)
    await cluster.wait(
        lambda g: next(m for m in g["members"] if m["member"] == master)["heartbeat_age"] < 1,  # type: ignore[index, attr-defined]
        "the master's agent to reach the controller again",
    )
    await assert_nothing_lost(cluster)


async def test_master_cut_from_everyone_fails_over_fences_itself_and_rejoins(
    partitioned: Partitioned,
) -> None:
    cluster, network = partitioned, partitioned.network
    master = str(cluster.status()["master"])
    standby = "dn1b" if master == "dn1a" else "dn1a"
    network.cut(master)
    cut_at = time.time()
    group = await cluster.wait(
        lambda g: g["master"] == standby and g["state"] in ("single", "protected"),
        "a failover to the standby",
    )
    failed_over = time.time() - cut_at
    old = cluster.topology.instance(master)
    deadline = time.monotonic() + 30
    while old.postmaster_pid() is not None:
        assert time.monotonic() < deadline, f"the isolated {master} did not fence itself"
        await asyncio.sleep(0.1)
    fenced = time.time() - cut_at
    deadline = time.monotonic() + 30
    while cluster.acks_since(cut_at + failed_over) < 20:
        assert time.monotonic() < deadline, (
            f"no 20 writes acknowledged by {standby} within 30 s of its promotion: "
            f"{cluster.writer.failures[-3:]}"
        )
        await asyncio.sleep(0.1)
    print(
        f"\n  {master} cut from everyone: {standby} promoted after {failed_over:.1f} s; {master} stopped "
        f"itself after {fenced:.1f} s; reason: {group['reason']}"
    )
    network.heal(master)
    healed = time.time()
    status = await cluster.wait(
        lambda g: (
            g["state"] == "protected"
            and next(m for m in g["members"] if m["member"] == master)["sync_state"] == "sync"
        ),  # type: ignore[attr-defined]
        f"{master} to rejoin as a synchronous standby",
    )
    rejoined = next(m for m in status["members"] if m["member"] == master)  # type: ignore[attr-defined]
    assert rejoined["role"] == "standby"
    print(f"  healed: {master} back as a synchronous standby after {time.time() - healed:.1f} s")
    await assert_nothing_lost(cluster)
