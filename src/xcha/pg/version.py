"""PostgreSQL version numbers in the server_version_num form (9.6 -> 90600, 15 -> 150000)."""

import re

from xcha.errors import InvalidInput

OLDEST_RENDERED = 90100
OLDEST_OPERATED = 120000


def parse_version(text: str) -> int:
    """'9.6' -> 90600, '15' -> 150000, '15.4' -> 150000 (the minor part is ignored from 10 on)."""
    match = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?(?:\.\d+)?\s*", text)
    if match is None:
        raise InvalidInput(f"invalid PostgreSQL version {text!r}: expected e.g. 9.6, 11 or 15")
    major = int(match.group(1))
    minor = int(match.group(2) or 0)
    if major < 10:
        if match.group(2) is None:
            raise InvalidInput(f"invalid PostgreSQL version {text!r}: 9.x needs its second part")
        number = major * 10000 + minor * 100
    else:
        number = major * 10000
    if number < OLDEST_RENDERED:
        raise InvalidInput(f"PostgreSQL {text} is older than 9.1, which has no synchronous replication")
    return number


def version_text(number: int) -> str:
    """90600 -> '9.6', 150000 -> '15'."""
    major = number // 10000
    return f"{major}.{number // 100 % 100}" if major < 10 else str(major)
