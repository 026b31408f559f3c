"""A whole xcha deployment on one machine, as real processes: a controller, an agent per
PostgreSQL instance (each group the specification's master/slave pair on a pair of
adjacent free ports), optional plain PostgreSQL coordinators with postgres_fdw, certificates
for mTLS, and the configuration files an operator would write. Used by `xcha up` /
`xcha down`, the demo, the tests and the benchmarks.

Every process is recorded with its PID in topology.json; stopping is by PID only. A
supervised topology (`xcha up`) starts a supervisor instead of the controller and the agents:
it runs and restarts them and records their PIDs in its own status file (`xcha.supervisor`).
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
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from xcha import pgxc_cluster, timings
from xcha.agent.config import load_agent_config
from xcha.config import TlsConfig
from xcha.coordinator import datanode_setup, fdw_setup
from xcha.ctl import ControllerTarget, call, find_group, new_master
from xcha.errors import XchaError
from xcha.names import Endpoint, check_name
from xcha.pg.flavor import check_flavor
from xcha.pg.gtm import GtmInstance
from xcha.pg.instance import InstanceSpec, PostgresInstance
from xcha.pg.runner import OsUser, Runner, find_bindir, server_version
from xcha.pgxc_cluster import PgxcLayout
from xcha.rpc import blocking_channel
from xcha.supervisor import Program, SupervisorStatus, read_status
from xcha.tls import Identity, create_ca, issue
from xcha.v1 import xcha_pb2 as pb
from xcha.v1 import xcha_pb2_grpc as pb_grpc

APP_USER = "xcha_app"
TOPOLOGY_FILE = "topology.json"
Tables = list[tuple[str, dict[str, object]]]
StatusCallback = Callable[[pb.ClusterStatus], None]
T = TypeVar("T")


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
    heartbeat_interval: float = timings.HEARTBEAT_INTERVAL
    failure_timeout: float = timings.FAILURE_TIMEOUT
    probe_timeout: float = timings.PROBE_TIMEOUT
    startup_grace: float | None = None
    # Coordinators: plain PostgreSQL with postgres_fdw, or (flavor xl/xc) the cluster's own.
    coordinators: tuple[str, ...] = ()
    flavor: str = "postgresql"  # xl or xc: a Postgres-XL / XC cluster with a GTM (xcha.pgxc_cluster)
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


@dataclass
class MemberInfo:
    name: str
    datanode: str
    port: int
    agent_port: int
    directory: str
    config: str


def _socket_conninfo(spec: InstanceSpec) -> str:
    return make_conninfo(
        "", host=str(spec.socket_dir), port=spec.port, user=spec.superuser, dbname="postgres"
    )


class Topology:
    def __init__(self, workdir: Path, plan: TopologyPlan | None = None, supervise: bool = False) -> None:
        """supervise: `start` leaves the controller and the agents to a supervisor process, which
        restarts them as systemd would (`xcha up`); else they are this process's children and stay
        dead when killed (the tests and benchmarks inject such faults and restart them)."""
        self.workdir = workdir
        self.plan = plan or TopologyPlan()
        self.supervise = supervise
        self.members: dict[str, MemberInfo] = {}
        self.controller_port = 0
        self.controller_config = workdir / "controller" / "controller.toml"
        self.coordinator_ports: dict[str, int] = {}
        self.metrics_ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._runner: Runner | None = None
        self.gtm_port = 0
        self.pooler_ports: dict[str, int] = {}  # XL / XC: per member and coordinator
        self._version = 0
        self._specs: dict[str, InstanceSpec] = {}  # each member's, as its agent.toml says
        self._channel: tuple[ControllerTarget, grpc.Channel] | None = None  # kept for polling
        self._channel_lock = threading.Lock()

    # ---- hosts ------------------------------------------------------------------------------

    def address(self, name: str) -> str:
        return self.plan.hosts.get(name, ("127.0.0.1", ""))[0]

    def netns(self, name: str) -> str:
        return self.plan.hosts.get(name, ("127.0.0.1", ""))[1]

    def _issue(self, identity: Identity) -> None:
        hosts = ("127.0.0.1", "::1", "localhost", self.address(identity.name))
        issue(self.workdir / "tls", identity, tuple(dict.fromkeys(hosts)))

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
            for role in ("controller", "operator"):
                self._issue(Identity(role, role))
        self.controller_port = free_port()
        if self.plan.flavor != "postgresql":
            self.gtm_port = free_port()
        for name in self.plan.coordinators:
            check_name(name, "coordinator name")
            self.coordinator_ports[name] = free_port()
            if self.plan.flavor != "postgresql":
                self.pooler_ports[name] = free_port()
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
            self._issue(Identity("agent", member, datanode))
        info = MemberInfo(
            member, datanode, port or free_port(), free_port(), str(directory), str(directory / "agent.toml")
        )
        self._specs.pop(member, None)
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
        if self.plan.flavor != "postgresql":
            self.pooler_ports[member] = free_port()
            settings = self.pgxc_layout.settings(member, datanode, "datanode")
            postgres.update(
                flavor=settings.flavor,
                bindir=self.runner.bindir,
                node_name=settings.node_name,
                pooler_port=settings.pooler_port,
                gtm_host=settings.gtm_host,
                gtm_port=settings.gtm_port,
                coordinator_networks=list(settings.coordinator_networks),
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
        router: dict[str, object] = {"kind": plan.router, **plan.router_settings}
        if plan.router == "pgxc" and plan.flavor != "postgresql" and plan.coordinators:
            router.setdefault("flavor", plan.flavor)
            router.setdefault("clean_command", self.clean_command(plan.coordinators[0]))
        tables: Tables = [("[controller]", controller), ("[router]", router)]
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
            "members": {name: asdict(info) for name, info in self.members.items()},
            "coordinators": self.coordinator_ports,
            "metrics": self.metrics_ports,
            "pids": self.pids,
            "plan": asdict(self.plan),
            "gtm_port": self.gtm_port,
            "pooler_ports": self.pooler_ports,
        }
        # Replaced at once: a supervisor starting meanwhile reads it.
        temporary = self.workdir / f".{TOPOLOGY_FILE}.{os.getpid()}"
        temporary.write_text(json.dumps(data, indent=2))
        os.replace(temporary, self.workdir / TOPOLOGY_FILE)

    @classmethod
    def load(cls, workdir: Path, supervise: bool = False) -> "Topology":
        try:
            return cls._load(workdir, json.loads((workdir / TOPOLOGY_FILE).read_text()), supervise)
        except FileNotFoundError:
            raise XchaError(
                f"{workdir} holds no {TOPOLOGY_FILE}: nothing was started there by `xcha up`"
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise XchaError(
                f"{workdir / TOPOLOGY_FILE} is unreadable: {type(error).__name__}: {error}"
            ) from None

    @classmethod
    def _load(cls, workdir: Path, data: dict[str, Any], supervise: bool) -> "Topology":
        plan = data["plan"]
        plan["datanodes"] = tuple(
            DatanodePlan(**{**d, "members": tuple(d["members"]), "async_members": tuple(d["async_members"])})
            for d in plan["datanodes"]
        )
        plan["coordinators"] = tuple(plan["coordinators"])
        plan["hosts"] = {name: tuple(host) for name, host in plan.get("hosts", {}).items()}
        topology = cls(workdir, TopologyPlan(**plan), supervise)
        topology.controller_port = int(data["controller"].rpartition(":")[2])
        topology.members = {name: MemberInfo(**info) for name, info in data["members"].items()}
        topology.coordinator_ports = {name: int(port) for name, port in data["coordinators"].items()}
        topology.metrics_ports = {name: int(port) for name, port in data["metrics"].items()}
        topology.pids = {name: int(pid) for name, pid in data["pids"].items()}
        topology.gtm_port = int(data.get("gtm_port", 0))
        topology.pooler_ports = {name: int(port) for name, port in data.get("pooler_ports", {}).items()}
        return topology

    # ---- PostgreSQL instances ---------------------------------------------------------------

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            flavor = check_flavor(self.plan.flavor)
            bindir = find_bindir(flavor=flavor)
            self._runner = Runner(bindir, OsUser.for_postgres())
            self._version = server_version(bindir, flavor)
        return self._runner

    @property
    def pgxc_layout(self) -> PgxcLayout:
        """The GTM and pooler ports of an XL / XC deployment."""
        if self.plan.flavor not in ("xl", "xc"):
            raise XchaError(f"a {self.plan.flavor} deployment has no GTM or poolers")
        return PgxcLayout(self.plan.flavor, self.gtm_port, self.pooler_ports)  # type: ignore[arg-type]

    def member_spec(self, member: str) -> InstanceSpec:
        """The member's instance as its agent sees it: read from the agent.toml written for it."""
        spec = self._specs.get(member)
        if spec is None:
            spec = load_agent_config(Path(self.members[member].config)).postgres.instance_spec(member)
            self._specs[member] = spec
        return spec

    def coordinator_spec(self, name: str) -> InstanceSpec:
        """A coordinator has no configuration file: this topology alone lays it out."""
        base = self.workdir / "coordinators" / name
        pgxc = (
            self.pgxc_layout.settings(name, name, "coordinator") if self.plan.flavor != "postgresql" else None
        )
        return InstanceSpec.under(
            base,
            name,
            self.coordinator_ports[name],
            base / "archive",
            self.secrets / "replication.password",
            pgxc=pgxc,
        )

    def instance(self, member: str) -> PostgresInstance:
        """A member's PostgreSQL as the pg layer sees it (to find and stop its processes)."""
        return PostgresInstance(self.member_spec(member), self.runner, self._version)

    def coordinator(self, name: str) -> PostgresInstance:
        return PostgresInstance(self.coordinator_spec(name), self.runner, self._version)

    def _to_stop(self, spec: InstanceSpec) -> PostgresInstance:
        """Enough of an instance to find its processes (by data directory) and SIGKILL them: that
        runs no PostgreSQL program, so `xcha down` needs neither the bindir nor the version probe
        (a runner that was never needed points at no bindir and fails if asked to run one)."""
        return PostgresInstance(spec, self._to_stop_runner(), self._version)

    def _to_stop_runner(self) -> Runner:
        return self._runner or Runner(Path("/nonexistent/bindir"), OsUser.for_postgres())

    def coordinator_conninfo(self, name: str) -> str:
        """How the controller reaches a coordinator: its private socket, as the superuser."""
        return _socket_conninfo(self.coordinator_spec(name))

    def clean_command(self, coordinator: str) -> list[str]:
        """`pgxc_clean -a` against a coordinator: resolves the prepared (two-phase) transactions
        a crash left in doubt, in every database."""
        spec = self.coordinator_spec(coordinator)
        return [
            str(self.runner.bindir / "pgxc_clean"),
            "-a",
            "-w",
            "-h",
            str(spec.socket_dir),
            "-p",
            str(spec.port),
            "-U",
            spec.superuser,
        ]

    def superuser_conninfo(self, member: str) -> str:
        return _socket_conninfo(self.member_spec(member))

    def gtm(self) -> GtmInstance:
        return pgxc_cluster.gtm(self.workdir, self.pgxc_layout, self._to_stop_runner())

    async def start_gtm(self) -> None:
        """XL / XC: the GTM, before any node (none starts without it)."""
        if self.gtm_port:
            gtm = pgxc_cluster.gtm(self.workdir, self.pgxc_layout, self.runner)
            await pgxc_cluster.start_gtm(gtm)
            self.pids["gtm"] = gtm.pid() or 0
            self.save()

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

    def _program(self, argv: list[str], log: str, netns: str = "") -> Program:
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]  # it execs argv: the PID stays the same
        return Program(tuple(argv), log)

    def programs(self) -> dict[str, Program]:
        """The controller and an agent per member, by key, as they run (also supervised)."""
        xcha = [sys.executable, "-m", "xcha"]
        programs = {
            "controller": self._program(
                [*xcha, "controller", "--config", str(self.controller_config)],
                "controller.log",
                self.netns("controller"),
            )
        }
        for member, info in self.members.items():
            programs[f"agent:{member}"] = self._program(
                [*xcha, "agent", "--config", info.config], f"agent-{member}.log", self.netns(member)
            )
        return programs

    @property
    def supervisor_program(self) -> Program:
        return Program(
            (sys.executable, "-m", "xcha", "supervise", "--workdir", str(self.workdir.absolute())),
            "supervisor.log",
        )

    def _spawn(self, key: str, program: Program) -> int:
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / program.log, "ab") as log:
            process = subprocess.Popen(
                program.argv,
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
        return self._spawn("controller", self.programs()["controller"])

    def start_agent(self, member: str) -> int:
        return self._spawn(f"agent:{member}", self.programs()[f"agent:{member}"])

    def start(self) -> None:
        """The controller and the agents, or (supervise) the supervisor that runs them."""
        if self.supervise:
            self._spawn("supervisor", self.supervisor_program)
            return
        self.start_controller()
        for member in self.members:
            self.start_agent(member)

    def supervisor_status(self) -> SupervisorStatus | None:
        return read_status(self.workdir)

    def supervised(self) -> dict[str, int]:
        """Key -> PID of what the supervisor's status file says runs, checked against each PID's
        command line (the file may be older than a PID's reuse)."""
        status = self.supervisor_status()
        programs = self.programs()
        return {
            key: process.pid
            for key, process in (status.processes.items() if status else ())
            if key in programs and process.pid and programs[key].runs_as(process.pid)
        }

    async def start_missing(self, timeout: float = 60) -> tuple[list[str], list[str]]:
        """`xcha up` on a deployment that partly runs: a supervisor unless one runs (it adopts the
        controller and agents still running and starts the others) and the stopped coordinators.
        Returns (started, already running), by key."""
        started: list[str] = []
        running: list[str] = []
        if self.gtm_port:
            (running if self.gtm().pid() else started).append("gtm")
            await self.start_gtm()
        if self.alive("supervisor"):
            running.append("supervisor")
            status = self.supervisor_status()
            for key, process in status.processes.items() if status else ():
                running.append(key if process.pid else f"{key} (restart pending)")
        else:
            self._spawn("supervisor", self.supervisor_program)
            status = await self._supervisor_started(timeout)
            started.append("supervisor")
            for key, process in status.processes.items():
                (running if process.adopted else started).append(key)
        for name in self.plan.coordinators:
            (running if self.coordinator(name).postmaster_pid() else started).append(f"coordinator:{name}")
        await self.start_coordinators()  # those running are left as they are
        return started, running

    async def _supervisor_started(self, timeout: float) -> SupervisorStatus:
        """The first status the supervisor just started writes (what it adopted, what it started)."""
        child = self.children["supervisor"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.supervisor_status()
            if status is not None and status.pid == child.pid:
                return status
            if child.poll() is not None:
                break
            await asyncio.sleep(0.05)
        self._reap("supervisor")
        log = self.workdir / "logs" / self.supervisor_program.log
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:]) if log.exists() else ""
        raise XchaError(f"the supervisor wrote no status within {timeout:.0f} s, see {log}:\n{tail}")

    async def up(
        self, on_status: StatusCallback | None = None, timeout: float = 120, fresh: bool = True
    ) -> pb.ClusterStatus:
        """The whole start: (fresh) write every file, start the controller and the agents (or the
        supervisor that runs them) and the coordinators, wait until every group is protected and
        every agent idle, then (fresh) create the application role and the sharded table. If any
        step fails or is interrupted, everything started is stopped before the error goes on."""
        try:
            if fresh:
                self.write()
            await self.start_gtm()
            self.start()
            await self.start_coordinators()
            status = await self.wait_for(settling(on_status), timeout, "every datanode to be protected")
            if fresh:
                await self.setup_sharding()
        except BaseException:
            await self.down()
            raise
        return status

    def alive(self, key: str) -> bool:
        pid = self.pids.get(key)
        if pid is None:
            return False
        child = self.children.get(key)
        if child is not None:
            return child.poll() is None
        if key == "supervisor":  # `xcha up` starts another unless this one runs: no PID reuse
            return self.supervisor_program.runs_as(pid)
        try:
            with open(f"/proc/{pid}/stat") as handle:
                return handle.read().rpartition(")")[2].split()[0] not in ("Z", "X")
        except OSError:
            return False

    def signal(self, key: str, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, KeyError):
            os.kill(self.pids[key], signum)

    def _reap(self, key: str) -> None:
        """Forget a process that was told to end (reaped when it is a child); not saved."""
        child = self.children.pop(key, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)
        self.pids.pop(key, None)

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
        self._reap(key)
        self.save()

    def kill_process(self, key: str) -> None:
        """kill -9, as a fault: the process gets no chance to clean up."""
        self.signal(key, signal.SIGKILL)
        self._reap(key)
        self.save()

    async def _stop_all(self, keys: list[str], timeout: float) -> None:
        """SIGTERM to every one at once, then one deadline for all; SIGKILL for stragglers."""
        for key in keys:
            for signum in (signal.SIGCONT, signal.SIGTERM):
                self.signal(key, signum)
        deadline = time.monotonic() + timeout
        while any(self.alive(key) for key in keys) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for key in keys:
            if self.alive(key):
                self.signal(key, signal.SIGKILL)
            self._reap(key)

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

    async def down(self, timeout: float = 10) -> list[str]:
        """Stop everything this topology started, by PID: the supervisor first (so nothing is
        restarted; it stops what it runs), then what a killed supervisor left running, agents
        and controller (so nothing restarts a server), then every PostgreSQL process of members
        and coordinators."""
        self.close_channel()
        stopped = []
        if "supervisor" in self.pids:
            stopped = ["supervisor", *self.supervised()]
            # Its own deadline for its processes is 10 s, then SIGKILL (`xcha.supervisor`).
            await self._stop_all(["supervisor"], max(timeout, 10) + 6)
        self.pids.update(self.supervised())
        daemons = [k for k in self.pids if k.startswith("agent:") or k == "controller"]
        await self._stop_all(daemons, timeout)
        instances = [(f"postgres:{m}", self._to_stop(self.member_spec(m))) for m in self.members]
        instances += [  # those written so far (a start that failed early has none)
            (f"coordinator:{c}", self._to_stop(self.coordinator_spec(c))) for c in self.coordinator_ports
        ]
        running = [(key, i) for key, i in instances if i.processes() or i.postmaster_pid()]
        await asyncio.gather(*(instance.kill() for _, instance in running))
        gtm = ["gtm"] if self.gtm_port and self.gtm().pid() is not None else []
        if gtm:  # after every node that uses it
            await self.gtm().kill()
        self.pids.pop("gtm", None)
        for name in self.coordinator_ports:
            self.pids.pop(f"coordinator:{name}", None)
        if self.workdir.is_dir():  # else nothing was written, nor started
            self.save()
        return list(dict.fromkeys(stopped + daemons)) + [key for key, _ in running] + gtm

    # ---- waiting and asking ------------------------------------------------------------------

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
        status: pb.ClusterStatus = self.call(
            lambda stub: stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=5)
        )
        return status

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
