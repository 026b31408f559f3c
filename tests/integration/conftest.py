"""A running xcha deployment (controller and agents as separate processes, real PostgreSQL)
and a writer that records every acknowledged commit."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

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
        return next(g for g in self.status().groups if g.name == datanode)

    def start_writing(self) -> None:
        self.writer_task = asyncio.create_task(self.writer.run())

    async def stop_writing(self) -> None:
        self.writer.stop()
        if self.writer_task is not None:
            await self.writer_task
        await self.writer.close()

    async def wait_for_acks(self, count: int, timeout: float = 30) -> None:
        """Until `count` more commits were acknowledged."""
        target = len(self.writer.acknowledged) + count
        deadline = time.monotonic() + timeout
        while len(self.writer.acknowledged) < target:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {count} acknowledged writes within {timeout} s; "
                    f"last failures: {self.writer.failures[-3:]}"
                )
            await asyncio.sleep(0.02)

    async def assert_nothing_lost(self, datanode: str = "dn1") -> None:
        """Every acknowledged id is on the current master; no id is there that was never sent."""
        await self.stop_writing()
        outcome = await self.writer.verify(self.topology.group_conninfos(datanode))
        assert outcome.acknowledged > 0
        assert outcome.lost == [], f"acknowledged but lost: {outcome.lost[:20]}"
        assert outcome.unexpected == [], f"present but never sent: {outcome.unexpected[:20]}"

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
            plan or TopologyPlan(datanodes=(DatanodePlan("dn1", ("dn1a", "dn1b")),), startup_grace=0.5),
        )
        topology.write()
        cluster = Cluster(topology, Writer([]))
        started.append(cluster)
        topology.start()
        await topology.wait_protected()
        for datanode in topology.plan.datanodes:
            await topology.create_app_role(datanode.name)
        cluster.writer = Writer(topology.group_conninfos(topology.plan.datanodes[0].name))
        await cluster.writer.prepare()
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
