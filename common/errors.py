"""User-facing input errors: one line that says what is wrong and where."""

from __future__ import annotations

from pathlib import Path

import tomllib


class FedaugError(Exception):
    """An error caused by the user's input (file, flag, config), not by a bug.

    The CLI prints ``str(error)`` as a single line and exits non-zero, without a traceback.
    """


class DataError(FedaugError):
    """A malformed data file, located as precisely as the format allows."""

    def __init__(
        self, path, message: str, line: int | None = None, column: int | str | None = None, unit: str = "line"
    ):
        self.path = str(path)
        self.line = line
        self.column = column
        self.reason = message
        where = self.path
        if line is not None:
            where += f", {unit} {line}"
        if column is not None:
            where += f", column {column}"
        super().__init__(f"{where}: {message}")


class ConfigError(FedaugError):
    """An impossible or malformed configuration (TOML key, CLI flag)."""


class DataWarning(UserWarning):
    """A data file that loads, but has something the loaders do not use (a catalog column): one line naming it."""


def read_toml(path) -> dict:
    """A TOML config file's tables; a missing, non-UTF-8 or invalid file is one ConfigError line. Here rather than
    in fedaug.common.config so that a reader of one key (a container healthcheck) does not load the ML stack."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
