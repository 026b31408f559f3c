"""Render the specification's master/slave configuration for one PostgreSQL version.

Pure functions: they return file names and contents and touch nothing, so the same
rendering serves `xcha pg render` (review before anything changes) and the agent
(which writes the files). Two faults of the specification are fixed here on purpose:
its `cp -i` archive_command is no guard against overwriting without a terminal, and
its restore_command has %p and %f swapped.
"""

import ipaddress
import shlex
from dataclasses import dataclass, field
from typing import Literal

from psycopg.conninfo import make_conninfo

from xcha.errors import InvalidInput
from xcha.names import check_host, check_name, check_port
from xcha.pg.flavor import PRODUCTS, Flavor, PgxcSettings, check_supported, password_method
from xcha.pg.syncrep import SyncStandbys
from xcha.pg.version import OLDEST_RENDERED, version_text

Role = Literal["master", "standby"]
AuthMethod = Literal["scram-sha-256", "trust"]

XCHA_CONF = "postgresql.xcha.conf"
# Before 9.4 there is no ALTER SYSTEM: synchronous_standby_names set at run time lives in this
# file, included at the end of XCHA_CONF (what postgresql.auto.conf is from 9.4 on).
SYNC_CONF = "postgresql.xcha.sync.conf"
ALTER_SYSTEM_SINCE = 90400
INCLUDE_LINE = f"include_if_exists = '{XCHA_CONF}'\t# added by xcha"
HEADER = "# Managed by xcha: rewritten on every role change."


@dataclass(frozen=True)
class ReplicationSpec:
    """Everything that decides one instance's configuration files."""

    version: int
    role: Role
    name: str
    port: int
    archive_dir: str
    socket_dir: str | None = None
    listen_addresses: str = "127.0.0.1"
    primary_host: str | None = None
    primary_port: int | None = None
    replication_user: str = "xcha_repl"
    passfile: str | None = None
    auth: AuthMethod = "scram-sha-256"
    superuser: str = "postgres"
    local_os_users: tuple[str, ...] = ("postgres",)
    allowed_networks: tuple[str, ...] = ()
    sync: SyncStandbys | None = None
    pgxc: PgxcSettings | None = None  # an XL or XC datanode; None: plain PostgreSQL
    detached: bool = False  # a standby that streams from no one (Detach): no primary_conninfo

    def __post_init__(self) -> None:
        if self.version < OLDEST_RENDERED:
            raise InvalidInput("PostgreSQL versions older than 9.1 are not supported")
        if self.pgxc is not None:
            if not isinstance(self.pgxc, PgxcSettings):
                raise InvalidInput("pgxc must be PgxcSettings")
            check_supported(self.pgxc.flavor, self.version)
        if self.role not in ("master", "standby"):
            raise InvalidInput(f"invalid role {self.role!r}: expected master or standby")
        check_name(self.name)
        check_port(self.port)
        check_name(self.replication_user, "replication user")
        check_name(self.superuser, "superuser name")
        for user in self.local_os_users:
            check_name(user, "OS user name")
        if self.auth not in ("scram-sha-256", "trust"):
            raise InvalidInput(f"invalid auth {self.auth!r}: expected scram-sha-256 or trust")
        for directory in (self.archive_dir, self.socket_dir, self.passfile):
            if directory is not None:
                check_path(directory)
        for address in self.listen_addresses.split(","):
            if address.strip() not in ("*", "localhost"):
                check_host(address.strip(), "listen address")
        for network in self.allowed_networks:
            try:
                ipaddress.ip_network(network)
            except ValueError:
                message = f"invalid allowed network {network!r}: expected CIDR, e.g. 192.0.2.0/24"
                raise InvalidInput(message) from None
        if self.detached and self.role != "standby":
            raise InvalidInput("only a standby can be detached")
        if self.role == "standby" and not self.detached:
            if self.primary_host is None or self.primary_port is None:
                raise InvalidInput("a standby needs the primary's host and port")
            check_host(self.primary_host, "primary host")
            check_port(self.primary_port, "primary port")
        if self.sync is not None:
            self.sync.render(self.version)  # refuses what this version cannot express

    @property
    def flavor(self) -> Flavor:
        return self.pgxc.flavor if self.pgxc is not None else "postgresql"


