"""Where one PostgreSQL instance lives and how others reach it; what an operation took."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xcha.errors import InvalidInput
from xcha.names import Endpoint, check_host, check_name, check_port
from xcha.pg.flavor import Flavor, PgxcSettings
from xcha.pg.render import AuthMethod, check_path

SOCKET_PATH_MAX = 107


@dataclass(frozen=True)
class InstanceSpec:
    """Where one instance lives and how others reach it."""

    name: str
    data_dir: Path
    port: int
    archive_dir: Path
    socket_dir: Path
    log_file: Path
    password_file: Path
    passfile: Path
    host: str = "127.0.0.1"
    listen_addresses: str = "127.0.0.1"
    replication_user: str = "xcha_repl"
    auth: AuthMethod = "scram-sha-256"
    superuser: str = "postgres"
    allowed_networks: tuple[str, ...] = field(default=())
    # An XL or XC datanode (node name, pooler port, GTM); None: plain PostgreSQL.
    pgxc: PgxcSettings | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.pgxc is not None and not isinstance(self.pgxc, PgxcSettings):
            raise InvalidInput("pgxc must be PgxcSettings")
        check_port(self.port)
        check_host(self.host)
        for path in (
            self.data_dir,
            self.archive_dir,
            self.socket_dir,
            self.log_file,
            self.password_file,
            self.passfile,
        ):
            check_path(str(path))
        if len(f"{self.socket_dir}/.s.PGSQL.{self.port}.lock") > SOCKET_PATH_MAX:
            raise InvalidInput(f"socket directory {self.socket_dir} is too long for a Unix socket path")

    @classmethod
    def under(
        cls, base: Path, name: str, port: int, archive_dir: Path, password_file: Path, **options: Any
    ) -> "InstanceSpec":
        """The conventional layout: data, run (socket), postgresql.log and pgpass under base."""
        return cls(
            name=name,
            data_dir=base / "data",
            port=port,
            archive_dir=archive_dir,
            socket_dir=base / "run",
            log_file=base / "postgresql.log",
            password_file=password_file,
            passfile=base / "pgpass",
            **options,
        )

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port)

    @property
    def flavor(self) -> Flavor:
        return self.pgxc.flavor if self.pgxc is not None else "postgresql"


@dataclass(frozen=True)
class Timings:
    """What an operation took, in seconds, step by step."""

    steps: tuple[tuple[str, float], ...]

    def __getitem__(self, step: str) -> float:
        return dict(self.steps)[step]
