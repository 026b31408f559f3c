"""The Postgres-XL / Postgres-XC side of a deployment on one machine (`xcha up --xl|--xc`):
a GTM, coordinators, the registration of every node with every other, and the writers'
distributed table. The datanodes themselves are members under agents, as for plain
PostgreSQL; Topology calls this module for the rest.

Order of a start: the GTM (no node starts without it), the agents (they initdb the masters
with the datanode's node name and clone the standbys), the coordinators; once every
datanode is protected: registration, then the application role and the table through the
first coordinator (XL and XC run both on every node).
"""

from dataclasses import dataclass
from pathlib import Path

from psycopg import sql

from xcha.coordinator import SHARDED_TABLE
from xcha.errors import XchaError
from xcha.names import Endpoint
from xcha.pg.client import Conn, connect
from xcha.pg.flavor import PgxcFlavor, PgxcSettings
from xcha.pg.gtm import GtmInstance, GtmSpec
from xcha.pg.runner import Runner
from xcha.pgxc_nodes import KNOWN_NODES, RELOAD, PgxcNode, distributed_table, registration

LOOPBACK_NETWORKS = ("127.0.0.1/32",)
STATEMENT_TIMEOUT = 30.0


@dataclass(frozen=True)
class PgxcLayout:
    """Ports and places of the cluster-wide parts, as topology.json keeps them."""

    flavor: PgxcFlavor
    gtm_port: int
    pooler_ports: dict[str, int]  # every member and coordinator has its own

    def settings(self, name: str, node_name: str, node_type: str) -> PgxcSettings:
        """The flavour settings of one member (node_name: its datanode) or coordinator. The
        coordinators connect from loopback here (their poolers log in without a password)."""
        return PgxcSettings(
            flavor=self.flavor,
            node_name=node_name,
            pooler_port=self.pooler_ports[name],
            gtm_host="127.0.0.1",
            gtm_port=self.gtm_port,
            coordinator_networks=LOOPBACK_NETWORKS,
            node_type=node_type,  # type: ignore[arg-type]
        )


def gtm(workdir: Path, layout: PgxcLayout, runner: Runner) -> GtmInstance:
    return GtmInstance(GtmSpec.under(workdir / "gtm", layout.gtm_port), runner)


async def start_gtm(instance: GtmInstance) -> None:
    if not instance.has_data():
        await instance.init()
    if instance.pid() is None:
        await instance.start()


async def _session(conninfo: str) -> Conn:
    return await connect(conninfo, STATEMENT_TIMEOUT, autocommit=True)


async def register_node(conninfo: str, itself: str, nodes: list[PgxcNode]) -> None:
    """Make one node's catalog hold every node at its address, then reload its pooler (in the
    same session: a reload from another session changes nothing)."""
    conn = await _session(conninfo)
    try:
        known = {str(row[0]) for row in await (await conn.execute(KNOWN_NODES)).fetchall()}
        for statement in registration(itself, nodes, known):
            await conn.execute(statement)
        await conn.execute(RELOAD)
    finally:
        await conn.close()


async def register_cluster(
    flavor: PgxcFlavor,
    coordinators: dict[str, tuple[str, Endpoint]],
    datanodes: dict[str, tuple[str, Endpoint]],
) -> None:
    """Every coordinator learns every node. On XL every datanode master too: datanodes talk
    to each other (a redistributed join) and refuse a coordinator they do not know; on XC a
    datanode's catalog is not used for routing and stays as initdb made it."""
    nodes = [PgxcNode(name, "coordinator", endpoint) for name, (_, endpoint) in coordinators.items()]
    nodes += [PgxcNode(name, "datanode", endpoint) for name, (_, endpoint) in datanodes.items()]
    targets = list(coordinators.items()) + (list(datanodes.items()) if flavor == "xl" else [])
    for name, (conninfo, _) in targets:
        try:
            await register_node(conninfo, name, nodes)
        except Exception as error:
            raise XchaError(f"registering the nodes on {name} failed: {error}") from error


async def create_table(conninfo: str, datanodes: list[str], user: str, password: str) -> None:
    """The application role and the distributed table, through one coordinator (it runs the
    DDL on every node)."""
    conn = await _session(conninfo)
    try:
        exists = await (await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [user])).fetchone()
        await conn.execute(
            sql.SQL(("ALTER" if exists else "CREATE") + " ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(user), sql.Literal(password)
            )
        )
        await conn.execute(distributed_table(datanodes))
        await conn.execute(
            sql.SQL("GRANT SELECT, INSERT ON {} TO {}").format(
                sql.Identifier(SHARDED_TABLE), sql.Identifier(user)
            )
        )
    finally:
        await conn.close()
