"""xcha on a real Postgres-XL 10 cluster, end to end: a GTM, two coordinators, dn1 and dn2 each a
master with a synchronous standby under agents, the controller's `pgxc` router. One cluster
serves the module; each test starts from a settled cluster (tests/integration/pgxc_cluster.py)."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.integration.pgxc_cluster import (
    PgxcCluster,
    add_and_remove_standby,
    coordinator_down_during_the_barrier,
    crash_failover,
    hung_master,
    pooler_blocked,
    prepared_statements_across_the_repoint,
    rendered_standby,
    running_cluster,
    setting,
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


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def shared(cluster: PgxcCluster, request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Each test starts from a settled cluster, and its log names the coordinator backend
    crashes it saw (each restarts that coordinator: measured on XC around a re-point)."""
    cluster.check_usable()
    yield
    cluster.report_crashes()
    await cluster.after_test(request.node.name)


async def test_crash_of_a_datanode_master(cluster: PgxcCluster) -> None:
    follow = await crash_failover(cluster)
    assert "rewind" in follow, follow


async def test_hung_master_host(cluster: PgxcCluster) -> None:
    """Everything hung_master asserts must hold. Writes resuming while the old master's host is
    still stopped is the expected failover behaviour that the coordinators' poolers prevent
    (measured, see pooler_blocked): that part alone is reported as an expected failure."""
    hung = await hung_master(cluster)
    if None in hung.while_hung.values():
        pytest.xfail(pooler_blocked(hung))


async def test_planned_switchover(cluster: PgxcCluster) -> None:
    follow = await switchover(cluster)
    assert "rewind" in follow or "restart" in follow, follow


async def test_a_coordinator_down_during_the_barrier(cluster: PgxcCluster) -> None:
    await coordinator_down_during_the_barrier(cluster)


async def test_a_write_transaction_spanning_the_repoint_never_commits_in_part(cluster: PgxcCluster) -> None:
    *_, read_only = await transactions_across_the_repoint(cluster)
    # XL's reload leaves a session without a transaction id alone: nothing of it is lost.
    assert read_only.answer == "COMMIT", read_only.answer


async def test_prepared_statements_survive_the_repoint(cluster: PgxcCluster) -> None:
    """Unlike XC's, XL's reload is selective: a connection on which psycopg prepared the INSERT
    goes on working across the re-point (measured)."""
    clients = await prepared_statements_across_the_repoint(cluster)
    for found in (clients.prepared, clients.unprepared, clients.new):
        assert found == ["INSERT 0 1"] * len(found), found


async def test_add_and_remove_a_standby(cluster: PgxcCluster) -> None:
    follow = await add_and_remove_standby(cluster)
    assert "clone" in follow, follow


async def test_rendered_standby_configuration(cluster: PgxcCluster) -> None:
    rendered = await rendered_standby(cluster)
    # XL 10 is PostgreSQL 10: wal_level replica, and a promotion waits at most 100 ms.
    assert setting(rendered.conf, "wal_level") == "replica"
    assert setting(rendered.conf, "wal_retrieve_retry_interval") == "'100ms'"
    assert setting(rendered.running_conf, "wal_retrieve_retry_interval") == "'100ms'"
    assert rendered.settings["wal_level"] == "replica"
    assert rendered.settings["wal_retrieve_retry_interval"] == "100ms"
