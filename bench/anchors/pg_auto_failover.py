"""pg_auto_failover 2 from the Debian packages: a monitor and two nodes with its defaults
(`pg_autoctl create monitor`, `pg_autoctl create postgres` twice, `pg_autoctl run` for each).

One deviation from the defaults, unrelated to failure handling: pg_autoctl sizes shared_buffers
from the machine's memory (a quarter of it, several GiB per instance); the bench sets
PostgreSQL's default 128MB on the three instances so that they fit beside everything else.
"""

import asyncio
import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from xcha.pg.client import connect
from xcha.pg.runner import server_version
from xcha.topology import free_port

from . import Anchor, AnchorUnavailable

SHARED_BUFFERS = "128MB"
PG_AUTOCTL = "/usr/bin/pg_autoctl"


def _pg_autoctl_version() -> str | None:
    program = shutil.which("pg_autoctl") or PG_AUTOCTL
    if not Path(program).exists():
        return None
    result = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=60)
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout else None


def ensure_installed(major: int) -> str:
    """pg_autoctl and the pgautofailover extension for this PostgreSQL major version (apt)."""
    control = Path(f"/usr/share/postgresql/{major}/extension/pgautofailover.control")
    version = _pg_autoctl_version()
    if version and control.exists():
        return version
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise AnchorUnavailable(
            f"pg_autoctl is not installed and cannot be (needs root and apt-get): "
            f"apt-get install postgresql-{major}-auto-failover pg-auto-failover-cli"
        )
    packages = [f"postgresql-{major}-auto-failover", "pg-auto-failover-cli"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", *packages]
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=900)
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    version = _pg_autoctl_version()
    if result.returncode != 0 or not version or not control.exists():
        tail = (result.stdout + result.stderr).strip()[-500:]
        raise AnchorUnavailable(f"apt-get install {' '.join(packages)} failed: {tail}")
    return version


class PgAutoFailover(Anchor):
    system = "pg_auto_failover"

    def __init__(self, keep: bool = False) -> None:
        super().__init__(keep)
        self.procs.env.update(
            XDG_CONFIG_HOME=str(self.base / "config"),
            XDG_DATA_HOME=str(self.base / "share"),
            XDG_RUNTIME_DIR=str(self.base / "run"),
        )
        self.monitor_port = 0
        self.version = ""
        self.monitor_settings: dict[str, str] = {}

    def data_dir(self, node: str) -> Path:
        return self.base / node

    def manager_keys(self, node: str) -> list[str]:
        return [f"pg_autoctl:{node}"]

    def settings(self) -> dict[str, object]:
        return {
            "version": self.version,
            "topology": "monitor + 2 nodes, defaults, --auth trust --no-ssl on 127.0.0.1",
            "monitor_settings": self.monitor_settings,
            "shared_buffers": SHARED_BUFFERS,
        }

    async def install(self) -> str:
        self.version = await asyncio.to_thread(ensure_installed, server_version(self.bindir) // 10000)
        return self.version

    @property
    def monitor_uri(self) -> str:
        return f"postgres://autoctl_node@127.0.0.1:{self.monitor_port}/pg_auto_failover?sslmode=disable"

    def _common(self, pgdata: Path, port: int) -> list[str]:
        return [
            "--pgdata",
            str(pgdata),
            "--pgport",
            str(port),
            "--hostname",
            "127.0.0.1",
            "--auth",
            "trust",
            "--no-ssl",
            "--pgctl",
            str(self.bindir / "pg_ctl"),
        ]

    def _small_buffers(self, pgdata: Path) -> None:
        with open(pgdata / "postgresql.conf", "a") as handle:
            handle.write(
                "\n# xcha bench: PostgreSQL's default, not a quarter of RAM\n"
                f"shared_buffers = '{SHARED_BUFFERS}'\n"
            )

    def _run(self, name: str) -> None:
        self.procs.spawn(
            f"pg_autoctl:{name}",
            [PG_AUTOCTL, "run", "--pgdata", str(self.data_dir(name))],
            self.base / f"{name}.log",
        )

    async def start(self, timeout: float) -> None:
        for directory in ("config", "share", "run"):
            (self.base / directory).mkdir(mode=0o700)
            os.chown(self.base / directory, self.user.uid, self.user.gid)
        self.monitor_port = free_port()
        for node in self.nodes:
            self.ports[node] = free_port()
        monitor = self.data_dir("monitor")
        await self.procs.run(
            [PG_AUTOCTL, "create", "monitor", *self._common(monitor, self.monitor_port)],
            self.base / "create.log",
            timeout,
        )
        self._small_buffers(monitor)
        self._run("monitor")
        await self._wait_monitor(timeout)
        for index, node in enumerate(self.nodes):
            pgdata = self.data_dir(node)
            await self.procs.run(
                [
                    PG_AUTOCTL,
                    "create",
                    "postgres",
                    *self._common(pgdata, self.ports[node]),
                    "--name",
                    node,
                    "--monitor",
                    self.monitor_uri,
                ],
                self.base / "create.log",
                timeout,
            )
            if index == 0:  # the second node's files are a base backup of the first's
                self._small_buffers(pgdata)
            self._run(node)
        await self.wait_healthy(timeout)
        with contextlib.suppress(Exception):
            rows = await self._monitor(
                "SELECT name, setting || coalesce(unit, '') FROM pg_settings "
                "WHERE name LIKE 'pgautofailover.%' ORDER BY name"
            )
            self.monitor_settings = {str(name).removeprefix("pgautofailover."): str(v) for name, v in rows}
            rows = await self._monitor(
                "SELECT 'number_sync_standbys', number_sync_standbys::text FROM pgautofailover.formation "
                "WHERE formationid = 'default'"
            )
            self.monitor_settings.update({str(k): str(v) for k, v in rows})

    async def _wait_monitor(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            with contextlib.suppress(Exception):
                await self._monitor("SELECT 1")
                return
            if self.procs.exited():
                raise AnchorUnavailable(f"the monitor exited (logs in {self.base})")
            await asyncio.sleep(0.3)
        raise AnchorUnavailable(f"the monitor did not answer within {timeout:.0f} s (logs in {self.base})")

    async def _monitor(self, statement: str) -> list[tuple[object, ...]]:
        conninfo = make_conninfo(
            "", host="127.0.0.1", port=self.monitor_port, user="autoctl_node", dbname="pg_auto_failover"
        )
        conn = await connect(conninfo, 2.0, autocommit=True)
        async with conn:
            cursor = await asyncio.wait_for(conn.execute(statement), 2.0)
            return await cursor.fetchall()

    async def states(self) -> dict[str, tuple[str, str]]:
        """node -> (reported state, goal state), as the monitor has them."""
        try:
            rows = await self._monitor("SELECT nodename, reportedstate, goalstate FROM pgautofailover.node")
        except (psycopg.Error, OSError, TimeoutError) as error:
            raise ConnectionError(f"monitor: {error}") from error
        return {str(name): (str(reported), str(goal)) for name, reported, goal in rows}

    async def roles(self) -> dict[str, str]:
        roles = {}
        for node, (reported, goal) in (await self.states()).items():
            if reported == goal == "primary":
                roles[node] = "primary"
            elif reported == goal == "wait_primary":
                roles[node] = "primary (wait_primary: no standby)"
            elif reported == goal == "secondary":
                roles[node] = "sync standby"
            else:
                roles[node] = reported if reported == goal else f"{reported} -> {goal}"
        return roles
