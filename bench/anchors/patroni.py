"""Patroni 4 with its built-in Raft DCS: two PostgreSQL nodes, each with a Patroni that is also a
Raft voter, and `patroni_raft_controller` as the third voter; `synchronous_mode: true`.

Patroni comes from PyPI (`patroni[raft]` and psycopg) in its own virtual environment under the
cache directory, built with the system Python so that the PostgreSQL OS user can run it.
"""

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from xcha.topology import free_port

from . import CACHE, Anchor, AnchorUnavailable, is_primary

VENV = CACHE / "patroni-venv"
PACKAGES = ("patroni[raft]", "psycopg[binary]")
TIMINGS = ("ttl", "loop_wait", "retry_timeout")
TIGHT_TIMINGS = {"ttl": 20, "loop_wait": 1, "retry_timeout": 3}  # the validator's minimums
TOO_TIGHT = ({"ttl": 19}, {"loop_wait": 0}, {"retry_timeout": 2})


def _system_python() -> str:
    for candidate in ("/usr/bin/python3", sys.executable):
        if Path(candidate).exists():
            return candidate
    raise AnchorUnavailable("no Python to build Patroni's virtual environment with")


def builtin_timings() -> dict[str, object]:
    """The installed Patroni's own defaults, used when bootstrap.dcs sets none."""
    code = (
        "import json; from patroni.config import Config; d = Config._Config__DEFAULT_CONFIG; "
        f"print(json.dumps({{k: d[k] for k in {TIMINGS!r}}}))"
    )
    result = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60
    )
    try:
        found = json.loads(result.stdout)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _version() -> str | None:
    patroni = VENV / "bin" / "patroni"
    if not patroni.exists():
        return None
    result = subprocess.run([str(patroni), "--version"], capture_output=True, text=True, timeout=60)
    return result.stdout.strip() if result.returncode == 0 else None


def ensure_installed() -> str:
    """Patroni's venv (created once, then reused); returns `patroni --version`."""
    version = _version()
    if version:
        return version
    CACHE.mkdir(parents=True, exist_ok=True)
    CACHE.chmod(0o755)
    log = CACHE / "patroni-install.log"
    steps = [
        [_system_python(), "-m", "venv", "--clear", str(VENV)],
        [str(VENV / "bin" / "python"), "-m", "pip", "install", "--upgrade", "pip"],
        [str(VENV / "bin" / "python"), "-m", "pip", "install", *PACKAGES],
    ]
    with open(log, "w") as handle:
        for step in steps:
            handle.write(f"$ {' '.join(step)}\n")
            handle.flush()
            result = subprocess.run(step, stdout=handle, stderr=subprocess.STDOUT, timeout=900)
            if result.returncode != 0:
                raise AnchorUnavailable(f"installing Patroni failed at `{' '.join(step)}` (see {log})")
    version = _version()
    if not version:
        raise AnchorUnavailable(f"Patroni was installed into {VENV} but `patroni --version` fails")
    return version


