"""`xcha supervise`: for a deployment `xcha up` leaves running on one machine, what systemd
(`Restart=always` with a back-off) does in production.

One supervisor per work directory owns the controller and the agents: it spawns them, so it is
their parent, reaps them and learns of a death at once; it restarts a dead one after an
exponential back-off, logs the exit and the restart, and keeps what it knows in
supervisor.json (atomically replaced), which `xcha ctl status --workdir` shows. On SIGTERM it
stops its processes by PID (SIGTERM, then SIGKILL after a timeout), then exits. A supervisor
started while processes of an earlier one still run (that one was killed) adopts them instead
of starting duplicates. PostgreSQL is not its business: each agent runs its own postmaster.

Standard library only: `xcha ctl` reads the status file through this module.
"""

import contextlib
import json
import logging
import os
import select
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xcha.procfs import alive, cmdline

STATUS_FILE = "supervisor.json"
log = logging.getLogger("xcha.supervisor")


@dataclass(frozen=True)
class Program:
    """A process to keep running: its command line and its log file under workdir/logs."""

    argv: tuple[str, ...]
    log: str

    def runs_as(self, pid: int) -> bool:
        """Whether `pid` is a live process of this program, not another that got its PID.
        The tail of the command line is compared: `ip netns exec NS` execs into the program."""
        if not alive(pid):
            return False
        running = cmdline(pid)
        tail = list(self.argv[-3:])
        return running[-len(tail) :] == tail


@dataclass
class Backoff:
    """Delays before restarts: `initial`, doubling up to `maximum` while a process keeps dying
    soon after its start; back to `initial` once it had stayed up `reset_after` seconds."""

    initial: float = 0.1
    maximum: float = 10.0
    reset_after: float = 30.0
    upcoming: float = field(default=0.0, init=False)

    def delay(self, uptime: float) -> float:
        """The wait before restarting a process that exited after `uptime` seconds."""
        if uptime >= self.reset_after or not self.upcoming:
            self.upcoming = self.initial
        delay = self.upcoming
        self.upcoming = min(self.maximum, delay * 2)
        return delay


@dataclass(frozen=True)
class Exit:
    """How a process ended; neither code nor signal when it was adopted (not a child)."""

    code: int | None
    signal: int | None
    at: float  # wall clock

    def describe(self) -> str:
        if self.signal is not None:
            with contextlib.suppress(ValueError):
                return signal.Signals(self.signal).name
            return f"signal {self.signal}"
        return f"exit {self.code}" if self.code is not None else "gone"


@dataclass(frozen=True)
class ProcessStatus:
    pid: int  # 0 while it waits for its restart
    restarts: int = 0
    last_exit: Exit | None = None
    last_restart: float | None = None  # wall clock
    restart_at: float | None = None  # wall clock of the pending restart
    adopted: bool = False  # found running from an earlier supervisor, not started by this one


@dataclass(frozen=True)
class SupervisorStatus:
    pid: int
    processes: dict[str, ProcessStatus]
    stopped: bool = False

    def running(self) -> bool:
        """Whether the supervisor that wrote this still runs (and was not stopped)."""
        return not self.stopped and alive(self.pid)


