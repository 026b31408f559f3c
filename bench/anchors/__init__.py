"""The systems xcha is compared with (Patroni and pg_auto_failover), run on this machine as real processes.

An `Anchor` is a two-node PostgreSQL HA deployment managed by another tool. Everything runs
as the unprivileged PostgreSQL OS user in a fresh directory; every process started is
recorded and stopped by PID: the managers' process trees (found through /proc parent links)
and every process whose working directory or command line lies in that directory (PostgreSQL
processes run in their data directory, as `xcha.pg.instance.PostgresInstance.processes`
relies on too).
"""

import abc
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from xcha.pg.client import bounded, connect
from xcha.pg.runner import OsUser, find_bindir

CACHE = Path(os.environ.get("XCHA_BENCH_CACHE", "/var/tmp/xcha-bench"))


class AnchorUnavailable(Exception):
    """The anchor could not be installed or started: reported, and the comparison goes on."""


# ---- processes ------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    found = _stat(pid)
    return found is not None and found[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """pid and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = _stat(int(entry))
            if found is not None:
                children.setdefault(found[1], []).append(int(entry))
    result, pending = [], [pid]
    while pending:
        current = pending.pop()
        if alive(current):
            result.append(current)
        pending.extend(children.get(current, []))
    return result


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def processes_in(directory: Path) -> list[int]:
    """Live processes whose working directory is directory (PostgreSQL runs in its data dir)."""
    target = os.path.realpath(directory)
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _cwd(int(e)) == target and alive(int(e))]


def processes_under(base: Path) -> list[int]:
    """Live processes working in base or naming it on their command line, except this one."""
    root = os.path.realpath(base)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        cwd = _cwd(pid)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read().decode(errors="replace")
        except OSError:
            continue
        if (cwd == root or cwd.startswith(root + "/") or root in cmdline) and alive(pid):
            found.append(pid)
    return found


def signal_pids(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


class Processes:
    """Long-running programs started as the PostgreSQL OS user, recorded by key and PID."""

    def __init__(self, base: Path, user: OsUser, env: Mapping[str, str]) -> None:
        self.base = base
        self.user = user
        self.env = dict(env)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.seen: set[int] = set()

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"env": self.env, "cwd": str(self.base)}
        if self.user.uid != os.geteuid():
            options.update(user=self.user.uid, group=self.user.gid, extra_groups=list(self.user.groups))
        return options

    def spawn(self, key: str, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as handle:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._options(),
            )
        self.children[key] = process
        self.seen.add(process.pid)
        return process

    async def run(self, argv: Sequence[str], log: Path, timeout: float = 300) -> str:
        """Run a program to completion as the PostgreSQL user; its output is appended to log."""
        options = self._options()
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **options
        )
        self.seen.add(process.pid)
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout)
        except (TimeoutError, asyncio.CancelledError):
            signal_pids(descendants(process.pid), signal.SIGKILL)
            await process.wait()
            raise
        text = output.decode(errors="replace")
        with open(log, "a") as handle:
            handle.write(f"$ {' '.join(argv)}\n{text}\n")
        if process.returncode != 0:
            tail = "\n".join(text.strip().splitlines()[-30:])
            raise AnchorUnavailable(f"{Path(argv[0]).name} failed (exit {process.returncode}): {tail}")
        return text

    def tree(self, key: str) -> list[int]:
        child = self.children.get(key)
        return descendants(child.pid) if child is not None and child.poll() is None else []

    def exited(self) -> list[str]:
        return [key for key, child in self.children.items() if child.poll() is not None]

    def stop(self, key: str, timeout: float = 15) -> None:
        """SIGTERM to one program's tree (after SIGCONT), SIGKILL after timeout; reaps it."""
        child = self.children.pop(key, None)
        if child is None:
            return
        pids = descendants(child.pid)
        signal_pids(pids, signal.SIGCONT)
        signal_pids([child.pid], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        signal_pids([p for p in pids if alive(p)], signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(5)

    def stop_all(self, timeout: float = 15) -> list[int]:
        """Every program gently (SIGTERM, in parallel), then SIGKILL of whatever is left that was
        started here: the programs' trees and every process working in or naming the base dir."""
        for child in self.children.values():
            signal_pids(descendants(child.pid), signal.SIGCONT)
        signal_pids(processes_under(self.base), signal.SIGCONT)
        for child in self.children.values():
            signal_pids([child.pid], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(c.poll() is None for c in self.children.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        killed: list[int] = []
        for _ in range(20):
            left = [p for c in self.children.values() for p in descendants(c.pid)]
            left += processes_under(self.base)
            left = sorted(set(left))
            if not left:
                break
            signal_pids(left, signal.SIGKILL)
            killed.extend(left)
            time.sleep(0.2)
        for child in self.children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)
        self.children.clear()
        return sorted(set(killed))


# ---- the deployments ----------------------------------------------------------------------------------


def pg_env(bindir: Path, home: Path) -> dict[str, str]:
    return {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "HOME": str(home),
        "LC_ALL": "C.UTF-8",
        "LANG": "C.UTF-8",
        "PGSYSCONFDIR": "/nonexistent",
    }


def is_primary(role: str) -> bool:
    """A role from `Anchor.roles` that takes writes: "primary", or "primary (...)" without a standby
    (not a transition such as "primary -> demoted")."""
    return role == "primary" or role.startswith("primary (")


class Anchor(abc.ABC):
    """A two-node deployment of another HA manager under test."""

    system = "anchor"
    nodes: tuple[str, ...] = ("node1", "node2")

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self.user = OsUser.for_postgres()
        self.bindir = find_bindir()
        self.base = Path(tempfile.mkdtemp(prefix=f"xcha-bench-{self.system}-"))
        self.base.chmod(0o755)
        os.chown(self.base, self.user.uid, self.user.gid)
        self.procs = Processes(self.base, self.user, pg_env(self.bindir, self.base))
        self.ports: dict[str, int] = {}

    # -- what every anchor provides

    @abc.abstractmethod
    async def install(self) -> str:
        """Make the software available; returns its version. Raises AnchorUnavailable."""

    @abc.abstractmethod
    async def start(self, timeout: float) -> None:
        """Create and start the deployment, until it is healthy."""

    @abc.abstractmethod
    async def roles(self) -> dict[str, str]:
        """The manager's view: node -> "primary" (or "primary (...)" when it has no standby),
        "sync standby", or what else it reports."""

    async def healthy(self) -> bool:
        """A primary and a synchronous standby that streams from it, both as the manager says."""
        roles = await self.roles()
        return sorted(roles.values()) == ["primary", "sync standby"] and len(roles) == len(self.nodes)

    @abc.abstractmethod
    def data_dir(self, node: str) -> Path: ...

    @abc.abstractmethod
    def manager_keys(self, node: str) -> list[str]:
        """The Processes keys of the manager programs that run on node's 'host'."""

    @abc.abstractmethod
    def settings(self) -> dict[str, object]: ...

    # -- shared

    def conninfo(self, node: str) -> str:
        return make_conninfo(
            "",
            host="127.0.0.1",
            port=self.ports[node],
            user="postgres",
            dbname="postgres",
            connect_timeout=2,
            application_name="bench-writer",
        )

    async def wait_healthy(self, timeout: float) -> float:
        """Seconds it took, or AnchorUnavailable naming what was seen last."""
        started = time.monotonic()
        last: dict[str, str] = {}
        while time.monotonic() - started < timeout:
            with contextlib.suppress(Exception):
                if await self.healthy() and await self.streams_sync():
                    return time.monotonic() - started
            with contextlib.suppress(Exception):
                last = await self.roles()
            gone = self.procs.exited()
            if gone:
                raise AnchorUnavailable(f"{', '.join(gone)} exited (logs in {self.base})")
            await asyncio.sleep(0.2)
        raise AnchorUnavailable(f"not healthy within {timeout:.0f} s; last seen {last} (logs in {self.base})")

    async def primary(self) -> str | None:
        roles = await self.roles()
        primaries = [n for n, r in roles.items() if is_primary(r)]
        return primaries[0] if len(primaries) == 1 else None

    def postmaster_pid(self, node: str) -> int | None:
        try:
            pid = int((self.data_dir(node) / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None

    def kill_postmaster(self, node: str) -> int:
        pid = self.postmaster_pid(node)
        if pid is None:
            raise AnchorUnavailable(f"{self.system}: {node} has no running postmaster to kill")
        os.kill(pid, signal.SIGKILL)
        return pid

    def host_pids(self, node: str) -> list[int]:
        """The manager's processes (with their children) and every PostgreSQL process of node."""
        pids = [p for key in self.manager_keys(node) for p in self.procs.tree(key)]
        return sorted(set(pids + processes_in(self.data_dir(node))))

    def host_signal(self, node: str, signum: int) -> list[int]:
        pids = self.host_pids(node)
        signal_pids(pids, signum)
        return pids

    async def query(self, node: str, statement: str, timeout: float = 1.0) -> list[tuple[object, ...]]:
        conn = await connect(self.conninfo(node), timeout, autocommit=True)
        try:
            cursor = await bounded(conn, conn.execute(statement), timeout)
            return await cursor.fetchall()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1)

    async def streams_sync(self) -> bool:
        """PostgreSQL's own view agrees: the primary is writable and a synchronous (or quorum)
        standby streams from it."""
        primary = await self.primary()
        if primary is None or await self.in_recovery(primary) is not False:
            return False
        rows = await self.query(
            primary,
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' "
            "AND sync_state IN ('sync', 'quorum')",
        )
        return bool(rows) and int(str(rows[0][0])) >= 1

    async def in_recovery(self, node: str, timeout: float = 0.5) -> bool | None:
        """pg_is_in_recovery() of node, None when it does not answer in time."""
        try:
            conn = await connect(self.conninfo(node), timeout, autocommit=True)
        except (psycopg.Error, OSError, TimeoutError):
            return None
        try:
            cursor = await bounded(conn, conn.execute("SELECT pg_is_in_recovery()"), timeout)
            row = await cursor.fetchone()
            return bool(row[0]) if row is not None else None
        except (psycopg.Error, OSError, TimeoutError):
            return None
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1)

    async def down(self) -> list[int]:
        killed = await asyncio.to_thread(self.procs.stop_all)
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)
        return killed
