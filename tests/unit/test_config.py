"""agent.toml and controller.toml: typed, frozen results with defaults, and every problem
reported with its key (all of them at once), also through `--check-config`."""

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from xcha import timings
from xcha.agent.config import AgentConfig, PostgresConfig, load_agent_config
from xcha.config import ConfigError, TlsConfig
from xcha.controller.config import ControllerConfig, DatanodeConfig, RouterConfig, load_controller_config
from xcha.controller.routers import command, fdw, pgxc
from xcha.controller.routers.base import CoordinatorConfig
from xcha.controller.views import GroupState, GroupView, SyncFailurePolicy
from xcha.pg.syncrep import SyncPolicy
from xcha.topology import TopologyPlan

INSECURE = "[tls]\ninsecure = true\n"


def agent_toml(
    password_file: Path, agent: str = "", postgres: str = "", tls: str = INSECURE, tail: str = ""
) -> str:
    """A valid minimal agent.toml; agent/postgres lines are added to (or override) their table."""
    agent_lines = {
        "datanode": '"dn1"',
        "member": '"dn1a"',
        "listen": '"127.0.0.1:7001"',
        "controller": '"127.0.0.1:7000"',
        "state_dir": '"/var/lib/xcha/dn1a"',
    }
    postgres_lines = {
        "archive_dir": '"/var/lib/xcha/archive"',
        "replication_password_file": f'"{password_file}"',
    }
    for table, extra in ((agent_lines, agent), (postgres_lines, postgres)):
        for line in extra.strip().splitlines():
            key, _, value = line.partition("=")
            table[key.strip()] = value.strip()
        for key in [key for key, value in table.items() if value == "DELETE"]:
            del table[key]
    return (
        "[agent]\n"
        + "".join(f"{key} = {value}\n" for key, value in agent_lines.items())
        + "\n[postgres]\n"
        + "".join(f"{key} = {value}\n" for key, value in postgres_lines.items())
        + "\n"
        + tls
        + tail
    )


COORDINATOR = '[[router.coordinator]]\nname = "co1"\nconninfo = "host=x"\n'
CONTROLLER = """\
[controller]
listen = "127.0.0.1:7000"
state_dir = "/var/lib/xcha/controller"
{controller}
[[datanode]]
name = "dn1"
members = ["dn1a", "dn1b"]
{datanode}
{tail}
{tls}"""


