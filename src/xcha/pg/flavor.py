"""Which PostgreSQL a datanode runs: plain PostgreSQL, Postgres-XL 10 or Postgres-XC 1.2.

What differs between them and is not a matter of the PostgreSQL version underneath (XL 10r1.1
is PostgreSQL 10.9, XC 1.2.1 is PostgreSQL 9.3.2; version differences are decided by the
version number elsewhere in this package):

- an XL/XC node has a node name (`initdb --nodename`, the `pgxc_node_name` setting). It is
  the DATANODE's name, shared by a master and its standbys (a standby is a copy of its
  master and a promoted standby must be the same node to the coordinators); a member's own
  name stays its application_name;
- its postmaster runs with `--datanode` (`pg_ctl start -Z datanode` does the same);
- it needs a pooler port of its own, a reachable GTM (`gtm_host`, `gtm_port`: the GTM or a
  GTM proxy) and `max_prepared_transactions` > 0 (multi-node writes commit by implicit 2PC).

Telling the binaries apart (measured): XL's `postgres --version` says
`postgres (PostgreSQL) 10.9 (Postgres-XL 10r1.1)`; XC's says only
`postgres (PostgreSQL) 9.3.2`, but its bindir holds `gtm`, whose `--version` says
`gtm (Postgres-XC) 1.2.1`. XL's gtm has no --version option (it would start), so it is only
asked when postgres did not already say XL.
"""

import ipaddress
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from xcha.errors import InvalidInput, PostgresError
from xcha.names import check_host, check_name, check_port
from xcha.pg.version import OLDEST_OPERATED, version_text

Flavor = Literal["postgresql", "xl", "xc"]
PgxcFlavor = Literal["xl", "xc"]
NodeType = Literal["datanode", "coordinator"]
FLAVORS: tuple[Flavor, ...] = ("postgresql", "xl", "xc")
PRODUCTS: dict[Flavor, str] = {"postgresql": "PostgreSQL", "xl": "Postgres-XL", "xc": "Postgres-XC"}
# The PostgreSQL major version (server_version_num // 100 for 9.x) each XC-family flavour is.
PGXC_BASE: dict[PgxcFlavor, int] = {"xl": 100000, "xc": 90300}
DEFAULT_MAX_PREPARED_TRANSACTIONS = 100


def check_flavor(value: object) -> Flavor:
    if value not in FLAVORS:
        raise InvalidInput(f"invalid flavor {value!r}: expected one of {', '.join(FLAVORS)}")
    return value


@dataclass(frozen=True)
class PgxcSettings:
    """What an XL or XC node needs beyond a plain PostgreSQL instance. xcha operates
    datanodes; a coordinator (node_type) can be run the same way, e.g. in tests."""

    flavor: PgxcFlavor
    node_name: str
    pooler_port: int
    gtm_host: str
    gtm_port: int
    max_prepared_transactions: int = DEFAULT_MAX_PREPARED_TRANSACTIONS
    # Networks whose coordinators' poolers log in: XL's and XC's pooler connect to a node
    # without a password (their connection strings carry host, port, dbname, user and
    # options only), so pg_hba must trust them for all users but replication.
    coordinator_networks: tuple[str, ...] = ()
    node_type: NodeType = "datanode"

    def __post_init__(self) -> None:
        if self.flavor not in PGXC_BASE:
            raise InvalidInput(f"invalid XC-family flavor {self.flavor!r}: expected xl or xc")
        check_name(self.node_name, "node name (pgxc_node_name)")
        check_port(self.pooler_port, "pooler port")
        check_host(self.gtm_host, "GTM host")
        check_port(self.gtm_port, "GTM port")
        if self.node_type not in ("datanode", "coordinator"):
            raise InvalidInput(f"invalid node type {self.node_type!r}: expected datanode or coordinator")
        for network in self.coordinator_networks:
            try:
                ipaddress.ip_network(network)
            except ValueError:
                message = f"invalid coordinator network {network!r}: expected CIDR, e.g. 192.0.2.0/24"
                raise InvalidInput(message) from None
        if (
            isinstance(self.max_prepared_transactions, bool)
            or not isinstance(self.max_prepared_transactions, int)
            or not 1 <= self.max_prepared_transactions <= 10000
        ):
            raise InvalidInput(
                f"invalid max_prepared_transactions {self.max_prepared_transactions!r}: expected 1 to "
                "10000 (multi-node writes commit by implicit two-phase commit)"
            )


