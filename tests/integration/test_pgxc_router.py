"""The pgxc router statement by statement, over a real PostgreSQL connection.

The end-to-end tests on real Postgres-XL and Postgres-XC clusters show that a re-point works;
these pin down the exact statements, the session discipline, the quoting and the retries,
including answers a real cluster gives only rarely. A RecordingSession implements the
router's Session protocol over a real psycopg connection: it records every statement with
the connection it went to, runs on the real server what PostgreSQL has (pg_stat_activity,
pg_terminate_backend) and answers the XC-only statements (ALTER NODE, EXECUTE DIRECT,
pgxc_pool_*, pgxc_node) with canned rows.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.conftest import InstanceFactory
from xcha.controller.routers import pgxc
from xcha.controller.routers.pgxc import WRITERS, PgxcTarget
from xcha.controller.routers.session import CoordinatorSession, Query
from xcha.controller.routing import Router
from xcha.names import Endpoint
from xcha.pg.instance import PostgresInstance

pytestmark = pytest.mark.integration

Conn = psycopg.AsyncConnection[tuple[object, ...]]
XC_ONLY = ("ALTER NODE", "EXECUTE DIRECT", "SELECT pgxc_pool_reload()", "SELECT pgxc_pool_check()")
RELOAD = "SELECT pgxc_pool_reload()"
CHECK = "SELECT pgxc_pool_check()"
NODE_ROW = "SELECT node_host, node_port FROM pgxc_node WHERE node_name = 'dn1'"
ROUTED_CHECK = "EXECUTE DIRECT ON (\"dn1\") 'SELECT pg_is_in_recovery()'"
ALTER = "ALTER NODE \"dn1\" WITH (HOST = '127.0.0.1', PORT = 5433)"
NEW = Endpoint("127.0.0.1", 5433)
LONG_LABEL = "h" + "0123456789" * 6 + "ab"  # 63 characters, the longest DNS label


class RecordingSession:
    """The Session protocol over a real autocommit connection, recording every statement."""

    def __init__(self, conn: Conn, pool_check: Sequence[bool] = (True,)) -> None:
        self.conn = conn
        # Answers of pgxc_pool_check(), consumed from the front; the last one repeats.
        self.pool_check = list(pool_check)
        self.node_row: tuple[object, ...] = (NEW.host, NEW.port)  # XC's catalog read-back
        self.statements: list[tuple[str, int, bool]] = []
        self.results: list[list[tuple[object, ...]]] = []
        self.closed = 0

    @property
    def texts(self) -> list[str]:
        return [text for text, _, _ in self.statements]

    async def run(self, query: Query, params: Sequence[object] | None = None) -> list[tuple[object, ...]]:
        text = query.as_string(self.conn) if isinstance(query, sql.Composable) else query
        self.statements.append((text, id(self.conn), self.conn.autocommit))
        rows: list[tuple[object, ...]]
        if text.startswith(CHECK):
            answer = self.pool_check.pop(0) if len(self.pool_check) > 1 else self.pool_check[0]
            rows = [(answer,)]
        elif text.startswith(RELOAD):
            rows = [(True,)]
        elif text.startswith(NODE_ROW):
            rows = [self.node_row]
        elif text == ROUTED_CHECK:
            rows = [(False,)]
        elif text.startswith(XC_ONLY):
            rows = []
        else:
            cursor = await self.conn.execute(query, params)  # type: ignore[arg-type]
            rows = await cursor.fetchall() if cursor.description else []
        self.results.append(rows)
        return rows

    def as_string(self, query: sql.Composable) -> str:
        return query.as_string(self.conn)

    async def close(self) -> None:
        self.closed += 1


async def coordinator(make_instance: InstanceFactory) -> PostgresInstance:
    instance = make_instance("coord")
    await instance.bootstrap_master()
    return instance


async def recorder(instance: PostgresInstance, pool_check: Sequence[bool] = (True,)) -> RecordingSession:
    conn = await instance.connect()
    assert conn.autocommit
    return RecordingSession(conn, pool_check)


def expected_direct(on: str, host: str) -> list[str]:
    """The two EXECUTE DIRECT statements for one datanode, written out by hand."""
    return [
        f"EXECUTE DIRECT ON (\"{on}\") 'ALTER NODE \"dn1\" WITH (HOST = ''{host}'', PORT = 5433)'",
        f"EXECUTE DIRECT ON (\"{on}\") 'SELECT pgxc_pool_reload()'",
    ]


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def wait_for_async(predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def xid_holders(conn: Conn) -> list[object]:
    cursor = await conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()"
    )
    return [row[0] for row in await cursor.fetchall()]


async def test_one_coordinator_gets_the_exact_sequence_on_one_autocommit_session(
    make_instance: InstanceFactory,
) -> None:
    instance = await coordinator(make_instance)
    session = await recorder(instance)
    try:
        target = PgxcTarget("c1", session, flavor="xl", datanodes=("dn1", "dn2"), first=False)
        detail = await target.apply("dn1", NEW, Endpoint("127.0.0.1", 5432), 7)
        writers = WRITERS["xl"].as_string(session.conn)
        assert session.texts == [writers, ALTER, RELOAD, writers, CHECK]
        assert writers.startswith("SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity")
        assert "backend_xid IS NOT NULL" in writers and "pg_backend_pid()" in writers
        assert {conn_id for _, conn_id, _ in session.statements} == {id(session.conn)}
        assert all(autocommit for _, _, autocommit in session.statements)
        assert all(";" not in text for text in session.texts)
        # The terminate query really ran (nothing to end) and nothing else was sent to the server.
        assert session.results[0] == []
        assert target.terminated_total == 0
        assert detail.startswith("dn1 -> 127.0.0.1:5433: end open transactions ")
        assert "ended" not in detail
        for label in ("ALTER NODE", "pgxc_pool_reload", "pgxc_pool_check"):
            assert f"; {label} " in detail
        assert "EXECUTE DIRECT" not in detail and "in-doubt" not in detail
    finally:
        await session.conn.close()


@pytest.mark.parametrize("host", ["::1", "db-1.example.com", LONG_LABEL, f"{LONG_LABEL}.example.com"])
async def test_xl_first_coordinator_re_points_every_datanode_through_execute_direct(
    make_instance: InstanceFactory, host: str
) -> None:
    instance = await coordinator(make_instance)
    session = await recorder(instance)
    try:
        new = Endpoint(host, 5433)
        datanodes = ("dn1", "dn2", "dn_3")
        target = PgxcTarget("c1", session, flavor="xl", datanodes=datanodes, first=True)
        detail = await target.apply("dn1", new, None, 3)
        alter = f"ALTER NODE \"dn1\" WITH (HOST = '{host}', PORT = 5433)"
        direct = [text for on in datanodes for text in expected_direct(on, host)]
        assert session.texts == [
            WRITERS["xl"].as_string(session.conn),
            alter,
            RELOAD,
            WRITERS["xl"].as_string(session.conn),
            CHECK,
            *direct,
        ]
        assert {conn_id for _, conn_id, _ in session.statements} == {id(session.conn)}
        assert all(autocommit for _, _, autocommit in session.statements)
        assert all(";" not in text for text in session.texts)
        # The real parser reads the quoted statement back as exactly the coordinator's ALTER NODE.
        prefix = 'EXECUTE DIRECT ON ("dn2") '
        assert session.texts[7].startswith(prefix)
        cursor = await session.conn.execute("SELECT " + session.texts[7].removeprefix(prefix))
        assert await cursor.fetchall() == [(alter,)]
        for on in datanodes:
            assert f"EXECUTE DIRECT ON ({on}) ALTER NODE " in detail
            assert f"EXECUTE DIRECT ON ({on}) pgxc_pool_reload " in detail
        assert detail.startswith(f"dn1 -> {new}: ")
    finally:
        await session.conn.close()


async def test_no_execute_direct_on_an_xl_coordinator_that_is_not_the_first(
    make_instance: InstanceFactory,
) -> None:
    instance = await coordinator(make_instance)
    session = await recorder(instance)
    try:
        target = PgxcTarget("c2", session, flavor="xl", datanodes=("dn1", "dn2"), first=False)
        await target.apply("dn1", NEW, None, 1)
        assert session.texts == [
            WRITERS["xl"].as_string(session.conn),
            ALTER,
            RELOAD,
            WRITERS["xl"].as_string(session.conn),
            CHECK,
        ]
    finally:
        await session.conn.close()


@pytest.mark.parametrize("first", [True, False])
async def test_xc_ends_every_open_transaction_and_checks_the_catalog_and_a_routed_statement(
    make_instance: InstanceFactory, first: bool
) -> None:
    """XC's reload rolls back every open transaction of the coordinator, readers' too, and
    its pgxc_pool_check() cannot be trusted."""
    instance = await coordinator(make_instance)
    session = await recorder(instance)
    writer, reader, idle = await open_sessions(instance)
    try:
        target = PgxcTarget("c1", session, flavor="xc", datanodes=("dn1", "dn2"), first=first)
        detail = await target.apply("dn1", NEW, None, 1)
        writers = WRITERS["xc"].as_string(session.conn)
        assert "xact_start IS NOT NULL" in writers
        assert session.texts == [writers, ALTER, RELOAD, NODE_ROW, ROUTED_CHECK]
        assert sorted(row[0] for row in session.results[0]) == sorted(  # type: ignore[type-var]
            [writer.info.backend_pid, reader.info.backend_pid]
        )
        assert "(2 ended)" in detail
        for ended in (writer, reader):
            with pytest.raises(psycopg.OperationalError):
                await ended.execute("SELECT 1")
        assert await still_works(idle)
        session.node_row = ("127.0.0.1", 5432)
        with pytest.raises(RuntimeError, match="pgxc_node has"):
            await target.apply("dn1", NEW, None, 2)
    finally:
        for conn in (writer, reader, idle, session.conn):
            await conn.close()


async def test_pool_check_false_is_not_acknowledged(make_instance: InstanceFactory) -> None:
    instance = await coordinator(make_instance)
    session = await recorder(instance, pool_check=[False])
    try:
        target = PgxcTarget("c1", session, flavor="xl", datanodes=("dn1", "dn2"), first=True)
        with pytest.raises(RuntimeError, match=r"pgxc_pool_check\(\) returned False"):
            await target.apply("dn1", NEW, None, 1)
        # Nothing goes through the datanodes before the coordinator's pooler acknowledged.
        assert session.texts == [
            WRITERS["xl"].as_string(session.conn),
            ALTER,
            RELOAD,
            WRITERS["xl"].as_string(session.conn),
            CHECK,
        ]
    finally:
        await session.conn.close()


async def test_barrier_retries_a_coordinator_until_pool_check_returns_true(
    make_instance: InstanceFactory,
) -> None:
    instance = await coordinator(make_instance)
    session = await recorder(instance, pool_check=[False])
    try:
        target = PgxcTarget("c1", session, flavor="xl", datanodes=("dn1",), first=False)
        router = Router("pgxc", [target], retry_initial=0.01, retry_max=0.02)
        events: list[tuple[str, str]] = []
        router.on_event = lambda datanode, kind, message, details: events.append((datanode, kind))
        task = asyncio.create_task(router.reroute("dn1", NEW, None, 2))
        await wait_until(lambda: session.texts.count(CHECK) >= 3, "three pgxc_pool_check() attempts")
        assert not task.done()
        assert [p.split()[0] for p in router.pending("dn1")] == ["c1"]
        session.pool_check = [True]
        barrier = await asyncio.wait_for(task, 10)
        assert router.pending("dn1") == []
        progress = barrier.targets["c1"]
        assert progress.acknowledged
        assert "pgxc_pool_check() returned False" in progress.last_error
        # Every attempt is the whole sequence again, on the same session.
        attempts = session.texts.count(CHECK)
        assert attempts == progress.attempts >= 4
        assert (
            session.texts
            == [
                WRITERS["xl"].as_string(session.conn),
                ALTER,
                RELOAD,
                WRITERS["xl"].as_string(session.conn),
                CHECK,
            ]
            * attempts
        )
        assert [rows for text, rows in zip(session.texts, session.results, strict=True) if text == CHECK] == [
            [(False,)]
        ] * (attempts - 1) + [[(True,)]]
        assert events[0] == ("dn1", "reroute_retry") and events[-1] == ("dn1", "reroute_ack")
    finally:
        await session.conn.close()


async def test_barrier_completes_on_a_sequence_of_pool_check_answers(make_instance: InstanceFactory) -> None:
    instance = await coordinator(make_instance)
    session = await recorder(instance, pool_check=[False, False, True])
    try:
        target = PgxcTarget("c1", session, flavor="xl", datanodes=("dn1",), first=False)
        router = Router("pgxc", [target], retry_initial=0.01, retry_max=0.02)
        barrier = await asyncio.wait_for(router.reroute("dn1", NEW, None, 2), 10)
        assert barrier.targets["c1"].attempts == 3 == session.texts.count(CHECK)
        assert session.texts.count(ALTER) == 3
        assert router.pending("dn1") == []
    finally:
        await session.conn.close()


async def open_sessions(instance: PostgresInstance) -> tuple[Conn, Conn, Conn]:
    """A writer holding a transaction id, a reader in a transaction without one, an idle one."""
    writer, reader, idle = await instance.connect(), await instance.connect(), await instance.connect()
    await writer.execute("BEGIN")
    await writer.execute("CREATE TEMP TABLE t (x int)")
    await writer.execute("INSERT INTO t VALUES (1)")
    await reader.execute("BEGIN")
    await reader.execute("SELECT count(*) FROM pg_class")
    await idle.execute("SELECT 1")
    return writer, reader, idle


async def still_works(conn: Conn) -> bool:
    cursor = await conn.execute("SELECT 1")
    return await cursor.fetchall() == [(1,)]


async def test_sessions_holding_a_transaction_id_are_ended_before_the_reload(
    make_instance: InstanceFactory,
) -> None:
    instance = await coordinator(make_instance)
    session = await recorder(instance)
    writer, reader, idle = await open_sessions(instance)
    try:
        assert await xid_holders(session.conn) == [writer.info.backend_pid]
        target = PgxcTarget("c1", session, flavor="xl", datanodes=("dn1",), first=True)
        detail = await target.apply("dn1", NEW, None, 1)
        assert target.terminated_total == 1
        assert "end open transactions " in detail and "(1 ended)" in detail
        assert session.texts[0] == WRITERS["xl"].as_string(session.conn)
        assert session.results[0] == [(writer.info.backend_pid, True)]
        with pytest.raises(psycopg.OperationalError):
            await writer.execute("INSERT INTO t VALUES (2)")
        assert await still_works(reader) and await still_works(idle)
        assert await still_works(session.conn) and not session.conn.closed

        async def no_xid_holders() -> bool:
            return await xid_holders(session.conn) == []

        await wait_for_async(no_xid_holders, "the ended writer to go")
        # A second re-point finds nothing to end.
        detail = await target.apply("dn1", NEW, None, 2)
        assert "ended" not in detail and target.terminated_total == 1
    finally:
        for conn in (writer, reader, idle, session.conn):
            await conn.close()


async def test_terminate_writers_off_leaves_every_session_alone(make_instance: InstanceFactory) -> None:
    instance = await coordinator(make_instance)
    session = await recorder(instance)
    writer, reader, idle = await open_sessions(instance)
    try:
        target = PgxcTarget(
            "c1", session, flavor="xl", datanodes=("dn1",), first=False, terminate_writers=False
        )
        detail = await target.apply("dn1", NEW, None, 1)
        assert session.texts == [ALTER, RELOAD, CHECK]
        assert not any("pg_terminate_backend" in text for text in session.texts)
        assert target.terminated_total == 0
        assert "terminate" not in detail and "ended" not in detail
        await writer.execute("INSERT INTO t VALUES (2)")
        cursor = await writer.execute("SELECT count(*) FROM t")
        assert await cursor.fetchall() == [(2,)]
        assert await xid_holders(session.conn) == [writer.info.backend_pid]
        assert await still_works(reader) and await still_works(idle)
    finally:
        for conn in (writer, reader, idle, session.conn):
            await conn.close()


def clean_script(directory: Path, exit_code: int) -> tuple[Path, Path]:
    """An executable standing in for pgxc_clean -a; it appends a line to a file per run."""
    runs = directory / f"runs-{exit_code}"
    script = directory / f"clean-{exit_code}.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"echo run >> '{runs}'\n"
        "echo 'checking prepared transactions on 2 nodes'\n"
        "echo 'warning: to stderr' >&2\n"
        "echo 'resolved 2 in-doubt transactions'\n"
        f"exit {exit_code}\n"
    )
    script.chmod(0o755)
    return script, runs


def run_count(runs: Path) -> int:
    return len(runs.read_text().splitlines()) if runs.exists() else 0


async def test_in_doubt_cleanup_runs_on_the_first_coordinator_only(
    make_instance: InstanceFactory, tmp_path: Path
) -> None:
    instance = await coordinator(make_instance)
    first, other = await recorder(instance), await recorder(instance)
    script, runs = clean_script(tmp_path, 0)
    try:
        options: dict[str, object] = {
            "flavor": "xl",
            "datanodes": ("dn1", "dn2"),
            "clean_command": (str(script),),
        }
        not_first = PgxcTarget("c2", other, first=False, **options)  # type: ignore[arg-type]
        detail = await not_first.apply("dn1", NEW, None, 1)
        assert run_count(runs) == 0 and "in-doubt" not in detail
        target = PgxcTarget("c1", first, first=True, **options)  # type: ignore[arg-type]
        detail = await target.apply("dn1", NEW, None, 1)
        assert run_count(runs) == 1
        last = detail.rsplit("; ", 1)[-1]
        assert last.startswith("in-doubt cleanup ")
        # The last lines, joined: pgxc_clean's messages span lines.
        assert last.endswith(
            " ms: checking prepared transactions on 2 nodes warning: to stderr "
            "resolved 2 in-doubt transactions"
        )
        # After every statement, the EXECUTE DIRECT ones included.
        assert len(first.texts) == 5 + 2 * 2
    finally:
        await first.conn.close()
        await other.conn.close()


async def test_a_failing_in_doubt_cleanup_is_retried_then_not_acknowledged(
    make_instance: InstanceFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pgxc, "CLEAN_RETRY", 0.01)
    instance = await coordinator(make_instance)
    session = await recorder(instance)
    script, runs = clean_script(tmp_path, 3)
    try:
        target = PgxcTarget(
            "c1", session, flavor="xc", datanodes=("dn1",), first=True, clean_command=(str(script),)
        )
        with pytest.raises(RuntimeError, match=r"(?s)exited 3: .*resolved 2 in-doubt transactions"):
            await target.apply("dn1", NEW, None, 1)
        assert run_count(runs) == pgxc.CLEAN_ATTEMPTS
        assert session.texts[1:] == [ALTER, RELOAD, NODE_ROW, ROUTED_CHECK]
    finally:
        await session.conn.close()


async def backend_pids(instance: PostgresInstance, application_name: str) -> list[object]:
    conn = await instance.connect()
    try:
        cursor = await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s ORDER BY pid", [application_name]
        )
        return [row[0] for row in await cursor.fetchall()]
    finally:
        await conn.close()


async def test_coordinator_session_sends_the_statements_to_the_server(make_instance: InstanceFactory) -> None:
    instance = await coordinator(make_instance)
    conninfo = make_conninfo(
        host=str(instance.spec.socket_dir),
        port=instance.port,
        user=instance.spec.superuser,
        dbname="postgres",
    )
    target = PgxcTarget.connect("c1", conninfo, flavor="xl", datanodes=("dn1",), first=True)
    try:
        assert isinstance(target.session, CoordinatorSession)
        before = await target.session.connection()
        before_pid = before.info.backend_pid
        assert before.autocommit
        assert await backend_pids(instance, "xcha-controller") == [before_pid]
        with pytest.raises(psycopg.errors.SyntaxError):
            await target.apply("dn1", NEW, None, 1)
        # PostgreSQL has no ALTER NODE: the server refused it, and the session was dropped.
        assert before.closed
        assert target.session._conn is None

        async def old_backend_gone() -> bool:
            return await backend_pids(instance, "xcha-controller") == []

        await wait_for_async(old_backend_gone, "the dropped session's backend to exit")
        rows = await target.session.run("SELECT pg_backend_pid()")
        after = await target.session.connection()
        assert after is not before and rows == [(after.info.backend_pid,)]
        assert after.info.backend_pid != before_pid
        assert await backend_pids(instance, "xcha-controller") == [after.info.backend_pid]
        assert "ALTER NODE" in instance.spec.log_file.read_text()
    finally:
        await target.close()


async def test_xl_ends_a_transaction_that_took_an_id_between_the_first_pass_and_the_reload(
    make_instance: InstanceFactory,
) -> None:
    """The first pass finds no writer; a session takes a transaction id before the reload. It
    spans the re-point as surely as the others: the pass after the reload ends it."""
    instance = await coordinator(make_instance)
    session = await recorder(instance)
    late = await instance.connect()
    run = session.run

    async def run_with_a_late_writer(
        query: Query, params: Sequence[object] | None = None
    ) -> list[tuple[object, ...]]:
        text = query.as_string(session.conn) if isinstance(query, sql.Composable) else query
        if text == RELOAD:
            await late.execute("BEGIN")
            await late.execute("CREATE TEMP TABLE t (x int)")
        return await run(query, params)

    session.run = run_with_a_late_writer  # type: ignore[method-assign]
    try:
        target = PgxcTarget("c1", session, flavor="xl", datanodes=("dn1",), first=False)
        detail = await target.apply("dn1", NEW, None, 1)
        assert session.results[0] == [], "nobody held a transaction id at the first pass"
        assert target.terminated_total == 1
        assert "end transactions begun meanwhile" in detail and "(1 ended)" in detail
        with pytest.raises(psycopg.OperationalError):
            await late.execute("INSERT INTO t VALUES (1)")
    finally:
        await late.close()
        await session.conn.close()