def controller_toml(controller: str = "", datanode: str = "", tail: str = "", tls: str = INSECURE) -> str:
    return CONTROLLER.format(controller=controller, datanode=datanode, tail=tail, tls=tls)


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "replication.password"
    path.write_text("secret\n")
    return path


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(load: Callable[[Path], object], path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.source == str(path)
    return caught.value.problems


def keys_of(problems: list[tuple[str, str]]) -> list[str]:
    return sorted(key for key, _ in problems)


def message_for(problems: list[tuple[str, str]], key: str) -> str:
    found = [message for problem_key, message in problems if problem_key == key]
    assert len(found) == 1, f"expected one problem for {key}, got {problems}"
    return found[0]


# ---- valid files and defaults ----------------------------------------------------------------


def test_minimal_agent_config_has_the_defaults(tmp_path: Path, password_file: Path) -> None:
    path = write(tmp_path, agent_toml(password_file))
    config = load_agent_config(path)
    assert isinstance(config, AgentConfig)
    assert config == AgentConfig(
        datanode="dn1",
        member="dn1a",
        listen="127.0.0.1:7001",
        advertise="127.0.0.1:7001",
        controller="127.0.0.1:7000",
        state_dir=Path("/var/lib/xcha/dn1a"),
        watch_interval=0.05,
        probe_timeout=0.5,
        metrics_listen=None,
        log_format="text",
        postgres=PostgresConfig(
            data_dir=Path("/var/lib/xcha/dn1a/data"),
            port=5432,
            archive_dir=Path("/var/lib/xcha/archive"),
            replication_password_file=password_file,
            socket_dir=Path("/var/lib/xcha/dn1a/run"),
            log_file=Path("/var/lib/xcha/dn1a/postgresql.log"),
            passfile=Path("/var/lib/xcha/dn1a/pgpass"),
            host="127.0.0.1",
            listen_addresses="127.0.0.1",
            replication_user="xcha_repl",
            auth="scram-sha-256",
            allowed_networks=(),
            bindir=None,
            run_as=None,
        ),
        tls=TlsConfig(insecure=True),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.member = "dn1b"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.postgres.port = 5433  # type: ignore[misc]


def test_agent_settings_override_the_defaults(tmp_path: Path, password_file: Path) -> None:
    text = agent_toml(
        password_file,
        agent='advertise = "10.0.0.5:7001"\nwatch_interval = 0.1\nprobe_timeout = 2\n'
        'metrics_listen = "127.0.0.1:9100"\nlog_format = "json"',
        postgres='port = 5433\ndata_dir = "/srv/pg"\nallowed_networks = ["10.0.0.0/8"]\n'
        'auth = "trust"\nbindir = "/usr/lib/postgresql/15/bin"',
    )
    config = load_agent_config(write(tmp_path, text))
    assert config.advertise == "10.0.0.5:7001"
    assert config.watch_interval == 0.1
    assert config.probe_timeout == 2.0 and isinstance(config.probe_timeout, float)
    assert config.metrics_listen == "127.0.0.1:9100"
    assert config.log_format == "json"
    assert config.postgres.port == 5433
    assert config.postgres.data_dir == Path("/srv/pg")
    assert config.postgres.allowed_networks == ("10.0.0.0/8",)
    assert config.postgres.auth == "trust"
    assert config.postgres.bindir == Path("/usr/lib/postgresql/15/bin")
    spec = config.postgres.instance_spec(config.member)
    assert (spec.name, spec.port, spec.data_dir) == ("dn1a", 5433, Path("/srv/pg"))


def test_minimal_controller_config_has_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, controller_toml())
    config = load_controller_config(path)
    assert config == ControllerConfig(
        listen="127.0.0.1:7000",
        state_dir=Path("/var/lib/xcha/controller"),
        heartbeat_interval=0.25,
        failure_timeout=2.0,
        probe_timeout=0.5,
        startup_grace=2.0,
        tick_interval=0.05,
        metrics_listen=None,
        log_format="text",
        datanodes=(
            DatanodeConfig(
                name="dn1",
                members=("dn1a", "dn1b"),
                policy=SyncPolicy("first", 1),
                on_sync_failure=SyncFailurePolicy.AVAILABLE,
                allow_data_loss=False,
                async_members=(),
            ),
        ),
        router=RouterConfig(kind="none"),
        tls=TlsConfig(insecure=True),
        advertise="127.0.0.1:7000",  # the listen address; the store is SQLite, the name "controller"
    )
    assert config.datanode("dn1") is config.datanodes[0]
    assert config.datanode("dn2") is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.failure_timeout = 9.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.datanodes[0].name = "dn2"  # type: ignore[misc]


def test_the_timing_defaults_are_the_ones_of_xcha_timings(tmp_path: Path, password_file: Path) -> None:
    """One definition: both configuration files, the state machine's view and the deployments
    `xcha up` writes start from the same numbers."""
    controller = load_controller_config(write(tmp_path, controller_toml()))
    assert (
        controller.heartbeat_interval,
        controller.failure_timeout,
        controller.probe_timeout,
        controller.startup_grace,
        controller.tick_interval,
    ) == (
        timings.HEARTBEAT_INTERVAL,
        timings.FAILURE_TIMEOUT,
        timings.PROBE_TIMEOUT,
        timings.FAILURE_TIMEOUT,
        timings.TICK_INTERVAL,
    )
    agent = load_agent_config(write(tmp_path, agent_toml(password_file), "agent.toml"))
    assert (agent.watch_interval, agent.probe_timeout) == (timings.WATCH_INTERVAL, timings.PROBE_TIMEOUT)
    assert GroupView("dn1", GroupState.INITIALIZING, ()).failure_timeout == timings.FAILURE_TIMEOUT
    plan = TopologyPlan()
    assert (plan.heartbeat_interval, plan.failure_timeout, plan.probe_timeout) == (
        timings.HEARTBEAT_INTERVAL,
        timings.FAILURE_TIMEOUT,
        timings.PROBE_TIMEOUT,
    )


def test_startup_grace_defaults_to_the_configured_failure_timeout(tmp_path: Path) -> None:
    config = load_controller_config(write(tmp_path, controller_toml("failure_timeout = 10")))
    assert config.failure_timeout == 10.0
    assert config.startup_grace == 10.0


def test_a_startup_grace_shorter_than_failure_timeout_is_refused(tmp_path: Path) -> None:
    """A member not heard from since the controller started is not yet a failed one."""
    path = write(tmp_path, controller_toml("failure_timeout = 3\nstartup_grace = 1"))
    with pytest.raises(
        ConfigError, match=r"controller\.startup_grace: must be at least failure_timeout \(3 s\)"
    ):
        load_controller_config(path)


def test_controller_settings_override_the_defaults(tmp_path: Path) -> None:
    text = controller_toml(
        'heartbeat_interval = 1\nfailure_timeout = 5\nprobe_timeout = 1.5\nlog_format = "json"',
        datanode='synchronous = "ANY 1"\nsync_policy = "strict"\n'
        'allow_data_loss = true\nasync_members = ["dn1c"]',
        tail='[router]\nkind = "fdw"\nretry_initial = 0.5\n'
        '[[router.coordinator]]\nname = "co1"\nconninfo = "host=/tmp port=5400"',
    ).replace('["dn1a", "dn1b"]', '["dn1a", "dn1b", "dn1c"]')
    config = load_controller_config(write(tmp_path, text))
    assert (config.heartbeat_interval, config.failure_timeout, config.probe_timeout) == (1.0, 5.0, 1.5)
    assert config.log_format == "json"
    assert config.datanodes == (
        DatanodeConfig(
            name="dn1",
            members=("dn1a", "dn1b", "dn1c"),
            policy=SyncPolicy("any", 1),
            on_sync_failure=SyncFailurePolicy.STRICT,
            allow_data_loss=True,
            async_members=("dn1c",),
        ),
    )
    assert config.router == RouterConfig(
        kind="fdw",
        retry_initial=0.5,
        settings=fdw.Settings(coordinators=(CoordinatorConfig("co1", "host=/tmp port=5400"),)),
    )


def test_tls_files_that_exist_are_accepted(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("pem")
    tls = (
        f'[tls]\nca_file = "{tmp_path}/ca.pem"\ncert_file = "{tmp_path}/cert.pem"\n'
        f'key_file = "{tmp_path}/key.pem"\n'
    )
    config = load_controller_config(write(tmp_path, controller_toml(tls=tls)))
    assert config.tls == TlsConfig(tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem", False)
    assert config.tls.read() == (b"pem", b"pem", b"pem")


# ---- problems, each with its key ---------------------------------------------------------------


@pytest.mark.parametrize("key", ["datanode", "member", "listen", "controller"])
def test_missing_required_agent_key(tmp_path: Path, password_file: Path, key: str) -> None:
    path = write(tmp_path, agent_toml(password_file, agent=f"{key} = DELETE"))
    problems = problems_of(load_agent_config, path)
    assert message_for(problems, f"agent.{key}") == "is required"


def test_missing_required_controller_listen(tmp_path: Path) -> None:
    text = controller_toml().replace('listen = "127.0.0.1:7000"\n', "")
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert problems == [("controller.listen", "is required")]


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("agent", "state_dir", "DELETE"),
        ("postgres", "archive_dir", "DELETE"),
        ("postgres", "replication_password_file", "DELETE"),
        ("agent", "state_dir", "5"),
    ],
)
def test_missing_or_mistyped_required_agent_path_is_a_problem(
    tmp_path: Path, password_file: Path, table: str, key: str, value: str
) -> None:
    text = agent_toml(password_file, **{table: f"{key} = {value}"})
    problems = problems_of(load_agent_config, write(tmp_path, text))
    assert f"{table}.{key}" in keys_of(problems)


def test_missing_controller_state_dir_is_a_problem(tmp_path: Path) -> None:
    text = controller_toml().replace('state_dir = "/var/lib/xcha/controller"\n', "")
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert problems == [("controller.state_dir", "is required")]


@pytest.mark.parametrize("members", ["", 'members = "dn1a"'])
def test_missing_or_mistyped_members_is_a_problem(tmp_path: Path, members: str) -> None:
    text = controller_toml().replace('members = ["dn1a", "dn1b"]', members)
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert "datanode[0].members" in keys_of(problems)


@pytest.mark.parametrize(
    ("postgres", "agent", "key", "message"),
    [
        ("port = true", "", "postgres.port", "must be a whole number, not True"),
        ("port = 5432.5", "", "postgres.port", "must be a whole number, not 5432.5"),
        ("port = 0", "", "postgres.port", "must be at least 1, not 0"),
        ("port = 70000", "", "postgres.port", "must be at most 65535, not 70000"),
        ('allowed_networks = "10.0.0.0/8"', "", "postgres.allowed_networks", "must be a list of strings"),
        ("allowed_networks = [1]", "", "postgres.allowed_networks", "must be a list of strings"),
        ('auth = "md5"', "", "postgres.auth", "must be one of scram-sha-256, trust, not 'md5'"),
        ("", 'watch_interval = "fast"', "agent.watch_interval", "must be a number, not 'fast'"),
        ("", "watch_interval = 5", "agent.watch_interval", "must be at most 1.0, not 5"),
        ("", "probe_timeout = true", "agent.probe_timeout", "must be a number, not True"),
        ("", "member = 7", "agent.member", "must be a string, not 7"),
        ("", 'log_format = "xml"', "agent.log_format", "must be one of text, json, not 'xml'"),
    ],
)
def test_agent_wrong_type_or_range(
    tmp_path: Path, password_file: Path, postgres: str, agent: str, key: str, message: str
) -> None:
    text = agent_toml(password_file, agent=agent, postgres=postgres)
    problems = problems_of(load_agent_config, write(tmp_path, text))
    assert message_for(problems, key).startswith(message)


@pytest.mark.parametrize(
    ("controller", "datanode", "key", "message"),
    [
        ('heartbeat_interval = "fast"', "", "controller.heartbeat_interval", "must be a number, not 'fast'"),
        ("failure_timeout = true", "", "controller.failure_timeout", "must be a number, not True"),
        ("tick_interval = 0", "", "controller.tick_interval", "must be at least 0.005, not 0"),
        ("listen = 7000", "", "controller.listen", "must be a string, not 7000"),
        ("", 'allow_data_loss = "yes"', "datanode[0].allow_data_loss", "must be true or false, not 'yes'"),
        ("", 'synchronous = "SOME 1"', "datanode[0].synchronous", "invalid synchronous policy 'SOME 1'"),
        ("", 'synchronous = "FIRST 0"', "datanode[0].synchronous", "invalid synchronous policy"),
    ],
)
def test_controller_wrong_type_or_value(
    tmp_path: Path, controller: str, datanode: str, key: str, message: str
) -> None:
    # listen = 7000 replaces the valid listen line; TOML refuses a repeated key.
    text = controller_toml(datanode=datanode)
    if controller.startswith("listen"):
        text = text.replace('listen = "127.0.0.1:7000"', controller)
    else:
        text = text.replace("[controller]\n", f"[controller]\n{controller}\n")
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert message_for(problems, key).startswith(message)


def test_unknown_sync_policy_is_a_problem(tmp_path: Path) -> None:
    text = controller_toml(datanode='sync_policy = "maybe"')
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert message_for(problems, "datanode[0].sync_policy").startswith("must be one of available, strict")


def test_mistyped_members_entry_is_a_problem(tmp_path: Path) -> None:
    text = controller_toml().replace('members = ["dn1a", "dn1b"]', 'members = ["dn1a", 2]')
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert "must be a list of strings" in [m for k, m in problems if k == "datanode[0].members"]


def test_unknown_agent_keys_are_reported(tmp_path: Path, password_file: Path) -> None:
    text = agent_toml(
        password_file,
        agent='memebr = "dn1a"',
        postgres="prot = 5432",
        tls="[tls]\ninsecure = true\nca_fiel = '/x'\n",
        tail="\n[agnet]\nx = 1\n",
    )
    problems = problems_of(load_agent_config, write(tmp_path, text))
    assert problems == [
        ("agent.memebr", "unknown setting"),
        ("postgres.prot", "unknown setting"),
        ("tls.ca_fiel", "unknown setting"),
        ("agnet", "unknown setting"),
    ]


def test_unknown_controller_keys_are_reported(tmp_path: Path) -> None:
    text = controller_toml(
        "heartbeat_intervall = 1",
        datanode="memebers = []",
        tail='[router]\nkind = "fdw"\nknid = "fdw"\n'
        '[[router.coordinator]]\nname = "co1"\nconninfo = "host=x"\nconnifo = "y"\n'
        "[routers]\n",
    )
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert sorted(problems) == sorted(
        [
            ("controller.heartbeat_intervall", "unknown setting"),
            ("datanode[0].memebers", "unknown setting"),
            ("router.knid", "unknown setting"),
            ("router.coordinator[0].connifo", "unknown setting"),
            ("routers", "unknown setting"),
        ]
    )


@pytest.mark.parametrize("name", ["DN1", "a-b", "1dn", "", "dn 1"])
def test_bad_node_names_in_agent_config(tmp_path: Path, password_file: Path, name: str) -> None:
    text = agent_toml(password_file, agent=f'datanode = "{name}"\nmember = "{name}"')
    problems = problems_of(load_agent_config, write(tmp_path, text))
    assert keys_of(problems) == ["agent.datanode", "agent.member"]
    assert message_for(problems, "agent.datanode").startswith(f"invalid node name {name!r}")


@pytest.mark.parametrize("name", ["DN1", "a-b"])
def test_bad_node_names_in_controller_config(tmp_path: Path, name: str) -> None:
    text = controller_toml().replace('name = "dn1"', f'name = "{name}"')
    text = text.replace('members = ["dn1a", "dn1b"]', f'members = ["dn1a", "{name}"]')
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert keys_of(problems) == ["datanode[0].members", "datanode[0].name"]
    assert message_for(problems, "datanode[0].name").startswith(f"invalid node name {name!r}")
    assert message_for(problems, "datanode[0].members").startswith(f"invalid member name {name!r}")


def test_bad_coordinator_name(tmp_path: Path) -> None:
    text = controller_toml(tail='[router]\nkind = "fdw"\n[[router.coordinator]]\nname = "CO1"\nconninfo = ""')
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert keys_of(problems) == ["router.coordinator[0].name"]


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("localhost", "expected HOST:PORT"),
        ("127.0.0.1:http", "the port is not a number"),
        ("127.0.0.1:70000", "expected a whole number from 1 to 65535"),
        ("bad_host!:7000", "expected an IP address or a host name"),
    ],
)
def test_bad_addresses(tmp_path: Path, password_file: Path, address: str, message: str) -> None:
    agent = write(tmp_path, agent_toml(password_file, agent=f'controller = "{address}"'), "agent.toml")
    problems = problems_of(load_agent_config, agent)
    assert keys_of(problems) == ["agent.controller"]
    assert message in message_for(problems, "agent.controller")

    text = controller_toml(f'metrics_listen = "{address}"').replace('"127.0.0.1:7000"', f'"{address}"')
    problems = problems_of(load_controller_config, write(tmp_path, text, "controller.toml"))
    assert keys_of(problems) == ["controller.listen", "controller.metrics_listen"]
    assert message in message_for(problems, "controller.listen")


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("localhost", "expected HOST:PORT"),
        ("127.0.0.1:0", "expected a whole number from 1 to 65535"),  # the metrics port is fixed
        ("bad_host!:9100", "expected an IP address or a host name"),
        (7, "must be a string, not 7"),
    ],
)
def test_bad_metrics_listen_is_reported_for_its_key(
    tmp_path: Path, password_file: Path, address: object, message: str
) -> None:
    value = f'"{address}"' if isinstance(address, str) else str(address)
    agent = write(tmp_path, agent_toml(password_file, agent=f"metrics_listen = {value}"), "agent.toml")
    problems = problems_of(load_agent_config, agent)
    assert keys_of(problems) == ["agent.metrics_listen"]
    assert message in message_for(problems, "agent.metrics_listen")
    text = controller_toml(f"metrics_listen = {value}")
    problems = problems_of(load_controller_config, write(tmp_path, text, "controller.toml"))
    assert keys_of(problems) == ["controller.metrics_listen"]
    assert message in message_for(problems, "controller.metrics_listen")


