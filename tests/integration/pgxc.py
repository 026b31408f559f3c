"""A real Postgres-XL or Postgres-XC datanode group for integration tests: a GTM, datanode dn1
as a master (dn1a) with a synchronous standby (dn1b), and one coordinator (coord1) to write
through (a session straight to an XL/XC datanode is read-only). Everything runs as the
unprivileged OS user through the Runner, on free loopback ports, and is stopped by PID.

`failover_and_rejoin` is the scenario both flavours run: commit a row, kill -9 the master,
promote the standby, re-point the coordinator, rejoin the old master as the new standby.
"""

import asyncio
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from psycopg import sql

from xcha.names import Endpoint
from xcha.pg.flavor import PgxcFlavor, PgxcSettings
from xcha.pg.gtm import GtmInstance, GtmSpec
from xcha.pg.instance import InstanceSpec, PostgresInstance
from xcha.pg.runner import OsUser, Runner, server_version
from xcha.pg.syncrep import SyncPolicy, SyncStandbys
from xcha.topology import free_port

LOOPBACK = "127.0.0.1"


@dataclass
class PgxcGroup:
    flavor: PgxcFlavor
    base: Path
    runner: Runner
    version: int
    gtm: GtmInstance
    password_file: Path
    instances: list[PostgresInstance] = field(default_factory=list)

    @classmethod
    def create(cls, flavor: PgxcFlavor, bindir: Path, base: Path) -> "PgxcGroup":
        runner = Runner(bindir, OsUser.for_postgres())
        version = server_version(bindir, flavor)  # refuses binaries of another flavour
        password_file = base / "replication.password"
        password_file.write_text(f"pw-{random.getrandbits(64):x}\n")
        password_file.chmod(0o600)
        gtm = GtmInstance(GtmSpec.under(base / "gtm", free_port()), runner)
        return cls(flavor, base, runner, version, gtm, password_file)

    def node(self, member: str, node_name: str, node_type: str = "datanode") -> PostgresInstance:
        """A member of datanode node_name (or a coordinator), with its own ports."""
        pgxc = PgxcSettings(
            flavor=self.flavor,
            node_name=node_name,
            pooler_port=free_port(),
            gtm_host=LOOPBACK,
            gtm_port=self.gtm.spec.port,
            # The coordinator's pooler logs in to the datanodes without a password.
            coordinator_networks=("127.0.0.1/32",),
            node_type=node_type,  # type: ignore[arg-type]
        )
        spec = InstanceSpec.under(
            self.base / member, member, free_port(), self.base / "archive", self.password_file, pgxc=pgxc
        )
        instance = PostgresInstance(spec, self.runner, self.version)
        self.instances.append(instance)
        return instance

    async def stop(self) -> None:
        """Every process this group started, by PID, also after a failure."""
        for instance in self.instances:
            await instance.kill()
        await self.gtm.kill()


async def run(instance: PostgresInstance, statement: sql.Composable | str) -> list[tuple[object, ...]]:
    async with await instance.connect() as conn:
        cursor = await conn.execute(statement)  # type: ignore[arg-type]
        return await cursor.fetchall() if cursor.description else []


def execute_direct(node: str, statement: sql.Composable) -> sql.Composed:
    """EXECUTE DIRECT ON (node) 'statement' (the statement as a literal)."""
    return sql.SQL("EXECUTE DIRECT ON ({}) {}").format(
        sql.Identifier(node), sql.Literal(statement.as_string(None))
    )


async def register(coordinator: PostgresInstance, datanode: str, master: Endpoint, flavor: str) -> None:
    """Make the coordinator route to the datanode (and, on XL, the datanode know the
    coordinator: it refuses a coordinator's queries without a pgxc_node row for it)."""
    me = coordinator.spec.pgxc.node_name if coordinator.spec.pgxc else "coord1"
    host, port = sql.Literal(master.host), sql.Literal(master.port)
    statements: list[sql.Composable] = [
        sql.SQL("ALTER NODE {} WITH (HOST = {}, PORT = {})").format(
            sql.Identifier(me), sql.Literal(LOOPBACK), sql.Literal(coordinator.port)
        ),
        sql.SQL("CREATE NODE {} WITH (TYPE = 'datanode', HOST = {}, PORT = {}, PRIMARY)").format(
            sql.Identifier(datanode), host, port
        ),
        sql.SQL("SELECT pgxc_pool_reload()"),
    ]
    if flavor == "xl":
        statements += [
            execute_direct(
                datanode,
                sql.SQL("CREATE NODE {} WITH (TYPE = 'coordinator', HOST = {}, PORT = {})").format(
                    sql.Identifier(me), sql.Literal(LOOPBACK), sql.Literal(coordinator.port)
                ),
            ),
            execute_direct(
                datanode,
                sql.SQL("ALTER NODE {} WITH (TYPE = 'datanode', HOST = {}, PORT = {})").format(
                    sql.Identifier(datanode), host, port
                ),
            ),
            execute_direct(datanode, sql.SQL("SELECT pgxc_pool_reload()")),
        ]
    for statement in statements:
        await run(coordinator, statement)


async def repoint(coordinator: PostgresInstance, datanode: str, master: Endpoint) -> None:
    await run(
        coordinator,
        sql.SQL("ALTER NODE {} WITH (HOST = {}, PORT = {})").format(
            sql.Identifier(datanode), sql.Literal(master.host), sql.Literal(master.port)
        ),
    )
    await run(coordinator, "SELECT pgxc_pool_reload()")


