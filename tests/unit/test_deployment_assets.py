"""What coordinator/ and datanode_agent/ ship stays true to the code: example configurations
load (only their certificate and password files are missing here), the rendered PostgreSQL
configuration is what `xcha pg render` writes, and the coordinator SQL is what
`xcha coordinator fdw-sql` prints."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from xcha.agent.config import AgentConfig, load_agent_config
from xcha.config import ConfigError
from xcha.controller.config import load_controller_config
from xcha.pg.render import ReplicationSpec, render

ROOT = Path(__file__).resolve().parent.parent.parent


def only_missing_files(error: ConfigError) -> None:
    for key, message in error.problems:
        assert "does not exist" in message, f"{key}: {message}"


@pytest.mark.parametrize("name", ["controller.toml", "controller-pgxc.toml", "controller-etcd.toml"])
def test_example_controller_configs_load(name: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_controller_config(ROOT / "coordinator" / name)
    only_missing_files(error.value)


@pytest.mark.parametrize("name", ["agent.toml", "agent-xl.toml"])
def test_example_agent_configs_load(name: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_agent_config(ROOT / "datanode_agent" / name)
    only_missing_files(error.value)


def example_agent(tmp_path: Path, member: str) -> AgentConfig:
    """datanode_agent/agent.toml as loaded, for dn1a (the file itself) or dn1b (the file with the
    changes its comment names: member, address, port). Its certificate and password files, which
    do not exist here, are made up under tmp_path."""
    text = (ROOT / "datanode_agent" / "agent.toml").read_text()
    if member == "dn1b":
        assert "port = 5432" in text and "192.0.2.11" in text, "the standby's changes no longer apply"
        text = (
            text.replace("dn1a", "dn1b")
            .replace("192.0.2.11", "192.0.2.12")
            .replace("port = 5432", "port = 5433")
        )
    etc = tmp_path / member
    text = text.replace('"/etc/xcha/', f'"{etc}/')
    for name in ("replication.password", "tls/ca.pem", f"tls/{member}.pem", f"tls/{member}.key"):
        (etc / name).parent.mkdir(parents=True, exist_ok=True)
        (etc / name).write_text("made up\n")
    path = tmp_path / f"agent-{member}.toml"
    path.write_text(text)
    config = load_agent_config(path)
    assert config.member == member
    return config


def example_spec(tmp_path: Path, role: str) -> ReplicationSpec:
    """What the example agent's instance (dn1a, the master) and its standby (dn1b) render, as the
    agent builds it from its configuration (PostgresInstance.replication_spec), PostgreSQL 15;
    the local OS user is the configured run_as."""
    config = example_agent(tmp_path, "dn1a" if role == "master" else "dn1b")
    master = example_agent(tmp_path, "dn1a").postgres
    pg = config.postgres
    assert pg.run_as is not None
    return ReplicationSpec(
        version=150000,
        role=role,  # type: ignore[arg-type]
        name=config.member,
        port=pg.port,
        archive_dir=str(pg.archive_dir),
        socket_dir=str(pg.socket_dir),
        listen_addresses=pg.listen_addresses,
        primary_host=master.host if role == "standby" else None,
        primary_port=master.port if role == "standby" else None,
        replication_user=pg.replication_user,
        passfile=str(pg.passfile),
        auth=pg.auth,
        local_os_users=(pg.run_as,),
        allowed_networks=pg.allowed_networks,
    )


@pytest.mark.parametrize("role", ["master", "standby"])
def test_rendered_configuration_is_what_xcha_writes(tmp_path: Path, role: str) -> None:
    directory = ROOT / "datanode_agent" / "rendered" / role
    rendering = render(example_spec(tmp_path, role))
    if os.environ.get("XCHA_REGENERATE_EXPECTED"):
        for rendered in rendering.files:
            (directory / Path(rendered.name).name).write_text(rendered.content)
    committed = {path.name: path.read_text() for path in directory.iterdir()}
    assert committed == {Path(f.name).name: f.content for f in rendering.files}


def test_coordinator_sql_is_what_the_command_prints() -> None:
    printed = subprocess.run(
        [
            sys.executable,
            "-m",
            "xcha",
            "coordinator",
            "fdw-sql",
            "--datanode",
            "dn1=192.0.2.11:5432",
            "--datanode",
            "dn2=192.0.2.21:5432",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    committed = (ROOT / "coordinator" / "fdw-setup.sql").read_text()
    assert [line for line in committed.splitlines() if not line.startswith("--")] == printed.splitlines()


@pytest.mark.parametrize(
    "unit", ["coordinator/xcha-controller.service", "datanode_agent/xcha-agent@.service"]
)
def test_service_units_run_commands_that_exist(unit: str) -> None:
    text = (ROOT / unit).read_text()
    for line in text.splitlines():
        if line.startswith(("ExecStart=", "ExecStartPre=")):
            argv = line.split("=", 1)[1].split()
            assert argv[0].endswith("/xcha") and argv[1] in ("agent", "controller")
            assert argv[2] == "--config"
            help_text = subprocess.run(
                [sys.executable, "-m", "xcha", argv[1], "--help"], capture_output=True, text=True, check=True
            ).stdout
            for flag in argv[2:]:
                if flag.startswith("--"):
                    assert flag in help_text