def test_an_empty_metrics_listen_switches_metrics_off(tmp_path: Path, password_file: Path) -> None:
    agent = write(tmp_path, agent_toml(password_file, agent='metrics_listen = ""'), "agent.toml")
    assert load_agent_config(agent).metrics_listen is None
    controller = write(tmp_path, controller_toml('metrics_listen = ""'), "controller.toml")
    assert load_controller_config(controller).metrics_listen is None
    controller = write(tmp_path, controller_toml('metrics_listen = "127.0.0.1:9200"'), "controller.toml")
    assert load_controller_config(controller).metrics_listen == "127.0.0.1:9200"


def test_datanodes_are_found_by_name(tmp_path: Path) -> None:
    text = controller_toml(tail='[[datanode]]\nname = "dn2"\nmembers = ["dn2a"]\n')
    config = load_controller_config(write(tmp_path, text))
    assert [config.datanode(name) for name in ("dn2", "dn1")] == [config.datanodes[1], config.datanodes[0]]
    assert config.datanode("dn3") is None


def test_bad_agent_listen_is_reported_for_listen(tmp_path: Path, password_file: Path) -> None:
    text = agent_toml(password_file, agent='listen = "nowhere"\nadvertise = "10.0.0.5:7001"')
    problems = problems_of(load_agent_config, write(tmp_path, text))
    assert keys_of(problems) == ["agent.listen"]


