"""synchronous_standby_names: what it means and how each PostgreSQL version spells it."""

import re
from dataclasses import dataclass
from typing import Literal

from xcha.errors import InvalidInput
from xcha.names import check_name

SyncMethod = Literal["first", "any"]


@dataclass(frozen=True)
class SyncPolicy:
    """How many standbys must confirm a commit: FIRST k (priority order) or ANY k (quorum)."""

    method: SyncMethod = "first"
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "SyncPolicy":
        """'FIRST 1' or 'ANY 2' (case-insensitive)."""
        match = re.fullmatch(r"\s*(first|any)\s+(\d+)\s*", text, re.IGNORECASE)
        if match is None or int(match.group(2)) < 1:
            raise InvalidInput(f"invalid synchronous policy {text!r}: expected 'FIRST k' or 'ANY k', k >= 1")
        method: SyncMethod = "first" if match.group(1).lower() == "first" else "any"
        return cls(method, int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.method.upper()} {self.count}"


@dataclass(frozen=True)
class SyncStandbys:
    """A policy applied to named standbys (their application_name, i.e. member names)."""

    policy: SyncPolicy
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in self.names:
            check_name(name, "standby name")
        if len(set(self.names)) != len(self.names):
            raise InvalidInput(f"standby names repeat: {', '.join(self.names)}")

    @property
    def required(self) -> int:
        """Standbys that must confirm a commit: k, or all of them when fewer are named."""
        return min(self.policy.count, len(self.names))

    def render(self, version: int) -> str:
        """The synchronous_standby_names value for this server version ('' = asynchronous)."""
        if not self.names:
            return ""
        listed = ", ".join(self.names)
        if version >= 100000:
            return f"{self.policy.method.upper()} {self.required} ({listed})"
        if self.policy.method == "any":
            raise InvalidInput("ANY k (quorum commit) needs PostgreSQL 10 or newer")
        if version >= 90600:
            return f"{self.required} ({listed})"
        if self.required != 1:
            raise InvalidInput("more than one synchronous standby needs PostgreSQL 9.6 or newer")
        return listed

    @classmethod
    def parse(cls, text: str) -> "SyncStandbys":
        """Read a synchronous_standby_names value in any version's spelling."""
        text = text.strip()
        if not text:
            return cls(SyncPolicy(), ())
        match = re.fullmatch(r"(?:(first|any)\s+)?(\d+)\s*\((.*)\)", text, re.IGNORECASE | re.DOTALL)
        if match is not None:
            method: SyncMethod = "any" if (match.group(1) or "").lower() == "any" else "first"
            policy = SyncPolicy(method, int(match.group(2)))
            listed = match.group(3)
        else:
            policy, listed = SyncPolicy(), text
        names = tuple(part.strip().strip('"') for part in listed.split(",") if part.strip())
        return cls(policy, names)
