"""Routes the ``wsgi_reload`` loggers into the host server's own log."""

from __future__ import annotations

import logging
from collections.abc import Callable

LOGGER_NAME = "wsgi_reload"


class ForwardingHandler(logging.Handler):
    """Hands each record's message to a server's logging function (gunicorn's, uWSGI's)."""

    def __init__(self, emit_line: Callable[[int, str], None]) -> None:
        super().__init__()
        self._emit_line = emit_line

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._emit_line(record.levelno, self.format(record))
        except Exception:
            self.handleError(record)


def forward_to(emit_line: Callable[[int, str], None], level: int = logging.INFO) -> None:
    """Send ``wsgi_reload`` logging to ``emit_line(levelno, message)`` instead of the root logger.

    Calling it again replaces the previous destination, so a re-read config does not log twice.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if isinstance(h, ForwardingHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(ForwardingHandler(emit_line))
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    logger.propagate = False
