"""What a deployment is made of: its plan (datanodes, router, timings, hosts) and, once
written, each member's ports and files."""

from collections.abc import Callable
from dataclasses import dataclass, field

from xcha import timings
from xcha.v1 import xcha_pb2 as pb

APP_USER = "xcha_app"
TOPOLOGY_FILE = "topology.json"
StatusCallback = Callable[[pb.ClusterStatus], None]


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
    # Several controllers (one leads, elected on a three-member etcd cluster started with them)
    # or one with its SQLite store.
    controllers: int = 1
    lease_ttl: float | None = None  # the leader lease (etcd); None: the store's default
    # Where each process runs: name ("controller" or a member) -> (address, network namespace).
    # By default everything runs on 127.0.0.1 in this namespace.
    hosts: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass
class MemberInfo:
    name: str
    datanode: str
    port: int
    agent_port: int
    directory: str
    config: str
