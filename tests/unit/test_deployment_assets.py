"""What coordinator/ and datanode_agent/ ship stays true to the code: example configurations
load (only their certificate and password files are missing here), the rendered PostgreSQL
configuration is what `xcha pg render` writes, and the coordinator SQL is what
`xcha coordinator fdw-sql` prints."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from xcha.agent.config import load_agent_config
from xcha.config import ConfigError
from xcha.controller.config import load_controller_config
from xcha.pg.render import ReplicationSpec, render

ROOT = Path(__file__).resolve().parent.parent.parent


def only_missing_files(error: ConfigError) -> None:
    for key, message in error.problems:
        assert "does not exist" in message, f"{key}: {message}"


@pytest.mark.parametrize("name", ["controller.toml", "controller-pgxc.toml"])
def test_example_controller_configs_load(name: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_controller_config(ROOT / "coordinator" / name)
    only_missing_files(error.value)


def test_example_agent_config_loads() -> None:
    with pytest.raises(ConfigError) as error:
        load_agent_config(ROOT / "datanode_agent" / "agent.toml")
    only_missing_files(error.value)


def example_spec(role: str) -> ReplicationSpec:
    """The example agent's instance (dn1a, master on 192.0.2.11:5432) and its standby (dn1b on
    192.0.2.12:5433), PostgreSQL 15."""
    member = "dn1a" if role == "master" else "dn1b"
    host = "192.0.2.11" if role == "master" else "192.0.2.12"
    return ReplicationSpec(
        version=150000,
        role=role,
        name=member,
        port=5432 if role == "master" else 5433,  # type: ignore[arg-type]
        archive_dir="/var/lib/xcha/archive/dn1",
        socket_dir=f"/var/lib/xcha/{member}/run",
        listen_addresses=host,
        primary_host="192.0.2.11" if role == "standby" else None,
        primary_port=5432 if role == "standby" else None,
        passfile=f"/var/lib/xcha/{member}/pgpass",
        local_os_users=("postgres",),
        allowed_networks=("192.0.2.0/24",),
    )


@pytest.mark.parametrize("role", ["master", "standby"])
def test_rendered_configuration_is_what_xcha_writes(role: str) -> None:
    directory = ROOT / "datanode_agent" / "rendered" / role
    rendering = render(example_spec(role))
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
