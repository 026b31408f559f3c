"""What an agent must remember across restarts, written and fsynced before it acts."""

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from xcha.errors import XchaError


@dataclass(frozen=True)
class AgentState:
    epoch: int = 0  # the highest controller epoch seen; older messages are refused
    fenced: bool = False  # stopped on purpose: do not start until told
    removed: bool = False  # removed from the group: stay stopped
    port: int | None = None  # the port after a port takeover, if it changed
    role: str = ""  # the role last configured: master or standby
    upstream_host: str = ""
    upstream_port: int = 0
    detached: bool = False  # a standby told to stream from no one (Detach) until the next Follow

    def but(self, **changes: object) -> "AgentState":
        return replace(self, **changes)  # type: ignore[arg-type]


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> AgentState:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return AgentState()
        except (OSError, ValueError) as error:
            raise XchaError(f"agent state file {self.path} is unreadable: {error}") from None
        if not isinstance(data, dict):
            raise XchaError(f"agent state file {self.path} is unreadable: not a JSON object")
        known = AgentState.__dataclass_fields__
        return AgentState(**{key: value for key, value in data.items() if key in known})

    def save(self, state: AgentState) -> None:
        """Atomic and durable: write a temporary file, fsync it, rename, fsync the directory."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "w") as handle:
            json.dump(asdict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
