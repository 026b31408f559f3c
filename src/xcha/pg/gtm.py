"""The GTM (global transaction manager) of a Postgres-XL or Postgres-XC cluster.

An XL/XC datanode does not start without a reachable GTM (`gtm_host`/`gtm_port`), so a test
or a demo that runs datanodes runs one GTM beside them. `gtm` comes from the same bindir as
the datanode's binaries and runs as the same unprivileged OS user (through the Runner).

Like the postmaster, `gtm -D DIR` runs as xcha's own child (what `gtm_ctl start` does is
`gtm -D DIR ... &`): it is stopped by its PID. Its lock file is DIR/gtm.pid; a GTM found
running (its PID in gtm.pid, with DIR on its command line) is adopted.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from xcha.errors import InvalidInput, PostgresError
from xcha.names import check_host, check_name, check_port
from xcha.pg.render import check_path, guc_quote
from xcha.pg.runner import Runner
from xcha.procfs import alive, cmdline

MARK = "# ---- added by xcha"
PID_FILE = "gtm.pid"


@dataclass(frozen=True)
class GtmSpec:
    data_dir: Path
    port: int
    log_file: Path  # gtm's output; its own log is data_dir/gtm.log
    listen_addresses: str = "127.0.0.1"
    host: str = "127.0.0.1"  # where datanodes reach it (their gtm_host)
    node_name: str = "gtm"

    def __post_init__(self) -> None:
        check_port(self.port, "GTM port")
        check_host(self.host, "GTM host")
        check_name(self.node_name, "GTM node name")
        for address in self.listen_addresses.split(","):
            if address.strip() not in ("*", "localhost"):
                check_host(address.strip(), "GTM listen address")
        check_path(str(self.data_dir))
        check_path(str(self.log_file))

    @classmethod
    def under(cls, base: Path, port: int, **options: object) -> "GtmSpec":
        """The conventional layout: base/data and base/gtm.log."""
        return cls(data_dir=base / "data", port=port, log_file=base / "gtm.log", **options)  # type: ignore[arg-type]


class GtmInstance:
    """initgtm, configure, start (as a child), stop by PID."""

    def __init__(self, spec: GtmSpec, runner: Runner) -> None:
        self.spec = spec
        self.runner = runner
        self._child: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.spec.data_dir

    def has_data(self) -> bool:
        return (self.data_dir / "gtm.conf").exists()

    async def init(self) -> float:
        """initgtm -Z gtm into an empty directory, then configure; returns its seconds."""
        if self.has_data():
            raise InvalidInput(f"{self.data_dir} already holds a GTM")
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise InvalidInput(f"{self.data_dir} is not empty")
        self.runner.make_dir(self.data_dir)
        result = await self.runner.run("initgtm", "-Z", "gtm", "-D", str(self.data_dir))
        self.configure()
        return result.seconds

    def configure(self) -> None:
        """Append (once; replaced on every call) node name, listen address and port to gtm.conf."""
        conf = self.data_dir / "gtm.conf"
        text = conf.read_text()
        text = text.split(MARK, 1)[0].rstrip("\n") + "\n"
        text += (
            f"{MARK}: rewritten by xcha on every configure\n"
            f"nodename = {guc_quote(self.spec.node_name)}\n"
            f"listen_addresses = {guc_quote(self.spec.listen_addresses)}\n"
            f"port = {self.spec.port}\n"
        )
        self.runner.write_file(conf, text)

    def pid(self) -> int | None:
        """The running GTM's PID, whether started here or found running."""
        if self._child is not None:
            if self._child.poll() is None:
                return self._child.pid
            self._child = None
        try:
            pid = int((self.data_dir / PID_FILE).read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        if alive(pid) and str(self.data_dir) in cmdline(pid):
            return pid
        return None

    async def start(self, timeout: float = 30) -> float:
        """Start gtm as a child and wait until it accepts TCP connections."""
        if not self.has_data():
            raise InvalidInput(f"{self.data_dir} holds no GTM (initgtm first)")
        started = time.monotonic()
        if self.pid() is None:
            lock = self.data_dir / PID_FILE
            with contextlib.suppress(OSError, ValueError):
                if not alive(int(lock.read_text().split("\n", 1)[0])):
                    lock.unlink()  # left by a GTM that was killed
            self.runner.make_dir(self.spec.log_file.parent, 0o755)
            # gtm writes its own log to DIR/gtm.log; stdout and stderr go to log_file.
            self._child = self.runner.spawn("gtm", ["-D", str(self.data_dir)], self.spec.log_file)
        deadline = time.monotonic() + timeout
        while True:
            if self.pid() is None:
                raise PostgresError(f"GTM exited during start-up:\n{self.log_tail()}")
            if await self._accepts():
                return time.monotonic() - started
            if time.monotonic() >= deadline:
                raise PostgresError(
                    f"GTM did not accept connections within {timeout:.0f} s:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.02)

    async def _accepts(self) -> bool:
        """Whether GTM takes TCP connections (it logs "Expecting a startup message" for each
        such probe: harmless)."""
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(self.spec.host, self.spec.port), 1)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def stop(self, timeout: float = 10) -> None:
        """SIGINT (GTM saves its state and exits), SIGKILL past the timeout."""
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        if not await self._wait_gone(pid, timeout):
            await self.kill()

    async def kill(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await self._wait_gone(pid, 10)

    async def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self._child is not None:
                self._child.poll()
            if not alive(pid):
                if self._child is not None and self._child.pid == pid:
                    self._child = None
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)

    def log_tail(self, lines: int = 15) -> str:
        """The end of GTM's own log (DIR/gtm.log) and of its output."""
        tails = []
        for path in (self.data_dir / "gtm.log", self.spec.log_file):
            with contextlib.suppress(OSError):
                tails += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(tails) or "(no GTM log)"
