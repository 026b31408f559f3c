"""One kept connection per coordinator, in autocommit, every statement bounded.

Kept, because re-pointing on an open session takes a few milliseconds where a new
connection with SCRAM authentication takes tens; bounded, because a coordinator that hangs
must not hold the barrier's other coordinators or the controller (see xcha.pg.client).
"""

from collections.abc import Sequence

from psycopg import sql

from xcha.pg.client import Conn, bounded, close, connect

Query = str | sql.Composable


class CoordinatorSession:
    def __init__(self, conninfo: str, timeout: float) -> None:
        self.conninfo = conninfo
        self.timeout = timeout
        self._conn: Conn | None = None

    async def connection(self) -> Conn:
        if self._conn is None or self._conn.closed:
            self._conn = await connect(
                self.conninfo, self.timeout, autocommit=True, application_name="xcha-controller"
            )
        return self._conn

    async def run(self, query: Query, params: Sequence[object] | None = None) -> list[tuple[object, ...]]:
        """One autocommit statement on the kept session; any failure drops the session."""
        conn = await self.connection()
        try:
            cursor = await bounded(conn, conn.execute(query, params), self.timeout)  # type: ignore[arg-type]
            return await cursor.fetchall() if cursor.description else []
        except BaseException:
            await self.close()
            raise

    def as_string(self, query: sql.Composable) -> str:
        assert self._conn is not None
        return query.as_string(self._conn)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await close(conn)
