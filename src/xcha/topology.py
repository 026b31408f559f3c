"""A whole xcha deployment on one machine, as real processes: a controller, an agent per
PostgreSQL instance (each group the specification's master/slave pair on a pair of
adjacent free ports), optional plain PostgreSQL coordinators with postgres_fdw, certificates
for mTLS, and the configuration files an operator would write. Used by `xcha up` /
`xcha down`, the demo, the tests and the benchmarks.

Every process is recorded with its PID in topology.json; stopping is by PID only.
"""

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from xcha.config import TlsConfig
from xcha.coordinator import datanode_setup, fdw_setup
from xcha.ctl import TOPOLOGY_FILE, ControllerTarget, get_status
from xcha.errors import XchaError
from xcha.names import Endpoint, check_name
from xcha.pg.instance import InstanceSpec, PostgresInstance
from xcha.pg.runner import OsUser, Runner, find_bindir, server_version
from xcha.tls import create_ca, issue
from xcha.v1 import xcha_pb2 as pb

APP_USER = "xcha_app"
Tables = list[tuple[str, dict[str, object]]]


@dataclass(frozen=True)
class DatanodePlan:
    name: str
    members: tuple[str, ...]
    synchronous: str = "FIRST 1"
    sync_policy: str = "available"
    allow_data_loss: bool = False
    async_members: tuple[str, ...] = ()


@dataclass(frozen=True)
class TopologyPlan:
    datanodes: tuple[DatanodePlan, ...] = (DatanodePlan("dn1", ("dn1a", "dn1b")),)
    router: str = "none"
    tls: bool = True
    heartbeat_interval: float = 0.25
    failure_timeout: float = 2.0
    probe_timeout: float = 0.5
    startup_grace: float | None = None
    coordinators: tuple[str, ...] = ()  # plain PostgreSQL coordinators with postgres_fdw
    metrics: bool = False
    router_settings: dict[str, object] = field(default_factory=dict)  # e.g. command = [...]
    # Where each process runs: name ("controller" or a member) -> (address, network namespace).
    # By default everything runs on 127.0.0.1 in this namespace.
    hosts: dict[str, tuple[str, str]] = field(default_factory=dict)


_handed_out: set[int] = set()


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port(count: int = 1) -> int:
    """First of `count` consecutive loopback ports that are free now and were never handed out
    by this process. They lie outside the kernel's ephemeral range: a port taken from there can
    become some client connection's local port before its server binds it."""
    ephemeral = _ephemeral_ports()
    if ephemeral.start > 25000:
        low, high = 20000, ephemeral.start - count
    else:
        low, high = ephemeral.stop, 65535 - count
    for _ in range(1000):
        start = low + secrets.randbelow(high - low + 1)
        block = range(start, start + count)
        if _handed_out.isdisjoint(block) and all(map(_bindable, block)):
            _handed_out.update(block)
            return block.start
    raise XchaError(f"no {count} free consecutive loopback port(s) found in {low}-{high}")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_document(tables: Tables) -> str:
    """[table] or [[array]] sections, in order; None values are left out."""
    lines = []
    for header, values in tables:
        lines.append(header)
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items() if value is not None)
        lines.append("")
    return "\n".join(lines)


@dataclass
class MemberInfo:
    name: str
    datanode: str
    port: int
    agent_port: int
    directory: str
    config: str


