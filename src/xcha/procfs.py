"""What /proc says of a process: whether it lives (a zombie does not) and its command line.
Stopping is by PID only, so a PID is checked against its command line before it is signalled."""


def alive(pid: int) -> bool:
    """A running process (not a zombie, not dead)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> list[str]:
    """The process's arguments ([] when it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except OSError:
        return []
