"""Reading TOML configuration into typed, frozen dataclasses.

Every problem is collected with the key it belongs to, so `--check-config` can list them
all at once ("controller.failure_timeout: must be greater than 2 x heartbeat_interval").
"""

import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from xcha.errors import InvalidInput, XchaError
from xcha.names import check_address, check_name

_MISSING = object()
LOG_FORMATS = ("text", "json")


class ConfigError(XchaError):
    """The configuration has problems; each is (key, message)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        listed = "; ".join(f"{key}: {message}" for key, message in problems)
        super().__init__(f"{source}: {len(problems)} problem(s): {listed}")

    def lines(self) -> list[str]:
        return [f"{self.source}: {key}: {message}" for key, message in self.problems]


@dataclass
class Problems:
    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, key: str, message: str) -> None:
        self.items.append((key, message))


class Section:
    """One TOML table: typed getters that record problems instead of raising."""

    def __init__(self, data: object, prefix: str, problems: Problems) -> None:
        self.prefix = prefix
        self.problems = problems
        self.used: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, dict):
            problems.add(prefix, "must be a table")
            data = {}
        self.data: dict[str, object] = data

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def _get(self, name: str, kinds: tuple[type, ...], default: object, what: str) -> object:
        """The value, or (after recording the problem) the default; None for a required key
        that is missing or wrong, so the loader can go on collecting problems."""
        self.used.add(name)
        fallback = None if default is _MISSING else default
        if name not in self.data:
            if default is _MISSING:
                self.problems.add(self.key(name), "is required")
            return fallback
        value = self.data[name]
        # bool is an int in Python, but `port = true` is a mistake, not 1.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            self.problems.add(self.key(name), f"must be {what}, not {value!r}")
            return fallback
        return value

    def text(
        self, name: str, default: object = _MISSING, check: Callable[[str], object] | None = None
    ) -> str:
        value = self._get(name, (str,), default, "a string")
        if check is not None and isinstance(value, str):
            self._check(name, value, check)
        return cast(str, value)

    def _check(self, name: str, value: str, check: Callable[[str], object]) -> None:
        try:
            check(value)
        except InvalidInput as error:
            self.problems.add(self.key(name), str(error))

    def name(self, name: str, default: object = _MISSING) -> str:
        return self.text(name, default, check_name)

    def address(self, name: str, default: object = _MISSING, listen: bool = False) -> str:
        """HOST:PORT; a listening address may use port 0 (any free port)."""
        return self.text(name, default, _address_check(listen))

    def optional_address(self, name: str) -> str | None:
        """HOST:PORT, or None when the key is absent or empty: an empty string switches off
        what the address is for, as leaving the key out does."""
        value = self.text(name, "")
        if not value:
            return None
        self._check(name, value, _address_check(listen=False))
        return value

    def _bounded(self, name: str, value: object, minimum: float | None, maximum: float | None) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if minimum is not None and value < minimum:
                self.problems.add(self.key(name), f"must be at least {minimum}, not {value}")
            if maximum is not None and value > maximum:
                self.problems.add(self.key(name), f"must be at most {maximum}, not {value}")

    def number(
        self,
        name: str,
        default: object = _MISSING,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        value = self._get(name, (int, float), default, "a number")
        if isinstance(value, float) and not math.isfinite(value):  # TOML has nan and inf
            self.problems.add(self.key(name), f"must be a finite number, not {value}")
            return cast(float, None if default is _MISSING else default)
        self._bounded(name, value, minimum, maximum)
        return float(value) if isinstance(value, int | float) else cast(float, value)

    def integer(
        self, name: str, default: object = _MISSING, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        value = self._get(name, (int,), default, "a whole number")
        self._bounded(name, value, minimum, maximum)
        return cast(int, value)

    def flag(self, name: str, default: object = _MISSING) -> bool:
        return cast(bool, self._get(name, (bool,), default, "true or false"))

    def path(self, name: str, default: object = _MISSING) -> Path:
        value = self.text(name, default if default is _MISSING or default is None else str(default))
        if value is None:
            return cast(Path, None)
        if isinstance(value, str) and not value.startswith("/"):
            self.problems.add(self.key(name), f"must be an absolute path, not {value!r}")
        return Path(value)

    def optional_path(self, name: str) -> Path | None:
        return self.path(name, None) if name in self.data else None

    def strings(self, name: str, default: object = _MISSING) -> tuple[str, ...]:
        value = self._get(name, (list,), default, "a list of strings")
        if isinstance(value, list):
            if not all(isinstance(item, str) for item in value):
                self.problems.add(self.key(name), "must be a list of strings")
                return ()
            return tuple(value)
        return cast(tuple[str, ...], value)

    def addresses(self, name: str, what: str) -> tuple[str, ...]:
        """A list of HOST:PORT, each checked (none by default)."""
        values = self.strings(name, ())
        for value in values:
            self._check(name, value, lambda checked: check_address(checked, what))
        return values

    def choice(self, name: str, choices: tuple[str, ...], default: object = _MISSING) -> str:
        value = self.text(name, default)
        if isinstance(value, str) and value not in choices:
            self.problems.add(self.key(name), f"must be one of {', '.join(choices)}, not {value!r}")
            return choices[0]  # the problem is recorded; a valid value lets loading go on
        return value

    def table(self, name: str) -> "Section":
        self.used.add(name)
        return Section(self.data.get(name), self.key(name), self.problems)

    def tables(self, name: str) -> list["Section"]:
        self.used.add(name)
        value = self.data.get(name, [])
        if not isinstance(value, list):
            self.problems.add(self.key(name), "must be an array of tables ([[...]])")
            return []
        return [Section(item, f"{self.key(name)}[{i}]", self.problems) for i, item in enumerate(value)]

    def finish(self) -> None:
        """Unknown keys are problems: a typo must not silently fall back to a default."""
        for unknown in sorted(set(self.data) - self.used):
            self.problems.add(self.key(unknown), "unknown setting")


def _address_check(listen: bool) -> Callable[[str], object]:
    def check(value: str) -> object:
        any_port = listen and value.endswith(":0")
        return check_address(value.removesuffix(":0") + ":1" if any_port else value)

    return check


def read_toml(path: Path) -> dict[str, object]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(str(path), [("(file)", "does not exist")]) from None
    except OSError as error:
        raise ConfigError(str(path), [("(file)", error.strerror or str(error))]) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(str(path), [("(syntax)", str(error))]) from None
    except UnicodeDecodeError as error:
        raise ConfigError(str(path), [("(syntax)", f"not UTF-8 text: {error}")]) from None


@dataclass(frozen=True)
class TlsConfig:
    """mTLS material; insecure (plaintext) only when the config says so explicitly."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False

    @classmethod
    def load(cls, section: Section) -> "TlsConfig":
        insecure = section.flag("insecure", False)
        files = {name: section.optional_path(name) for name in ("ca_file", "cert_file", "key_file")}
        if not insecure:
            for name, value in files.items():
                if value is None and name not in section.data:
                    section.problems.add(
                        section.key(name), "is required (or set insecure = true for plaintext)"
                    )
                elif value is not None and not value.is_file():
                    section.problems.add(section.key(name), f"{value} does not exist")
        section.finish()
        return cls(files["ca_file"], files["cert_file"], files["key_file"], insecure)

    def read(self) -> tuple[bytes, bytes, bytes]:
        assert self.ca_file and self.cert_file and self.key_file
        return self.ca_file.read_bytes(), self.cert_file.read_bytes(), self.key_file.read_bytes()
