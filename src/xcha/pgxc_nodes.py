"""Registering the nodes of a Postgres-XC / Postgres-XL cluster, and its distributed table.

Every coordinator and datanode knows the others through its own `pgxc_node` catalog, and
CREATE / ALTER NODE change only the node they run on: each node is told about every other
one, then `pgxc_pool_reload()` makes its pooler use the catalog. A standby is not a node of
its own: it takes its master's node name (its catalog is a copy of the master's), and after a
promotion the `pgxc` router re-points that name.

The statements are composed with psycopg.sql; node names are checked identifiers.
"""

from dataclasses import dataclass
from typing import Literal

from psycopg import sql

from xcha.coordinator import SHARDED_TABLE
from xcha.names import Endpoint, check_name

NodeKind = Literal["coordinator", "datanode"]
RELOAD = sql.SQL("SELECT pgxc_pool_reload()")
KNOWN_NODES = sql.SQL("SELECT node_name FROM pgxc_node")


@dataclass(frozen=True)
class PgxcNode:
    name: str
    kind: NodeKind
    endpoint: Endpoint

    def __post_init__(self) -> None:
        check_name(self.name, f"{self.kind} name")


def _options(node: PgxcNode, with_type: bool) -> sql.Composed:
    parts = [sql.SQL("HOST = {}").format(sql.Literal(node.endpoint.host))]
    parts.append(sql.SQL("PORT = {}").format(sql.Literal(node.endpoint.port)))
    if with_type:
        parts.insert(0, sql.SQL("TYPE = {}").format(sql.Literal(node.kind)))
    return sql.SQL(", ").join(parts)


def alter_node(node: PgxcNode, with_type: bool = False) -> sql.Composed:
    return sql.SQL("ALTER NODE {} WITH ({})").format(sql.Identifier(node.name), _options(node, with_type))


def create_node(node: PgxcNode) -> sql.Composed:
    return sql.SQL("CREATE NODE {} WITH ({})").format(sql.Identifier(node.name), _options(node, True))


def registration(itself: str, nodes: list[PgxcNode], known: set[str]) -> list[sql.Composed]:
    """What one node (named itself) runs so that its catalog holds every node at its address:
    ALTER for the rows it has (its own, made by initdb --nodename, with the right type: XL's
    initdb records a datanode as a coordinator), CREATE for the others. Each statement is its
    own autocommit transaction; `RELOAD` follows, in the same session."""
    statements = []
    for node in nodes:
        if node.name == itself:
            statements.append(alter_node(node, with_type=True))
        elif node.name in known:
            statements.append(alter_node(node))
        else:
            statements.append(create_node(node))
    return statements


def distributed_table(datanodes: list[str], table: str = SHARDED_TABLE) -> sql.Composed:
    """The writers' table, its rows spread over the datanodes by a hash of the id."""
    check_name(table, "table name")
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT "
        "clock_timestamp()) DISTRIBUTE BY HASH (id) TO NODE ({})"
    ).format(
        sql.Identifier(table),
        sql.SQL(", ").join(sql.Identifier(check_name(name, "datanode name")) for name in datanodes),
    )


NODE_ORDER = sql.SQL(
    "SELECT n.node_name FROM (SELECT nodeoids::oid[] AS nodes FROM pgxc_class WHERE pcrelid = {}::regclass) "
    "AS c, generate_subscripts(c.nodes, 1) AS place, pgxc_node n WHERE n.oid = c.nodes[place] ORDER BY place"
)


def node_order(table: str = SHARDED_TABLE) -> sql.Composed:
    """The table's datanodes in the order its hash distribution indexes them."""
    return NODE_ORDER.format(sql.Literal(check_name(table, "table name")))


def routed_ids(flavor: str, node_index: int, node_count: int, start: int, count: int) -> sql.Composed:
    """The ids in start .. start + count - 1 that a bigint hash distribution over node_count
    datanodes sends to the one at node_index. Both hash the id with hashint8; Postgres-XL
    takes the hash as an unsigned 32-bit number modulo the node count, Postgres-XC its
    absolute value (read in their locator sources, and checked against xc_node_id by the tests)."""
    bucket = (
        sql.SQL("(hashint8(id)::bigint & 4294967295)")
        if flavor == "xl"
        else sql.SQL("abs(hashint8(id)::bigint)")
    )
    return sql.SQL(
        "SELECT id FROM generate_series({}::bigint, {}::bigint + {} - 1) AS id WHERE {} % {} = {} ORDER BY id"
    ).format(
        sql.Literal(start),
        sql.Literal(start),
        sql.Literal(count),
        bucket,
        sql.Literal(node_count),
        sql.Literal(node_index),
    )
