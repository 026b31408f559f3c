"""The `pgxc` router: Postgres-XC / Postgres-XL coordinators.

VERIFIED BY ITS STATEMENTS ONLY. There is no Postgres-XC or XL server on the machines this
was built on; tests check the exact statement sequence, the session discipline and the
quoting against a recording session over a real PostgreSQL connection (where the statements
exist in PostgreSQL, such as pg_stat_activity and pg_terminate_backend, they run for real).
The sequence follows what was measured on a real Postgres-XL 10 cluster (docs/design.md,
"Postgres-XC / XL coordinators"):

on every coordinator, in ONE session, each statement its own autocommit transaction:
  1. end the sessions that hold a transaction id (`backend_xid IS NOT NULL`), so a write
     transaction spanning the re-point gets an error instead of a COMMIT that kept only part
     of its rows (configurable, on by default);
  2. `ALTER NODE dn WITH (HOST = 'h', PORT = p)`;
  3. `SELECT pgxc_pool_reload()` (in the same transaction as the ALTER it fails; as one query
     string with it the ALTER is rolled back; from another session it returns t and changes
     nothing);
  4. `SELECT pgxc_pool_check()` must return t, else the coordinator has not acknowledged and
     the barrier retries it;
then, through the first coordinator only, for every datanode including the promoted one
(needed once datanodes talk to each other, e.g. a redistributed join), with flavor "xl":
  5. `EXECUTE DIRECT ON (dnX) 'ALTER NODE dn WITH (HOST = ''h'', PORT = p)'`;
  6. `EXECUTE DIRECT ON (dnX) 'SELECT pgxc_pool_reload()'`;
  7. the in-doubt cleanup (`pgxc_clean -a` or an equivalent command), when configured.
The controller asks for the re-point only once the promoted standby accepts writes: a hot
standby refuses coordinator connections, so re-pointing earlier gains nothing.
"""

import asyncio
import logging
import subprocess
import time
from collections.abc import Sequence
from typing import Protocol

import psycopg
from psycopg import sql

from xcha.controller.routers.session import CoordinatorSession, Query
from xcha.names import Endpoint

log = logging.getLogger(__name__)
CLEAN_TIMEOUT = 60.0

# Client sessions (client_port is NULL only for background processes, on every version) that
# hold a transaction id (backend_xid: PostgreSQL 9.4 on, so XL 9.5 and 10; not XC 1.x).
WRITERS = sql.SQL(
    "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
    "WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() AND client_port IS NOT NULL"
)


class Session(Protocol):
    """What the router needs of a coordinator connection (CoordinatorSession, or a recorder)."""

    async def run(self, query: Query, params: Sequence[object] | None = None) -> list[tuple[object, ...]]: ...

    def as_string(self, query: sql.Composable) -> str: ...

    async def close(self) -> None: ...


def alter_node(datanode: str, new: Endpoint) -> sql.Composed:
    return sql.SQL("ALTER NODE {} WITH (HOST = {}, PORT = {})").format(
        sql.Identifier(datanode), sql.Literal(new.host), sql.Literal(new.port)
    )


def execute_direct(session: Session, on: str, statement: sql.Composable) -> sql.Composed:
    """`EXECUTE DIRECT ON (dnX) '<statement>'`: the statement is a literal inside the
    statement, quoted by the connection (so a quote in a host name is doubled twice)."""
    return sql.SQL("EXECUTE DIRECT ON ({}) {}").format(
        sql.Identifier(on), sql.Literal(session.as_string(statement))
    )


