"""The PostgreSQL layer on real PostgreSQL: the specification's master/slave pair and more."""

import asyncio
import logging
import time
from pathlib import Path

import psycopg
import pytest

from tests.conftest import InstanceFactory
from xcha.errors import InvalidInput
from xcha.names import Endpoint
from xcha.pg.instance import PostgresInstance
from xcha.pg.ipc import SHM_TABLE
from xcha.pg.syncrep import SyncPolicy, SyncStandbys
from xcha.topology import free_port

pytestmark = pytest.mark.integration


async def sql(instance: PostgresInstance, query: str) -> list[tuple[object, ...]]:
    async with await instance.connect() as conn:
        cur = await conn.execute(query)
        return await cur.fetchall() if cur.description else []


async def wait_for(predicate, timeout: float = 20, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def sync_pair(
    make_instance: InstanceFactory, **clone: object
) -> tuple[PostgresInstance, PostgresInstance]:
    master, standby = make_instance("dn1a"), make_instance("dn1b")
    await master.bootstrap_master()
    await standby.follow(master.spec.endpoint, **clone)  # type: ignore[arg-type]
    await master.set_synchronous_standbys(SyncStandbys(SyncPolicy(), ("dn1b",)))
    await wait_for_sync(master, "dn1b")
    return master, standby


async def wait_for_sync(master: PostgresInstance, name: str) -> None:
    async def is_sync() -> bool:
        downstream = (await master.status()).downstream(name)
        return downstream is not None and downstream.sync_state == "sync" and downstream.state == "streaming"

    await wait_for(is_sync, what=f"{name} to be a streaming sync standby")


async def test_master_and_standby_reach_sync_and_replicate_a_commit(make_instance: InstanceFactory) -> None:
    master, standby = await sync_pair(make_instance)
    await sql(master, "CREATE TABLE t (id int)")
    await sql(master, "INSERT INTO t VALUES (42)")

    async def replayed() -> bool:
        return await sql(standby, "SELECT count(*) FROM pg_class WHERE relname = 't'") == [
            (1,)
        ] and await sql(standby, "SELECT id FROM t") == [(42,)]

    await wait_for(replayed, what="the row on the standby")
    master_status, standby_status = await master.status(), await standby.status()
    assert master_status.role == "master" and standby_status.role == "standby"
    assert master_status.system_identifier == standby_status.system_identifier
    assert standby_status.wal_receiver is not None
    assert standby_status.wal_receiver.status == "streaming"
    assert standby_status.wal_receiver.upstream_port == master.port
    assert master_status.synchronous_standby_names == "FIRST 1 (dn1b)"
    assert standby_status.synchronous_standby_names == ""
    # The data directory belongs to the unprivileged user the servers run as.
    assert master.data_dir.stat().st_uid == master.runner.user.uid


async def test_wal_is_archived_and_a_standby_recovers_from_the_archive_alone(
    make_instance: InstanceFactory,
) -> None:
    master, standby = make_instance("dn1a"), make_instance("dn1b")
    await master.bootstrap_master()
    await standby.clone_from(master.spec.endpoint)
    # No streaming: point the standby at a port where nothing listens.
    standby.configure("standby", Endpoint("127.0.0.1", free_port()))
    await sql(master, "CREATE TABLE t (id int)")
    await sql(master, "INSERT INTO t VALUES (7)")
    segment = (await sql(master, "SELECT pg_walfile_name(pg_current_wal_lsn())"))[0][0]
    await sql(master, "SELECT pg_switch_wal()")
    archive = master.spec.archive_dir
    await wait_for(lambda: _exists(archive / str(segment)), what=f"{segment} in the archive")
    await standby.start()

    async def restored() -> bool:
        try:
            return await sql(standby, "SELECT id FROM t") == [(7,)]
        except psycopg.errors.UndefinedTable:
            return False

    await wait_for(restored, what="the row restored from the archive")
    status = await standby.status()
    assert status.in_recovery and (status.wal_receiver is None or status.wal_receiver.status != "streaming")


async def _exists(path: Path) -> bool:
    return path.exists()


async def test_low_level_backup_clone_becomes_a_sync_standby(make_instance: InstanceFactory) -> None:
    master, standby = make_instance("dn1a"), make_instance("dn1b")
    await master.bootstrap_master()
    await sql(master, "CREATE TABLE t AS SELECT generate_series(1, 1000) AS id")
    await standby.follow(master.spec.endpoint, method="lowlevel", source_data_dir=master.data_dir)
    await master.set_synchronous_standbys(SyncStandbys(SyncPolicy(), ("dn1b",)))
    await wait_for_sync(master, "dn1b")
    await sql(master, "INSERT INTO t VALUES (1001)")
    await wait_for(lambda: _count(standby, 1001), what="1001 rows on the standby")


async def _count(instance: PostgresInstance, expected: int) -> bool:
    return await sql(instance, "SELECT count(*) FROM t") == [(expected,)]


async def test_promotion_accepts_a_write_and_moves_to_a_new_timeline(make_instance: InstanceFactory) -> None:
    master, standby = await sync_pair(make_instance)
    await sql(master, "CREATE TABLE t (id int)")
    await master.kill()
    seconds = await standby.promote()
    assert seconds < 10
    await sql(standby, "INSERT INTO t VALUES (1)")
    status = await standby.status()
    assert status.role == "master" and status.timeline == 2


async def test_a_killed_server_leaves_no_shared_memory_segment(make_instance: InstanceFactory) -> None:
    """A fence (SIGKILL) removes the System V segment its postmaster made: a killed server
    whose data directory is set aside or deleted would otherwise leave it for ever."""
    master = make_instance("dn1a")
    await master.bootstrap_master()
    pid = master.postmaster_pid()
    assert pid is not None
    attached = [line.split() for line in SHM_TABLE.read_text().splitlines()[1:]]
    assert any(fields[4] == str(pid) for fields in attached), "PostgreSQL made a segment"
    await master.kill()
    left = [line.split() for line in SHM_TABLE.read_text().splitlines()[1:]]
    assert not any(fields[4] == str(pid) for fields in left), left


async def test_port_takeover_restarts_the_promoted_standby_on_the_masters_port(
    make_instance: InstanceFactory,
) -> None:
    master, standby = await sync_pair(make_instance)
    old_port = master.port
    await master.kill()
    await standby.promote()  # the agent promotes first; the takeover only moves the master
    timings = await standby.take_over_port(old_port)
    assert [step for step, _ in timings.steps] == ["restart"]
    assert not (standby.data_dir / "standby.signal").exists()
    async with await psycopg.AsyncConnection.connect(
        host=str(standby.spec.socket_dir), port=old_port, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        await conn.execute("CREATE TABLE after_takeover (id int)")
    assert (await standby.status()).port == old_port


async def test_rewind_rejoins_a_diverged_former_master_as_sync_standby(
    make_instance: InstanceFactory,
) -> None:
    master, standby = await sync_pair(make_instance)
    await sql(master, "CREATE TABLE t (id int)")
    await sql(master, "INSERT INTO t VALUES (1)")
    await master.kill()
    await standby.promote()
    await sql(standby, "INSERT INTO t VALUES (2)")
    # The old master diverges: a commit it wrote locally after losing its standby.
    await _diverge(master)
    timings = await master.follow(standby.spec.endpoint)
    assert [step for step, _ in timings.steps] == ["rewind", "start"]
    await standby.set_synchronous_standbys(SyncStandbys(SyncPolicy(), ("dn1a",)))
    await wait_for_sync(standby, "dn1a")
    await sql(standby, "INSERT INTO t VALUES (3)")
    await wait_for(lambda: _rows(master, [(1,), (2,), (3,)]), what="the rejoined standby to replay")
    assert (await master.status()).timeline == 2


async def _diverge(former_master: PostgresInstance) -> None:
    """Start the killed former master alone and commit there, so its history forks."""
    former_master.configure("master")
    await former_master.start()
    await former_master.set_synchronous_standbys(None)
    await sql(former_master, "INSERT INTO t VALUES (99)")
    await former_master.kill()


async def _rows(instance: PostgresInstance, expected: list[tuple[int]]) -> bool:
    return await sql(instance, "SELECT id FROM t ORDER BY id") == expected


async def test_a_former_master_that_cannot_be_rewound_is_set_aside_and_cloned(
    make_instance: InstanceFactory,
) -> None:
    master, standby = await sync_pair(make_instance)
    await master.kill()
    await standby.promote()
    (master.data_dir / "global" / "pg_control").write_bytes(b"garbage")
    timings = await master.follow(standby.spec.endpoint)
    steps = [step for step, _ in timings.steps]
    assert steps[0].startswith("rewind failed") and steps[1:] == ["clone", "start"]
    aside = list(master.data_dir.parent.glob("data.old-*"))
    assert len(aside) == 1 and (aside[0] / "PG_VERSION").exists()
    assert (await master.status()).in_recovery


async def test_clearing_sync_names_releases_commits_waiting_for_a_missing_standby(
    make_instance: InstanceFactory,
) -> None:
    master, standby = await sync_pair(make_instance)
    await sql(master, "CREATE TABLE t (id int)")
    await standby.kill()
    insert = asyncio.create_task(sql(master, "INSERT INTO t VALUES (1)"))
    await asyncio.sleep(1.0)
    assert not insert.done(), "the commit should wait for the missing synchronous standby"
    await master.set_synchronous_standbys(None)
    await asyncio.wait_for(insert, 10)
    assert await sql(master, "SELECT id FROM t") == [(1,)]


async def test_bad_names_ports_and_directories_are_refused_before_anything_changes(
    make_instance: InstanceFactory, workdir: Path
) -> None:
    with pytest.raises(InvalidInput, match="invalid node name"):
        make_instance("dn1; DROP TABLE x")
    with pytest.raises(InvalidInput, match="invalid port"):
        make_instance("dn1a", port=70000)
    master = make_instance("dn1a")
    await master.bootstrap_master()
    await master.stop()
    with pytest.raises(InvalidInput, match="already holds a PostgreSQL cluster"):
        await master.initdb()
    with pytest.raises(InvalidInput, match="already holds a PostgreSQL cluster"):
        await master.clone_from(Endpoint("127.0.0.1", 5432))
    stray = make_instance("dn1b")
    stray.data_dir.mkdir(parents=True)
    (stray.data_dir / "notes.txt").write_text("someone's file")
    with pytest.raises(InvalidInput, match="is not empty"):
        await stray.initdb()
    assert (stray.data_dir / "notes.txt").read_text() == "someone's file"
    with pytest.raises(InvalidInput, match="holds no PostgreSQL cluster"):
        await make_instance("dn1c").start()
    with pytest.raises(InvalidInput, match="invalid clone method"):
        await make_instance("dn1d").clone_from(master.spec.endpoint, method="rsync")  # type: ignore[arg-type]
    assert not (workdir / "dn1d" / "data").exists()


async def test_trust_authentication_is_logged_as_a_warning(
    make_instance: InstanceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    master = make_instance("dn1a", auth="trust")
    with caplog.at_level(logging.WARNING):
        await master.bootstrap_master()
    assert any(
        "trust" in record.getMessage() and "without a password" in record.getMessage()
        for record in caplog.records
    )
    hba = (master.data_dir / "pg_hba.conf").read_text()
    assert "replication  xcha_repl            127.0.0.1/32       trust" in hba


async def test_a_detached_standby_receives_nothing_until_it_follows_again(
    make_instance: InstanceFactory,
) -> None:
    """Detach (a failover, before positions are read): the WAL receiver stops and stays stopped,
    across a restart too, so the master can confirm nothing through this standby and its
    position is final; follow() attaches it again."""
    master, standby = await sync_pair(make_instance)
    await sql(master, "CREATE TABLE t (id int)")
    await wait_for(lambda: _count_rows(standby, "t", 0), what="the table on the standby")
    await standby.detach()
    status = await standby.status()
    assert status.role == "standby" and status.wal_receiver is None
    await wait_for(lambda: _no_downstream(master, "dn1b"), what="the master's WAL sender for dn1b to end")
    position = status.position
    # Nothing confirms for the master now (a commit would wait): commit without waiting.
    await sql(master, "SET synchronous_commit = local; INSERT INTO t VALUES (1), (2)")
    await asyncio.sleep(1.0)
    assert (await standby.status()).position == position and await _count_rows(standby, "t", 0)
    await standby.stop("fast")
    await standby.start()
    await asyncio.sleep(1.0)
    restarted = await standby.status()
    assert restarted.wal_receiver is None and restarted.position == position
    await standby.detach()  # idempotent
    await standby.follow(master.spec.endpoint)
    await wait_for(lambda: _count_rows(standby, "t", 2), what="both rows on the re-attached standby")
    assert (await standby.status()).wal_receiver is not None


async def _count_rows(instance: PostgresInstance, table: str, expected: int) -> bool:
    try:
        return await sql(instance, f"SELECT count(*) FROM {table}") == [(expected,)]
    except psycopg.errors.UndefinedTable:
        return False


async def _no_downstream(master: PostgresInstance, name: str) -> bool:
    return (await master.status()).downstream(name) is None
