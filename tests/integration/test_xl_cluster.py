"""xcha on a real Postgres-XL 10 cluster, end to end (GTM, two coordinators, dn1 and dn2 each
a master with a synchronous standby under agents, the controller's `pgxc` router)."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.integration.pgxc_cluster import (
    PgxcCluster,
    coordinator_down_during_the_barrier,
    crash_failover,
    hung_master,
    running_cluster,
    switchover,
    transactions_across_the_repoint,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.asyncio(loop_scope="module"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(xl_bindir: Path) -> AsyncIterator[PgxcCluster]:
    async with running_cluster("xl") as running:
        yield running


async def test_crash_of_a_datanode_master(cluster: PgxcCluster) -> None:
    follow = await crash_failover(cluster)
    assert "rewind" in follow, follow


async def test_hung_master_host(cluster: PgxcCluster) -> None:
    await hung_master(cluster)


async def test_planned_switchover(cluster: PgxcCluster) -> None:
    follow = await switchover(cluster)
    assert "rewind" in follow or "restart" in follow, follow


async def test_a_coordinator_down_during_the_barrier(cluster: PgxcCluster) -> None:
    await coordinator_down_during_the_barrier(cluster)


async def test_a_write_transaction_spanning_the_repoint_never_commits_in_part(cluster: PgxcCluster) -> None:
    await transactions_across_the_repoint(cluster)
