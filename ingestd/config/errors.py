"""Configuration errors (one line per problem, with file and key path) and the `Secret` wrapper.

Loaded by every process that reads settings.yaml; imports nothing beyond the logging helpers.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from ingestd.logs import MASK

EXIT_CONFIG: Final = 78  # EX_CONFIG (sysexits.h): what every command exits with on bad settings
# EX_UNAVAILABLE (sysexits.h): a service a command needs (MongoDB, the endpoint, the daemon's
# answer) cannot be reached or refused; 1 stays "unexpected error".
EXIT_UNAVAILABLE: Final = 69


class ConfigError(Exception):
    """One invalid setting: `str()` is `"<file>: <key.path>: <reason>"`."""

    def __init__(self, file: Path | str, key_path: str, reason: str) -> None:
        super().__init__(str(file), key_path, reason)
        self.file = str(file)
        self.key_path = key_path
        self.reason = reason

    def __str__(self) -> str:
        # File-level problems (unreadable, YAML syntax) have no key path.
        if not self.key_path:
            return f"{self.file}: {self.reason}"
        return f"{self.file}: {self.key_path}: {self.reason}"


class ConfigErrors(ConfigError):
    """All problems found in one file; the first one also fills the ConfigError fields."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        if not errors:
            raise ValueError("ConfigErrors needs at least one error")
        first = errors[0]
        super().__init__(first.file, first.key_path, first.reason)
        self.errors: tuple[ConfigError, ...] = tuple(errors)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class Secret:
    """A secret string: masked in str/repr (hence in dataclass reprs and tracebacks)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return MASK

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

