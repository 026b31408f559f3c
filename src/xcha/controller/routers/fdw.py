"""The `fdw` router: a plain PostgreSQL coordinator that reaches each datanode through a
postgres_fdw foreign server named after it (a hash-partitioned table whose partitions are
foreign tables makes the sharded table).

`ALTER SERVER <dn> OPTIONS (SET host '...', SET port '...')` closes every session's cached
connection to that server at its next use (verified on PostgreSQL 15: a second, connected
session wrote to the new server right after another session ran ALTER SERVER); a
connection in use inside an open transaction is kept until that transaction ends.
"""

from dataclasses import dataclass

from psycopg import sql

from xcha.config import Section
from xcha.controller.routers.base import CoordinatorConfig, RouterConfig, parse_coordinators, settings_of
from xcha.controller.routers.session import CoordinatorSession
from xcha.controller.routing import Target
from xcha.names import Endpoint

KIND = "fdw"
STATEMENTS = 3  # connecting (a dropped session reconnects), ALTER SERVER, reading it back


@dataclass(frozen=True)
class Settings:
    coordinators: tuple[CoordinatorConfig, ...]


def parse(section: Section) -> Settings:
    return Settings(parse_coordinators(section, KIND))


def build(router: RouterConfig, datanodes: tuple[str, ...]) -> list[Target]:
    settings = settings_of(router, Settings)
    return [FdwTarget(c.name, c.conninfo, router.timeout) for c in settings.coordinators]


class FdwTarget:
    def __init__(self, name: str, conninfo: str, timeout: float) -> None:
        self.name = name
        self.timeout = timeout
        self.session = CoordinatorSession(conninfo, timeout)

    @property
    def attempt_timeout(self) -> float:
        """Every statement (and the connection) may take `timeout`."""
        return self.timeout * STATEMENTS

    async def apply(self, datanode: str, new: Endpoint, old: Endpoint | None, epoch: int) -> str:
        await self.session.run(
            sql.SQL("ALTER SERVER {} OPTIONS (SET host {}, SET port {})").format(
                sql.Identifier(datanode), sql.Literal(new.host), sql.Literal(str(new.port))
            )
        )
        rows = await self.session.run(
            "SELECT srvoptions FROM pg_foreign_server WHERE srvname = %s", [datanode]
        )
        options = list(rows[0][0]) if rows and rows[0][0] else []  # type: ignore[call-overload]
        if f"host={new.host}" not in options or f"port={new.port}" not in options:
            raise RuntimeError(f"foreign server {datanode} has options {options} after ALTER SERVER")
        return f"ALTER SERVER {datanode} host={new.host} port={new.port}"

    async def close(self) -> None:
        await self.session.close()
