"""Run PostgreSQL programs as an unprivileged OS user.

PostgreSQL refuses to run as root. When xcha runs as root, every PostgreSQL program
(initdb, postgres, pg_basebackup, pg_rewind, ...) is started as the configured user
(default `postgres`) and the directories it needs are owned by that user. When xcha
runs as any other user, programs run as that user. Tests use this same path.
"""

import asyncio
import os
import pwd
import re
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xcha.errors import InvalidInput, PostgresError
from xcha.pg.flavor import PRODUCTS, Flavor, check_binaries

DEFAULT_PG_USER = "postgres"
BINDIR_VARIABLES: dict[Flavor, str] = {
    "postgresql": "XCHA_PG_BINDIR",
    "xl": "XCHA_XL_BINDIR",
    "xc": "XCHA_XC_BINDIR",
}


@dataclass(frozen=True)
class OsUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def lookup(cls, name: str) -> "OsUser":
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise InvalidInput(
                f"OS user {name!r} does not exist: create it (useradd --system {name}) "
                "or set postgres.run_as / XCHA_PG_USER"
            ) from None
        groups = tuple(os.getgrouplist(name, entry.pw_gid))
        return cls(name, entry.pw_uid, entry.pw_gid, groups)

    @classmethod
    def for_postgres(cls, configured: str | None = None) -> "OsUser":
        """The user PostgreSQL programs run as: configured (root only) or the current user."""
        if os.geteuid() == 0:
            user = cls.lookup(configured or os.environ.get("XCHA_PG_USER") or DEFAULT_PG_USER)
            if user.uid == 0:
                raise InvalidInput(f"PostgreSQL cannot run as {user.name!r}, a root account")
            return user
        current = cls.lookup(pwd.getpwuid(os.geteuid()).pw_name)
        if configured and configured != current.name:
            raise InvalidInput(
                f"running as {current.name!r}: PostgreSQL runs as {configured!r} only when xcha runs as root"
            )
        return current

    def can_traverse(self, path: Path) -> Path | None:
        """The first directory on the way to path that this user cannot enter, if any."""
        for directory in [*reversed(path.parents), path]:
            try:
                info = directory.stat()
            except FileNotFoundError:
                return None
            if not stat.S_ISDIR(info.st_mode):
                continue
            if info.st_uid == self.uid:
                allowed = info.st_mode & stat.S_IXUSR
            elif info.st_gid in self.groups:
                allowed = info.st_mode & stat.S_IXGRP
            else:
                allowed = info.st_mode & stat.S_IXOTH
            if not allowed and self.uid != 0:
                return directory
        return None


@dataclass(frozen=True)
class ProgramResult:
    argv: tuple[str, ...]
    returncode: int
    output: str
    seconds: float


