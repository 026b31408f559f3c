"""A real etcd cluster on one machine: N members (1 or 3) on free loopback ports, each a
real `etcd` process, for `xcha up --controllers 3` and the tests.

Each member lives in DIRECTORY/<name>/: its data directory (`data`, owned by the unprivileged
OS user etcd runs as when xcha runs as root, like PostgreSQL: see `xcha.pg.runner`), its output
(`etcd.log`), its PID (`etcd.pid`) and, with TLS, a copy of the certificate files it serves
with (`tls/`, readable by that user only). With TLS, clients and peers speak https and must
present a certificate issued by the same CA. DIRECTORY/etcd-cluster.json records names and ports, so
that another xcha process can find (`EtcdCluster.load`) and stop the cluster. Stopping is by
PID only, and only a PID whose command line still names the member's data directory.
"""

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from aetcd import rpc

from xcha.errors import InvalidInput, XchaError
from xcha.pg.runner import OsUser, Runner
from xcha.procfs import alive, cmdline

STATE_FILE = "etcd-cluster.json"
LOOPBACK = "127.0.0.1"


def find_etcd() -> Path:
    """The etcd binary: XCHA_ETCD, else `etcd` on PATH, else /usr/bin/etcd. It runs as the
    user PostgreSQL runs as (`OsUser.for_postgres`): never as root."""
    configured = os.environ.get("XCHA_ETCD")
    found = configured or shutil.which("etcd") or "/usr/bin/etcd"
    if not os.access(found, os.X_OK):
        if configured:
            raise InvalidInput(f"XCHA_ETCD={configured} is not an executable etcd")
        raise InvalidInput("etcd not found: install the etcd-server package (or set XCHA_ETCD)")
    return Path(found).resolve()


@dataclass(frozen=True)
class EtcdTls:
    """The CA that clients' and peers' certificates must come from, and the certificate and
    key every member serves with (valid for 127.0.0.1, for server and client authentication:
    members present it to each other)."""

    ca: Path
    cert: Path
    key: Path

    def credentials(self) -> Any:
        return grpc.ssl_channel_credentials(
            self.ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes()
        )


@dataclass(frozen=True)
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    directory: Path
    tls: bool = False
    host: str = LOOPBACK

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_file(self) -> Path:
        return self.directory / "etcd.log"

    @property
    def pid_file(self) -> Path:
        return self.directory / "etcd.pid"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def tls_dir(self) -> Path:
        return self.directory / "tls"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.peer_port}"


