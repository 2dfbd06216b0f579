"""The logger handed to aiohttp's servers (AppRunner `logger=`): a client that sends
something that is not HTTP (a bad request line, a NUL in a header, a broken chunk size)
is expected input, so aiohttp's "Error handling request" record, logged at ERROR with a
traceback, becomes one INFO line; so does a request body that cannot be decoded
(RequestPayloadError, raised again when aiohttp drains the unread rest of it after the
answer). Unexpected exceptions keep their traceback."""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError


class _BadHttpIsInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (HttpProcessingError, RequestPayloadError)):
            text = str(exc).strip() or type(exc).__name__
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg, record.args = "bad HTTP from %s: %s", (remote, text.splitlines()[0][:200])
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def server_logger(name: str) -> logging.Logger:
    log = logging.getLogger(name)
    if not any(isinstance(f, _BadHttpIsInfo) for f in log.filters):
        log.addFilter(_BadHttpIsInfo())
    return log