def test_advertise_must_not_use_port_zero(tmp_path: Path, password_file: Path) -> None:
    text = agent_toml(password_file, agent='advertise = "10.0.0.5:0"')
    problems = problems_of(load_agent_config, write(tmp_path, text))
    assert "agent.advertise" in keys_of(problems)
    assert "needs the port the controller can reach" in " ".join(m for k, m in problems)


def test_agent_may_listen_on_port_zero_when_advertise_is_given(tmp_path: Path, password_file: Path) -> None:
    text = agent_toml(password_file, agent='listen = "127.0.0.1:0"\nadvertise = "10.0.0.5:7001"')
    config = load_agent_config(write(tmp_path, text))
    assert (config.listen, config.advertise) == ("127.0.0.1:0", "10.0.0.5:7001")


@pytest.mark.parametrize(("table", "key"), [("postgres", "archive_dir"), ("postgres", "data_dir")])
def test_relative_paths_are_refused(tmp_path: Path, password_file: Path, table: str, key: str) -> None:
    text = agent_toml(password_file, **{table: f'{key} = "relative/dir"'})
    problems = problems_of(load_agent_config, write(tmp_path, text))
    assert problems == [(f"{table}.{key}", "must be an absolute path, not 'relative/dir'")]


def test_relative_state_dir_is_refused(tmp_path: Path, password_file: Path) -> None:
    text = agent_toml(password_file, agent='state_dir = "var/lib/xcha"')
    problems = problems_of(load_agent_config, write(tmp_path, text))
    assert ("agent.state_dir", "must be an absolute path, not 'var/lib/xcha'") in problems


