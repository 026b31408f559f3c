"""A Postgres-XL 10 datanode on real XL binaries: GTM, master, synchronous standby, a row
committed through a coordinator, kill -9 of the master, promotion, re-pointing, and the old
master's rejoin by pg_rewind. Skipped (with the reason) when no XL build is available."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.pgxc import PgxcGroup, detach_and_follow, failover_and_rejoin
from xcha.errors import InvalidInput
from xcha.pg.runner import server_version

pytestmark = pytest.mark.integration


@pytest.fixture
async def xl_group(xl_bindir: Path, workdir: Path) -> AsyncIterator[PgxcGroup]:
    group = PgxcGroup.create("xl", xl_bindir, workdir)
    try:
        yield group
    finally:
        await group.stop()


async def test_xl_datanode_fails_over_and_the_old_master_rejoins_by_pg_rewind(xl_group: PgxcGroup) -> None:
    measured, rejoin = await failover_and_rejoin(xl_group)
    print(f"\n  Postgres-XL 10: {measured.line()}; rejoin steps: {', '.join(rejoin)}")
    assert rejoin[0] == "rewind", rejoin


async def test_a_xl_standby_detached_by_a_restart_stays_detached_until_it_follows(
    xl_group: PgxcGroup,
) -> None:
    steps = await detach_and_follow(xl_group)
    print(f"\n  Postgres-XL 10: {', '.join(steps)}")


def test_configured_flavour_must_match_the_binaries(xl_bindir: Path) -> None:
    assert server_version(xl_bindir, "xl") == 100000
    with pytest.raises(InvalidInput, match="holds Postgres-XL"):
        server_version(xl_bindir, "postgresql")
    with pytest.raises(InvalidInput, match="holds Postgres-XL"):
        server_version(xl_bindir, "xc")
