"""agent.toml: one agent beside one PostgreSQL instance."""

from dataclasses import dataclass
from pathlib import Path

from xcha.config import ConfigError, Problems, Section, TlsConfig, read_toml
from xcha.names import check_address, check_host
from xcha.pg.instance import InstanceSpec
from xcha.pg.render import AuthMethod

LOG_FORMATS = ("text", "json")


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
        )


@dataclass(frozen=True)
class AgentConfig:
    source: Path
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


def load_agent_config(path: Path) -> AgentConfig:
    problems = Problems()
    root = Section(read_toml(path), "", problems)
    agent = root.table("agent")
    datanode = agent.name("datanode")
    member = agent.name("member")
    listen = agent.address("listen", listen=True)
    advertise = agent.address("advertise", None) or listen
    controller = agent.address("controller")
    state_dir = agent.path("state_dir")
    watch_interval = agent.number("watch_interval", 0.05, minimum=0.005, maximum=1.0)
    probe_timeout = agent.number("probe_timeout", 0.5, minimum=0.05, maximum=10.0)
    metrics_listen = agent.text("metrics_listen", "") or None
    if metrics_listen:
        try:
            check_address(metrics_listen)
        except Exception as error:
            problems.add("agent.metrics_listen", str(error))
    log_format = agent.choice("log_format", LOG_FORMATS, "text")
    if isinstance(advertise, str) and advertise.endswith(":0"):
        problems.add("agent.advertise", "needs the port the controller can reach (listen uses port 0)")
    agent.finish()

    pg = root.table("postgres")
    # Defaults under state_dir; an unusable state_dir is reported once, under its own key.
    base = state_dir if isinstance(state_dir, Path) and state_dir.is_absolute() else Path("/var/lib/xcha")
    data_dir = pg.path("data_dir", base / "data")
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
    )
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
        path,
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
    )