class PgxcTarget:
    def __init__(
        self,
        name: str,
        session: Session,
        flavor: str,
        datanodes: tuple[str, ...],
        first: bool,
        terminate_writers: bool = True,
        clean_command: tuple[str, ...] = (),
        timeout: float = 5.0,
    ) -> None:
        self.name = name
        self.session = session
        self.flavor = flavor
        self.datanodes = datanodes
        self.first = first
        self.terminate_writers = terminate_writers
        self.clean_command = clean_command
        self.timeout = timeout
        self.terminated_total = 0

    @property
    def attempt_timeout(self) -> float:
        """How long one attempt may take: every statement may take `timeout`, the cleanup more."""
        statements = 4 + (2 * len(self.datanodes) if self.first and self.flavor == "xl" else 0)
        return self.timeout * statements + (CLEAN_TIMEOUT if self.first and self.clean_command else 0.0)

    @classmethod
    def connect(cls, name: str, conninfo: str, **options: object) -> "PgxcTarget":
        timeout = float(options.get("timeout", 5.0))  # type: ignore[arg-type]
        return cls(name, CoordinatorSession(name, conninfo, timeout), **options)  # type: ignore[arg-type]

    async def apply(self, datanode: str, new: Endpoint, old: Endpoint | None, epoch: int) -> str:
        steps: list[str] = []

        async def step(label: str, query: Query) -> list[tuple[object, ...]]:
            started = time.monotonic()
            rows = await self.session.run(query)
            steps.append(f"{label} {(time.monotonic() - started) * 1000:.1f} ms")
            return rows

        if self.terminate_writers:
            try:
                ended = [row for row in await step("terminate writers", WRITERS) if row[1] is True]
            except psycopg.errors.UndefinedColumn:
                # Postgres-XC 1.x (PostgreSQL 9.3) has no backend_xid: go on without this step.
                log.warning(
                    "%s: cannot find sessions holding a transaction id (no backend_xid before "
                    "PostgreSQL 9.4): set terminate_writers = false",
                    self.name,
                )
                steps.append("terminate writers unavailable")
                ended = []
            if ended:
                self.terminated_total += len(ended)
                log.warning(
                    "%s: ended %d session(s) holding a transaction id before re-pointing %s: %s",
                    self.name,
                    len(ended),
                    datanode,
                    ", ".join(str(row[0]) for row in ended),
                )
                steps[-1] += f" ({len(ended)} ended)"
        await step("ALTER NODE", alter_node(datanode, new))
        await step("pgxc_pool_reload", sql.SQL("SELECT pgxc_pool_reload()"))
        check = await step("pgxc_pool_check", sql.SQL("SELECT pgxc_pool_check()"))
        if not check or check[0][0] is not True:
            raise RuntimeError(
                f"pgxc_pool_check() returned {check[0][0] if check else 'nothing'} after "
                "pgxc_pool_reload(): the pooler still has the old address"
            )
        if self.first and self.flavor == "xl":
            for on in self.datanodes:
                await step(
                    f"EXECUTE DIRECT ON ({on}) ALTER NODE",
                    execute_direct(self.session, on, alter_node(datanode, new)),
                )
                await step(
                    f"EXECUTE DIRECT ON ({on}) pgxc_pool_reload",
                    execute_direct(self.session, on, sql.SQL("SELECT pgxc_pool_reload()")),
                )
        if self.first and self.clean_command:
            steps.append(await self._clean())
        return f"{datanode} -> {new}: " + "; ".join(steps)

    async def _clean(self) -> str:
        """Resolve prepared transactions the crash left in doubt (pgxc_clean -a)."""
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *self.clean_command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), CLEAN_TIMEOUT)
        except BaseException as error:  # a timeout, or the barrier giving up: never leave it running
            process.kill()
            await process.wait()
            if isinstance(error, TimeoutError):
                raise RuntimeError(
                    f"{self.clean_command[0]} did not finish in {CLEAN_TIMEOUT:.0f} s"
                ) from None
            raise
        text = output.decode(errors="replace").strip()
        if process.returncode != 0:
            raise RuntimeError(f"{self.clean_command[0]} exited {process.returncode}: {text[-500:]}")
        log.info("%s: in-doubt cleanup: %s", self.name, text or "nothing reported")
        last = text.splitlines()[-1] if text else "nothing reported"
        return f"in-doubt cleanup {(time.monotonic() - started) * 1000:.0f} ms: {last}"

    async def close(self) -> None:
        await self.session.close()
