"""A plain PostgreSQL coordinator over postgres_fdw: one foreign server per datanode, and a
hash-partitioned table whose partitions are foreign tables, so rows are sharded across the
datanodes. The `fdw` router re-points the servers after a promotion.

The statements are composed with psycopg.sql; `xcha coordinator fdw-sql` prints them for
an operator (coordinator/fdw-setup.sql is that output for the example deployment).
"""

from psycopg import sql

from xcha.names import Endpoint, check_name

SHARDED_TABLE = "xcha_writes"


def fdw_setup(
    datanodes: list[tuple[str, Endpoint]],
    user: str,
    password: str,
    table: str = SHARDED_TABLE,
    dbname: str = "postgres",
) -> list[sql.Composed]:
    """Run once on the coordinator, as a superuser."""
    check_name(user, "user name")
    check_name(table, "table name")
    statements = [sql.SQL("CREATE EXTENSION IF NOT EXISTS postgres_fdw").format()]
    for name, endpoint in datanodes:
        check_name(name, "datanode name")
        server = sql.Identifier(name)
        statements.append(
            sql.SQL(
                "CREATE SERVER {} FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host {}, port {}, dbname {})"
            ).format(server, sql.Literal(endpoint.host), sql.Literal(str(endpoint.port)), sql.Literal(dbname))
        )
        statements.append(
            sql.SQL("CREATE USER MAPPING FOR PUBLIC SERVER {} OPTIONS (user {}, password {})").format(
                server, sql.Literal(user), sql.Literal(password)
            )
        )
        statements.append(
            sql.SQL("GRANT USAGE ON FOREIGN SERVER {} TO {}").format(server, sql.Identifier(user))
        )
    statements.append(
        sql.SQL(
            "CREATE TABLE {} (id bigint NOT NULL, at timestamptz NOT NULL DEFAULT "
            "clock_timestamp()) PARTITION BY HASH (id)"
        ).format(sql.Identifier(table))
    )
    for remainder, (name, _) in enumerate(datanodes):
        statements.append(
            sql.SQL(
                "CREATE FOREIGN TABLE {} PARTITION OF {} FOR VALUES WITH (MODULUS {}, "
                "REMAINDER {}) SERVER {} OPTIONS (table_name {})"
            ).format(
                sql.Identifier(f"{table}_{name}"),
                sql.Identifier(table),
                sql.Literal(len(datanodes)),
                sql.Literal(remainder),
                sql.Identifier(name),
                sql.Literal(table),
            )
        )
    statements.append(
        sql.SQL("GRANT SELECT, INSERT ON {} TO {}").format(sql.Identifier(table), sql.Identifier(user))
    )
    return statements


def shard_table(table: str = SHARDED_TABLE) -> sql.Composed:
    """The table writes land in on a datanode: the coordinator's partition points at it, and a
    client writing to a datanode directly (the writer of the HA tests) relies on its default."""
    check_name(table, "table name")
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} "
        "(id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())"
    ).format(sql.Identifier(table))


def datanode_setup(user: str, table: str = SHARDED_TABLE) -> list[sql.Composed]:
    """Run once on each datanode's master: the shard the coordinator's partition points at."""
    return [
        shard_table(table),
        sql.SQL("GRANT SELECT, INSERT ON {} TO {}").format(sql.Identifier(table), sql.Identifier(user)),
    ]


ID_CHUNK = 200_000


def partition_ids(datanode_index: int, datanodes: int, start: int = 1, count: int = ID_CHUNK) -> sql.Composed:
    """A query for the ids in start .. start + count - 1 that the coordinator routes to one
    datanode (hash partition routing); the next chunk starts at start + count."""
    return sql.SQL(
        "SELECT id FROM generate_series({}::bigint, {}::bigint + {} - 1) AS id "
        "WHERE satisfies_hash_partition({}::regclass, {}, {}, id) ORDER BY id"
    ).format(
        sql.Literal(start),
        sql.Literal(start),
        sql.Literal(count),
        sql.Literal(SHARDED_TABLE),
        sql.Literal(datanodes),
        sql.Literal(datanode_index),
    )