def read_status(workdir: Path) -> SupervisorStatus | None:
    """The supervisor's last word on its processes, or None if it never wrote one."""
    try:
        data: dict[str, Any] = json.loads((workdir / STATUS_FILE).read_text())
        processes = {
            key: ProcessStatus(
                **{**entry, "last_exit": Exit(**entry["last_exit"]) if entry["last_exit"] else None}
            )
            for key, entry in data["processes"].items()
        }
        return SupervisorStatus(int(data["pid"]), processes, bool(data["stopped"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class _Process:
    key: str
    program: Program
    backoff: Backoff = field(default_factory=Backoff)
    pid: int = 0
    child: bool = False  # spawned here (reaped by waitpid), else adopted (watched by a pidfd)
    pidfd: int | None = None
    started: float = 0.0  # monotonic
    due: float | None = None  # monotonic time of the pending restart
    restarts: int = 0
    last_exit: Exit | None = None
    last_restart: float | None = None

    def status(self) -> ProcessStatus:
        restart_at = time.time() + self.due - time.monotonic() if self.due is not None else None
        return ProcessStatus(
            self.pid,
            self.restarts,
            self.last_exit,
            self.last_restart,
            restart_at,
            bool(self.pid and not self.child),
        )


class Supervisor:
    def __init__(self, workdir: Path, programs: dict[str, Program], stop_timeout: float = 10) -> None:
        self.workdir = workdir
        self.stop_timeout = stop_timeout
        self.processes = {key: _Process(key, program) for key, program in programs.items()}
        self._wakeup = -1

    # ---- status ---------------------------------------------------------------------------------

    def save(self, stopped: bool = False) -> None:
        data = {
            "pid": os.getpid(),
            "stopped": stopped,
            "processes": {key: asdict(process.status()) for key, process in self.processes.items()},
        }
        path = self.workdir / STATUS_FILE
        temporary = path.with_name(f".{STATUS_FILE}.{os.getpid()}")
        temporary.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(temporary, path)

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """Until SIGTERM or SIGINT: keep every program running; then stop them all."""
        read_end, write_end = os.pipe()
        for end in (read_end, write_end):
            os.set_blocking(end, False)
        self._wakeup = read_end
        signal.set_wakeup_fd(write_end)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: None)  # the byte on the wakeup pipe is what counts
        log.info("supervising %s in %s", ", ".join(self.processes), self.workdir)
        self._adopt_or_start(read_status(self.workdir))
        self.save()
        while not self._stop_requested():
            changed = self._reap() | self._watch_adopted() | self._restart_due()
            if changed:
                self.save()
            self._sleep()
        self._stop_all()
        self.save(stopped=True)

    def _adopt_or_start(self, previous: SupervisorStatus | None) -> None:
        for key, process in self.processes.items():
            earlier = previous.processes.get(key) if previous else None
            if earlier and earlier.pid and process.program.runs_as(earlier.pid):
                with contextlib.suppress(ProcessLookupError):
                    process.pidfd = os.pidfd_open(earlier.pid)
                    process.pid, process.started = earlier.pid, time.monotonic()
                    log.info("%s: adopted PID %d, left running by an earlier supervisor", key, process.pid)
                    continue
            self._spawn(process)
            if process.pid:
                log.info("%s: started as PID %d", key, process.pid)

    def _spawn(self, process: _Process) -> None:
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        try:
            process.pid = os.posix_spawnp(
                process.program.argv[0],
                list(process.program.argv),
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, str(logs / process.program.log), flags, 0o644),
                    (os.POSIX_SPAWN_DUP2, 1, 2),
                ],
                setsid=True,
            )
        except OSError as error:  # as if it had exited at once: tried again after the back-off
            log.error("%s: cannot start %s: %s", process.key, process.program.argv[0], error)
            process.pid, process.child = 0, False
            self._exited(process, Exit(127, None, time.time()), 0.0)
            return
        process.child, process.pidfd, process.started = True, None, time.monotonic()

    def _stop_requested(self) -> bool:
        """Whether SIGTERM or SIGINT came; empties the wakeup pipe."""
        received = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._wakeup, 512):
                received += chunk
        return signal.SIGTERM in received or signal.SIGINT in received

    def _sleep(self) -> None:
        dues = [p.due for p in self.processes.values() if p.due is not None]
        timeout = max(0.0, min(dues) - time.monotonic()) if dues else None
        pidfds = [p.pidfd for p in self.processes.values() if p.pidfd is not None]
        select.select([self._wakeup, *pidfds], [], [], timeout)

    def _reap(self) -> bool:
        """Collect every child that exited; schedule its restart."""
        changed = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return changed
            if pid == 0:
                return changed
            process = next((p for p in self.processes.values() if p.child and p.pid == pid), None)
            if process is None:
                continue
            if os.WIFSIGNALED(status):
                ended = Exit(None, os.WTERMSIG(status), time.time())
            else:
                ended = Exit(os.waitstatus_to_exitcode(status), None, time.time())
            self._exited(process, ended, time.monotonic() - process.started)
            changed = True

    def _watch_adopted(self) -> bool:
        """An adopted process is no child: its end wakes the loop through its pidfd, and its
        exit status is not known."""
        changed = False
        for process in self.processes.values():
            if process.pid and not process.child and not process.program.runs_as(process.pid):
                self._exited(process, Exit(None, None, time.time()), time.monotonic() - process.started)
                changed = True
        return changed

    def _exited(self, process: _Process, ended: Exit, uptime: float) -> None:
        if process.pidfd is not None:
            os.close(process.pidfd)
        delay = process.backoff.delay(uptime)
        if process.pid:
            log.warning(
                "%s: PID %d ended (%s) after %.1f s; restart in %.1f s",
                process.key,
                process.pid,
                ended.describe(),
                uptime,
                delay,
            )
        process.pid, process.child, process.pidfd = 0, False, None
        process.last_exit, process.due = ended, time.monotonic() + delay

    def _restart_due(self) -> bool:
        changed = False
        for process in self.processes.values():
            if process.due is not None and process.due <= time.monotonic():
                process.due = None
                process.restarts += 1
                process.last_restart = time.time()
                self._spawn(process)
                if process.pid:
                    log.info(
                        "%s: restarted as PID %d (restart %d)", process.key, process.pid, process.restarts
                    )
                changed = True
        return changed

    # ---- stopping -------------------------------------------------------------------------------

    def _stop_all(self) -> None:
        """SIGTERM to every process at once, one deadline for all, SIGKILL for stragglers."""
        running = [p for p in self.processes.values() if p.pid]
        log.info("stopping %s", ", ".join(p.key for p in running) or "nothing (none running)")
        for process in running:
            for signum in (signal.SIGCONT, signal.SIGTERM):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)
        deadline = time.monotonic() + self.stop_timeout
        while self._still_running(running) and time.monotonic() < deadline:
            time.sleep(0.02)
        for process in self._still_running(running):
            log.warning("%s: PID %d ignored SIGTERM: SIGKILL", process.key, process.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self._still_running(running) and time.monotonic() < deadline:
            time.sleep(0.02)
        for process in self.processes.values():
            if process.pidfd is not None:
                os.close(process.pidfd)
            process.pid, process.child, process.pidfd, process.due = 0, False, None, None

    def _still_running(self, processes: list[_Process]) -> list[_Process]:
        """Those not yet gone, reaping the children that are."""
        left = []
        for process in processes:
            if process.child:
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(process.pid, os.WNOHANG)[0] == 0:
                        left.append(process)
            elif process.program.runs_as(process.pid):
                left.append(process)
        return left


def supervise(workdir: Path) -> int:
    """`xcha supervise`: the controller and the agents of the deployment in `workdir`."""
    from xcha.logs import setup_logging
    from xcha.topology import Topology  # the deployment's layout: PostgreSQL code, loaded once

    setup_logging("text", "supervisor")
    programs = Topology.load(workdir).programs()
    os.chdir(workdir)  # the processes run there, as `xcha up` runs them
    Supervisor(workdir, programs).run()
    return 0
