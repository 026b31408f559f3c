"""Validation of the values that reach SQL, file paths and shell commands.

Node names become SQL identifiers, application_name values, directory names and
arguments of PostgreSQL programs, so they are restricted to a safe alphabet up
front rather than quoted differently in every place they end up.
"""

import ipaddress
import re

from xcha.errors import InvalidInput

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,62}")
HOST_PATTERN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def check_name(value: object, what: str = "node name") -> str:
    """Return value if it is a safe identifier ([a-z][a-z0-9_]{0,62}), else raise."""
    if not isinstance(value, str) or NAME_PATTERN.fullmatch(value) is None:
        raise InvalidInput(
            f"invalid {what} {value!r}: use 1-63 characters, a lowercase letter first, "
            "then lowercase letters, digits or '_'"
        )
    return value


def check_port(value: object, what: str = "port") -> int:
    """Return value if it is a TCP port number (1-65535), else raise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidInput(f"invalid {what} {value!r}: expected a whole number from 1 to 65535")
    return value


def check_host(value: object, what: str = "host") -> str:
    """Return value if it is an IP address or a DNS host name, else raise."""
    if isinstance(value, str):
        try:
            ipaddress.ip_address(value)
            return value
        except ValueError:
            if HOST_PATTERN.fullmatch(value) is not None:
                return value
    raise InvalidInput(f"invalid {what} {value!r}: expected an IP address or a host name")


def check_address(value: object, what: str = "address") -> tuple[str, int]:
    """Split 'host:port' (or '[v6]:port') into a checked (host, port) pair."""
    if not isinstance(value, str) or ":" not in value:
        raise InvalidInput(f"invalid {what} {value!r}: expected HOST:PORT")
    host, _, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit():
        raise InvalidInput(f"invalid {what} {value!r}: the port is not a number")
    return check_host(host, what), check_port(int(port_text), what)


class Endpoint:
    """A checked host and port where a PostgreSQL server (or an agent) is reached."""

    __slots__ = ("host", "port")

    def __init__(self, host: str, port: int) -> None:
        self.host = check_host(host)
        self.port = check_port(port)

    @classmethod
    def parse(cls, text: str, what: str = "address") -> "Endpoint":
        return cls(*check_address(text, what))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Endpoint) and (self.host, self.port) == (other.host, other.port)

    def __hash__(self) -> int:
        return hash((self.host, self.port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"Endpoint({self.host!r}, {self.port})"
