"""controller.toml: the controller, the datanode groups it keeps available, and how
coordinators are re-pointed after a promotion (`[router]`: `xcha.controller.routers`)."""

from dataclasses import dataclass, field
from pathlib import Path

from xcha import timings
from xcha.config import LOG_FORMATS, ConfigError, Problems, Section, TlsConfig, read_toml
from xcha.controller.routers import RouterConfig, parse_router
from xcha.controller.store.config import StoreConfig
from xcha.controller.views import SyncFailurePolicy
from xcha.errors import InvalidInput
from xcha.names import check_name
from xcha.pg.syncrep import SyncPolicy


@dataclass(frozen=True)
class DatanodeConfig:
    name: str
    members: tuple[str, ...]
    policy: SyncPolicy
    on_sync_failure: SyncFailurePolicy
    allow_data_loss: bool
    async_members: tuple[str, ...]


@dataclass(frozen=True)
class ControllerConfig:
    listen: str
    state_dir: Path
    heartbeat_interval: float
    failure_timeout: float
    probe_timeout: float
    startup_grace: float
    tick_interval: float
    metrics_listen: str | None
    log_format: str
    datanodes: tuple[DatanodeConfig, ...]
    router: RouterConfig
    tls: TlsConfig
    store: StoreConfig = field(default_factory=StoreConfig)
    name: str = "controller"  # this controller among several (etcd store)
    advertise: str = ""  # where agents and operators reach it (default: listen)
    peers: tuple[str, ...] = ()  # every controller's address, this one's included
    report_interval: float = timings.REPORT_INTERVAL  # an unchanged report is sent again this often
    keepalive_interval: float = timings.KEEPALIVE_INTERVAL  # pings between reports

    @property
    def keepalive(self) -> timings.Keepalive:
        return timings.Keepalive.of(self.heartbeat_interval, self.keepalive_interval, self.failure_timeout)

    _by_name: dict[str, DatanodeConfig] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {d.name: d for d in self.datanodes})

    def datanode(self, name: str) -> DatanodeConfig | None:
        return self._by_name.get(name)


def _datanode(section: Section) -> DatanodeConfig:
    name = section.name("name")
    members = section.strings("members")
    for member in members or ():
        try:
            check_name(member, "member name")
        except InvalidInput as error:
            section.problems.add(section.key("members"), str(error))
    policy = SyncPolicy()
    text = section.text("synchronous", "FIRST 1")
    try:
        policy = SyncPolicy.parse(text)
    except InvalidInput as error:
        section.problems.add(section.key("synchronous"), str(error))
    async_members = section.strings("async_members", [])
    config = DatanodeConfig(
        name=name,
        members=members or (),
        policy=policy,
        on_sync_failure=SyncFailurePolicy(
            section.choice("sync_policy", ("available", "strict"), "available")
        ),
        allow_data_loss=section.flag("allow_data_loss", False),
        async_members=async_members or (),
    )
    if members is not None and len(set(config.members)) != len(config.members):
        section.problems.add(section.key("members"), "member names repeat")
    if not config.members:
        section.problems.add(
            section.key("members"), "needs at least one member (the first is bootstrapped as master)"
        )
    unknown = set(config.async_members) - set(config.members)
    if unknown:
        section.problems.add(section.key("async_members"), f"not members: {', '.join(sorted(unknown))}")
    sync_standbys = len(config.members) - 1 - len(set(config.async_members) & set(config.members))
    if len(config.members) > 1 and policy.count > sync_standbys:
        section.problems.add(
            section.key("synchronous"),
            f"{policy} needs {policy.count} synchronous standbys but the group has {sync_standbys}",
        )
    section.finish()
    return config


def load_controller_config(path: Path) -> ControllerConfig:
    problems = Problems()
    root = Section(read_toml(path), "", problems)
    controller = root.table("controller")
    listen = controller.address("listen", listen=True)
    state_dir = controller.path("state_dir")
    heartbeat_interval = controller.number(
        "heartbeat_interval", timings.HEARTBEAT_INTERVAL, minimum=0.05, maximum=30
    )
    failure_timeout = controller.number("failure_timeout", timings.FAILURE_TIMEOUT, minimum=0.2, maximum=600)
    report_interval = controller.number(
        "report_interval", max(timings.REPORT_INTERVAL, heartbeat_interval), minimum=0.05, maximum=600
    )
    keepalive_interval = controller.number(
        "keepalive_interval", max(timings.KEEPALIVE_INTERVAL, heartbeat_interval), minimum=0.05, maximum=300
    )
    if not heartbeat_interval <= keepalive_interval <= report_interval:
        problems.add(
            "controller.keepalive_interval",
            f"must be between heartbeat_interval ({heartbeat_interval:g} s) and report_interval "
            f"({report_interval:g} s): between reports, keep-alive pings say the agent is alive",
        )
    elif keepalive_interval > max(heartbeat_interval, failure_timeout / 2):
        problems.add(
            "controller.keepalive_interval",
            f"must be at most failure_timeout / 2 ({failure_timeout / 2:g} s), so that a stalled "
            "agent is noticed before failure_timeout",
        )
    probe_timeout = controller.number("probe_timeout", timings.PROBE_TIMEOUT, minimum=0.05, maximum=30)
    startup_grace = controller.number("startup_grace", failure_timeout, minimum=0, maximum=3600)
    if startup_grace < failure_timeout:
        problems.add(
            "controller.startup_grace",
            f"must be at least failure_timeout ({failure_timeout:g} s): a member not heard from "
            "since the start is not yet a failed one",
        )
    tick_interval = controller.number("tick_interval", timings.TICK_INTERVAL, minimum=0.005, maximum=5)
    metrics_listen = controller.optional_address("metrics_listen")
    log_format = controller.choice("log_format", LOG_FORMATS, "text")
    name = controller.name("name", "controller")
    advertise = controller.optional_address("advertise") or listen
    peers = controller.addresses("peers", "controller address")
    controller.finish()
    if failure_timeout <= 2 * heartbeat_interval:
        problems.add(
            "controller.failure_timeout",
            f"must be greater than 2 x heartbeat_interval ({2 * heartbeat_interval:g} s), "
            f"so that one missed heartbeat is not a failure",
        )
    if probe_timeout >= failure_timeout:
        problems.add("controller.probe_timeout", "must be shorter than failure_timeout")
    datanodes = tuple(_datanode(section) for section in root.tables("datanode"))
    if not datanodes:
        problems.add("datanode", "at least one [[datanode]] is needed")
    names = [d.name for d in datanodes]
    if len(set(names)) != len(names):
        problems.add("datanode", "datanode names repeat")
    members = [m for d in datanodes for m in d.members]
    if len(set(members)) != len(members):
        problems.add("datanode", "a member name is used in more than one datanode")
    router = parse_router(root.table("router"))
    tls = TlsConfig.load(root.table("tls"))
    store = StoreConfig.load(root.table("store"))
    root.finish()
    if problems.items:
        raise ConfigError(str(path), problems.items)
    return ControllerConfig(
        listen,
        state_dir,
        heartbeat_interval,
        failure_timeout,
        probe_timeout,
        startup_grace,
        tick_interval,
        metrics_listen,
        log_format,
        datanodes,
        router,
        tls,
        store,
        name,
        advertise,
        peers,
        report_interval,
        keepalive_interval,
    )


__all__ = ["ControllerConfig", "DatanodeConfig", "RouterConfig", "load_controller_config"]