class Topology:
    def __init__(self, workdir: Path, plan: TopologyPlan | None = None) -> None:
        self.workdir = workdir
        self.plan = plan or TopologyPlan()
        self.members: dict[str, MemberInfo] = {}
        self.controller_port = 0
        self.controller_config = workdir / "controller" / "controller.toml"
        self.coordinator_ports: dict[str, int] = {}
        self.metrics_ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._runner: Runner | None = None
        self._version = 0

    # ---- hosts ------------------------------------------------------------------------------

    def address(self, name: str) -> str:
        return self.plan.hosts.get(name, ("127.0.0.1", ""))[0]

    def netns(self, name: str) -> str:
        return self.plan.hosts.get(name, ("127.0.0.1", ""))[1]

    def _issue(self, name: str) -> None:
        hosts = ("127.0.0.1", "::1", "localhost", self.address(name))
        issue(self.workdir / "tls", name, tuple(dict.fromkeys(hosts)))

    # ---- files ------------------------------------------------------------------------------

    @property
    def secrets(self) -> Path:
        return self.workdir / "secrets"

    @property
    def app_password(self) -> str:
        return (self.secrets / "app.password").read_text().strip()

    def _tls(self, name: str) -> dict[str, object]:
        if not self.plan.tls:
            return {"insecure": True}
        directory = self.workdir / "tls"
        return {
            "ca_file": directory / "ca.pem",
            "cert_file": directory / f"{name}.pem",
            "key_file": directory / f"{name}.key",
        }

    @property
    def operator_tls(self) -> TlsConfig:
        if not self.plan.tls:
            return TlsConfig(insecure=True)
        directory = self.workdir / "tls"
        return TlsConfig(directory / "ca.pem", directory / "operator.pem", directory / "operator.key")

    @property
    def target(self) -> ControllerTarget:
        return ControllerTarget(f"{self.address('controller')}:{self.controller_port}", self.operator_tls)

    def write(self) -> None:
        """Allocate ports and write certificates, secrets and every configuration file."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        self.secrets.mkdir(mode=0o700, exist_ok=True)
        for secret in ("replication.password", "app.password"):
            path = self.secrets / secret
            if not path.exists():
                path.write_text(secrets.token_hex(16) + "\n")
                path.chmod(0o600)
        # PostgreSQL (as its own OS user) reads the replication password for its passfile.
        self.runner.own(self.secrets)
        self.runner.own(self.secrets / "replication.password")
        if self.plan.tls and not (self.workdir / "tls" / "ca.pem").exists():
            create_ca(self.workdir / "tls")
            for name in ("controller", "operator"):
                self._issue(name)
        self.controller_port = free_port()
        for name in self.plan.coordinators:
            check_name(name, "coordinator name")
            self.coordinator_ports[name] = free_port()
        if self.plan.metrics:
            self.metrics_ports["controller"] = free_port()
        for datanode in self.plan.datanodes:
            check_name(datanode.name, "datanode name")
            base = free_port(2)  # the seed's 5432/5433 pair, elsewhere
            for index, member in enumerate(datanode.members):
                self.add_member(datanode.name, member, base + index if index < 2 else None)
        self._write_controller_config()
        self.save()

    def add_member(self, datanode: str, member: str, port: int | None = None) -> MemberInfo:
        """Write the agent configuration for one member (also a later one: add-standby)."""
        check_name(member)
        directory = self.workdir / datanode / member
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
        if self.plan.tls and not (self.workdir / "tls" / f"{member}.pem").exists():
            self._issue(member)
        info = MemberInfo(
            member, datanode, port or free_port(), free_port(), str(directory), str(directory / "agent.toml")
        )
        if self.plan.metrics:
            self.metrics_ports[member] = free_port()
        agent: dict[str, object] = {
            "datanode": datanode,
            "member": member,
            "listen": f"{self.address(member)}:{info.agent_port}",
            "controller": f"{self.address('controller')}:{self.controller_port}",
            "state_dir": directory,
            "probe_timeout": self.plan.probe_timeout,
        }
        if member in self.metrics_ports:
            agent["metrics_listen"] = f"{self.address(member)}:{self.metrics_ports[member]}"
        postgres: dict[str, object] = {
            "port": info.port,
            "archive_dir": self.workdir / datanode / "archive",
            "replication_password_file": self.secrets / "replication.password",
        }
        if member in self.plan.hosts:
            address = self.address(member)
            postgres.update(
                host=address,
                listen_addresses=address,
                allowed_networks=[address.rpartition(".")[0] + ".0/24"],
            )
        Path(info.config).write_text(
            toml_document([("[agent]", agent), ("[postgres]", postgres), ("[tls]", self._tls(member))])
        )
        self.members[member] = info
        return info

    def _write_controller_config(self) -> None:
        plan = self.plan
        controller: dict[str, object] = {
            "listen": f"{self.address('controller')}:{self.controller_port}",
            "state_dir": self.controller_config.parent / "state",
            "heartbeat_interval": plan.heartbeat_interval,
            "failure_timeout": plan.failure_timeout,
            "probe_timeout": plan.probe_timeout,
            "startup_grace": plan.startup_grace,
        }
        if "controller" in self.metrics_ports:
            controller["metrics_listen"] = f"127.0.0.1:{self.metrics_ports['controller']}"
        tables: Tables = [
            ("[controller]", controller),
            ("[router]", {"kind": plan.router, **plan.router_settings}),
        ]
        if plan.router in ("fdw", "pgxc"):
            for name in plan.coordinators:
                tables.append(
                    ("[[router.coordinator]]", {"name": name, "conninfo": self.coordinator_conninfo(name)})
                )
        for datanode in plan.datanodes:
            tables.append(
                (
                    "[[datanode]]",
                    {
                        "name": datanode.name,
                        "members": list(datanode.members),
                        "synchronous": datanode.synchronous,
                        "sync_policy": datanode.sync_policy,
                        "allow_data_loss": datanode.allow_data_loss,
                        "async_members": list(datanode.async_members),
                    },
                )
            )
        tables.append(("[tls]", self._tls("controller")))
        self.controller_config.parent.mkdir(parents=True, exist_ok=True)
        self.controller_config.write_text(toml_document(tables))

    def save(self) -> None:
        data = {
            "controller": f"{self.address('controller')}:{self.controller_port}",
            "controller_config": str(self.controller_config),
            "operator_tls": {
                k: str(v) if isinstance(v, Path) else v for k, v in self._tls("operator").items()
            },
            "members": {name: asdict(info) for name, info in self.members.items()},
            "coordinators": self.coordinator_ports,
            "metrics": self.metrics_ports,
            "pids": self.pids,
            "plan": asdict(self.plan),
        }
        (self.workdir / TOPOLOGY_FILE).write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, workdir: Path) -> "Topology":
        try:
            return cls._load(workdir, json.loads((workdir / TOPOLOGY_FILE).read_text()))
        except FileNotFoundError:
            raise XchaError(
                f"{workdir} holds no {TOPOLOGY_FILE}: nothing was started there by `xcha up`"
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise XchaError(
                f"{workdir / TOPOLOGY_FILE} is unreadable: {type(error).__name__}: {error}"
            ) from None

    @classmethod
    def _load(cls, workdir: Path, data: dict[str, Any]) -> "Topology":
        plan = data["plan"]
        plan["datanodes"] = tuple(
            DatanodePlan(**{**d, "members": tuple(d["members"]), "async_members": tuple(d["async_members"])})
            for d in plan["datanodes"]
        )
        plan["coordinators"] = tuple(plan["coordinators"])
        plan["hosts"] = {name: tuple(host) for name, host in plan.get("hosts", {}).items()}
        topology = cls(workdir, TopologyPlan(**plan))
        topology.controller_port = int(data["controller"].rpartition(":")[2])
        topology.members = {name: MemberInfo(**info) for name, info in data["members"].items()}
        topology.coordinator_ports = {name: int(port) for name, port in data["coordinators"].items()}
        topology.metrics_ports = {name: int(port) for name, port in data["metrics"].items()}
        topology.pids = {name: int(pid) for name, pid in data["pids"].items()}
        return topology

    # ---- PostgreSQL instances ---------------------------------------------------------------

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            bindir = find_bindir()
            self._runner = Runner(bindir, OsUser.for_postgres())
            self._version = server_version(bindir)
        return self._runner

    def instance(self, member: str) -> PostgresInstance:
        """A member's PostgreSQL as the pg layer sees it (to find and stop its processes)."""
        info = self.members[member]
        spec = InstanceSpec.under(
            Path(info.directory),
            member,
            info.port,
            self.workdir / info.datanode / "archive",
            self.secrets / "replication.password",
        )
        return PostgresInstance(spec, self.runner, self._version)

    def coordinator(self, name: str) -> PostgresInstance:
        base = self.workdir / "coordinators" / name
        spec = InstanceSpec.under(
            base, name, self.coordinator_ports[name], base / "archive", self.secrets / "replication.password"
        )
        return PostgresInstance(spec, self.runner, self._version)

    def coordinator_conninfo(self, name: str) -> str:
        """How the controller reaches a coordinator: its private socket, as the superuser."""
        socket_dir = self.workdir / "coordinators" / name / "run"
        return make_conninfo(
            "", host=str(socket_dir), port=self.coordinator_ports[name], user="postgres", dbname="postgres"
        )

    async def start_coordinators(self) -> None:
        for name in self.plan.coordinators:
            instance = self.coordinator(name)
            if instance.has_cluster():
                await instance.start()
            else:
                await instance.bootstrap_master()
            self.pids[f"coordinator:{name}"] = instance.postmaster_pid() or 0
        self.save()

    # ---- processes ------------------------------------------------------------------------------

    def _spawn(self, key: str, argv: list[str], log_name: str, netns: str = "") -> int:
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]  # it execs argv: the PID stays the same
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / log_name, "ab") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        self.children[key] = process
        self.pids[key] = process.pid
        self.save()
        return process.pid

    def start_controller(self) -> int:
        return self._spawn(
            "controller",
            [sys.executable, "-m", "xcha", "controller", "--config", str(self.controller_config)],
            "controller.log",
            self.netns("controller"),
        )

    def start_agent(self, member: str) -> int:
        return self._spawn(
            f"agent:{member}",
            [sys.executable, "-m", "xcha", "agent", "--config", self.members[member].config],
            f"agent-{member}.log",
            self.netns(member),
        )

    def start(self) -> None:
        self.start_controller()
        for member in self.members:
            self.start_agent(member)

    def alive(self, key: str) -> bool:
        pid = self.pids.get(key)
        if pid is None:
            return False
        child = self.children.get(key)
        if child is not None:
            return child.poll() is None
        try:
            with open(f"/proc/{pid}/stat") as handle:
                return handle.read().rpartition(")")[2].split()[0] not in ("Z", "X")
        except OSError:
            return False

    def signal(self, key: str, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, KeyError):
            os.kill(self.pids[key], signum)

    def _forget(self, key: str) -> None:
        child = self.children.pop(key, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)
        self.pids.pop(key, None)
        self.save()

    def stop_process(self, key: str, timeout: float = 10) -> None:
        """SIGTERM by PID, then SIGKILL if it does not exit; reaps it when it is a child."""
        if key not in self.pids:
            return
        for signum in (signal.SIGCONT, signal.SIGTERM):
            self.signal(key, signum)
        deadline = time.monotonic() + timeout
        while self.alive(key) and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.alive(key):
            self.signal(key, signal.SIGKILL)
        self._forget(key)

    def kill_process(self, key: str) -> None:
        """kill -9, as a fault: the process gets no chance to clean up."""
        self.signal(key, signal.SIGKILL)
        self._forget(key)

    def postmaster_pid(self, member: str) -> int | None:
        return self.instance(member).postmaster_pid()

    def postgres_pids(self, member: str) -> list[int]:
        return self.instance(member).processes()

    def host_signal(self, member: str, signum: int) -> list[int]:
        """A hung (SIGSTOP) or resumed (SIGCONT) host: the agent and every PostgreSQL process."""
        pids = self.postgres_pids(member)
        if f"agent:{member}" in self.pids:
            pids.append(self.pids[f"agent:{member}"])
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        return pids

    async def down(self) -> list[str]:
        """Stop everything this topology started, by PID: agents and controller first (so
        nothing restarts a server), then every PostgreSQL process of members and coordinators."""
        stopped = []
        keys = [k for k in self.pids if k.startswith("agent:")] + [k for k in self.pids if k == "controller"]
        for key in keys:
            self.stop_process(key)
            stopped.append(key)
        instances = [(f"postgres:{m}", self.instance(m)) for m in self.members]
        instances += [(f"coordinator:{c}", self.coordinator(c)) for c in self.plan.coordinators]
        for key, instance in instances:
            if instance.processes() or instance.postmaster_pid():
                await instance.kill()
                stopped.append(key)
            self.pids.pop(key, None)
        self.save()
        return stopped

    # ---- waiting and asking ------------------------------------------------------------------

    def status(self) -> pb.ClusterStatus:
        return get_status(self.target)

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

    def master(self, datanode: str) -> str:
        return next(g.master for g in self.status().groups if g.name == datanode)

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

    async def create_app_role(self, datanode: str) -> None:
        """The role clients (the writer, coordinators) use: a password over TCP."""
        async with await self.superuser(self.master(datanode)) as conn:
            await self._app_role(conn)

    async def setup_sharding(self) -> None:
        """The demo's sharded table: a shard on every datanode, and on every coordinator a
        hash-partitioned table over postgres_fdw foreign tables."""
        status = self.status()
        masters = {g.name: g.master for g in status.groups}
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
