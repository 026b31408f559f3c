"""Rendering of the specification's configuration, compared with reviewed expected files."""

import os
from pathlib import Path

import pytest

from xcha.errors import InvalidInput
from xcha.pg import versions
from xcha.pg.flavor import PgxcSettings, check_supported, detect_flavor, parse_version_output
from xcha.pg.render import ReplicationSpec, archive_command, render, restore_command
from xcha.pg.syncrep import SyncPolicy, SyncStandbys
from xcha.pg.version import parse_version

EXPECTED = Path(__file__).parent.parent / "expected" / "render"
VERSIONS = ("9.1", "9.6", "11", "12", "15")


def pair_spec(version: str, role: str) -> ReplicationSpec:
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
    rendering = render(pair_spec(version, role))
    directory = EXPECTED / version / role
    if os.environ.get("XCHA_REGENERATE_EXPECTED"):
        directory.mkdir(parents=True, exist_ok=True)
        for rendered in rendering.files:
            (directory / Path(rendered.name).name).write_text(rendered.content)
    expected = {path.name: path.read_text() for path in directory.iterdir()}
    assert {Path(f.name).name: f.content for f in rendering.files} == expected


@pytest.mark.parametrize("version", VERSIONS)
def test_every_line_of_the_specification_is_rendered(version: str) -> None:
    master = render(pair_spec(version, "master"))
    standby = render(pair_spec(version, "standby"))
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


def test_archive_and_restore_commands_fix_the_specification_and_quote_paths() -> None:
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
    values = {**pair_spec("15", "standby").__dict__, **change}
    with pytest.raises(InvalidInput, match=message):
        ReplicationSpec(**values)  # type: ignore[arg-type]


def test_trust_is_only_rendered_when_asked_for_and_warns() -> None:
    assert "trust" not in render(pair_spec("15", "master")).file("pg_hba.conf").content
    values = {**pair_spec("15", "master").__dict__, "auth": "trust"}
    rendering = render(ReplicationSpec(**values))  # type: ignore[arg-type]
    assert "trust" in rendering.file("pg_hba.conf").content
    assert rendering.warnings and "without a password" in rendering.warnings[0]


# ---- Postgres-XL and Postgres-XC datanodes ---------------------------------------------------


def pgxc_spec(flavor: str, role: str, **changes: object) -> ReplicationSpec:
    """The specification's pair as an XL (PostgreSQL 10) or XC (9.3) datanode dn1."""
    values = {
        **pair_spec("10" if flavor == "xl" else "9.3", role).__dict__,
        "pgxc": PgxcSettings(flavor, "dn1", 6668 if role == "standby" else 6667, "127.0.0.1", 6666),  # type: ignore[arg-type]
    }
    values.update(changes)
    return ReplicationSpec(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("role", ["master", "standby"])
@pytest.mark.parametrize("flavor", ["xl", "xc"])
def test_a_pgxc_datanode_gets_its_node_name_pooler_and_gtm(flavor: str, role: str) -> None:
    conf = render(pgxc_spec(flavor, role)).file("postgresql.xcha.conf").content
    assert "pgxc_node_name = 'dn1'" in conf  # the datanode's name, also on its standby
    assert f"pooler_port = {6668 if role == 'standby' else 6667}" in conf
    assert "gtm_host = '127.0.0.1'" in conf and "gtm_port = 6666" in conf
    assert "max_prepared_transactions = 100" in conf
    assert "hot_standby = on" in conf and "max_wal_senders = 10" in conf
    assert ("wal_level = replica" if flavor == "xl" else "wal_level = hot_standby") in conf
    assert "wal_keep_segments = 16" in conf and "wal_keep_size" not in conf
    # 9.3 has no wal_retrieve_retry_interval: writing it would stop the server from starting.
    assert ("wal_retrieve_retry_interval = '100ms'" in conf) == (flavor == "xl")
    if role == "standby":
        assert "synchronous_standby_names = ''" in conf
        recovery = render(pgxc_spec(flavor, role)).file("recovery.conf").content
        assert "standby_mode = 'on'" in recovery and "recovery_target_timeline = 'latest'" in recovery
        assert "application_name=dn1b" in recovery  # the member's name, not the node name


def test_xl_uses_md5_and_a_hot_standby_takes_its_own_snapshots() -> None:
    for role in ("master", "standby"):
        rendering = render(pgxc_spec("xl", role))
        conf = rendering.file("postgresql.xcha.conf").content
        assert "password_encryption = 'md5'" in conf
        assert "scram" not in rendering.file("pg_hba.conf").content
        assert ("global_snapshot_source = 'coordinator'" in conf) == (role == "standby")
    assert "scram-sha-256" in render(pair_spec("15", "master")).file("pg_hba.conf").content


def test_xc_has_no_alter_system_and_no_passfile_option() -> None:
    master = render(pgxc_spec("xc", "master", sync=SyncStandbys(SyncPolicy(), ("dn1b",))))
    conf = master.file("postgresql.xcha.conf").content
    assert "synchronous_standby_names = 'dn1b'" in conf  # 9.3's spelling
    assert conf.rstrip().endswith("include_if_exists = 'postgresql.xcha.sync.conf'")
    assert "md5" in master.file("pg_hba.conf").content
    recovery = render(pgxc_spec("xc", "standby")).file("recovery.conf").content
    assert "passfile=" not in recovery and "PGPASSFILE=/var/lib/xcha/pgpass" in recovery


def test_coordinator_networks_are_trusted_for_all_but_replication_and_warn() -> None:
    pgxc = PgxcSettings("xl", "dn1", 6667, "127.0.0.1", 6666, coordinator_networks=("10.0.0.0/24",))
    rendering = render(pgxc_spec("xl", "master", pgxc=pgxc))
    hba = rendering.file("pg_hba.conf").content.splitlines()
    trusted = [line for line in hba if line.endswith("trust")]
    assert trusted == ["host    all          all                  10.0.0.0/24        trust"]
    assert hba.index(trusted[0]) < next(
        i for i, line in enumerate(hba) if line.endswith("md5") and " all " in line
    )
    assert any("poolers log in without a password" in warning for warning in rendering.warnings)
    assert not render(pgxc_spec("xl", "master")).warnings


@pytest.mark.parametrize(
    ("flavor", "version", "message"),
    [
        ("xl", "9.3", "Postgres-XL is PostgreSQL 10 based, not 9.3"),
        ("xc", "15", "Postgres-XC is PostgreSQL 9.3"),
    ],
)
def test_a_pgxc_flavour_refuses_another_version(flavor: str, version: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        pgxc_spec(flavor, "master", version=parse_version(version))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"node_name": "DN-1"}, "invalid node name"),
        ({"pooler_port": 0}, "invalid pooler port"),
        ({"gtm_host": "gtm; rm"}, "invalid GTM host"),
        ({"gtm_port": 70000}, "invalid GTM port"),
        ({"max_prepared_transactions": 0}, "max_prepared_transactions"),
        ({"coordinator_networks": ("10.0.0.0/33",)}, "invalid coordinator network"),
        ({"flavor": "postgresql"}, "expected xl or xc"),
        ({"node_type": "gtm"}, "invalid node type"),
    ],
)
def test_bad_pgxc_settings_are_refused(change: dict[str, object], message: str) -> None:
    values: dict[str, object] = {
        "flavor": "xl",
        "node_name": "dn1",
        "pooler_port": 6667,
        "gtm_host": "127.0.0.1",
        "gtm_port": 6666,
        **change,
    }
    with pytest.raises(InvalidInput, match=message):
        PgxcSettings(**values)  # type: ignore[arg-type]


