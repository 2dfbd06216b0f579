"""Logging set-up shared by the daemons and the CLI: plain text, or one JSON object per
line (`--log-json`) carrying the record's structured fields (`extra=`), so a log
pipeline can filter on them without parsing messages."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

LEVELS = ("debug", "info", "warning", "error")
# attributes every LogRecord has; anything else on a record came from `extra=`
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """`{"t", "level", "logger", "msg", ...extra fields, "exc"?}`, one line, always valid
    JSON whatever the message contains."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "t": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup(level: str, *, as_json: bool, text_format: str, stream: TextIO | None = None) -> None:
    """Configure the root logger (a second call replaces the handler of the first; other
    handlers, such as a test runner's, are left alone)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(text_format))
    handler._dragonfly = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dragonfly", False):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())


class RefusalLog:
    """Refusals are logged at most once a second per reason (a flood must not flood the log)."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger = logger
        self.what = what
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def __call__(self, reason: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(reason, -1e9) < 1.0:
            self._quiet[reason] = self._quiet.get(reason, 0) + 1
            return
        self._last[reason] = now
        more = self._quiet.pop(reason, 0)
        self.logger.warning("%s refused (%s): %s%s", self.what, reason, message,
                         f" (+{more} more since the last line)" if more else "")
