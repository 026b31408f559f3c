"""Re-pointing coordinators after a promotion, as a barrier.

A failover is complete only when every coordinator has acknowledged the new master's
address. A coordinator that cannot be reached is retried with backoff until it answers,
shown in status and in events, and never skipped (pgxc_ctl's weakness: it logs and moves on).
Each coordinator kind (pgxc, fdw, command, ...) is a `Target`.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from xcha.names import Endpoint

log = logging.getLogger(__name__)

EventSink = Callable[[str, str, str, dict[str, object]], None]  # datanode, kind, message, details


class Target(Protocol):
    name: str

    @property
    def attempt_timeout(self) -> float:
        """How long one apply may take before the barrier gives it up (cancels it) and retries."""
        ...

    async def apply(self, datanode: str, new: Endpoint, old: Endpoint | None, epoch: int) -> str:
        """Point this coordinator's route for datanode at new; return what was done.
        Raise to say "not acknowledged"; it is retried."""
        ...

    async def close(self) -> None: ...


@dataclass
class TargetProgress:
    name: str
    acknowledged: bool = False
    attempts: int = 0
    last_error: str = ""
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Barrier:
    datanode: str
    epoch: int
    new: Endpoint
    started: float = field(default_factory=time.monotonic)
    targets: dict[str, TargetProgress] = field(default_factory=dict)

    @property
    def pending(self) -> list[str]:
        return [name for name, progress in self.targets.items() if not progress.acknowledged]


class Router:
    def __init__(
        self,
        kind: str,
        targets: list[Target],
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
    ) -> None:
        self.kind = kind
        self.targets = targets
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.barriers: dict[str, Barrier] = {}
        self.on_event: EventSink = lambda datanode, kind, message, details: None

    def pending(self, datanode: str) -> list[str]:
        """Coordinators that have not acknowledged yet, each with its attempts and last error."""
        barrier = self.barriers.get(datanode)
        if barrier is None:
            return []
        return [
            f"{name} (attempt {p.attempts}: {p.last_error or 'in progress'})"
            for name, p in barrier.targets.items()
            if not p.acknowledged
        ]

    async def reroute(self, datanode: str, new: Endpoint, old: Endpoint | None, epoch: int) -> Barrier:
        """Returns when every target acknowledged new for datanode (cancel it to give up)."""
        barrier = Barrier(
            datanode, epoch, new, targets={t.name: TargetProgress(t.name) for t in self.targets}
        )
        self.barriers[datanode] = barrier
        await asyncio.gather(*(self._until_acknowledged(barrier, target, old) for target in self.targets))
        return barrier

    async def _until_acknowledged(self, barrier: Barrier, target: Target, old: Endpoint | None) -> None:
        progress = barrier.targets[target.name]
        delay = self.retry_initial
        while True:
            progress.attempts += 1
            started = time.monotonic()
            try:
                progress.detail = await asyncio.wait_for(
                    target.apply(barrier.datanode, barrier.new, old, barrier.epoch), target.attempt_timeout
                )
            except Exception as error:
                message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                if progress.attempts == 1 or message != progress.last_error:
                    log.warning(
                        "reroute %s on %s: not acknowledged (%s); retrying",
                        barrier.datanode,
                        target.name,
                        message,
                    )
                    self.on_event(
                        barrier.datanode,
                        "reroute_retry",
                        f"coordinator {target.name} did not acknowledge {barrier.new}: {message}",
                        {"coordinator": target.name, "attempt": progress.attempts},
                    )
                progress.last_error = message
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            progress.acknowledged = True
            progress.seconds = time.monotonic() - barrier.started
            log.info(
                "reroute %s on %s: %s (%.0f ms, attempt %d)",
                barrier.datanode,
                target.name,
                progress.detail,
                (time.monotonic() - started) * 1000,
                progress.attempts,
            )
            if progress.attempts > 1:
                self.on_event(
                    barrier.datanode,
                    "reroute_ack",
                    f"coordinator {target.name} acknowledged {barrier.new} after "
                    f"{progress.attempts} attempts",
                    {"coordinator": target.name},
                )
            return

    async def close(self) -> None:
        for target in self.targets:
            await target.close()
