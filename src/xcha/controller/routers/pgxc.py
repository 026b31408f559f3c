"""The `pgxc` router: Postgres-XC / Postgres-XL coordinators.

Verified end to end on real Postgres-XL 10r1.1 and Postgres-XC 1.2.1 clusters (GTM,
coordinators, datanodes with synchronous standbys under xcha's agents:
tests/integration/test_xl_cluster.py, test_xc_cluster.py), and statement by statement
against a recording session (tests/integration/test_pgxc_router.py).

On every coordinator, in ONE session, each statement its own autocommit transaction:
  1. end the client sessions whose transaction the re-point would break, so that their
     clients get an error instead of a COMMIT that kept only part of the rows
     (configurable, on by default). XL: sessions holding a transaction id (`backend_xid`);
     a write transaction spanning the re-point otherwise got COMMIT with only the rows of
     the other datanode. XC: every session inside a transaction (by `state`: 9.3 has no
     backend_xid, and XC 1.2.1 coordinators leave `xact_start` NULL even inside one),
     because XC's reload silently rolls back the open transaction of EVERY session on the
     coordinator and the client's COMMIT then returns the tag ROLLBACK without an error;
  2. `ALTER NODE dn WITH (HOST = 'h', PORT = p)`;
  3. `SELECT pgxc_pool_reload()` (in the same transaction as the ALTER it fails; as one query
     string with it the ALTER is rolled back; from another session it returns t and changes
     nothing); on XL, step 1 again: a session that took a transaction id between step 1 and
     the reload spans the re-point too;
  4. the acknowledgement, else the barrier retries: XL: `SELECT pgxc_pool_check()` is t.
     XC, where pgxc_pool_check() returned f in fresh sessions before any fault and once after
     a reload that did take effect: the catalog row holds the new address and a statement
     routed to the datanode (`EXECUTE DIRECT`) reaches a server that is not in recovery;
then, through the first coordinator only:
  with flavor "xl", for every datanode including the promoted one (needed once datanodes
  talk to each other, e.g. a redistributed join):
  5. `EXECUTE DIRECT ON (dnX) 'ALTER NODE dn WITH (HOST = ''h'', PORT = p)'`;
  6. `EXECUTE DIRECT ON (dnX) 'SELECT pgxc_pool_reload()'`;
  with any flavor:
  7. the in-doubt cleanup (`pgxc_clean -a` or an equivalent command), when configured,
     retried (on XC it once failed while the coordinator recovered from a crashed backend).
The controller asks for the re-point only once the promoted standby accepts writes: a hot
standby refuses coordinator connections, so re-pointing earlier gains nothing.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from psycopg import sql

from xcha.config import Section
from xcha.controller.routers.base import (
    TIMEOUT,
    CoordinatorConfig,
    RouterConfig,
    parse_coordinators,
    settings_of,
)
from xcha.controller.routers.process import run_command
from xcha.controller.routers.session import CoordinatorSession, Query
from xcha.controller.routing import Target
from xcha.names import Endpoint

log = logging.getLogger(__name__)
Rows = list[tuple[object, ...]]
Step = Callable[[str, Query], Awaitable[Rows]]
CLEAN_TIMEOUT = 60.0

# Client sessions (client_port is NULL only for background processes, on every version)
# whose transaction the re-point breaks; see step 1 above.
_CLIENTS = "pid <> pg_backend_pid() AND client_port IS NOT NULL"
WRITERS = {
    "xl": sql.SQL(
        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND "
        + _CLIENTS
    ),
    # XC 1.2.1 coordinators report xact_start NULL in every session (measured: idle in
    # transaction after an INSERT, and active): the state says it.
    "xc": sql.SQL(
        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE (xact_start IS NOT NULL OR "
        "state IN ('active', 'idle in transaction', 'idle in transaction (aborted)')) AND " + _CLIENTS
    ),
}
CLEAN_ATTEMPTS = 3
CLEAN_RETRY = 1.0
KIND = "pgxc"


@dataclass(frozen=True)
class Settings:
    coordinators: tuple[CoordinatorConfig, ...]
    flavor: str = "xc"  # xc or xl
    terminate_writers: bool = True  # end sessions holding an xid before the reload (step 1)
    clean_command: tuple[str, ...] = ()  # pgxc_clean -a or equivalent (step 7)


def parse(section: Section) -> Settings:
    return Settings(
        coordinators=parse_coordinators(section, KIND),
        flavor=section.choice("flavor", ("xc", "xl"), "xc"),
        terminate_writers=section.flag("terminate_writers", True),
        clean_command=section.strings("clean_command", ()),
    )


def build(router: RouterConfig, datanodes: tuple[str, ...]) -> list[Target]:
    """A target per coordinator; the first also re-points the datanodes (XL) and cleans up."""
    settings = settings_of(router, Settings)
    return [
        PgxcTarget.connect(
            c.name,
            c.conninfo,
            flavor=settings.flavor,
            datanodes=datanodes,
            first=index == 0,
            terminate_writers=settings.terminate_writers,
            clean_command=settings.clean_command,
            timeout=router.timeout,
        )
        for index, c in enumerate(settings.coordinators)
    ]


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
        timeout: float = TIMEOUT,
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
        # The re-point (steps 1-4; 5-6 on the first XL coordinator) that already took effect
        # here, as (datanode, new, epoch): a retry after a later step failed (the cleanup,
        # while another coordinator is down) must not end this coordinator's sessions again.
        self._repointed: tuple[str, Endpoint, int] | None = None
        self._datanodes_repointed: tuple[str, Endpoint, int] | None = None

    @property
    def attempt_timeout(self) -> float:
        """How long one attempt may take: every statement may take `timeout`, the cleanup more."""
        statements = 6 + (2 * len(self.datanodes) if self.first and self.flavor == "xl" else 0)
        cleanup = CLEAN_ATTEMPTS * CLEAN_TIMEOUT + (CLEAN_ATTEMPTS - 1) * CLEAN_RETRY
        return self.timeout * statements + (cleanup if self.first and self.clean_command else 0.0)

    @classmethod
    def connect(
        cls,
        name: str,
        conninfo: str,
        *,
        flavor: str,
        datanodes: tuple[str, ...],
        first: bool,
        terminate_writers: bool = True,
        clean_command: tuple[str, ...] = (),
        timeout: float = TIMEOUT,
    ) -> "PgxcTarget":
        """A target over a kept session of its own (`CoordinatorSession`)."""
        session = CoordinatorSession(conninfo, timeout)
        return cls(name, session, flavor, datanodes, first, terminate_writers, clean_command, timeout)

    async def apply(self, datanode: str, new: Endpoint, old: Endpoint | None, epoch: int) -> str:
        steps: list[str] = []

        async def step(label: str, query: Query) -> Rows:
            started = time.monotonic()
            rows = await self.session.run(query)
            steps.append(f"{label} {(time.monotonic() - started) * 1000:.1f} ms")
            return rows

        signalled: set[object] = set()  # a backend told to end may still be listed a moment

        async def end_transactions(label: str) -> None:
            rows = await step(label, WRITERS[self.flavor])
            ended = [row for row in rows if row[1] is True and row[0] not in signalled]
            signalled.update(row[0] for row in ended)
            if ended:
                self.terminated_total += len(ended)
                log.warning(
                    "%s: ended %d session(s) inside a transaction while re-pointing %s: %s",
                    self.name,
                    len(ended),
                    datanode,
                    ", ".join(str(row[0]) for row in ended),
                )
                steps[-1] += f" ({len(ended)} ended)"

        key = (datanode, new, epoch)
        if self._repointed == key:
            steps.append("re-pointed by an earlier attempt")
        else:
            if self.terminate_writers:
                await end_transactions("end open transactions")
            await step("ALTER NODE", alter_node(datanode, new))
            await step("pgxc_pool_reload", sql.SQL("SELECT pgxc_pool_reload()"))
            if self.terminate_writers and self.flavor == "xl":
                # A session that took a transaction id after the first pass, before the reload,
                # spans the re-point too (XC's reload already rolled every one back).
                await end_transactions("end transactions begun meanwhile")
        if self.flavor == "xl":
            check = await step("pgxc_pool_check", sql.SQL("SELECT pgxc_pool_check()"))
            if not check or check[0][0] is not True:
                raise RuntimeError(
                    f"pgxc_pool_check() returned {check[0][0] if check else 'nothing'} after "
                    "pgxc_pool_reload(): the pooler still has the old address"
                )
        else:
            await self._check_routed(datanode, new, step)
        self._repointed = key
        if self.first and self.flavor == "xl" and self._datanodes_repointed != key:
            for on in self.datanodes:
                await step(
                    f"EXECUTE DIRECT ON ({on}) ALTER NODE",
                    execute_direct(self.session, on, alter_node(datanode, new)),
                )
                await step(
                    f"EXECUTE DIRECT ON ({on}) pgxc_pool_reload",
                    execute_direct(self.session, on, sql.SQL("SELECT pgxc_pool_reload()")),
                )
            self._datanodes_repointed = key
        if self.first and self.clean_command:
            steps.append(await self._clean())
        return f"{datanode} -> {new}: " + "; ".join(steps)

    async def _check_routed(self, datanode: str, new: Endpoint, step: Step) -> None:
        """XC's acknowledgement: the catalog has the new address, and a statement routed to the
        datanode through the pooler reaches a server that accepts writes."""
        rows = await step(
            "pgxc_node",
            sql.SQL("SELECT node_host, node_port FROM pgxc_node WHERE node_name = {}").format(
                sql.Literal(datanode)
            ),
        )
        if not rows or (rows[0][0], rows[0][1]) != (new.host, new.port):
            raise RuntimeError(f"pgxc_node has {rows[0] if rows else 'no row'} for {datanode}, not {new}")
        routed = await step(
            f"EXECUTE DIRECT ON ({datanode})",
            execute_direct(self.session, datanode, sql.SQL("SELECT pg_is_in_recovery()")),
        )
        if not routed or routed[0][0] is not False:
            raise RuntimeError(f"a statement routed to {datanode} reached a server in recovery")

    async def _clean(self) -> str:
        """Resolve prepared transactions the crash left in doubt (pgxc_clean -a); retried."""
        started = time.monotonic()
        for attempt in range(1, CLEAN_ATTEMPTS + 1):
            try:
                text = await run_command(self.clean_command, CLEAN_TIMEOUT)
                break
            except RuntimeError as error:
                if attempt == CLEAN_ATTEMPTS:
                    raise
                log.warning("%s: in-doubt cleanup failed (attempt %d): %s", self.name, attempt, error)
                await asyncio.sleep(CLEAN_RETRY)
        log.info("%s: in-doubt cleanup: %s", self.name, text or "nothing reported")
        # pgxc_clean's messages span lines (a lone ")" can end one): the last few, joined.
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        last = " ".join(lines[-3:])[-300:] if lines else "nothing reported"
        tries = f", {attempt} attempts" if attempt > 1 else ""
        return f"in-doubt cleanup {(time.monotonic() - started) * 1000:.0f} ms{tries}: {last}"

    async def close(self) -> None:
        await self.session.close()