async def rows(instance: PostgresInstance) -> list[int]:
    return [int(row[0]) for row in await run(instance, "SELECT id FROM t ORDER BY id")]  # type: ignore[call-overload]


async def wait_rows(instance: PostgresInstance, expected: list[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (found := await rows(instance)) != expected:
        assert time.monotonic() < deadline, f"{instance.spec.name} has rows {found}, expected {expected}"
        await asyncio.sleep(0.05)


async def sync_state(master: PostgresInstance, standby: str) -> str | None:
    downstream = (await master.status()).downstream(standby)
    return downstream.sync_state if downstream else None


async def wait_sync(master: PostgresInstance, standby: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (state := await sync_state(master, standby)) != "sync":
        assert time.monotonic() < deadline, f"{standby} is {state!r} to {master.spec.name}, not sync"
        await asyncio.sleep(0.05)


@dataclass
class Measured:
    steps: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        return ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in self.steps.items())


async def failover_and_rejoin(group: PgxcGroup) -> tuple[Measured, list[str]]:
    """The whole scenario; returns what each step took and the old master's rejoin steps."""
    measured = Measured()
    started = time.monotonic()
    await group.gtm.init()
    await group.gtm.start()
    measured.steps["gtm"] = time.monotonic() - started
    master, standby = group.node("dn1a", "dn1"), group.node("dn1b", "dn1")
    coordinator = group.node("coord1", "coord1", "coordinator")

    bootstrap = await master.bootstrap_master()
    measured.steps["initdb"] = bootstrap["initdb"]
    await coordinator.bootstrap_master()
    await register(coordinator, "dn1", master.spec.endpoint, group.flavor)

    # The copy first, then synchronous_standby_names naming it.
    measured.steps["clone"] = await standby.clone_from(master.spec.endpoint)
    await standby.start()
    await master.set_synchronous_standbys(SyncStandbys(SyncPolicy(), ("dn1b",)))
    await wait_sync(master, "dn1b")

    await run(coordinator, "CREATE TABLE t (id int PRIMARY KEY) DISTRIBUTE BY REPLICATION")
    await run(coordinator, "INSERT INTO t VALUES (1)")  # acknowledged: dn1b has it
    assert await rows(standby) == [1]

    pid = master.postmaster_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # kill -9 of the master's postmaster
    await master.kill()  # and what it left behind, as a fence would
    measured.steps["promote -> writable"] = await standby.promote()
    assert (await standby.status()).role == "master"
    assert await rows(standby) == [1], "the acknowledged row is on the promoted standby"

    await repoint(coordinator, "dn1", standby.spec.endpoint)
    await run(coordinator, "INSERT INTO t VALUES (2)")  # the promoted standby takes writes

    rejoin = await master.follow(standby.spec.endpoint)
    for name, seconds in rejoin.steps:
        if not name.startswith("set aside "):
            measured.steps[f"rejoin: {name}"] = seconds
    status = await master.status()
    assert status.in_recovery and status.wal_receiver is not None
    assert (status.wal_receiver.upstream_host, status.wal_receiver.upstream_port) == (
        LOOPBACK,
        standby.port,
    )
    await standby.set_synchronous_standbys(SyncStandbys(SyncPolicy(), ("dn1a",)))
    await wait_sync(standby, "dn1a")
    await run(coordinator, "INSERT INTO t VALUES (3)")
    await wait_rows(master, [1, 2, 3])
    return measured, [name for name, _ in rejoin.steps]


async def detach_and_follow(group: PgxcGroup) -> list[str]:
    """Detach where primary_conninfo needs a restart (before PostgreSQL 13: XL 10, XC 9.3):
    the standby restarts without a WAL receiver, stays so across another restart, and the
    master's WAL sender for it ends; follow() attaches it again and it confirms commits."""
    await group.gtm.init()
    await group.gtm.start()
    master, standby = group.node("dn1a", "dn1"), group.node("dn1b", "dn1")
    coordinator = group.node("coord1", "coord1", "coordinator")
    await master.bootstrap_master()
    await coordinator.bootstrap_master()
    await register(coordinator, "dn1", master.spec.endpoint, group.flavor)
    await standby.clone_from(master.spec.endpoint)
    await standby.start()
    await master.set_synchronous_standbys(SyncStandbys(SyncPolicy(), ("dn1b",)))
    await wait_sync(master, "dn1b")
    await run(coordinator, "CREATE TABLE t (id int PRIMARY KEY) DISTRIBUTE BY REPLICATION")
    await run(coordinator, "INSERT INTO t VALUES (1)")
    steps = [f"detach {await standby.detach() * 1000:.0f} ms"]
    detached = await standby.status()
    assert detached.role == "standby" and detached.wal_receiver is None, detached
    deadline = time.monotonic() + 10
    while (await master.status()).downstream("dn1b") is not None:
        assert time.monotonic() < deadline, "the master still has a WAL sender for dn1b"
        await asyncio.sleep(0.1)
    await standby.stop("fast")
    await standby.start()
    restarted = await standby.status()
    assert restarted.wal_receiver is None and restarted.position == detached.position, restarted
    await standby.detach()  # idempotent
    started = time.monotonic()
    await standby.follow(master.spec.endpoint)
    steps.append(f"follow {(time.monotonic() - started) * 1000:.0f} ms")
    await wait_sync(master, "dn1b")
    await run(coordinator, "INSERT INTO t VALUES (2)")  # confirmed by dn1b again
    await wait_rows(standby, [1, 2])
    return steps
