"""Shared fixtures: real PostgreSQL on free loopback ports in temporary directories; a
deployment under write load (`loaded`); the checks every HA scenario ends with.

Every process a test starts lives under one session directory; at the end of the run any
process still running there (by its working directory or command line) is killed by PID
and fails the run.
"""

import asyncio
import contextlib
import os
import random
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import psycopg.errors
import pytest

from xcha.harness import LoadedCluster
from xcha.pg.instance import InstanceSpec, PostgresInstance
from xcha.pg.runner import OsUser, Runner, find_bindir, server_version
from xcha.topology import DatanodePlan, TopologyPlan, free_port
from xcha.workload import Outcome

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


# ---- Postgres-XL / Postgres-XC, built by ./run (scripts/build_pgxc.sh) -----------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
PGXC_FLAVOURS = {
    "xl": ("Postgres-XL", "postgres-xl-10r1.1.tar.xz"),
    "xc": ("Postgres-XC", "postgres-xc-1.2.1.tar.xz"),
}


def pgxc_bindir_or_skip(flavour: str) -> Path:
    """The bindir ./run exported for this flavour (XCHA_XL_BINDIR / XCHA_XC_BINDIR), or a skip
    that says why it is not there."""
    product, tarball_name = PGXC_FLAVOURS[flavour]
    variable = f"XCHA_{flavour.upper()}_BINDIR"
    if value := os.environ.get(variable):
        bindir = Path(value)
        if not (bindir / "postgres").is_file():
            pytest.fail(f"{variable}={value} holds no postgres binary")
        return bindir
    tarball_variable = f"XCHA_{flavour.upper()}_TARBALL"
    tarball = Path(os.environ.get(tarball_variable) or REPO_ROOT.parent / "shared" / flavour / tarball_name)
    if tarball.is_file():
        reason = f"{variable} is not set (./run test builds {product} from {tarball} and sets it)"
    else:
        reason = f"no source tarball at {tarball} ({tarball_variable}) and no {variable}"
    pytest.skip(f"{product} not available: {reason}")


@pytest.fixture(scope="session")
def xl_bindir() -> Path:
    """Postgres-XL 10's installed bindir (initgtm, gtm, gtm_ctl, postgres, pgxc_clean, ...)."""
    return pgxc_bindir_or_skip("xl")


@pytest.fixture(scope="session")
def xc_bindir() -> Path:
    """Postgres-XC 1.2.1's installed bindir (initgtm, gtm, gtm_ctl, postgres, pgxc_clean, ...)."""
    return pgxc_bindir_or_skip("xc")


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


# ---- a deployment under write load ---------------------------------------------------------------

LoadedFactory = Callable[..., Awaitable[LoadedCluster]]


def default_plan(**changes: object) -> TopologyPlan:
    """dn1 as a master/standby pair behind one postgres_fdw coordinator, coord1."""
    values: dict[str, object] = {
        "datanodes": (DatanodePlan("dn1", ("dn1a", "dn1b")),),
        "router": "fdw",
        "coordinators": ("coord1",),
    }
    values.update(changes)
    return TopologyPlan(**values)  # type: ignore[arg-type]


@pytest.fixture
async def loaded(workdir: Path) -> AsyncIterator[LoadedFactory]:
    """A deployment (coordinator, datanodes, agents, controller as real processes) with a writer
    per datanode inserting unique ids through the coordinator; stopped by PID afterwards."""
    clusters: list[LoadedCluster] = []

    async def make(plan: TopologyPlan | None = None) -> LoadedCluster:
        cluster = LoadedCluster(workdir / "x", plan or default_plan())
        clusters.append(cluster)
        await cluster.start()
        return cluster

    yield make
    for cluster in clusters:
        await cluster.down()


# ---- the checks every scenario ends with --------------------------------------------------------


def assert_nothing_lost(outcome: Outcome) -> None:
    """Something was acknowledged, every acknowledged id is there, no id is there unsent."""
    print(
        f"  {outcome.acknowledged} commits acknowledged, {len(outcome.lost)} lost, "
        f"{len(outcome.unexpected)} present but never sent"
    )
    assert outcome.acknowledged > 0, "no commit was acknowledged: nothing was tested"
    assert outcome.lost == [], f"acknowledged but lost: {outcome.lost[:20]}"
    assert outcome.unexpected == [], f"present but never sent: {outcome.unexpected[:20]}"


async def acknowledges_a_write(conninfo: str, statement: str) -> bool:
    """Whether the server behind conninfo acknowledges `statement` (an insert) in autocommit.

    Only three answers count as refusing it: a connection refused or lost (OperationalError,
    which includes a cancelled statement), "read-only transaction" (a standby), and no answer
    within the bounds (a commit waiting for a synchronous standby that no longer confirms). Any
    other error is raised: it says nothing about whether the server would take writes."""
    try:
        async with await asyncio.wait_for(
            psycopg.AsyncConnection.connect(conninfo, autocommit=True), 2
        ) as conn:
            await asyncio.wait_for(conn.execute(statement), 3)
    except (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction, TimeoutError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        print(f"  refused: {type(error).__name__}: {first_line}")
        return False
    return True


def cmdline(pid: int) -> str:
    """A process's command line, words joined by spaces ('' once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