def test_relative_controller_state_dir_is_refused(tmp_path: Path) -> None:
    text = controller_toml().replace('"/var/lib/xcha/controller"', '"state"')
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert problems == [("controller.state_dir", "must be an absolute path, not 'state'")]


def test_replication_password_file_must_exist(tmp_path: Path, password_file: Path) -> None:
    missing = tmp_path / "missing.password"
    text = agent_toml(password_file, postgres=f'replication_password_file = "{missing}"')
    problems = problems_of(load_agent_config, write(tmp_path, text))
    assert problems == [("postgres.replication_password_file", f"{missing} does not exist")]


def test_a_socket_path_too_long_is_reported_for_postgres(tmp_path: Path, password_file: Path) -> None:
    text = agent_toml(password_file, postgres=f'socket_dir = "/{"s" * 120}"')
    problems = problems_of(load_agent_config, write(tmp_path, text))
    assert keys_of(problems) == ["postgres"]
    assert "too long" in problems[0][1]


@pytest.mark.parametrize(
    ("heartbeat", "failure", "failing"),
    [(1, 2, True), (1, 1.5, True), (0.5, 1, True), (1, 2.01, False), (0.5, 2, False)],
)
def test_failure_timeout_must_exceed_two_heartbeats(
    tmp_path: Path, heartbeat: float, failure: float, failing: bool
) -> None:
    text = controller_toml(
        f"heartbeat_interval = {heartbeat}\nfailure_timeout = {failure}\nprobe_timeout = 0.1"
    )
    path = write(tmp_path, text)
    if failing:
        problems = problems_of(load_controller_config, path)
        assert keys_of(problems) == ["controller.failure_timeout"]
        assert "must be greater than 2 x heartbeat_interval" in problems[0][1]
    else:
        assert load_controller_config(path).failure_timeout == float(failure)


@pytest.mark.parametrize(("probe", "failing"), [(3, True), (4, True), (2.99, False)])
def test_probe_timeout_must_be_shorter_than_failure_timeout(
    tmp_path: Path, probe: float, failing: bool
) -> None:
    text = controller_toml(f"heartbeat_interval = 1\nfailure_timeout = 3\nprobe_timeout = {probe}")
    path = write(tmp_path, text)
    if failing:
        problems = problems_of(load_controller_config, path)
        assert problems == [("controller.probe_timeout", "must be shorter than failure_timeout")]
    else:
        assert load_controller_config(path).probe_timeout == float(probe)


@pytest.mark.parametrize(
    ("members", "synchronous", "async_members", "failing"),
    [
        ('["a", "b"]', "FIRST 2", "[]", True),
        ('["a", "b", "c"]', "ANY 3", "[]", True),
        ('["a", "b", "c"]', "FIRST 2", '["c"]', True),
        ('["a", "b", "c"]', "FIRST 2", "[]", False),
        ('["a", "b", "c"]', "ANY 1", '["c"]', False),
        ('["a"]', "FIRST 1", "[]", False),  # a single member: no standby to count yet
    ],
)
def test_synchronous_count_at_most_the_sync_standbys(
    tmp_path: Path, members: str, synchronous: str, async_members: str, failing: bool
) -> None:
    text = controller_toml().replace('members = ["dn1a", "dn1b"]', f"members = {members}")
    text = text.replace(
        "[[datanode]]\n", f'[[datanode]]\nsynchronous = "{synchronous}"\nasync_members = {async_members}\n'
    )
    path = write(tmp_path, text)
    if failing:
        problems = problems_of(load_controller_config, path)
        assert keys_of(problems) == ["datanode[0].synchronous"]
        assert synchronous in problems[0][1] and "synchronous standbys" in problems[0][1]
    else:
        assert str(load_controller_config(path).datanodes[0].policy) == synchronous


def test_async_members_must_be_members(tmp_path: Path) -> None:
    text = controller_toml(datanode='async_members = ["dn1z", "dn1y"]').replace(
        '["dn1a", "dn1b"]', '["dn1a", "dn1b", "dn1c", "dn1d"]'
    )
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert ("datanode[0].async_members", "not members: dn1y, dn1z") in problems


def test_member_names_repeat_within_a_datanode(tmp_path: Path) -> None:
    text = controller_toml().replace('["dn1a", "dn1b"]', '["dn1a", "dn1b", "dn1a"]')
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert ("datanode[0].members", "member names repeat") in problems


def test_member_names_repeat_across_datanodes(tmp_path: Path) -> None:
    text = controller_toml(tail='[[datanode]]\nname = "dn2"\nmembers = ["dn2a", "dn1b"]\n')
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert problems == [("datanode", "a member name is used in more than one datanode")]


def test_datanode_names_repeat(tmp_path: Path) -> None:
    text = controller_toml(tail='[[datanode]]\nname = "dn1"\nmembers = ["dn2a"]\n')
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert problems == [("datanode", "datanode names repeat")]


def test_at_least_one_datanode(tmp_path: Path) -> None:
    text = '[controller]\nlisten = "127.0.0.1:7000"\nstate_dir = "/var/lib/xcha"\n' + INSECURE
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert problems == [("datanode", "at least one [[datanode]] is needed")]


