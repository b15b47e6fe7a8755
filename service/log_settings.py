"""Triton's logging extension: read and change the server's log verbosity and format while it runs.

The settings drive the real `modelserve` loggers: log_verbose_level > 0 turns on DEBUG, otherwise the most
verbose of log_info / log_warning / log_error that is on sets the level (all off: silent). log_format picks
the line format of the handler the CLI installs (`ModelserveFormatter`): "default" or "ISO8601" (UTC).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from service.errors import InvalidInput

LOGGER = "modelserve"
FORMATS = ("default", "ISO8601")
_BOOLS = ("log_info", "log_warning", "log_error")


class ModelserveFormatter(logging.Formatter):
    """The CLI's log line format; switches between Triton's two formats when log_format changes."""

    mode = "default"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if ModelserveFormatter.mode == "ISO8601":
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
            return f"{stamp} {record.levelname[0]} {record.process} {record.name}] {message}"
        return f"{self.formatTime(record)} {record.levelname} {record.name}: {message}"


class LogSettings:
    """The live logging settings, as Triton's v2/logging reports them."""

    def __init__(self, *, level: str, verbose: int, log_format: str) -> None:
        self._lock = threading.Lock()
        numeric = logging.getLevelName(level.upper())
        self.values: dict[str, Any] = {
            "log_file": "", "log_info": numeric <= logging.INFO, "log_warning": numeric <= logging.WARNING,
            "log_error": numeric <= logging.ERROR, "log_verbose_level": verbose, "log_format": log_format,
        }
        self._apply()

    def get(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.values)

    def update(self, changes: dict[str, Any]) -> dict[str, Any]:
        checked = {k: self._check(k, v) for k, v in changes.items() if v is not None}
        with self._lock:
            self.values.update(checked)
            self._apply()
            return dict(self.values)

    @staticmethod
    def _check(key: str, value: Any) -> Any:
        if key in _BOOLS:
            if not isinstance(value, bool):
                raise InvalidInput(f"log setting '{key}': expected a boolean, got {value!r}")
            return value
        if key == "log_verbose_level":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInput(f"log setting 'log_verbose_level': expected an integer >= 0, got {value!r}")
            return value
        if key == "log_format":
            if value not in FORMATS:
                raise InvalidInput(f"log setting 'log_format': expected one of {list(FORMATS)}, got {value!r}")
            return value
        if key == "log_file":
            if value != "":
                raise InvalidInput("log file location can not be updated through network protocol; redirect the "
                                   "server's output when it starts")
            return value
        raise InvalidInput(f"unknown log setting '{key}'; expected one of "
                           f"{['log_file', *_BOOLS, 'log_verbose_level', 'log_format']}")

    def _apply(self) -> None:
        v = self.values
        if v["log_verbose_level"] > 0:
            level = logging.DEBUG
        elif v["log_info"]:
            level = logging.INFO
        elif v["log_warning"]:
            level = logging.WARNING
        elif v["log_error"]:
            level = logging.ERROR
        else:
            level = logging.CRITICAL + 1
        logging.getLogger(LOGGER).setLevel(level)
        ModelserveFormatter.mode = v["log_format"]
