"""The `xcha` command line: one parser, subcommands that delegate to domain code.

Every operator error is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from xcha import __version__
from xcha.config import ConfigError
from xcha.ctl import add_ctl, add_report_failure
from xcha.errors import InvalidInput, XchaError
from xcha.logs import setup_logging
from xcha.pg.flavor import FLAVORS, PgxcSettings
from xcha.pg.render import ReplicationSpec, render
from xcha.pg.syncrep import SyncPolicy, SyncStandbys
from xcha.pg.version import parse_version
from xcha.tls import DEFAULT_HOSTS, ROLES, Identity, create_ca, describe, issue

Handler = Callable[[argparse.Namespace], int]
PG_VERSION_OF = {"xl": "10", "xc": "9.3"}  # what `pg render --flavor` renders by default
REROUTES = ("fdw", "takeover")  # what `xcha demo` and `xcha up` offer


class DaemonConfig(Protocol):
    """What the agent's and the controller's configurations share here."""

    @property
    def log_format(self) -> str: ...


Config = TypeVar("Config", bound=DaemonConfig)


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (argparse prints usage, then the error, and exits 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _pg_render(args: argparse.Namespace) -> int:
    sync = None
    if args.sync_standbys:
        names = tuple(n.strip() for n in args.sync_standbys.split(",") if n.strip())
        sync = SyncStandbys(SyncPolicy.parse(args.sync), names)
    pgxc = None
    if args.flavor != "postgresql":
        pgxc = PgxcSettings(
            flavor=args.flavor,
            node_name=args.node_name,
            pooler_port=args.pooler_port or (6667 if args.role == "master" else 6668),
            gtm_host=args.gtm_host,
            gtm_port=args.gtm_port,
            coordinator_networks=tuple(args.coordinator_network),
        )
    pg_version = args.pg_version or PG_VERSION_OF.get(args.flavor)
    if pg_version is None:
        raise InvalidInput("--pg-version is required for plain PostgreSQL (e.g. 15)")
    spec = ReplicationSpec(
        version=parse_version(pg_version),
        role=args.role,
        name=args.name,
        port=args.port if args.port is not None else (5432 if args.role == "master" else 5433),
        archive_dir=args.archive_dir,
        socket_dir=args.socket_dir,
        primary_host=args.primary_host if args.role == "standby" else None,
        primary_port=args.primary_port if args.role == "standby" else None,
        replication_user=args.replication_user,
        passfile=args.passfile,
        auth=args.auth,
        sync=sync,
        pgxc=pgxc,
    )
    rendering = render(spec)
    for warning in rendering.warnings:
        print(f"xcha: warning: {warning}", file=sys.stderr)
    for rendered in rendering.files:
        note = f"  ({rendered.note})" if rendered.note else ""
        print(f"==> {rendered.name}{note}")
        print(rendered.content, end="" if rendered.content.endswith("\n") or not rendered.content else "\n")
        print()
    return 0


def _add_pg(commands: argparse._SubParsersAction[Parser]) -> None:
    pg = commands.add_parser("pg", help="PostgreSQL configuration as xcha writes it")
    pg_commands = pg.add_subparsers(dest="pg_command", required=True)
    r = pg_commands.add_parser(
        "render", help="print the files xcha would write for one instance, touching nothing"
    )
    r.add_argument("--role", choices=("master", "standby"), required=True)
    r.add_argument(
        "--flavor",
        choices=FLAVORS,
        default="postgresql",
        help="plain PostgreSQL (default), a Postgres-XL 10 (xl) or Postgres-XC 1.2 (xc) datanode",
    )
    r.add_argument(
        "--pg-version",
        help="target version: 9.1 ... 9.6, 10, 11, 12, ...; required for postgresql, "
        "10 for xl and 9.3 for xc by default",
    )
    r.add_argument("--name", default="dn1", help="member name (application_name); default dn1")
    r.add_argument("--port", type=int, help="default 5432 for a master, 5433 for a standby")
    r.add_argument("--primary-host", default="127.0.0.1")
    r.add_argument("--primary-port", type=int, default=5432)
    r.add_argument("--archive-dir", default="/var/lib/xcha/archive")
    r.add_argument("--socket-dir", default=None)
    r.add_argument("--passfile", default="/var/lib/xcha/pgpass")
    r.add_argument("--replication-user", default="xcha_repl")
    r.add_argument("--auth", choices=("scram-sha-256", "trust"), default="scram-sha-256")
    r.add_argument("--sync", default="FIRST 1", help="synchronous policy, FIRST k or ANY k")
    r.add_argument("--sync-standbys", default="", help="comma-separated standby names (master only)")
    xc = r.add_argument_group("xl and xc datanodes")
    xc.add_argument(
        "--node-name", default="dn1", help="the datanode's node name (initdb --nodename); default dn1"
    )
    xc.add_argument("--pooler-port", type=int, help="default 6667 for a master, 6668 for a standby")
    xc.add_argument("--gtm-host", default="127.0.0.1", help="the GTM or GTM proxy; default 127.0.0.1")
    xc.add_argument("--gtm-port", type=int, default=6666, help="default 6666")
    xc.add_argument(
        "--coordinator-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="trusted for the coordinators' poolers, which log in without a password (repeat)",
    )
    r.set_defaults(handler=_pg_render)


def _demo(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else None
    if args.flavor:
        from xcha.demo_pgxc import run_pgxc_demo

        return asyncio.run(run_pgxc_demo(args.flavor, workdir=workdir, as_json=args.json))
    from xcha.demo import run_demo

    return asyncio.run(run_demo(workdir=workdir, as_json=args.json, reroute=args.reroute or "fdw"))


def _up(args: argparse.Namespace) -> int:
    from xcha.demo import start_topology

    workdir = Path(args.workdir).absolute()
    return asyncio.run(start_topology(workdir, args.reroute, args.flavor, args.controllers))


def _flavour_options(parser: Parser, reroute_help: str) -> None:
    """--reroute, --xl and --xc: one of them at most (an XL / XC cluster has its own router)."""
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--reroute", choices=REROUTES, help=reroute_help)
    for flavor, product in (("xl", "Postgres-XL 10"), ("xc", "Postgres-XC 1.2")):
        choice.add_argument(
            f"--{flavor}",
            dest="flavor",
            action="store_const",
            const=flavor,
            help=f"a {product} cluster: a GTM, coordinators coord1 and coord2, the pgxc router "
            f"(binaries from XCHA_{flavor.upper()}_BINDIR)",
        )


def _supervise(args: argparse.Namespace) -> int:
    from xcha.supervisor import supervise

    return supervise(Path(args.workdir))


def _down(args: argparse.Namespace) -> int:
    from xcha.topology import Topology

    stopped = asyncio.run(Topology.load(Path(args.workdir)).down())
    print(f"stopped {len(stopped)}: {', '.join(stopped) or 'nothing was running'}")
    return 0


def _add_demo(commands: argparse._SubParsersAction[Parser]) -> None:
    d = commands.add_parser("demo", help="a failover under load on real processes, then tear it all down")
    d.add_argument("--workdir", help="build the demo here instead of a temporary directory")
    d.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    _flavour_options(d, "re-point the coordinator (fdw, default) or take over the old master's port")
    d.set_defaults(handler=_demo)
    up = commands.add_parser(
        "up", help="start the demo topology (or what of it is not running) and leave it running, supervised"
    )
    up.add_argument("--workdir", required=True)
    up.add_argument(
        "--controllers",
        type=int,
        choices=(1, 3),
        help="1 (default: SQLite store) or 3: three controllers, one leader elected on a three-member "
        "etcd cluster started with them",
    )
    _flavour_options(
        up, "as for demo (default fdw); a stopped deployment starts again with its own (also --xl, --xc)"
    )
    up.set_defaults(handler=_up)
    down = commands.add_parser("down", help="stop every process `xcha up` started there, by PID")
    down.add_argument("--workdir", required=True)
    down.set_defaults(handler=_down)
    supervise = commands.add_parser(
        "supervise", help="what `xcha up` runs: keep the controller and the agents running, as systemd does"
    )
    supervise.add_argument("--workdir", required=True)
    supervise.set_defaults(handler=_supervise)


def _check_or_serve(
    args: argparse.Namespace,
    load: Callable[[Path], Config],
    serve: Callable[[Config], Coroutine[Any, Any, None]],
    name: str,
) -> int:
    try:
        config = load(Path(args.config))
    except ConfigError as error:
        for line in error.lines():
            print(line, file=sys.stderr)
        return 1
    if args.check_config:
        print(f"{args.config}: ok")
        return 0
    setup_logging(config.log_format, name)
    asyncio.run(serve(config))
    return 0


def _agent(args: argparse.Namespace) -> int:
    from xcha.agent.config import load_agent_config
    from xcha.agent.main import serve_agent

    return _check_or_serve(args, load_agent_config, serve_agent, "agent")


def _controller(args: argparse.Namespace) -> int:
    from xcha.controller.config import load_controller_config
    from xcha.controller.main import serve_controller

    return _check_or_serve(args, load_controller_config, serve_controller, "controller")


def _add_daemons(commands: argparse._SubParsersAction[Parser]) -> None:
    for name, handler, text in (
        ("agent", _agent, "run the agent beside one PostgreSQL instance"),
        ("controller", _controller, "run the controller (with the coordinators)"),
    ):
        parser = commands.add_parser(name, help=text)
        parser.add_argument("--config", required=True, help=f"{name}.toml")
        parser.add_argument(
            "--check-config",
            action="store_true",
            help="report every problem of the configuration, with its key, and exit",
        )
        parser.set_defaults(handler=handler)


def _tls_identity(text: str) -> Identity:
    """controller, ROLE/NAME or agent/DATANODE/MEMBER; a role alone is named after itself."""
    text = text.strip()
    if text in ROLES and text != "agent":
        return Identity(text, text)
    return Identity.parse(text)


def _tls_init(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    identities = [_tls_identity(item) for item in args.identities.split(",") if item.strip()]
    hosts = tuple(h.strip() for h in args.hosts.split(",") if h.strip())
    if (directory / "ca.pem").exists():
        print(f"using the CA in {directory}")
    else:
        create_ca(directory)
    for identity in identities:
        cert, key = issue(directory, identity, hosts)
        print(f"{identity}: {cert} {key}")
    return 0


def _tls_issue(args: argparse.Namespace) -> int:
    name = args.name.split("/") if args.role == "agent" else [args.name]
    if args.role == "agent" and len(name) != 2:
        raise InvalidInput(f"an agent's --name is DATANODE/MEMBER (e.g. dn1/dn1a), not {args.name!r}")
    identity = Identity(args.role, name[-1], name[0] if args.role == "agent" else "")
    if not 1 <= args.days <= 3650:
        raise InvalidInput(f"invalid --days {args.days}: from 1 to 3650")
    directory = Path(args.directory)
    existing = [
        p for p in (directory / f"{identity.name}.pem", directory / f"{identity.name}.key") if p.exists()
    ]
    if existing and not args.force:
        raise InvalidInput(f"{existing[0]} exists: give --force to replace it (renewing a certificate)")
    hosts = tuple(args.host) if args.host else DEFAULT_HOSTS
    cert, key = issue(directory, identity, hosts, datetime.timedelta(days=args.days))
    print(f"{identity}: {cert} {key}")
    return 0


def _tls_show(args: argparse.Namespace) -> int:
    print("\n".join(describe(Path(path)) for path in args.files), end="")
    return 0


def _add_tls(commands: argparse._SubParsersAction[Parser]) -> None:
    tls = commands.add_parser(
        "tls",
        help="certificates for mTLS: each names who holds it (xcha://ROLE/NAME), which the servers authorize",
    )
    sub = tls.add_subparsers(dest="tls_command", required=True)
    init_parser = sub.add_parser("init", help="create a CA (once) and a certificate per identity")
    init_parser.add_argument("directory")
    init_parser.add_argument(
        "--identities",
        required=True,
        help="comma-separated ROLE/NAME (a role alone: named after itself) or agent/DATANODE/MEMBER, "
        "e.g. controller,operator,agent/dn1/dn1a,agent/dn1/dn1b; roles: agent, controller, operator, "
        "coordinator, monitor",
    )
    init_parser.add_argument(
        "--hosts", default=",".join(DEFAULT_HOSTS), help="addresses the certificates are valid for"
    )
    init_parser.set_defaults(handler=_tls_init)
    issue_parser = sub.add_parser(
        "issue", help="one more certificate from the CA in DIRECTORY (a new agent, an operator)"
    )
    issue_parser.add_argument(
        "directory", help="holds ca.pem and ca.key; NAME.pem and NAME.key are written there"
    )
    issue_parser.add_argument("--role", required=True, choices=ROLES)
    issue_parser.add_argument("--name", required=True, help="NAME, or DATANODE/MEMBER for an agent")
    issue_parser.add_argument(
        "--host",
        action="append",
        help="a host name or address it serves on (repeat; default 127.0.0.1, ::1, localhost)",
    )
    issue_parser.add_argument("--days", type=int, default=825, help="validity (default 825)")
    issue_parser.add_argument("--force", action="store_true", help="replace existing files (renewal)")
    issue_parser.set_defaults(handler=_tls_issue)
    show_parser = sub.add_parser("show", help="a certificate's identity, role, name, hosts and expiry")
    show_parser.add_argument("files", nargs="+", metavar="FILE")
    show_parser.set_defaults(handler=_tls_show)


def _fdw_sql(args: argparse.Namespace) -> int:
    from xcha.coordinator import fdw_setup
    from xcha.names import Endpoint

    datanodes = []
    for item in args.datanode:
        name, sep, address = item.partition("=")
        if not sep:
            raise InvalidInput(f"invalid --datanode {item!r}: expected NAME=HOST:PORT")
        datanodes.append((name, Endpoint.parse(address, f"address of {name}")))
    password = Path(args.password_file).read_text().strip() if args.password_file else "CHANGE-ME"
    for statement in fdw_setup(datanodes, args.user, password, dbname=args.dbname):
        print(statement.as_string(None) + ";")
    return 0


def _add_coordinator(commands: argparse._SubParsersAction[Parser]) -> None:
    coordinator = commands.add_parser("coordinator", help="set up a plain PostgreSQL coordinator")
    sub = coordinator.add_subparsers(dest="coordinator_command", required=True)
    fdw = sub.add_parser(
        "fdw-sql",
        help="print the postgres_fdw setup: a foreign server per datanode and a "
        "hash-partitioned table over them",
    )
    fdw.add_argument(
        "--datanode",
        action="append",
        required=True,
        metavar="NAME=HOST:PORT",
        help="each datanode's master (repeat, in partition order)",
    )
    fdw.add_argument("--user", default="xcha_app", help="the role the coordinator uses on the datanodes")
    fdw.add_argument("--password-file", help="its password (default: the placeholder CHANGE-ME)")
    fdw.add_argument("--dbname", default="postgres")
    fdw.set_defaults(handler=_fdw_sql)


def build_parser() -> Parser:
    parser = Parser(prog="xcha", description="High availability for Postgres-XC style datanodes.")
    parser.add_argument("--version", action="version", version=f"xcha {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _add_pg(commands)
    _add_daemons(commands)
    add_ctl(commands)
    add_report_failure(commands)
    _add_tls(commands)
    _add_coordinator(commands)
    _add_demo(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except XchaError as error:
        print(f"xcha: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("xcha: interrupted", file=sys.stderr)
        return 130