class EtcdCluster:
    """Start, stop, kill and restart the members; find the raft leader."""

    def __init__(
        self,
        directory: Path,
        members: int = 1,
        runner: Runner | None = None,
        token: str | None = None,
        ports: list[tuple[int, int]] | None = None,
        tls: EtcdTls | None = None,
        host: str = LOOPBACK,
        netns: str = "",
    ) -> None:
        """host, netns: every member listens on host (its ports differ), inside the network
        namespace netns when given (partition tests); health checks then run etcdctl there."""
        if members < 1:
            raise InvalidInput(f"an etcd cluster has at least one member, not {members}")
        self.program = "etcd"
        if runner is None:
            etcd = find_etcd()
            runner, self.program = Runner(etcd.parent, OsUser.for_postgres()), etcd.name
        self.directory = directory
        self.runner = runner
        self.token = token or f"xcha-{secrets.token_hex(6)}"
        self.tls = tls
        self.host, self.netns = host, netns
        if ports is None:
            from xcha.topology import free_port  # here: xcha.topology starts etcd clusters

            ports = [(free_port(), free_port()) for _ in range(members)]
        self.members = [
            EtcdMember(f"etcd{i}", client, peer, directory / f"etcd{i}", tls is not None, host)
            for i, (client, peer) in enumerate(ports, start=1)
        ]
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    @classmethod
    def load(cls, directory: Path, runner: Runner | None = None) -> "EtcdCluster":
        """The cluster recorded in directory (by `start`)."""
        try:
            data = json.loads((directory / STATE_FILE).read_text())
        except (OSError, ValueError) as error:
            raise InvalidInput(f"no etcd cluster recorded in {directory}: {error}") from None
        ports = [(int(member["client_port"]), int(member["peer_port"])) for member in data["members"]]
        tls = EtcdTls(**{k: Path(v) for k, v in data["tls"].items()}) if data.get("tls") else None
        host, netns = str(data.get("host", LOOPBACK)), str(data.get("netns", ""))
        return cls(directory, len(ports), runner, str(data["token"]), ports, tls, host, netns)

    def save(self) -> None:
        tls = self.tls
        data = {
            "token": self.token,
            "host": self.host,
            "netns": self.netns,
            "tls": {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)} if tls else None,
            "members": [
                {"name": m.name, "client_port": m.client_port, "peer_port": m.peer_port} for m in self.members
            ],
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.directory / f".{STATE_FILE}.{os.getpid()}"
        temporary.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(temporary, self.directory / STATE_FILE)

    @property
    def endpoints(self) -> tuple[str, ...]:
        """host:port, or with TLS https://host:port."""
        return tuple(m.client_url if m.tls else m.endpoint for m in self.members)

    def member(self, name: str) -> EtcdMember:
        for member in self.members:
            if member.name == name:
                return member
        raise InvalidInput(f"no etcd member {name!r} (members: {', '.join(m.name for m in self.members)})")

    # ---- processes ------------------------------------------------------------------------------

    def pid(self, name: str) -> int | None:
        """The member's running etcd, started here or found by its PID file."""
        member = self.member(name)
        child = self._children.get(name)
        if child is not None:
            if child.poll() is None:
                return child.pid
            del self._children[name]
        try:
            pid = int(member.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if alive(pid) and f"--data-dir={member.data_dir}" in cmdline(pid):
            return pid
        return None

    def _arguments(self, member: EtcdMember, state: str) -> list[str]:
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        tls = []
        if member.tls:
            directory = member.tls_dir
            for side in ("", "peer-"):
                tls += [
                    f"--{side}cert-file={directory / 'etcd.pem'}",
                    f"--{side}key-file={directory / 'etcd.key'}",
                    f"--{side}trusted-ca-file={directory / 'ca.pem'}",
                    f"--{side}client-cert-auth",
                ]
        return [
            *tls,
            f"--name={member.name}",
            f"--data-dir={member.data_dir}",
            f"--listen-client-urls={member.client_url}",
            f"--advertise-client-urls={member.client_url}",
            f"--listen-peer-urls={member.peer_url}",
            f"--initial-advertise-peer-urls={member.peer_url}",
            f"--initial-cluster={cluster}",
            f"--initial-cluster-token={self.token}",
            f"--initial-cluster-state={state}",
            # Every write is a revision that etcd keeps until compacted: keep an hour of them.
            "--auto-compaction-mode=periodic",
            "--auto-compaction-retention=1h",
            "--logger=zap",
            "--log-outputs=stderr",
        ]

    def start(self) -> None:
        """Start every member that does not run (a new cluster, or the existing one again);
        `wait_ready` then waits until they serve."""
        self.save()
        for member in self.members:
            self.start_member(member.name)

    def start_member(self, name: str) -> int:
        """Start the member (again: same data directory, `--initial-cluster-state existing`)."""
        member = self.member(name)
        running = self.pid(name)
        if running is not None:
            return running
        self.runner.make_dir(member.directory, 0o755)
        self.runner.make_dir(member.data_dir)
        if self.tls is not None:
            self.runner.make_dir(member.tls_dir)
            copies = {"ca.pem": self.tls.ca, "etcd.pem": self.tls.cert, "etcd.key": self.tls.key}
            for copy, source in copies.items():
                self.runner.write_file(member.tls_dir / copy, source.read_text())
        state = "existing" if (member.data_dir / "member").exists() else "new"
        arguments = self._arguments(member, state)
        child = self.runner.spawn(self.program, arguments, member.log_file, netns=self.netns)
        self._children[name] = child
        member.pid_file.write_text(f"{child.pid}\n")
        return child.pid

    def signal(self, name: str, signum: int) -> None:
        pid = self.pid(name)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def kill(self, name: str) -> None:
        """kill -9, as a fault: the member gets no chance to clean up."""
        pid = self.pid(name)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        child = self._children.pop(name, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)

    async def stop_member(self, name: str, timeout: float = 10) -> None:
        """SIGTERM by PID (SIGCONT first, should it be stopped), SIGKILL past the timeout."""
        await self._stop([name], timeout)

    async def stop(self, timeout: float = 10) -> None:
        """Stop every member: SIGTERM to all at once, then one deadline, then SIGKILL."""
        await self._stop([member.name for member in self.members], timeout)

    async def _stop(self, names: list[str], timeout: float) -> None:
        # The raft leader last: a leader that is told to stop hands leadership to a peer it is
        # connected to, and waits for that up to 7 s when the peer is stopping as well.
        leader = await self.raft_leader() if len(names) > 1 else None
        if leader in names:
            await self._terminate([name for name in names if name != leader], timeout)
            names = [leader]
        await self._terminate(names, timeout)

    async def _terminate(self, names: list[str], timeout: float) -> None:
        pids = {name: pid for name in names if (pid := self.pid(name)) is not None}
        for pid in pids.values():
            for signum in (signal.SIGCONT, signal.SIGTERM):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
        deadline = time.monotonic() + timeout
        while any(self._running(name, pid) for name, pid in pids.items()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for name, pid in pids.items():
            if self._running(name, pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                while self._running(name, pid):
                    await asyncio.sleep(0.02)
            self._children.pop(name, None)
            with contextlib.suppress(FileNotFoundError):
                self.member(name).pid_file.unlink()

    def _running(self, name: str, pid: int) -> bool:
        child = self._children.get(name)
        if child is not None and child.pid == pid:
            return child.poll() is None
        return alive(pid)

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.member(name).log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no etcd log)"

    # ---- health ---------------------------------------------------------------------------------

    def _channel(self, name: str) -> Any:
        endpoint = self.member(name).endpoint
        if self.tls is None:
            return grpc.aio.insecure_channel(endpoint)
        return grpc.aio.secure_channel(endpoint, self.tls.credentials())

    async def status(self, name: str, timeout: float = 1) -> Any | None:
        """The member's Maintenance.Status, or None when it does not answer."""
        async with self._channel(name) as channel:
            try:
                return await rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=timeout)
            except grpc.aio.AioRpcError:
                return None

    async def healthy(self, name: str, timeout: float = 1) -> bool:
        """Like `etcdctl endpoint health`: the member knows a raft leader and serves a
        linearizable read (which takes a quorum)."""
        if self.netns:
            return await self._healthy_in_netns(name, timeout)
        status = await self.status(name, timeout)
        if status is None or not status.leader:
            return False
        async with self._channel(name) as channel:
            try:
                await rpc.KVStub(channel).Range(rpc.RangeRequest(key=b"health"), timeout=timeout)
            except grpc.aio.AioRpcError:
                return False
        return True

    async def _healthy_in_netns(self, name: str, timeout: float) -> bool:
        """`etcdctl endpoint health` run inside the members' network namespace."""
        member = self.member(name)
        tls = []
        if self.tls is not None:
            tls = [f"--cacert={self.tls.ca}", f"--cert={self.tls.cert}", f"--key={self.tls.key}"]
        process = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.netns, "etcdctl", f"--endpoints={member.client_url}",
            f"--command-timeout={timeout}s", *tls, "endpoint", "health",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "ETCDCTL_API": "3"},
        )  # fmt: skip
        return await process.wait() == 0

    async def wait_ready(self, timeout: float = 30, names: list[str] | None = None) -> float:
        """Until every member (or those named) is healthy; returns the seconds waited."""
        started = time.monotonic()
        waiting = list(names or [member.name for member in self.members])
        while waiting:
            for name in list(waiting):
                if self.pid(name) is None:
                    raise XchaError(f"etcd member {name} is not running:\n{self.log_tail(name)}")
                if await self.healthy(name):
                    waiting.remove(name)
            if not waiting:
                break
            if time.monotonic() - started > timeout:
                tails = "\n".join(f"{name}:\n{self.log_tail(name)}" for name in waiting)
                raise XchaError(
                    f"etcd members {', '.join(waiting)} not ready within {timeout:.0f} s:\n{tails}"
                )
            await asyncio.sleep(0.1)
        return time.monotonic() - started

    async def raft_leader(self) -> str | None:
        """The member that is raft leader, as the running members see it (None: none known)."""
        ids: dict[int, str] = {}
        leaders = set()
        for member in self.members:
            if self.pid(member.name) is None:
                continue
            status = await self.status(member.name)
            if status is not None:
                ids[int(status.header.member_id)] = member.name
                if status.leader:
                    leaders.add(int(status.leader))
        for leader in leaders:
            if leader in ids:
                return ids[leader]
        return None
