"""What every adapter does with a batch of changes: name the files, check the code, reload or refuse."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from .check import CheckResult, check_code
from .files import failed_imports
from .scanner import Change
from .settings import Settings

log = logging.getLogger("wsgi_reload.reloader")


class Reloader:
    """Turns a batch of changes into at most one call of ``trigger``, and only for good code.

    On a failed check nothing reloads: the error is logged once per distinct error, the
    broken file stays watched, and the next batch whose check passes triggers the reload.
    """

    def __init__(
        self,
        settings: Settings,
        trigger: Callable[[Sequence[Change]], object],
        *,
        server: str = "server",
        check: Callable[[Sequence[str]], CheckResult] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.settings = settings
        self.trigger = trigger
        self.server = server
        # By default the check imports with this process's sys.path, environment and directory.
        self.check = check if check is not None else (lambda paths: check_code(paths, settings))
        self.log = logger if logger is not None else log
        self.broken: CheckResult | None = None
        self._reported: set[tuple[str | None, int | None, str]] = set()

    def __call__(self, batch: Sequence[Change]) -> bool:
        """Handle one batch; returns True when it triggered a reload."""
        if not batch:
            return False
        detected = time.monotonic()
        self.log.info("wsgi_reload: %s", describe(batch))
        result = self.check([c.path for c in batch if c.kind != "deleted"])
        if not result.ok:
            self.refuse(result)
            return False
        if self.broken is not None:
            self.log.info("wsgi_reload: the code loads again (%s was fixed)", self.broken.file or "the error")
        self.broken = None
        self._reported.clear()
        failed_imports.clear()
        self.log.info("wsgi_reload: check passed (%s, %.0f ms); reloading %s",
                      result.stage, 1000 * (time.monotonic() - detected), self.server)
        self.trigger(batch)
        return True

    def refuse(self, result: CheckResult) -> None:
        """Record a failed check: watch its file, log it once, and wait for a fix."""
        self.broken = result
        if result.file:
            # Watched from the moment the check read it, so the fix counts even if it is quick.
            failed_imports.record(result.file, read_at_ns=result.started_ns)
        if result.key in self._reported:
            self.log.debug("wsgi_reload: still broken: %s", result)
            return
        self._reported.add(result.key)
        self.log.error("wsgi_reload: not reloading, the new code does not load: %s. "
                       "The old code keeps serving; saving a fix reloads.", result)
        if result.details:
            self.log.debug("wsgi_reload: check traceback:\n%s", result.details)


def describe(batch: Sequence[Change], limit: int = 5) -> str:
    """'2 files changed: a.py, b.py' with at most ``limit`` names."""
    names = [str(c) for c in batch[:limit]]
    more = f" and {len(batch) - limit} more" if len(batch) > limit else ""
    noun = "file" if len(batch) == 1 else "files"
    return f"{len(batch)} {noun} changed: {', '.join(names)}{more}"
