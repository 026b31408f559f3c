"""A Postgres-XC 1.2.1 (PostgreSQL 9.3) datanode on real XC binaries: GTM, master,
synchronous standby, a row committed through a coordinator, kill -9 of the master,
promotion, re-pointing, and the old master's rejoin. 9.3 has no pg_rewind: the old master is
set aside and re-cloned, and its rejoin steps say so. Skipped (with the reason) when no XC
build is available."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.pgxc import PgxcGroup, detach_and_follow, failover_and_rejoin
from xcha.errors import InvalidInput
from xcha.pg.runner import server_version

pytestmark = pytest.mark.integration


@pytest.fixture
async def xc_group(xc_bindir: Path, workdir: Path) -> AsyncIterator[PgxcGroup]:
    group = PgxcGroup.create("xc", xc_bindir, workdir)
    try:
        yield group
    finally:
        await group.stop()


async def test_xc_datanode_fails_over_and_the_old_master_is_recloned(xc_group: PgxcGroup) -> None:
    measured, rejoin = await failover_and_rejoin(xc_group)
    print(f"\n  Postgres-XC 1.2.1: {measured.line()}; rejoin steps: {', '.join(rejoin)}")
    assert rejoin[0].startswith("set aside "), rejoin
    assert rejoin[1] == "re-clone (no pg_rewind on PostgreSQL 9.3)", rejoin


async def test_a_xc_standby_detached_by_a_restart_stays_detached_until_it_follows(
    xc_group: PgxcGroup,
) -> None:
    steps = await detach_and_follow(xc_group)
    print(f"\n  Postgres-XC 1.2.1: {', '.join(steps)}")


def test_configured_flavour_must_match_the_binaries(xc_bindir: Path) -> None:
    assert server_version(xc_bindir, "xc") == 90300
    with pytest.raises(InvalidInput, match="holds Postgres-XC"):
        server_version(xc_bindir, "postgresql")
    with pytest.raises(InvalidInput, match="holds Postgres-XC"):
        server_version(xc_bindir, "xl")
