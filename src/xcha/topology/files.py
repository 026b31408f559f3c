"""Writing the configuration files (TOML) of a deployment."""

import json
from pathlib import Path

Tables = list[tuple[str, dict[str, object]]]


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_document(tables: Tables) -> str:
    """[table] or [[array]] sections, in order; None values are left out."""
    lines = []
    for header, values in tables:
        lines.append(header)
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items() if value is not None)
        lines.append("")
    return "\n".join(lines)