class Patroni(Anchor):
    system = "patroni"

    def __init__(self, timings: dict[str, int] | None, keep: bool = False) -> None:
        """timings None: Patroni's own defaults (nothing set in bootstrap.dcs)."""
        super().__init__(keep)
        self.timings = timings
        self.rest: dict[str, int] = {}
        self.raft: dict[str, int] = {}
        self.version = ""
        self.reported: dict[str, object] = {}
        self.validation: dict[str, str] = {}

    def data_dir(self, node: str) -> Path:
        return self.base / node / "data"

    def manager_keys(self, node: str) -> list[str]:
        return [f"patroni:{node}"]

    def settings(self) -> dict[str, object]:
        return {
            "version": self.version,
            "dcs": "raft (2 Patroni voters + patroni_raft_controller)",
            "timings_set": self.timings or "Patroni defaults (none set)",
            "timings_running": self.reported,
            "synchronous_mode": True,
            "use_pg_rewind": True,
            "validator": self.validation,
        }

    async def install(self) -> str:
        self.version = await asyncio.to_thread(ensure_installed)
        return self.version

    # ---- configuration ------------------------------------------------------------------------

    def _raft(self, me: str) -> dict[str, object]:
        addresses = {name: f"127.0.0.1:{port}" for name, port in self.raft.items()}
        return {
            "data_dir": str(self.base / "raft" / me),
            "self_addr": addresses[me],
            "partner_addrs": [a for name, a in addresses.items() if name != me],
        }

    def _config(self, node: str, timings: dict[str, int] | None) -> dict[str, object]:
        dcs: dict[str, object] = {
            "synchronous_mode": True,
            "postgresql": {
                "use_pg_rewind": True,
                "use_slots": True,
                "parameters": {"wal_keep_size": "256MB", "max_wal_senders": 10},
            },
        }
        dcs.update(timings or {})
        directory = self.base / node
        return {
            "scope": "xcha-bench",
            "namespace": "/xcha-bench/",
            "name": node,
            "log": {"level": "INFO"},
            "restapi": {
                "listen": f"127.0.0.1:{self.rest[node]}",
                "connect_address": f"127.0.0.1:{self.rest[node]}",
            },
            "raft": self._raft(node),
            "bootstrap": {
                "dcs": dcs,
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "data-checksums"],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.ports[node]}",
                "connect_address": f"127.0.0.1:{self.ports[node]}",
                "data_dir": str(self.data_dir(node)),
                "bin_dir": str(self.bindir),
                "pgpass": str(directory / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": "bench"},
                    "replication": {"username": "replicator", "password": "bench"},
                },
                "parameters": {
                    "unix_socket_directories": str(directory),
                    "logging_collector": "on",
                    "log_directory": str(directory / "log"),
                },
                "pg_hba": [
                    "local all all trust",
                    "host all all 127.0.0.1/32 trust",
                    "host replication all 127.0.0.1/32 trust",
                ],
            },
        }

    def _write(self, path: Path, config: dict[str, object]) -> None:
        path.write_text(json.dumps(config, indent=2) + "\n")  # YAML is a superset of JSON
        os.chown(path, self.user.uid, self.user.gid)

    async def _validate(self, timings: dict[str, int]) -> str:
        """What `patroni --validate-config` says about node1's configuration with these timings."""
        path = self.base / "validate.yml"
        self._write(path, self._config("node1", timings))
        try:
            await self.procs.run(
                [str(VENV / "bin" / "patroni"), "--validate-config", str(path)],
                self.base / "validate.log",
                120,
            )
            return "accepted"
        except AnchorUnavailable as error:
            # It also rejects loopback addresses, which Patroni itself runs with: only the timings count.
            timing = [line.strip() for line in str(error).splitlines() if "bootstrap.dcs." in line]
            return "rejected: " + "; ".join(timing) if timing else "accepted"
        finally:
            path.unlink(missing_ok=True)

    async def start(self, timeout: float) -> None:
        for node in self.nodes:
            self.ports[node] = free_port()
            self.rest[node] = free_port()
        for name in (*self.nodes, "controller"):
            self.raft[name] = free_port()
        for directory in [self.base / "raft", *(self.base / n for n in self.nodes)]:
            directory.mkdir(mode=0o700)
            os.chown(directory, self.user.uid, self.user.gid)
        if self.timings is not None:
            self.validation[json.dumps(self.timings)] = await self._validate(self.timings)
            for change in TOO_TIGHT:
                tighter = {**self.timings, **change}
                self.validation[json.dumps(tighter)] = await self._validate(tighter)
        controller = self.base / "raft-controller.yml"
        self._write(controller, {"raft": self._raft("controller"), "log": {"level": "WARNING"}})
        self.procs.spawn(
            "raft-controller",
            [str(VENV / "bin" / "patroni_raft_controller"), str(controller)],
            self.base / "raft-controller.log",
        )
        for index, node in enumerate(self.nodes):
            path = self.base / f"{node}.yml"
            self._write(path, self._config(node, self.timings))
            self.procs.spawn(
                f"patroni:{node}", [str(VENV / "bin" / "patroni"), str(path)], self.base / f"{node}.log"
            )
            if index == 0:  # the first one bootstraps (initdb); the second clones it
                await self._wait_primary(node, timeout, f"{node} to bootstrap")
        await self.wait_healthy(timeout)
        with contextlib.suppress(Exception):
            config = await asyncio.to_thread(self._get, self.nodes[0], "/config")
            assert isinstance(config, dict)
            self.reported = {k: config.get(k) for k in (*TIMINGS, "synchronous_mode")}
        if self.timings is None:  # nothing in the DCS: Patroni runs with its built-in values
            defaults = await asyncio.to_thread(builtin_timings)
            self.reported.update({k: f"{defaults.get(k)} (built-in)" for k in TIMINGS})

    async def _wait_primary(self, node: str, timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            with contextlib.suppress(Exception):
                if is_primary((await self.roles()).get(node, "")):
                    return
            if self.procs.exited():
                raise AnchorUnavailable(f"{', '.join(self.procs.exited())} exited (logs in {self.base})")
            await asyncio.sleep(0.3)
        raise AnchorUnavailable(f"timed out after {timeout:.0f} s waiting for {what} (logs in {self.base})")

    # ---- state -------------------------------------------------------------------------------

    def _get(self, node: str, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.rest[node]}{path}", timeout=1.0) as response:
            return json.loads(response.read())

    async def _cluster(self) -> list[dict[str, object]]:
        """GET /cluster from whichever node answers first (a stopped one does not)."""
        attempts = [asyncio.ensure_future(asyncio.to_thread(self._get, n, "/cluster")) for n in self.nodes]
        try:
            for finished in asyncio.as_completed(attempts):
                with contextlib.suppress(Exception):
                    answer = await finished
                    if isinstance(answer, dict) and isinstance(answer.get("members"), list):
                        return answer["members"]  # type: ignore[no-any-return]
        finally:
            for attempt in attempts:
                attempt.cancel()
        raise ConnectionError("no Patroni REST API answered")

    async def roles(self) -> dict[str, str]:
        roles = {}
        for member in await self._cluster():
            role, state = str(member.get("role")), str(member.get("state"))
            if role == "leader" and state == "running":
                roles[str(member["name"])] = "primary"
            elif role in ("sync_standby", "replica") and state == "streaming":
                roles[str(member["name"])] = "sync standby" if role == "sync_standby" else "standby"
            else:
                roles[str(member["name"])] = f"{role} ({state})"
        return roles
