"""agent.toml: one agent beside one PostgreSQL instance."""

from dataclasses import dataclass
from pathlib import Path

from xcha import timings
from xcha.config import LOG_FORMATS, ConfigError, Problems, Section, TlsConfig, read_toml
from xcha.errors import InvalidInput
from xcha.names import check_host
from xcha.pg.flavor import FLAVORS, Flavor, PgxcSettings
from xcha.pg.instance import InstanceSpec
from xcha.pg.render import AuthMethod

PGXC_KEYS = ("node_name", "pooler_port", "gtm_host", "gtm_port", "coordinator_networks")


@dataclass(frozen=True)
class PostgresConfig:
    data_dir: Path
    port: int
    archive_dir: Path
    replication_password_file: Path
    socket_dir: Path
    log_file: Path
    passfile: Path
    host: str
    listen_addresses: str
    replication_user: str
    auth: AuthMethod
    allowed_networks: tuple[str, ...]
    bindir: Path | None
    run_as: str | None
    # postgresql, or an XL / XC datanode with the settings below (None for postgresql).
    flavor: Flavor = "postgresql"
    node_name: str | None = None  # --nodename / pgxc_node_name: the datanode's name
    pooler_port: int | None = None
    gtm_host: str | None = None
    gtm_port: int | None = None
    coordinator_networks: tuple[str, ...] = ()

    @property
    def pgxc(self) -> PgxcSettings | None:
        if self.flavor == "postgresql":
            return None
        assert self.node_name and self.pooler_port and self.gtm_host and self.gtm_port
        return PgxcSettings(
            flavor=self.flavor,
            node_name=self.node_name,
            pooler_port=self.pooler_port,
            gtm_host=self.gtm_host,
            gtm_port=self.gtm_port,
            coordinator_networks=self.coordinator_networks,
        )

    def instance_spec(self, member: str) -> InstanceSpec:
        return InstanceSpec(
            name=member,
            data_dir=self.data_dir,
            port=self.port,
            archive_dir=self.archive_dir,
            socket_dir=self.socket_dir,
            log_file=self.log_file,
            password_file=self.replication_password_file,
            passfile=self.passfile,
            host=self.host,
            listen_addresses=self.listen_addresses,
            replication_user=self.replication_user,
            auth=self.auth,
            allowed_networks=self.allowed_networks,
            pgxc=self.pgxc,
        )


@dataclass(frozen=True)
class AgentConfig:
    datanode: str
    member: str
    listen: str
    advertise: str
    controller: str
    state_dir: Path
    watch_interval: float
    probe_timeout: float
    metrics_listen: str | None
    log_format: str
    postgres: PostgresConfig
    tls: TlsConfig
    # Every controller's address (several on an etcd store): heartbeats go to the leader.
    controllers: tuple[str, ...] = ()

    @property
    def controller_addresses(self) -> tuple[str, ...]:
        return self.controllers or (self.controller,)


