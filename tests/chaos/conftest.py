"""The fault-injection harness: a deployment (coordinator, datanodes, agents, controller as
real processes) with writers inserting unique ids through the coordinator; after every
scenario every acknowledged id must be on the surviving masters and no unsent id there."""

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from xcha.harness import LoadedCluster
from xcha.topology import DatanodePlan, TopologyPlan

ChaosFactory = Callable[..., Awaitable[LoadedCluster]]


def default_plan(**changes: object) -> TopologyPlan:
    values: dict[str, object] = {
        "datanodes": (DatanodePlan("dn1", ("dn1a", "dn1b")),),
        "router": "fdw",
        "coordinators": ("coord1",),
        "startup_grace": 0.5,
    }
    values.update(changes)
    return TopologyPlan(**values)  # type: ignore[arg-type]


@pytest.fixture
async def loaded(workdir: Path) -> AsyncIterator[ChaosFactory]:
    clusters: list[LoadedCluster] = []

    async def make(plan: TopologyPlan | None = None) -> LoadedCluster:
        cluster = LoadedCluster(workdir / "x", plan or default_plan())
        clusters.append(cluster)
        await cluster.start()
        return cluster

    yield make
    for cluster in clusters:
        await cluster.down()


async def assert_nothing_lost(cluster: LoadedCluster) -> None:
    outcome = await cluster.finish()
    print(
        f"  {outcome.acknowledged} commits acknowledged, {len(outcome.lost)} lost, "
        f"{len(outcome.unexpected)} present but never sent"
    )
    assert outcome.acknowledged > 0
    assert outcome.lost == [], f"acknowledged but lost: {outcome.lost[:20]}"
    assert outcome.unexpected == [], f"present but never sent: {outcome.unexpected[:20]}"
