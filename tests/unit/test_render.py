"""Rendering of the specification's configuration, compared with reviewed expected files."""

import os
from pathlib import Path

import pytest

from xcha.errors import InvalidInput
from xcha.pg.render import ReplicationSpec, archive_command, render, restore_command
from xcha.pg.syncrep import SyncPolicy, SyncStandbys
from xcha.pg.version import parse_version

EXPECTED = Path(__file__).parent.parent / "expected" / "render"
VERSIONS = ("9.1", "9.6", "11", "12", "15")


def seed_spec(version: str, role: str) -> ReplicationSpec:
    """The specification's pair: master on 5432, slave on 5433, one archive."""
    return ReplicationSpec(
        version=parse_version(version),
        role=role,
        name="dn1b" if role == "standby" else "dn1a",  # type: ignore[arg-type]
        port=5433 if role == "standby" else 5432,
        archive_dir="/var/lib/xcha/archive",
        socket_dir="/var/run/xcha",
        primary_host="127.0.0.1" if role == "standby" else None,
        primary_port=5432 if role == "standby" else None,
        passfile="/var/lib/xcha/pgpass",
        local_os_users=("postgres",),
        sync=SyncStandbys(SyncPolicy(), ("dn1b",)) if role == "master" else None,
    )


@pytest.mark.parametrize("role", ["master", "standby"])
@pytest.mark.parametrize("version", VERSIONS)
def test_rendering_matches_the_expected_files(version: str, role: str) -> None:
    rendering = render(seed_spec(version, role))
    directory = EXPECTED / version / role
    if os.environ.get("XCHA_REGENERATE_EXPECTED"):
        directory.mkdir(parents=True, exist_ok=True)
        for rendered in rendering.files:
            (directory / Path(rendered.name).name).write_text(rendered.content)
    expected = {path.name: path.read_text() for path in directory.iterdir()}
    assert {Path(f.name).name: f.content for f in rendering.files} == expected


@pytest.mark.parametrize("version", VERSIONS)
def test_every_line_of_the_seed_is_rendered(version: str) -> None:
    master = render(seed_spec(version, "master"))
    standby = render(seed_spec(version, "standby"))
    conf = master.file("postgresql.xcha.conf").content
    wal_level = "hot_standby" if version == "9.1" else "replica"
    assert f"wal_level = {wal_level}" in conf
    assert "archive_mode = on" in conf
    assert "max_wal_senders = 10" in conf
    assert "test ! -f /var/lib/xcha/archive/%f && cp %p /var/lib/xcha/archive/%f" in conf
    assert "port = 5432" in conf
    hba = master.file("pg_hba.conf").content
    assert "host    replication  xcha_repl            127.0.0.1/32" in hba
    assert "host    replication  xcha_repl            ::1/128" in hba
    standby_conf = standby.file("postgresql.xcha.conf").content
    assert "hot_standby = on" in standby_conf and "port = 5433" in standby_conf
    names = {Path(f.name).name for f in standby.files}
    recovery = standby.file("recovery.conf").content if "recovery.conf" in names else standby_conf
    assert "cp /var/lib/xcha/archive/%f %p" in recovery
    assert "application_name=dn1b" in recovery and "host=127.0.0.1 port=5432" in recovery
    if parse_version(version) >= 120000:
        assert "recovery.conf" not in names and "standby.signal" in names
        assert "standby_mode" not in standby_conf
    else:
        assert "standby_mode = 'on'" in recovery and "standby.signal" not in names


def test_archive_and_restore_commands_fix_the_seed_and_quote_paths() -> None:
    assert archive_command("/a") == "test ! -f /a/%f && cp %p /a/%f"
    assert restore_command("/a") == "cp /a/%f %p"
    assert archive_command("/with space") == "test ! -f '/with space'/%f && cp %p '/with space'/%f"


def test_sync_names_per_version() -> None:
    two = SyncStandbys(SyncPolicy("first", 1), ("b", "c"))
    assert two.render(150000) == "FIRST 1 (b, c)"
    assert two.render(90600) == "1 (b, c)"
    assert two.render(90100) == "b, c"
    assert SyncStandbys(SyncPolicy("any", 2), ("b", "c", "d")).render(100000) == "ANY 2 (b, c, d)"
    with pytest.raises(InvalidInput, match="ANY k"):
        SyncStandbys(SyncPolicy("any", 1), ("b",)).render(90600)
    with pytest.raises(InvalidInput, match=r"9\.6"):
        SyncStandbys(SyncPolicy("first", 2), ("b", "c")).render(90500)
    assert SyncStandbys.parse("ANY 2 (b, c, d)") == SyncStandbys(SyncPolicy("any", 2), ("b", "c", "d"))
    assert SyncStandbys.parse("2 (b, c)") == SyncStandbys(SyncPolicy("first", 2), ("b", "c"))
    assert SyncStandbys.parse("b, c").names == ("b", "c")
    assert SyncStandbys.parse("").names == ()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "Bad-Name"}, "invalid node name"),
        ({"port": 0}, "invalid port"),
        ({"archive_dir": "relative/dir"}, "absolute path"),
        ({"archive_dir": "/a%b"}, "not allowed"),
        ({"primary_host": "bad host; rm -rf /"}, "invalid primary host"),
        ({"replication_user": "Robert'); DROP"}, "invalid replication user"),
        ({"allowed_networks": ("10.0.0.0/33",)}, "invalid allowed network"),
        ({"auth": "password"}, "invalid auth"),
        ({"version": 80400}, "older than 9.1"),
    ],
)
def test_bad_values_are_refused(change: dict[str, object], message: str) -> None:
    values = {**seed_spec("15", "standby").__dict__, **change}
    with pytest.raises(InvalidInput, match=message):
        ReplicationSpec(**values)  # type: ignore[arg-type]


def test_trust_is_only_rendered_when_asked_for_and_warns() -> None:
    assert "trust" not in render(seed_spec("15", "master")).file("pg_hba.conf").content
    values = {**seed_spec("15", "master").__dict__, "auth": "trust"}
    rendering = render(ReplicationSpec(**values))  # type: ignore[arg-type]
    assert "trust" in rendering.file("pg_hba.conf").content
    assert rendering.warnings and "without a password" in rendering.warnings[0]
