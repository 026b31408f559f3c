"""Shared fixtures: real PostgreSQL on free loopback ports in temporary directories.

Every process a test starts lives under one session directory; at the end of the run any
process still running there (by its working directory or command line) is killed by PID
and fails the run.
"""

import contextlib
import os
import random
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xcha.pg.instance import InstanceSpec, PostgresInstance
from xcha.pg.runner import OsUser, Runner, find_bindir, server_version
from xcha.topology import free_port

SESSION_BASE = Path(tempfile.mkdtemp(prefix="xcha-test-"))
SESSION_BASE.chmod(0o755)


def processes_under(base: Path) -> list[tuple[int, str]]:
    """Live processes whose working directory or command line lies under base."""
    found = []
    prefix = str(base)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            cwd = ""
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/stat") as handle:
                state = handle.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z" and (cwd.startswith(prefix) or prefix in cmdline):
            found.append((int(entry), cmdline or cwd))
    return found


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A plain `kill` of pytest would end it without teardown and leave PostgreSQL, agents and
    # controllers running; as an interrupt, fixtures are torn down and the sweep below runs.
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = processes_under(SESSION_BASE)
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left:
        listing = "\n".join(f"  PID {pid}: {what}" for pid, what in left)
        print(f"\nFAILED: processes started by the tests were still running (killed now):\n{listing}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if session.exitstatus == 0:
        shutil.rmtree(SESSION_BASE, ignore_errors=True)
    else:
        print(f"\ntest directories (logs, data) kept in {SESSION_BASE}")


@dataclass(frozen=True)
class PgEnv:
    bindir: Path
    version: int
    runner: Runner


@pytest.fixture(scope="session")
def pg_env() -> PgEnv:
    bindir = find_bindir()
    return PgEnv(bindir, server_version(bindir), Runner(bindir, OsUser.for_postgres()))


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    # Short: a Unix socket path (socket directory included) must fit in 107 bytes.
    name = request.node.name.removeprefix("test_").replace("[", "-").replace("]", "")[:20]
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=SESSION_BASE))
    path.chmod(0o755)
    yield path


InstanceFactory = Callable[..., PostgresInstance]


@pytest.fixture
async def make_instance(pg_env: PgEnv, workdir: Path) -> AsyncIterator[InstanceFactory]:
    """Build instances of one datanode group (shared archive and replication password);
    every one is stopped at the end of the test, also when it fails."""
    password_file = workdir / "replication.password"
    password_file.write_text(f"pw-{random.getrandbits(64):x}\n")
    password_file.chmod(0o600)
    made: list[PostgresInstance] = []

    def make(name: str, port: int | None = None, **options: object) -> PostgresInstance:
        spec = InstanceSpec.under(
            workdir / name, name, port or free_port(), workdir / "archive", password_file, **options
        )
        instance = PostgresInstance(spec, pg_env.runner, pg_env.version)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        await instance.kill()
