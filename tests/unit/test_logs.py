"""The JSON log format: one object per record, one line each, also with a traceback."""

import json
import logging
import sys

from xcha.logs import JsonFormatter


def test_json_formatter_writes_one_object_per_record() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord(
        "xcha.controller", logging.WARNING, __file__, 1, "dn1: %s", ("protected",), None
    )
    record.created = 0.25
    record.msecs = 250.0
    entry = json.loads(formatter.format(record))
    assert entry == {
        "time": "1970-01-01T00:00:00.250Z",
        "level": "warning",
        "logger": "xcha.controller",
        "message": "dn1: protected",
    }
    try:
        raise ValueError("two\nlines")
    except ValueError:
        failing = logging.LogRecord("xcha", logging.ERROR, __file__, 2, "failed", (), sys.exc_info())
    text = formatter.format(failing)
    assert "\n" not in text
    parsed = json.loads(text)
    assert parsed["level"] == "error" and "ValueError: two\nlines" in parsed["exception"]
