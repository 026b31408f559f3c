"""Write-ahead log positions: PostgreSQL prints them as 'X/Y' (two 32-bit hex halves)."""

from xcha.errors import InvalidInput


def parse_lsn(text: str) -> int:
    high, sep, low = text.partition("/")
    try:
        if not sep:
            raise ValueError
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError:
        raise InvalidInput(f"invalid WAL position {text!r}: expected X/Y in hexadecimal") from None


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