@dataclass(frozen=True)
class RenderedFile:
    name: str
    content: str
    note: str = ""


@dataclass(frozen=True)
class Rendering:
    files: tuple[RenderedFile, ...]
    warnings: tuple[str, ...] = field(default=())

    def file(self, name: str) -> RenderedFile:
        for rendered in self.files:
            if rendered.name == name:
                return rendered
        raise KeyError(name)


def check_path(path: str) -> str:
    """Refuse paths that would break the shell commands and settings they are put in."""
    if not path.startswith("/"):
        raise InvalidInput(f"invalid path {path!r}: use an absolute path")
    if any(ch in path for ch in "%\n\r\0"):
        raise InvalidInput(f"invalid path {path!r}: '%', newlines and NUL are not allowed")
    return path


def guc_quote(value: str) -> str:
    """A postgresql.conf string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def archive_command(archive_dir: str) -> str:
    """Copy a finished WAL file to the archive, refusing to overwrite one already there."""
    target = shlex.quote(archive_dir.rstrip("/") or "/") + "/%f"
    return f"test ! -f {target} && cp %p {target}"


def restore_command(archive_dir: str) -> str:
    """Copy an archived WAL file (%f) to where the server asks for it (%p)."""
    return f"cp {shlex.quote(archive_dir.rstrip('/') or '/')}/%f %p"


def primary_conninfo(spec: ReplicationSpec) -> str:
    params: dict[str, str | int] = {
        "host": spec.primary_host or "",
        "port": spec.primary_port or 0,
        "user": spec.replication_user,
        "application_name": spec.name,
    }
    if spec.passfile is not None and spec.version >= 100000:
        params["passfile"] = spec.passfile
    return make_conninfo("", **params)


def _setting(name: str, value: str, comment: str = "") -> str:
    line = f"{name} = {value}"
    return f"{line:<60} # {comment}" if comment else line


def _conf(spec: ReplicationSpec) -> str:
    version = spec.version
    product = f"{PRODUCTS[spec.flavor]} datanode, " if spec.pgxc is not None else ""
    lines = [
        HEADER,
        "# Included at the end of postgresql.conf: local settings go there, overrides here.",
        f"# {spec.role} {spec.name}, {product}PostgreSQL {version_text(version)}",
        "",
    ]
    lines.append(_setting("listen_addresses", guc_quote(spec.listen_addresses)))
    lines.append(_setting("port", str(spec.port)))
    if spec.pgxc is not None:
        lines.extend(_pgxc_settings(spec.pgxc))
    if spec.socket_dir is not None:
        key = "unix_socket_directories" if version >= 90300 else "unix_socket_directory"
        lines.append(_setting(key, guc_quote(spec.socket_dir)))
        lines.append(_setting("unix_socket_permissions", "0700", "only the server's OS user and root"))
    if version >= 90600:
        lines.append(_setting("wal_level", "replica", "called hot_standby before 9.6"))
    else:
        lines.append(_setting("wal_level", "hot_standby"))
    lines.append(_setting("archive_mode", "on"))
    lines.append(
        _setting(
            "archive_command",
            guc_quote(archive_command(spec.archive_dir)),
            "never overwrites an archived file (cp -i asks only on a terminal)",
        )
    )
    lines.append(_setting("max_wal_senders", "10"))
    if version >= 130000:
        lines.append(_setting("wal_keep_size", "'256MB'", "a standby catching up finds its WAL"))
    else:
        lines.append(_setting("wal_keep_segments", "16", "a standby catching up finds its WAL"))
    if version >= 90400:
        lines.append(_setting("wal_log_hints", "on", "pg_rewind needs it"))
    else:
        lines.append("# wal_log_hints needs 9.4: initdb --data-checksums (9.3) lets a rewind tool work")
    lines.append(_setting("hot_standby", "on"))
    lines.append(_setting("synchronous_commit", "on"))
    if version >= 90500:
        lines.append(_setting("wal_retrieve_retry_interval", "'100ms'", "a promote waits at most this"))
    lines.append(_setting("wal_receiver_status_interval", "'1s'", "the master sees a live standby"))
    # A hung synchronous standby holds every commit until its WAL sender gives up on it (60 s
    # by default: a soak measured writes blocked 61 s); then it leaves pg_stat_replication and
    # the controller drops it from the synchronous standbys. Before PostgreSQL 12 (no
    # reply_time) a master's self-fencing also counts on it.
    lines.append(_setting("wal_sender_timeout", "'5s'", "a silent standby leaves pg_stat_replication"))
    if version >= 100000:
        method = password_method(version, spec.flavor)
        note = "not scram: see xcha.pg.flavor.password_method" if method != "scram-sha-256" else ""
        lines.append(_setting("password_encryption", guc_quote(method), note))
    if spec.role == "master" and spec.sync is not None:
        lines.append(_setting("synchronous_standby_names", guc_quote(spec.sync.render(version))))
    if spec.role == "standby" and spec.pgxc is not None:
        # postgresql.conf came from the master with the copy: a promoted standby that kept
        # the master's names would wait for a standby of its own on every commit.
        lines.append(_setting("synchronous_standby_names", "''", "a promoted standby waits for nobody"))
    if spec.role == "standby" and spec.flavor == "xl":
        # XL takes every snapshot from the GTM, which a server in recovery cannot: without
        # this even logging in fails ("Was unable to obtain a snapshot from GTM"). A promoted
        # standby is configured as a master at once, without it.
        lines.append(_setting("global_snapshot_source", "'coordinator'", "a hot standby's own snapshots"))
    if spec.role == "standby" and version >= 120000:
        lines.append("")
        lines.append("# Recovery settings (recovery.conf before 12; standby.signal marks a standby)")
        lines.extend(_recovery_settings(spec))
    elif version >= 120000:
        lines.append(
            _setting(
                "restore_command",
                guc_quote(restore_command(spec.archive_dir)),
                "unused by a master; pg_rewind reads it",
            )
        )
    if version < ALTER_SYSTEM_SINCE and spec.pgxc is not None:
        # (xcha operates a server this old only as Postgres-XC; plain 9.x is rendered only)
        lines.append("")
        lines.append("# No ALTER SYSTEM before 9.4: synchronous_standby_names set at run time")
        lines.append(_setting("include_if_exists", guc_quote(SYNC_CONF)))
    return "\n".join(lines) + "\n"


def _pgxc_settings(pgxc: PgxcSettings) -> list[str]:
    return [
        "",
        f"# {PRODUCTS[pgxc.flavor]}: the datanode's node name, shared by its master and standbys",
        _setting("pgxc_node_name", guc_quote(pgxc.node_name), "initdb --nodename wrote it too"),
        _setting("pooler_port", str(pgxc.pooler_port), "one of its own per node on a host"),
        _setting("gtm_host", guc_quote(pgxc.gtm_host), "the GTM or a GTM proxy"),
        _setting("gtm_port", str(pgxc.gtm_port)),
        _setting(
            "max_prepared_transactions",
            str(pgxc.max_prepared_transactions),
            "multi-node writes commit by implicit 2PC",
        ),
        "",
    ]


def _recovery_settings(spec: ReplicationSpec) -> list[str]:
    if spec.version >= 100000:
        password_note = []
    elif spec.pgxc is not None and spec.passfile is not None:  # xcha starts this server
        password_note = [f"# the password comes from PGPASSFILE={spec.passfile}, set by xcha for the server"]
    else:
        password_note = [
            "# the password comes from ~/.pgpass of the server's OS user (passfile= needs PostgreSQL 10)"
        ]
    if spec.detached:
        # 12+: an empty primary_conninfo starts no WAL receiver. recovery.conf (before 12) has
        # no such rule: an empty one would connect with libpq's defaults, so it has none.
        streaming = (
            [_setting("primary_conninfo", "''", "detached: streams from no one until told to follow")]
            if spec.version >= 120000
            else ["# detached: no primary_conninfo, streams from no one until told to follow"]
        )
    else:
        streaming = [*password_note, _setting("primary_conninfo", guc_quote(primary_conninfo(spec)))]
    return [
        *streaming,
        _setting(
            "restore_command",
            guc_quote(restore_command(spec.archive_dir)),
            "from the archive (%f) to where the server wants it (%p)",
        ),
        _setting("recovery_target_timeline", "'latest'", "follow a promoted standby"),
    ]


def _recovery_conf(spec: ReplicationSpec) -> str:
    lines = [HEADER, "", _setting("standby_mode", "'on'"), *_recovery_settings(spec)]
    return "\n".join(lines) + "\n"


def _hba(spec: ReplicationSpec) -> str:
    password = password_method(spec.version, spec.flavor)
    replication = "trust" if spec.auth == "trust" else password
    networks = ("127.0.0.1/32", "::1/128", *spec.allowed_networks)
    rows = [("local", "all", "all", "", "peer map=xcha")]
    rows += [("host", "replication", spec.replication_user, net, replication) for net in networks]
    if spec.pgxc is not None:  # their poolers log in without a password
        rows += [("host", "all", "all", net, "trust") for net in spec.pgxc.coordinator_networks]
    rows += [("host", "all", "all", net, password) for net in networks]
    lines = [HEADER, "# TYPE  DATABASE     USER                 ADDRESS            METHOD"]
    lines += [f"{t:<7} {d:<12} {u:<20} {a:<18} {m}".rstrip() for t, d, u, a, m in rows]
    return "\n".join(lines) + "\n"


def _ident(spec: ReplicationSpec) -> str:
    lines = [HEADER, "# MAPNAME  SYSTEM-USERNAME      PG-USERNAME"]
    for user in dict.fromkeys(spec.local_os_users):
        lines.append(f"xcha       {user:<20} {spec.superuser}")
    return "\n".join(lines) + "\n"


def render(spec: ReplicationSpec) -> Rendering:
    """The files one instance needs, for its role and PostgreSQL version."""
    files = [
        RenderedFile("postgresql.conf", INCLUDE_LINE + "\n", note="line appended once"),
        RenderedFile(XCHA_CONF, _conf(spec)),
        RenderedFile("pg_hba.conf", _hba(spec)),
        RenderedFile("pg_ident.conf", _ident(spec)),
    ]
    if spec.role == "standby":
        if spec.version >= 120000:
            files.append(RenderedFile("standby.signal", "", note="empty: marks the server a standby"))
        else:
            files.append(RenderedFile("recovery.conf", _recovery_conf(spec)))
    if spec.passfile is not None:
        files.append(
            RenderedFile(
                spec.passfile,
                f"*:*:*:{spec.replication_user}:<password from the replication password file>\n",
                note="libpq password file, mode 0600",
            )
        )
    warnings = []
    if spec.pgxc is not None and spec.pgxc.coordinator_networks:
        warnings.append(
            f"pg_hba trusts {', '.join(spec.pgxc.coordinator_networks)} for every user but replication: "
            f"{PRODUCTS[spec.flavor]} coordinators' poolers log in without a password"
        )
    if spec.auth == "trust":
        warnings.append(
            f"pg_hba 'trust' lets anyone who reaches the server replicate as {spec.replication_user} "
            "without a password: use scram-sha-256 unless the network is yours alone"
        )
    return Rendering(tuple(files), tuple(warnings))
