"""A running xcha deployment (controller and agents as separate processes, real PostgreSQL)
and a writer that records every acknowledged commit; a real etcd cluster."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import assert_nothing_lost
from xcha.errors import InvalidInput
from xcha.etcd_cluster import EtcdCluster, find_etcd
from xcha.topology import DatanodePlan, Topology, TopologyPlan
from xcha.v1 import xcha_pb2 as pb
from xcha.workload import Writer


@dataclass
class Cluster:
    topology: Topology
    writer: Writer
    writer_task: asyncio.Task[None] | None = None

    def status(self) -> pb.ClusterStatus:
        return self.topology.status()

    def group(self, datanode: str = "dn1") -> pb.GroupView:
        return self.topology.group(datanode)

    def events(self, kind: str | None = None) -> list[pb.Event]:
        return self.topology.events(kind=kind)

    def start_writing(self) -> None:
        self.writer_task = asyncio.create_task(self.writer.run())

    async def stop_writing(self) -> None:
        self.writer.stop()
        if self.writer_task is not None:
            await self.writer_task
        await self.writer.close()

    async def wait_for_acks(self, count: int, timeout: float = 30) -> None:
        """Until `count` more commits were acknowledged."""
        await self.writer.wait_for_acks(count, timeout)

    async def assert_nothing_lost(self, datanode: str = "dn1") -> None:
        """Every acknowledged id is on the current master; no id is there that was never sent."""
        await self.stop_writing()
        assert_nothing_lost(await self.writer.verify(self.topology.group_conninfos(datanode)))

    async def wait_for(
        self, predicate: Callable[[pb.ClusterStatus], bool], what: str, timeout: float = 60
    ) -> pb.ClusterStatus:
        return await self.topology.wait_for(predicate, timeout, what)

    async def wait_master_changed(self, old: str, datanode: str = "dn1", timeout: float = 60) -> str:
        status = await self.wait_for(
            lambda s: any(
                g.name == datanode
                and g.master not in ("", old)
                and g.state in ("single", "protected", "unprotected")
                for g in s.groups
            ),
            f"a new master instead of {old}",
            timeout,
        )
        return next(g.master for g in status.groups if g.name == datanode)

    async def wait_protected(self, timeout: float = 90) -> pb.ClusterStatus:
        return await self.topology.wait_protected(timeout)


ClusterFactory = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def make_cluster(workdir: Path) -> AsyncIterator[ClusterFactory]:
    """Start a deployment from a plan; everything it started is stopped by PID afterwards."""
    started: list[Cluster] = []

    async def make(plan: TopologyPlan | None = None, write: bool = True) -> Cluster:
        topology = Topology(
            workdir / "x",
            plan or TopologyPlan(datanodes=(DatanodePlan("dn1", ("dn1a", "dn1b")),)),
        )
        cluster = Cluster(topology, Writer([]))
        started.append(cluster)
        await topology.up()  # also the application role and the table on every master
        cluster.writer = Writer(topology.group_conninfos(topology.plan.datanodes[0].name))
        if write:
            cluster.start_writing()
            await cluster.wait_for_acks(20)
        return cluster

    yield make
    for cluster in started:
        cluster.writer.stop()
        if cluster.writer_task is not None:
            cluster.writer_task.cancel()
        await cluster.writer.close()
        await cluster.topology.down()


@pytest.fixture
async def etcd_cluster(request: pytest.FixtureRequest, workdir: Path) -> AsyncIterator[EtcdCluster]:
    """A real etcd cluster on free loopback ports, ready: one member, or as many as the test
    asks for with `@pytest.mark.parametrize("etcd_cluster", [3], indirect=True)`. Stopped by PID
    afterwards, also when the test fails."""
    try:
        find_etcd()
    except InvalidInput as error:
        pytest.skip(str(error))
    cluster = EtcdCluster(workdir / "etcd", getattr(request, "param", 1))
    try:
        cluster.start()
        await cluster.wait_ready()
        yield cluster
    finally:
        await cluster.stop()