def test_the_flavour_is_told_from_the_version_outputs() -> None:
    xl = "postgres (PostgreSQL) 10.9 (Postgres-XL 10r1.1)"
    assert detect_flavor(xl, None) == "xl" and parse_version_output(xl) == 100000
    # XC's postgres says only the PostgreSQL version; its gtm says what it is.
    xc = "postgres (PostgreSQL) 9.3.2"
    assert detect_flavor(xc, "gtm (Postgres-XC) 1.2.1") == "xc" and parse_version_output(xc) == 90300
    assert detect_flavor("postgres (PostgreSQL) 15.4 (Debian 15.4-1)", None) == "postgresql"
    assert parse_version_output("postgres (PostgreSQL) 15.4") == 150000
    check_supported("xl", 100000)
    check_supported("xc", 90300)
    with pytest.raises(InvalidInput, match="too old"):
        check_supported("postgresql", 100000)


def test_pgxc_command_lines_per_version() -> None:
    data = Path("/d")
    xc = versions.initdb_args(90300, "xc", data, "postgres", "dn1")
    assert "--auth-host=md5" in xc and "--nodename=dn1" in xc and "--no-instructions" not in xc
    assert "--auth-host=md5" in versions.initdb_args(100000, "xl", data, "postgres", "dn1")
    plain = versions.initdb_args(150000, "postgresql", data, "postgres", None)
    assert "--auth-host=scram-sha-256" in plain and "--no-instructions" in plain
    assert not any(arg.startswith("--nodename") for arg in plain)
    # pg_ctl promote of 10 waits unless -W; 9.3's takes only -D and does not wait.
    assert versions.pg_ctl_promote_args(100000, data) == ("promote", "-W", "-D", "/d")
    assert versions.pg_ctl_promote_args(90300, data) == ("promote", "-D", "/d")
    assert versions.rewind_needs_superuser(100000) and not versions.rewind_needs_superuser(110000)
    assert versions.backup_calls(90300).exclusive and not versions.backup_calls(100000).exclusive
    assert versions.basebackup_wal_method(90300) == "fetch"
    assert versions.basebackup_wal_method(150000) == "stream"
    pgxc = PgxcSettings("xl", "dn1", 6667, "127.0.0.1", 6666)
    assert versions.postmaster_mode(pgxc) == ("--datanode",) and versions.postmaster_mode(None) == ()
