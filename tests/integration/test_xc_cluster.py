"""xcha on a real Postgres-XC 1.2.1 (PostgreSQL 9.3) cluster, end to end: a GTM, two
coordinators, dn1 and dn2 each a master with a synchronous standby under agents, the
controller's `pgxc` router. One cluster serves the module; each test starts from a settled
cluster (tests/integration/pgxc_cluster.py). XC has no pg_rewind: an old master rejoins by a
fresh clone, and its reload drops every session's prepared statements."""

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

RECLONE = "re-clone (no pg_rewind on PostgreSQL 9.3)"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(xc_bindir: Path) -> AsyncIterator[PgxcCluster]:
    async with running_cluster("xc") as running:
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
    assert "set aside" in follow and RECLONE in follow, follow


async def test_hung_master_host(cluster: PgxcCluster) -> None:
    """Everything hung_master asserts must hold. Writes resuming while the old master's host is
    still stopped is the expected failover behaviour that the coordinators' poolers prevent
    (measured, see pooler_blocked): that part alone is reported as an expected failure."""
    hung = await hung_master(cluster)
    if None in hung.while_hung.values():
        pytest.xfail(pooler_blocked(hung))


async def test_planned_switchover(cluster: PgxcCluster) -> None:
    follow = await switchover(cluster)
    assert RECLONE in follow, follow


async def test_a_coordinator_down_during_the_barrier(cluster: PgxcCluster) -> None:
    await coordinator_down_during_the_barrier(cluster)


async def test_a_transaction_open_during_the_repoint_never_commits(cluster: PgxcCluster) -> None:
    """On XC also a transaction that only read: XC's reload rolls back every session's open
    transaction and its COMMIT would answer the tag ROLLBACK without an error; the router
    ends such sessions first, so the client sees an error."""
    *_, read_only = await transactions_across_the_repoint(cluster)
    assert read_only.failed, f"a transaction open during the re-point answered {read_only.answer!r}"


async def test_prepared_statements_after_the_repoint(cluster: PgxcCluster) -> None:
    """Measured: a connection on which psycopg prepared the INSERT (its default after 5
    executions) fails every further execution of it with `prepared statement "_pg3_0" does
    not exist` (the reload dropped the session's prepared statements, psycopg still uses
    them) and does not recover by itself; a new connection works, and so does one with
    prepare_threshold=None across the re-point, without a single error."""
    clients = await prepared_statements_across_the_repoint(cluster)
    assert clients.prepared and all(
        answer.startswith("InvalidSqlStatementName") and 'prepared statement "_pg3_' in answer
        for answer in clients.prepared
    ), clients.prepared
    assert clients.unprepared == ["INSERT 0 1"] * len(clients.unprepared)
    assert clients.new == ["INSERT 0 1"] * len(clients.new)


async def test_add_and_remove_a_standby(cluster: PgxcCluster) -> None:
    follow = await add_and_remove_standby(cluster)
    assert "clone" in follow, follow


async def test_rendered_standby_configuration(cluster: PgxcCluster) -> None:
    rendered = await rendered_standby(cluster)
    # XC 1.2 is PostgreSQL 9.3: wal_level hot_standby, no wal_retrieve_retry_interval (9.5).
    assert setting(rendered.conf, "wal_level") == "hot_standby"
    assert setting(rendered.conf, "wal_retrieve_retry_interval") is None
    assert setting(rendered.running_conf, "wal_retrieve_retry_interval") is None
    assert rendered.settings["wal_level"] == "hot_standby"
    assert "wal_retrieve_retry_interval" not in rendered.settings
