"""Running an operator's executable from a router (the `command` router, pgxc's in-doubt
cleanup): bounded, and never left running.

The child runs in a session of its own, so that when the controller gives up on it (its
timeout, or the barrier cancelling the attempt) everything it started is killed with it: a
shell script's own children too, which would otherwise hold its output pipe open.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence


async def run_command(argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None) -> str:
    """Run argv with stdin closed; return its output (stdout and stderr, stripped). Raise
    RuntimeError when it does not finish within timeout or exits non-zero. On any exception,
    cancellation included, the child's process group is killed and the child reaped."""
    # Started shielded: cancelled while the start is awaited, asyncio would kill the child
    # alone, and then wait for whatever the child started to close its output.
    starting = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    )
    try:
        process = await asyncio.shield(starting)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await _kill(await starting)
        raise
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except BaseException as error:
        await _kill(process)
        if isinstance(error, TimeoutError):
            raise RuntimeError(f"{argv[0]} did not finish within {timeout:g} s") from None
        raise
    text = output.decode(errors="replace").strip()
    if process.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {process.returncode}: {text[-500:]}")
    return text


async def _kill(process: asyncio.subprocess.Process) -> None:
    """Kill the child's whole process group (its session), then reap the child."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()