def load_agent_config(path: Path) -> AgentConfig:
    problems = Problems()
    root = Section(read_toml(path), "", problems)
    agent = root.table("agent")
    datanode = agent.name("datanode")
    member = agent.name("member")
    listen = agent.address("listen", listen=True)
    advertise = agent.address("advertise", None) or listen
    controllers = agent.addresses("controllers", "controller address")
    if controllers and "controller" in agent.data:
        agent.address("controller")  # a known key, checked, but one of the two only
        problems.add("agent.controller", "give controller or controllers, not both")
    controller = controllers[0] if controllers else agent.address("controller")
    state_dir = agent.path("state_dir")
    watch_interval = agent.number("watch_interval", timings.WATCH_INTERVAL, minimum=0.005, maximum=1.0)
    probe_timeout = agent.number("probe_timeout", timings.PROBE_TIMEOUT, minimum=0.05, maximum=10.0)
    metrics_listen = agent.optional_address("metrics_listen")
    log_format = agent.choice("log_format", LOG_FORMATS, "text")
    if isinstance(advertise, str) and advertise.endswith(":0"):
        problems.add("agent.advertise", "needs the port the controller can reach (listen uses port 0)")
    agent.finish()

    pg = root.table("postgres")
    # Defaults under state_dir; an unusable state_dir is reported once, under its own key.
    base = state_dir if isinstance(state_dir, Path) and state_dir.is_absolute() else Path("/var/lib/xcha")
    data_dir = pg.path("data_dir", base / "data")
    pgxc = _pgxc_settings(pg, datanode)
    postgres = PostgresConfig(
        data_dir=data_dir,
        port=pg.integer("port", 5432, minimum=1, maximum=65535),
        archive_dir=pg.path("archive_dir"),
        replication_password_file=pg.path("replication_password_file"),
        socket_dir=pg.path("socket_dir", base / "run"),
        log_file=pg.path("log_file", base / "postgresql.log"),
        passfile=pg.path("passfile", base / "pgpass"),
        host=pg.text("host", "127.0.0.1", check_host),
        listen_addresses=pg.text("listen_addresses", "127.0.0.1"),
        replication_user=pg.name("replication_user", "xcha_repl"),
        auth=pg.choice("auth", ("scram-sha-256", "trust"), "scram-sha-256"),  # type: ignore[arg-type]
        allowed_networks=pg.strings("allowed_networks", []),
        bindir=pg.optional_path("bindir"),
        run_as=pg.text("run_as", "") or None,
        **pgxc,  # type: ignore[arg-type]
    )
    if postgres.pooler_port is not None and postgres.pooler_port == postgres.port:
        problems.add("postgres.pooler_port", f"must differ from postgres.port ({postgres.port})")
    pg.finish()
    if (
        isinstance(postgres.replication_password_file, Path)
        and not postgres.replication_password_file.is_file()
    ):
        problems.add(
            "postgres.replication_password_file", f"{postgres.replication_password_file} does not exist"
        )
    tls = TlsConfig.load(root.table("tls"))
    root.finish()
    if problems.items:
        raise ConfigError(str(path), problems.items)
    try:
        postgres.instance_spec(member)
    except Exception as error:
        raise ConfigError(str(path), [("postgres", str(error))]) from None
    return AgentConfig(
        datanode,
        member,
        listen,
        advertise,
        controller,
        state_dir,
        watch_interval,
        probe_timeout,
        metrics_listen,
        log_format,
        postgres,
        tls,
        controllers,
    )


def _pgxc_settings(pg: Section, datanode: str) -> dict[str, object]:
    """[postgres] flavor and, for xl / xc, what an XL/XC datanode needs: node_name (default:
    the agent's datanode, which a master and its standbys share), pooler_port and gtm_port
    (required), gtm_host (default 127.0.0.1), coordinator_networks (default none)."""
    flavor = pg.choice("flavor", FLAVORS, "postgresql")
    if flavor == "postgresql":
        for key in PGXC_KEYS:
            if key in pg.data:
                pg.used.add(key)
                pg.problems.add(pg.key(key), 'is for flavor = "xl" or "xc" only')
        return {"flavor": flavor}
    problems_before = len(pg.problems.items)
    settings: dict[str, object] = {
        "flavor": flavor,
        "node_name": pg.name("node_name", datanode),
        "pooler_port": pg.integer("pooler_port", minimum=1, maximum=65535),
        "gtm_host": pg.text("gtm_host", "127.0.0.1", check_host),
        "gtm_port": pg.integer("gtm_port", minimum=1, maximum=65535),
        "coordinator_networks": pg.strings("coordinator_networks", []),
    }
    if len(pg.problems.items) > problems_before or any(value is None for value in settings.values()):
        return {"flavor": "postgresql"}  # a problem is recorded: loading goes on to list them all
    try:
        PgxcSettings(**settings)  # type: ignore[arg-type]
    except InvalidInput as error:  # the other values are checked above, as they were read
        pg.problems.add(pg.key("coordinator_networks"), str(error))
        return {"flavor": "postgresql"}
    return settings