class Runner:
    """Starts PostgreSQL programs from one bindir as one OS user."""

    def __init__(self, bindir: Path, user: OsUser) -> None:
        self.bindir = bindir
        self.user = user
        self.switching = user.uid != os.geteuid()

    def program(self, name: str) -> str:
        path = self.bindir / name
        if not os.access(path, os.X_OK):
            raise PostgresError(f"{path} is missing or not executable")
        return str(path)

    def _process_options(self, extra_env: Mapping[str, str] | None = None) -> dict[str, Any]:
        env = {
            "PATH": f"{self.bindir}:/usr/bin:/bin",
            "LC_ALL": "C.UTF-8",
            "LC_MESSAGES": "C",
            "HOME": pwd.getpwuid(self.user.uid).pw_dir,
            "PGSYSCONFDIR": "/nonexistent",
            **(extra_env or {}),
        }
        options: dict[str, Any] = {"env": env, "cwd": "/"}
        if self.switching:
            options.update(user=self.user.uid, group=self.user.gid, extra_groups=list(self.user.groups))
        return options

    async def run(
        self,
        name: str,
        *args: str,
        timeout: float | None = 300,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> ProgramResult:
        """Run a program to completion; with check, a non-zero exit raises with its output.
        env: variables added to the program's (small, fixed) environment; input: its stdin
        (never on its command line, where other users could read it)."""
        argv = (self.program(name), *args)
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            **self._process_options(env),
        )
        try:
            output, _ = await asyncio.wait_for(
                process.communicate(None if input is None else input.encode()), timeout
            )
        except (TimeoutError, asyncio.CancelledError):
            process.kill()
            await process.wait()
            raise
        result = ProgramResult(
            argv, process.returncode or 0, output.decode(errors="replace"), time.monotonic() - started
        )
        if check and result.returncode != 0:
            raise PostgresError(f"{name} failed (exit {result.returncode}): {result.output.strip()[-2000:]}")
        return result

    def spawn(
        self,
        name: str,
        args: Sequence[str],
        log_file: Path,
        env: Mapping[str, str] | None = None,
        netns: str = "",
    ) -> subprocess.Popen[bytes]:
        """Start a long-running program (the postmaster) as this process's child, in its own
        session so that signals meant for xcha do not reach it and it can outlive xcha. netns:
        inside that network namespace (nsenter enters it, then becomes the unprivileged user)."""
        argv = [self.program(name), *args]
        options = self._process_options(env)
        if netns:
            identity = []
            if self.switching:
                options = {key: options[key] for key in ("env", "cwd")}
                identity = [f"--setgid={self.user.gid}", f"--setuid={self.user.uid}"]
            argv = ["nsenter", f"--net=/run/netns/{netns}", *identity, *argv]
        with open(log_file, "ab") as log:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **options,
            )

    def make_dir(self, path: Path, mode: int = 0o700) -> Path:
        """Create path (and missing parents) owned by the PostgreSQL user."""
        blocked = self.user.can_traverse(path)
        if blocked is not None:
            raise InvalidInput(
                f"OS user {self.user.name!r} cannot reach {path}: {blocked} does not let it in "
                "(choose a directory it can reach, or chmod o+x the parent)"
            )
        missing = [p for p in [*reversed(path.parents), path] if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        for created in missing:
            self.own(created)
        if missing:
            path.chmod(mode)  # a directory that already existed keeps its owner and mode
        return path

    def own(self, path: Path) -> None:
        if self.switching:
            os.chown(path, self.user.uid, self.user.gid)

    def own_tree(self, root: Path) -> None:
        if not self.switching:
            return
        self.own(root)
        for directory, dirnames, filenames in os.walk(root):
            for entry in (*dirnames, *filenames):
                os.lchown(os.path.join(directory, entry), self.user.uid, self.user.gid)

    def write_file(self, path: Path, content: str, mode: int = 0o600) -> None:
        """Write a file atomically (write, fsync, rename), owned by the PostgreSQL user."""
        temporary = path.with_name(f".{path.name}.xcha-tmp")
        with open(temporary, "w") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.chmod(mode)
        self.own(temporary)
        os.replace(temporary, path)


def find_bindir(configured: str | None = None, flavor: Flavor = "postgresql") -> Path:
    """Server binaries: configured, else for plain PostgreSQL XCHA_PG_BINDIR, pg_config
    --bindir or the newest /usr/lib/postgresql/*/bin; for Postgres-XL XCHA_XL_BINDIR and for
    Postgres-XC XCHA_XC_BINDIR (neither has a package: scripts/build_pgxc.sh builds them)."""
    if flavor != "postgresql":
        variable = BINDIR_VARIABLES[flavor]
        value = configured or os.environ.get(variable)
        if not value:
            raise InvalidInput(
                f"{PRODUCTS[flavor]} binaries not found: set postgres.bindir or {variable} "
                f"(scripts/build_pgxc.sh {flavor} builds them and prints the bindir)"
            )
        if not (Path(value) / "postgres").exists():
            raise InvalidInput(f"{value} holds no postgres binary ({PRODUCTS[flavor]} bindir setting)")
        return Path(value)
    candidates: list[str] = []
    for value in (configured, os.environ.get("XCHA_PG_BINDIR")):
        if value:
            if not (Path(value) / "postgres").exists():
                raise InvalidInput(f"{value} holds no postgres binary (PostgreSQL bindir setting)")
            return Path(value)
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        candidates.append(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    versioned = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0],
        reverse=True,
    )
    candidates.extend(str(p) for p in versioned)
    for candidate in candidates:
        if candidate and (Path(candidate) / "postgres").exists() and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise InvalidInput("PostgreSQL server binaries not found: install 'postgresql' or set XCHA_PG_BINDIR")


def server_version(bindir: Path, flavor: Flavor = "postgresql") -> int:
    """server_version_num of the postgres binary in bindir; refuses binaries of another
    flavour than configured (plain PostgreSQL, Postgres-XL, Postgres-XC) and versions xcha
    cannot operate."""
    return check_binaries(bindir, flavor)
