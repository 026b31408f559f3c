"""Asking a deployment's controller (status, events, waiting for a state) and its
PostgreSQL servers (connection strings, the demo's application role and sharded table)."""

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from xcha import pgxc_cluster
from xcha.coordinator import datanode_setup, fdw_setup
from xcha.ctl import call, find_group, get_status, new_master
from xcha.errors import XchaError
from xcha.names import Endpoint
from xcha.rpc import blocking_channel
from xcha.topology.layout import Layout
from xcha.topology.plan import APP_USER, StatusCallback
from xcha.v1 import xcha_pb2 as pb
from xcha.v1 import xcha_pb2_grpc as pb_grpc

T = TypeVar("T")


def settled(status: pb.ClusterStatus) -> bool:
    """Every group protected and every agent done with what it was doing (a standby can be
    confirming commits while its agent still finishes the Follow that started it)."""
    return all(
        g.state == "protected" and all(m.status.activity == "idle" for m in g.members) for g in status.groups
    )


def settling(on_status: StatusCallback | None = None) -> Callable[[pb.ClusterStatus], bool]:
    """`settled`, showing every status it sees to on_status first."""

    def check(status: pb.ClusterStatus) -> bool:
        if on_status is not None:
            on_status(status)
        return settled(status)

    return check


class Client(Layout):
    """Asking the controller over one kept channel, and the servers over SQL."""

    def channel(self) -> grpc.Channel:
        """One channel to the controller, kept: polling does not pay a TLS handshake a call."""
        target = self.target
        with self._channel_lock:
            if self._channel is None or self._channel[0] != target:
                if self._channel is not None:
                    self._channel[1].close()
                self._channel = (target, blocking_channel(target.address, target.tls))
            return self._channel[1]

    def close_channel(self) -> None:
        with self._channel_lock:
            if self._channel is not None:
                self._channel[1].close()
                self._channel = None

    def call(self, work: Callable[[pb_grpc.ControllerStub], T]) -> T:
        """One controller RPC over the kept channel (`xcha.ctl.call`'s errors)."""
        return call(self.target, work, self.channel())

    def status(self) -> pb.ClusterStatus:
        """The leading controller's status (a follower names the leader: asked in turn)."""
        return get_status(self.target, self.channel())

    def events(self, datanode: str = "", kind: str | None = None) -> list[pb.Event]:
        """The controller's whole event history (of one datanode), oldest first."""
        reply = self.call(
            lambda stub: stub.ListEvents(pb.EventsRequest(limit=100000, datanode=datanode), timeout=5)
        )
        return [event for event in reply.events if kind is None or event.kind == kind]

    async def wait_for(
        self, predicate: Callable[[pb.ClusterStatus], bool], timeout: float, what: str
    ) -> pb.ClusterStatus:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = await asyncio.to_thread(self.status)
                if predicate(last):
                    return last
            except XchaError:
                pass
            for key, child in self.children.items():
                if child.poll() is not None:
                    log = self.workdir / "logs" / (key.replace("agent:", "agent-") + ".log")
                    tail = (
                        "\n".join(log.read_text(errors="replace").splitlines()[-5:]) if log.exists() else ""
                    )
                    raise XchaError(f"{key} exited (code {child.returncode}), see {log}:\n{tail}")
            await asyncio.sleep(0.1)
        summary = (
            "\n".join(f"  {g.name}: {g.state}, master {g.master}: {g.reason}" for g in last.groups)
            if last
            else "  (controller not reachable)"
        )
        raise XchaError(f"timed out after {timeout:.0f} s waiting for {what}:\n{summary}")

    async def wait_protected(self, timeout: float = 90) -> pb.ClusterStatus:
        return await self.wait_for(
            lambda s: all(g.state == "protected" for g in s.groups), timeout, "every datanode to be protected"
        )

    async def wait_new_master(self, datanode: str, old: str, timeout: float = 60) -> str:
        """Until a member other than `old` is the datanode's master and the group runs again."""
        status = await self.wait_for(
            lambda s: new_master(s, datanode, old) is not None,
            timeout,
            f"a new master of {datanode} instead of {old}",
        )
        return find_group(status, datanode).master

    def group(self, datanode: str) -> pb.GroupView:
        return find_group(self.status(), datanode)

    def master(self, datanode: str) -> str:
        return self.group(datanode).master

    def app_conninfo(self, member: str) -> str:
        return self._app_conninfo(self.members[member].port, self.address(member))

    def _app_conninfo(self, port: int, host: str = "127.0.0.1") -> str:
        return make_conninfo(
            "",
            host=host,
            port=port,
            user=APP_USER,
            password=self.app_password,
            dbname="postgres",
            connect_timeout=2,
            application_name="xcha-writer",
        )

    def group_conninfos(self, datanode: str) -> list[str]:
        return [self.app_conninfo(m) for m, info in self.members.items() if info.datanode == datanode]

    def coordinator_app_conninfo(self, name: str) -> str:
        return self._app_conninfo(self.coordinator_ports[name])

    async def superuser(self, member: str) -> psycopg.AsyncConnection[tuple[object, ...]]:
        return await self.instance(member).connect()

    async def _run(
        self, conn: psycopg.AsyncConnection[tuple[object, ...]], statements: list[sql.Composed]
    ) -> None:
        for statement in statements:
            await conn.execute(statement)

    async def _app_role(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        exists = await (
            await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [APP_USER])
        ).fetchone()
        verb = "ALTER" if exists else "CREATE"
        await conn.execute(
            sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(APP_USER), sql.Literal(self.app_password)
            )
        )
        await conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(APP_USER)))

    async def setup_sharding(self) -> None:
        """The demo's sharded table: a shard on every datanode, and on every coordinator a
        hash-partitioned table over postgres_fdw foreign tables (XL / XC: the nodes registered
        with each other and a distributed table)."""
        status = self.status()
        masters = {g.name: g.master for g in status.groups}
        if self.plan.flavor != "postgresql":
            await self._setup_pgxc(masters)
            return
        for master in masters.values():
            async with await self.superuser(master) as conn:
                await self._app_role(conn)
                await self._run(conn, datanode_setup(APP_USER))
        endpoints = [
            (d.name, Endpoint(self.address(masters[d.name]), self.members[masters[d.name]].port))
            for d in self.plan.datanodes
        ]
        for name in self.plan.coordinators:
            async with await self.coordinator(name).connect() as conn:
                await self._app_role(conn)
                await self._run(conn, fdw_setup(endpoints, APP_USER, self.app_password))

    async def _setup_pgxc(self, masters: dict[str, str]) -> None:
        coordinators = {
            name: (self.coordinator_conninfo(name), Endpoint("127.0.0.1", port))
            for name, port in self.coordinator_ports.items()
        }
        datanodes = {
            datanode: (
                self.superuser_conninfo(master),
                Endpoint(self.address(master), self.members[master].port),
            )
            for datanode, master in masters.items()
        }
        await pgxc_cluster.register_cluster(self.pgxc_layout.flavor, coordinators, datanodes)
        first = self.plan.coordinators[0]
        await pgxc_cluster.create_table(
            self.coordinator_conninfo(first),
            [d.name for d in self.plan.datanodes],
            APP_USER,
            self.app_password,
        )