@pytest.mark.parametrize("kind", ["fdw", "pgxc"])
def test_router_kind_needs_coordinators(tmp_path: Path, kind: str) -> None:
    text = controller_toml(tail=f'[router]\nkind = "{kind}"\n')
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert problems == [
        ("router.coordinator", f"router kind {kind} needs at least one [[router.coordinator]]")
    ]


def test_router_kind_command_needs_a_command(tmp_path: Path) -> None:
    text = controller_toml(tail='[router]\nkind = "command"\n')
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert keys_of(problems) == ["router.command"]


def test_router_kind_must_be_known(tmp_path: Path) -> None:
    text = controller_toml(tail='[router]\nkind = "magic"\n')
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert keys_of(problems) == ["router.kind"]


def test_a_setting_of_another_router_kind_is_named_as_such(tmp_path: Path) -> None:
    """Each kind parses its own settings: one left from another kind is not silently ignored."""
    text = controller_toml(
        tail='[router]\nkind = "fdw"\ncommand = ["/bin/true"]\nflavor = "xl"\n' + COORDINATOR
    )
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert problems == [
        ("router.command", "a setting of router kind command, not of fdw"),
        ("router.flavor", "a setting of router kind pgxc, not of fdw"),
    ]
    text = controller_toml(tail='[router]\nkind = "command"\ncommand = ["/bin/true"]\n' + COORDINATOR)
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert problems == [("router.coordinator", "a setting of router kind fdw or pgxc, not of command")]


def test_every_router_kind_parses_its_own_settings(tmp_path: Path) -> None:
    shared = "retry_initial = 0.2\nretry_max = 2\ntimeout = 3\n"
    for kind, extra, settings in (
        ("none", "", None),
        ("takeover", "", None),
        ("fdw", COORDINATOR, fdw.Settings((CoordinatorConfig("co1", "host=x"),))),
        (
            "pgxc",
            'flavor = "xl"\nterminate_writers = false\nclean_command = ["pgxc_clean", "-a"]\n' + COORDINATOR,
            pgxc.Settings((CoordinatorConfig("co1", "host=x"),), "xl", False, ("pgxc_clean", "-a")),
        ),
        ("command", 'command = ["/bin/true", "x"]\n', command.Settings(("/bin/true", "x"))),
    ):
        # Tables ([[router.coordinator]]) come after the keys of [router].
        keys, _, tables = extra.partition("[[")
        tail = f'[router]\nkind = "{kind}"\n{shared}{keys}' + (f"[[{tables}" if tables else "")
        config = load_controller_config(write(tmp_path, controller_toml(tail=tail)))
        assert config.router == RouterConfig(kind, 0.2, 2.0, 3.0, settings), kind


def test_coordinator_names_repeat(tmp_path: Path) -> None:
    coordinator = '[[router.coordinator]]\nname = "co1"\nconninfo = "host=x"\n'
    text = controller_toml(tail='[router]\nkind = "fdw"\n' + coordinator + coordinator)
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert problems == [("router.coordinator", "coordinator names repeat")]


@pytest.mark.parametrize("tls", ["", "[tls]\n", "[tls]\ninsecure = false\n"])
def test_tls_files_are_required_unless_insecure(tmp_path: Path, password_file: Path, tls: str) -> None:
    for load, text in (
        (load_controller_config, controller_toml(tls=tls)),
        (load_agent_config, agent_toml(password_file, tls=tls)),
    ):
        problems = problems_of(load, write(tmp_path, text))
        assert keys_of(problems) == ["tls.ca_file", "tls.cert_file", "tls.key_file"]
        assert all(message.startswith("is required") for _, message in problems)


