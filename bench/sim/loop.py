"""An asyncio event loop whose clock is virtual: when nothing is ready, time jumps to the
next timer instead of sleeping. The controller's own coroutines (asyncio.sleep, wait_for,
timeouts, call_soon) then run unchanged, deterministically and as fast as Python allows."""

import asyncio
import selectors


class _Selector(selectors.SelectSelector):
    """Nothing real ever becomes readable: waiting for `timeout` is advancing the clock."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 100.0  # not 0: no time in the simulation reads as "never" or "unset"

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise RuntimeError("the simulation has nothing scheduled: it would wait forever")
        self.now += timeout
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._virtual = _Selector()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now