def check_supported(flavor: Flavor, version: int) -> None:
    """Refuse a server version this flavour is not (XL is 10, XC is 9.3, PostgreSQL 12+)."""
    if flavor == "postgresql":
        if version < OLDEST_OPERATED:
            raise InvalidInput(
                f"PostgreSQL {version_text(version)} is too old to operate: xcha needs 12 or newer"
            )
        return
    expected = PGXC_BASE[flavor]
    if version // 100 != expected // 100:
        raise InvalidInput(
            f"{PRODUCTS[flavor]} is PostgreSQL {version_text(expected)} based, not {version_text(version)}"
        )


def parse_version_output(output: str) -> int:
    """server_version_num from `postgres --version` ('... (PostgreSQL) 10.9 ...' -> 100000)."""
    match = re.search(r"\(PostgreSQL\) (\d+)(?:\.(\d+))?", output)
    if match is None:
        raise PostgresError(f"cannot tell the PostgreSQL version from {output.strip()!r}")
    major, minor = int(match.group(1)), int(match.group(2) or 0)
    return major * 10000 + (minor * 100 if major < 10 else 0)


def detect_flavor(postgres_version: str, gtm_version: str | None) -> Flavor:
    """The flavour from `postgres --version` and, when there is a gtm, `gtm --version`."""
    if "Postgres-XL" in postgres_version:
        return "xl"
    if "Postgres-XC" in postgres_version or (gtm_version is not None and "Postgres-XC" in gtm_version):
        return "xc"
    return "postgresql"


def _version_output(program: Path) -> str:
    try:
        out = subprocess.run(
            [str(program), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PostgresError(f"cannot run {program} --version: {error}") from None
    return (out.stdout + out.stderr).strip()


def probe_binaries(bindir: Path) -> tuple[Flavor, int, str]:
    """(flavour, server_version_num, what postgres --version said) of the binaries in bindir."""
    said = _version_output(bindir / "postgres")
    version = parse_version_output(said)
    gtm = bindir / "gtm"
    gtm_said = None
    if "Postgres-XL" not in said and gtm.exists():
        gtm_said = _version_output(gtm)
    return detect_flavor(said, gtm_said), version, said


def check_binaries(bindir: Path, flavor: Flavor) -> int:
    """server_version_num of bindir's postgres, refusing binaries of another flavour (one
    error naming both) or a version the flavour is not."""
    check_flavor(flavor)
    found, version, said = probe_binaries(bindir)
    if found != flavor:
        raise InvalidInput(
            f"postgres.flavor is {flavor!r} but {bindir} holds {PRODUCTS[found]} "
            f"({said!r}): set flavor = {found!r} or point bindir at {PRODUCTS[flavor]} binaries"
        )
    check_supported(flavor, version)
    return version


def password_method(version: int, flavor: Flavor) -> str:
    """How passwords are stored and checked over TCP: scram-sha-256 from PostgreSQL 10 on,
    md5 before, and md5 on Postgres-XL 10. XL links libpq's SCRAM code into the server, and
    a WAL receiver that logged in with SCRAM dies at disconnect (SIGABRT, "free(): invalid
    pointer" in pg_fe_scram_free, measured on every promotion); the postmaster then
    restarts, dropping every session. With md5 the same promotion takes 55 ms."""
    return "scram-sha-256" if version >= 100000 and flavor != "xl" else "md5"
