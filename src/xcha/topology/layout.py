"""A deployment's layout: ports, certificates, secrets, every configuration file (written,
saved in topology.json, loaded again) and each PostgreSQL instance as its agent sees it."""

import json
import os
import secrets
import subprocess
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Self

import grpc
from psycopg.conninfo import make_conninfo

from xcha import pgxc_cluster
from xcha.agent.config import load_agent_config
from xcha.config import TlsConfig
from xcha.ctl import ControllerTarget
from xcha.errors import XchaError
from xcha.etcd_cluster import STATE_FILE as ETCD_STATE_FILE
from xcha.etcd_cluster import EtcdCluster, EtcdTls
from xcha.names import check_name
from xcha.pg.flavor import check_flavor
from xcha.pg.gtm import GtmInstance
from xcha.pg.instance import InstanceSpec, PostgresInstance
from xcha.pg.runner import OsUser, Runner, find_bindir, server_version
from xcha.pgxc_cluster import PgxcLayout
from xcha.tls import Identity, create_ca, issue
from xcha.topology.files import Tables, toml_document
from xcha.topology.plan import TOPOLOGY_FILE, DatanodePlan, MemberInfo, TopologyPlan
from xcha.topology.ports import free_port

ETCD_MEMBERS = 3  # a quorum survives one member lost


def _socket_conninfo(spec: InstanceSpec) -> str:
    return make_conninfo(
        "", host=str(spec.socket_dir), port=spec.port, user=spec.superuser, dbname="postgres"
    )