def test_tls_files_must_exist(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("pem")
    tls = (
        f'[tls]\nca_file = "{tmp_path}/ca.pem"\ncert_file = "{tmp_path}/nope.pem"\n'
        f'key_file = "{tmp_path}/nope.key"\n'
    )
    problems = problems_of(load_controller_config, write(tmp_path, controller_toml(tls=tls)))
    assert problems == [
        ("tls.cert_file", f"{tmp_path}/nope.pem does not exist"),
        ("tls.key_file", f"{tmp_path}/nope.key does not exist"),
    ]


def test_tls_insecure_must_be_a_flag(tmp_path: Path) -> None:
    problems = problems_of(
        load_controller_config, write(tmp_path, controller_toml(tls='[tls]\ninsecure = "yes"\n'))
    )
    assert message_for(problems, "tls.insecure") == "must be true or false, not 'yes'"


def test_a_table_that_is_not_a_table(tmp_path: Path) -> None:
    text = "tls = 5\n" + controller_toml(tls="")
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert ("tls", "must be a table") in problems


def test_datanode_must_be_an_array_of_tables(tmp_path: Path) -> None:
    text = '[controller]\nlisten = "127.0.0.1:7000"\nstate_dir = "/x"\n[datanode]\nname = "dn1"\n' + INSECURE
    problems = problems_of(load_controller_config, write(tmp_path, text))
    assert ("datanode", "must be an array of tables ([[...]])") in problems


@pytest.mark.parametrize("load", [load_agent_config, load_controller_config])
def test_toml_syntax_error(tmp_path: Path, load: Callable[[Path], object]) -> None:
    path = write(tmp_path, "[agent\nmember = 'dn1a'\n")
    problems = problems_of(load, path)
    assert len(problems) == 1
    key, message = problems[0]
    assert key == "(syntax)"
    assert "line 1" in message


@pytest.mark.parametrize("load", [load_agent_config, load_controller_config])
def test_nonexistent_file(tmp_path: Path, load: Callable[[Path], object]) -> None:
    path = tmp_path / "nope.toml"
    assert problems_of(load, path) == [("(file)", "does not exist")]


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    problems = problems_of(load_controller_config, tmp_path)
    assert len(problems) == 1 and problems[0][0] == "(file)"


# ---- several problems at once ------------------------------------------------------------------


def test_every_agent_problem_is_listed(tmp_path: Path, password_file: Path) -> None:
    text = agent_toml(
        password_file,
        agent='datanode = "DN1"\nmember = DELETE\nwatch_interval = "fast"\nlsiten = "x"',
        postgres=f'port = true\nreplication_password_file = "{tmp_path}/missing"\nlog_file = "pg.log"',
        tls="",
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_agent_config(path)
    error = caught.value
    assert keys_of(error.problems) == sorted(
        [
            "agent.datanode",
            "agent.member",
            "agent.watch_interval",
            "agent.lsiten",
            "postgres.port",
            "postgres.replication_password_file",
            "postgres.log_file",
            "tls.ca_file",
            "tls.cert_file",
            "tls.key_file",
        ]
    )
    lines = error.lines()
    assert len(lines) == len(error.problems) == 10
    assert lines == [f"{path}: {key}: {message}" for key, message in error.problems]
    assert str(error).startswith(f"{path}: 10 problem(s): ")


def test_every_controller_problem_is_listed(tmp_path: Path) -> None:
    text = controller_toml(
        "heartbeat_interval = 2\nfailure_timeout = 3\nprobe_timeout = 5\nfailure_timout = 9",
        datanode='synchronous = "FIRST 2"\nasync_members = ["dn1x"]',
        tail='[[datanode]]\nname = "a-b"\nmembers = ["dn1b"]\n[router]\nkind = "fdw"\n',
        tls="",
    ).replace('"127.0.0.1:7000"', '"localhost"')
    with pytest.raises(ConfigError) as caught:
        load_controller_config(write(tmp_path, text))
    problems = caught.value.problems
    assert {key for key, _ in problems} == {
        "controller.listen",
        "controller.failure_timout",
        "controller.failure_timeout",
        "controller.probe_timeout",
        "datanode[0].synchronous",
        "datanode[0].async_members",
        "datanode[1].name",
        "datanode",
        "router.coordinator",
        "tls.ca_file",
        "tls.cert_file",
        "tls.key_file",
    }
    assert len(caught.value.lines()) == len(problems)


# ---- the command line --------------------------------------------------------------------------


def check_config(daemon: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xcha", daemon, "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_lists_every_agent_problem(tmp_path: Path, password_file: Path) -> None:
    text = agent_toml(password_file, agent='datanode = "DN1"\nlsiten = "x"', postgres="port = true", tls="")
    path = write(tmp_path, text, "bad.toml")
    result = check_config("agent", path)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    expected = [
        "agent.datanode",
        "agent.lsiten",
        "postgres.port",
        "tls.ca_file",
        "tls.cert_file",
        "tls.key_file",
    ]
    assert len(lines) == len(expected)
    assert sorted(line.removeprefix(f"{path}: ").split(": ")[0] for line in lines) == expected
    assert "Traceback" not in result.stderr


def test_check_config_lists_every_controller_problem(tmp_path: Path) -> None:
    text = controller_toml('heartbeat_interval = "fast"', tail='[router]\nkind = "fdw"\n').replace(
        'name = "dn1"', 'name = "DN1"'
    )
    path = write(tmp_path, text, "bad.toml")
    result = check_config("controller", path)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path}: ") for line in lines)
    keys = sorted(line.removeprefix(f"{path}: ").split(": ")[0] for line in lines)
    assert keys == ["controller.heartbeat_interval", "datanode[0].name", "router.coordinator"]


def test_check_config_reports_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    result = check_config("controller", path)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [f"{path}: (file): does not exist"]


def test_check_config_ok(tmp_path: Path, password_file: Path) -> None:
    agent = write(tmp_path, agent_toml(password_file), "agent.toml")
    controller = write(tmp_path, controller_toml(), "controller.toml")
    for daemon, path in (("agent", agent), ("controller", controller)):
        result = check_config(daemon, path)
        assert (result.returncode, result.stdout, result.stderr) == (0, f"{path}: ok\n", "")


# ---- [postgres] flavor: Postgres-XL and Postgres-XC datanodes --------------------------------


def test_plain_postgresql_is_the_default_flavor(tmp_path: Path, password_file: Path) -> None:
    config = load_agent_config(write(tmp_path, agent_toml(password_file)))
    assert config.postgres.flavor == "postgresql" and config.postgres.pgxc is None
    assert config.postgres.instance_spec("dn1a").pgxc is None


@pytest.mark.parametrize("flavor", ["xl", "xc"])
def test_an_xl_or_xc_datanode_takes_its_node_name_from_the_datanode(
    tmp_path: Path, password_file: Path, flavor: str
) -> None:
    postgres = f'flavor = "{flavor}"\npooler_port = 6667\ngtm_port = 6666'
    config = load_agent_config(write(tmp_path, agent_toml(password_file, postgres=postgres)))
    pgxc = config.postgres.instance_spec("dn1a").pgxc
    assert pgxc is not None
    # The datanode's name (shared with its standbys), not the member's; the GTM on this host.
    assert (pgxc.flavor, pgxc.node_name, pgxc.pooler_port) == (flavor, "dn1", 6667)
    assert (pgxc.gtm_host, pgxc.gtm_port, pgxc.coordinator_networks) == ("127.0.0.1", 6666, ())


def test_xl_settings_override_the_defaults(tmp_path: Path, password_file: Path) -> None:
    postgres = (
        'flavor = "xl"\nnode_name = "datanode_1"\npooler_port = 16667\ngtm_host = "10.0.0.9"\n'
        'gtm_port = 16666\ncoordinator_networks = ["10.0.0.0/24"]'
    )
    config = load_agent_config(write(tmp_path, agent_toml(password_file, postgres=postgres)))
    assert config.postgres.pgxc is not None
    assert config.postgres.pgxc.node_name == "datanode_1"
    assert (config.postgres.gtm_host, config.postgres.gtm_port) == ("10.0.0.9", 16666)
    assert config.postgres.coordinator_networks == ("10.0.0.0/24",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.postgres.flavor = "postgresql"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("postgres", "key", "message"),
    [
        ('flavor = "xz"', "postgres.flavor", "must be one of postgresql, xl, xc"),
        ('flavor = "xl"\ngtm_port = 6666', "postgres.pooler_port", "is required"),
        ('flavor = "xl"\npooler_port = 6667', "postgres.gtm_port", "is required"),
        ('flavor = "xc"\npooler_port = 0\ngtm_port = 6666', "postgres.pooler_port", "at least 1"),
        ('flavor = "xc"\npooler_port = 5432\ngtm_port = 6666', "postgres.pooler_port", "must differ"),
        ('flavor = "xl"\npooler_port = 6667\ngtm_port = "x"', "postgres.gtm_port", "whole number"),
        ('flavor = "xl"\npooler_port = 6667\ngtm_port = 6666\ngtm_host = "a b"', "postgres.gtm_host", "host"),
        (
            'flavor = "xl"\npooler_port = 6667\ngtm_port = 6666\nnode_name = "DN1"',
            "postgres.node_name",
            "1-63",
        ),
        (
            'flavor = "xl"\npooler_port = 6667\ngtm_port = 6666\ncoordinator_networks = ["10.0.0.0/33"]',
            "postgres.coordinator_networks",
            "invalid coordinator network",
        ),
        ("pooler_port = 6667", "postgres.pooler_port", 'for flavor = "xl" or "xc" only'),
        ('gtm_host = "127.0.0.1"', "postgres.gtm_host", 'for flavor = "xl" or "xc" only'),
    ],
)
def test_bad_flavor_settings_are_reported_with_their_key(
    tmp_path: Path, password_file: Path, postgres: str, key: str, message: str
) -> None:
    problems = problems_of(load_agent_config, write(tmp_path, agent_toml(password_file, postgres=postgres)))
    assert message in message_for(problems, key)


def test_check_config_lists_flavor_problems(tmp_path: Path, password_file: Path) -> None:
    path = write(tmp_path, agent_toml(password_file, postgres='flavor = "xl"'), "agent.toml")
    result = subprocess.run(
        [sys.executable, "-m", "xcha", "agent", "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert f"{path}: postgres.pooler_port: is required" in result.stderr
    assert f"{path}: postgres.gtm_port: is required" in result.stderr


# ---- several controllers ------------------------------------------------------------------------


def test_several_controllers_an_etcd_store_and_agents_that_know_them_all(
    tmp_path: Path, password_file: Path
) -> None:
    addresses = '["127.0.0.1:7000", "127.0.0.1:7010", "127.0.0.1:7020"]'
    controller = controller_toml(
        f'name = "c2"\npeers = {addresses}',
        tail='[store]\nkind = "etcd"\nendpoints = ["127.0.0.1:2379"]\nprefix = "/xcha/c1/"\nlease_ttl = 3\n',
    )
    config = load_controller_config(write(tmp_path, controller))
    assert (config.name, config.advertise, config.peers[1]) == ("c2", "127.0.0.1:7000", "127.0.0.1:7010")
    assert (config.store.kind, config.store.endpoints, config.store.prefix, config.store.lease_ttl) == (
        "etcd",
        ("127.0.0.1:2379",),
        "/xcha/c1/",
        3.0,
    )
    agent = agent_toml(password_file, agent=f"controller = DELETE\ncontrollers = {addresses}")
    loaded = load_agent_config(write(tmp_path, agent, "agent.toml"))
    assert loaded.controller == "127.0.0.1:7000" and len(loaded.controller_addresses) == 3


def test_store_and_controller_list_problems_are_listed_with_their_keys(
    tmp_path: Path, password_file: Path
) -> None:
    controller = controller_toml(
        'peers = ["127.0.0.1:7000", "nowhere"]',
        tail='[store]\nkind = "etcd"\nprefix = "xcha"\ncert_file = "/c.pem"\n',
    )
    problems = problems_of(load_controller_config, write(tmp_path, controller))
    assert keys_of(problems) == ["controller.peers", "store.cert_file", "store.endpoints", "store.prefix"]
    agent = agent_toml(password_file, agent='controllers = ["127.0.0.1:7000", "localhost"]')
    problems = problems_of(load_agent_config, write(tmp_path, agent, "agent.toml"))
    assert keys_of(problems) == ["agent.controller", "agent.controllers"]
    assert "give controller or controllers, not both" in message_for(problems, "agent.controller")


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ("keepalive_interval = 0.1", "must be between heartbeat_interval (0.25 s) and report_interval (5 s)"),
        ("keepalive_interval = 6", "must be between heartbeat_interval (0.25 s) and report_interval (5 s)"),
        ("keepalive_interval = 1.5", "must be at most failure_timeout / 2 (1 s)"),
        ("keepalive_interval = 1", None),
    ],
)
def test_keepalive_interval_lies_between_heartbeats_and_reports_and_within_half_the_failure_timeout(
    tmp_path: Path, settings: str, problem: str | None
) -> None:
    path = write(tmp_path, controller_toml(settings))
    if problem is None:
        config = load_controller_config(path)
        assert (config.keepalive_interval, config.report_interval) == (1.0, 5.0)
        assert config.keepalive.silence == config.heartbeat_interval + config.keepalive.timeout
    else:
        ((where, message),) = problems_of(load_controller_config, path)
        assert where == "controller.keepalive_interval" and message.startswith(problem)
