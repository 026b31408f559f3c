"""The System V shared memory a killed postmaster leaves behind.

PostgreSQL keeps a small System V segment as an interlock on its data directory; a clean stop
removes it, and a start in the same data directory removes a stale one. A server killed with
SIGKILL (a fence) whose data directory is then set aside or deleted (a re-clone, a test) leaves
it for ever: tests on one machine left 1,468 and then 554 in two sessions, toward the kernel's
limit of 4,096 segments."""

import asyncio
import contextlib
from pathlib import Path

SHM_TABLE = Path("/proc/sysvipc/shm")


def orphaned_segments(creator: int, table: Path = SHM_TABLE) -> list[int]:
    """The segments the process `creator` made that nothing is attached to."""
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:  # not Linux, or no System V IPC
        return []
    found = []
    for line in lines:
        fields = line.split()  # key shmid perms size cpid lpid nattch ...
        if len(fields) > 6 and fields[4] == str(creator) and fields[6] == "0":
            found.append(int(fields[1]))
    return found


async def remove_orphaned_segments(creator: int) -> None:
    """Remove them (`ipcrm`; the owner or root may); best effort: one left is only a leak."""
    for shmid in orphaned_segments(creator):
        with contextlib.suppress(OSError):
            removing = await asyncio.create_subprocess_exec(
                "ipcrm",
                "-m",
                str(shmid),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                await asyncio.wait_for(removing.wait(), 5)
            except TimeoutError:
                removing.kill()
                await removing.wait()