class Layout:
    """Where everything of the deployment is, and the files that say so (`Topology`'s base)."""

    def __init__(self, workdir: Path, plan: TopologyPlan | None = None, supervise: bool = False) -> None:
        """supervise: `start` leaves the controller and the agents to a supervisor process, which
        restarts them as systemd would (`xcha up`); else they are this process's children and stay
        dead when killed (the tests and benchmarks inject such faults and restart them)."""
        self.workdir = workdir
        self.plan = plan or TopologyPlan()
        self.supervise = supervise
        self.members: dict[str, MemberInfo] = {}
        self.controller_ports: dict[str, int] = {}  # by controller name
        self.controller_config = workdir / "controller" / "controller.toml"  # the first's
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
        self._etcd: EtcdCluster | None = None

    # ---- hosts ------------------------------------------------------------------------------

    def address(self, name: str) -> str:
        return self._host(name)[0]

    def netns(self, name: str) -> str:
        return self._host(name)[1]

    def _host(self, name: str) -> tuple[str, str]:
        """A controller not named in the plan's hosts runs where "controller" does."""
        hosts = self.plan.hosts
        if name not in hosts and name in self.controller_names:
            name = "controller"
        return hosts.get(name, ("127.0.0.1", ""))

    # ---- controllers ------------------------------------------------------------------------

    @property
    def controller_names(self) -> tuple[str, ...]:
        count = self.plan.controllers
        return ("controller",) if count == 1 else tuple(f"c{index}" for index in range(1, count + 1))

    @property
    def controller_port(self) -> int:
        """The first controller's port."""
        return self.controller_ports.get(self.controller_names[0], 0)

    def controller_address(self, name: str) -> str:
        return f"{self.address(name)}:{self.controller_ports[name]}"

    @property
    def controller_addresses(self) -> list[str]:
        names = [name for name in self.controller_names if name in self.controller_ports]
        return [self.controller_address(name) for name in names]

    def controller_config_of(self, name: str) -> Path:
        if self.plan.controllers == 1:
            return self.controller_config
        return self.workdir / "controller" / name / "controller.toml"

    def controller_key(self, name: str) -> str:
        """The process key: "controller", or "controller:c1" among several."""
        return "controller" if self.plan.controllers == 1 else f"controller:{name}"

    @property
    def etcd_dir(self) -> Path:
        return self.workdir / "etcd"

    def etcd(self) -> EtcdCluster:
        """The etcd cluster several controllers elect their leader on (three members)."""
        if self._etcd is None:
            if (self.etcd_dir / ETCD_STATE_FILE).exists():
                self._etcd = EtcdCluster.load(self.etcd_dir)
            else:
                tls = None
                if self.plan.tls:
                    directory = self.workdir / "tls" / "etcd"
                    tls = EtcdTls(directory / "ca.pem", directory / "etcd.pem", directory / "etcd.key")
                host, netns = self._host("etcd")
                self._etcd = EtcdCluster(self.etcd_dir, ETCD_MEMBERS, tls=tls, host=host, netns=netns)
        return self._etcd

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
        """The first controller, the others as fallbacks (a follower names the leader)."""
        first, *others = self.controller_addresses or [f"{self.address('controller')}:0"]
        return ControllerTarget(first, self.operator_tls, fallbacks=tuple(others))

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
        if self.plan.controllers not in (1, 3):
            raise XchaError(f"a deployment has 1 or 3 controllers, not {self.plan.controllers}")
        if self.plan.tls and not (self.workdir / "tls" / "ca.pem").exists():
            create_ca(self.workdir / "tls")
            self._issue(Identity("operator", "operator"))
            for name in self.controller_names:
                self._issue(Identity("controller", name))
        for name in self.controller_names:
            self.controller_ports[name] = free_port()
        if self.plan.controllers > 1:
            self._write_etcd_certificates()
        if self.plan.flavor != "postgresql":
            self.gtm_port = free_port()
        for name in self.plan.coordinators:
            check_name(name, "coordinator name")
            self.coordinator_ports[name] = free_port()
            if self.plan.flavor != "postgresql":
                self.pooler_ports[name] = free_port()
        if self.plan.metrics:
            for name in self.controller_names:
                self.metrics_ports[name] = free_port()
        for datanode in self.plan.datanodes:
            check_name(datanode.name, "datanode name")
            base = free_port(2)  # a master/standby pair on adjacent ports (5432/5433 in the specification)
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
            **(
                {"controllers": self.controller_addresses}
                if self.plan.controllers > 1
                else {"controller": self.controller_address("controller")}
            ),
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
        for name in self.controller_names:
            self._write_one_controller_config(name)

    def _write_etcd_certificates(self) -> None:
        """etcd gets a CA of its own: a certificate from the cluster's CA (an agent's, say)
        must not reach the store; only the controllers hold one from etcd's CA."""
        if not self.plan.tls:
            return
        directory = self.workdir / "tls" / "etcd"
        if (directory / "ca.pem").exists():
            return
        create_ca(directory)
        hosts = tuple(dict.fromkeys(("127.0.0.1", "localhost", self.address("etcd"))))
        issue(directory, Identity("controller", "etcd"), hosts)
        for name in self.controller_names:
            issue(directory, Identity("controller", name), ("127.0.0.1", "localhost"))

    def _store(self, name: str) -> dict[str, object]:
        etcd = self.etcd()
        store: dict[str, object] = {
            "kind": "etcd",
            "endpoints": [member.endpoint for member in etcd.members],
            "prefix": "/xcha/deployment/",  # the etcd cluster is this deployment's own
        }
        if self.plan.lease_ttl is not None:
            store["lease_ttl"] = self.plan.lease_ttl
        if self.plan.tls:
            directory = self.workdir / "tls" / "etcd"
            store.update(
                ca_file=directory / "ca.pem",
                cert_file=directory / f"{name}.pem",
                key_file=directory / f"{name}.key",
            )
        return store

    def _write_one_controller_config(self, name: str) -> None:
        plan = self.plan
        path = self.controller_config_of(name)
        controller: dict[str, object] = {
            "listen": self.controller_address(name),
            "state_dir": path.parent / "state",
            "heartbeat_interval": plan.heartbeat_interval,
            "failure_timeout": plan.failure_timeout,
            "probe_timeout": plan.probe_timeout,
            "startup_grace": plan.startup_grace,
        }
        if plan.controllers > 1:
            controller.update(name=name, peers=self.controller_addresses)
        if name in self.metrics_ports:
            controller["metrics_listen"] = f"127.0.0.1:{self.metrics_ports[name]}"
        router: dict[str, object] = {"kind": plan.router, **plan.router_settings}
        if plan.router == "pgxc" and plan.flavor != "postgresql" and plan.coordinators:
            router.setdefault("flavor", plan.flavor)
            router.setdefault("clean_command", self.clean_command(plan.coordinators[0]))
        tables: Tables = [("[controller]", controller), ("[router]", router)]
        if plan.router in ("fdw", "pgxc"):
            for coordinator in plan.coordinators:
                conninfo = self.coordinator_conninfo(coordinator)
                tables.append(("[[router.coordinator]]", {"name": coordinator, "conninfo": conninfo}))
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
        if plan.controllers > 1:
            tables.append(("[store]", self._store(name)))
        tables.append(("[tls]", self._tls(name)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(toml_document(tables))

    def save(self) -> None:
        data = {
            "controllers": self.controller_ports,
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
    def load(cls, workdir: Path, supervise: bool = False) -> Self:
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
    def _load(cls, workdir: Path, data: dict[str, Any], supervise: bool) -> Self:
        plan = data["plan"]
        plan["datanodes"] = tuple(
            DatanodePlan(**{**d, "members": tuple(d["members"]), "async_members": tuple(d["async_members"])})
            for d in plan["datanodes"]
        )
        plan["coordinators"] = tuple(plan["coordinators"])
        plan["hosts"] = {name: tuple(host) for name, host in plan.get("hosts", {}).items()}
        topology = cls(workdir, TopologyPlan(**plan), supervise)
        topology.controller_ports = {name: int(port) for name, port in data["controllers"].items()}
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
