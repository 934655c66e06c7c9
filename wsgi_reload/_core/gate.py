"""The check-then-act gate every watcher shares: name the files, check the code, act or refuse."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from .._check.check import CheckResult, check_code
from .files import failed_imports
from .scanner import Change
from .settings import Settings

log = logging.getLogger("wsgi_reload.gate")

MAX_RECHECKS = 5
"""Files still changing after this many checks in a row: give up on this batch, the next scan brings them."""


class Settler(Protocol):
    """What settles a batch for the gate (the watcher's :class:`~wsgi_reload._core.monitor.Monitor`)."""

    def written(self, batch: Sequence[Change]) -> None:
        """Wait until no file of ``batch`` is open for writing."""

    def settle(self, batch: list[Change], since: float | None = None) -> tuple[list[Change], list[Change]]:
        """Wait until the batch's files are quiet (measured from ``since``, a ``time.monotonic()``),
        and return the whole batch and the changes found meanwhile."""


class ActionFailed(Exception):
    """The reload could not be carried out now (the target is gone, a pidfile is missing); try again."""


class ReloadGate:
    """Turns a batch of changes into at most one call of ``action``, and only for good code.

    - The check runs on the batch as soon as it comes, while its settle window runs
      (``settler``), rather than after it: a save that settles with the bytes the check read has
      its verdict when the window closes. If the files changed again meanwhile (an editor's
      second write), the result is stale: the settled batch is checked.
    - If files changed while that check ran (``rescan`` finds more), its result is stale too:
      the new changes join the batch and the check runs again.
    - On a failed check nothing happens: the error is logged once per distinct error, the
      broken file stays watched, and the next batch whose check passes acts.
    - An ``action`` that raises :class:`ActionFailed` stays pending and is retried by
      :meth:`retry_pending` until it works or a newer batch replaces it.
    """

    def __init__(
        self,
        settings: Settings,
        action: Callable[[Sequence[Change]], object],
        *,
        server: str = "server",
        check: Callable[[Sequence[str]], CheckResult] | None = None,
        rescan: Callable[[], Sequence[Change]] | None = None,
        settler: Settler | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.settings = settings
        self.action = action
        self.server = server
        # By default the check imports with this process's sys.path, environment and directory.
        self.check = check if check is not None else (lambda paths: check_code(paths, settings))
        self.rescan = rescan
        self.settler = settler
        """None: batches come settled."""
        self.log = logger if logger is not None else log
        self.broken: CheckResult | None = None
        self.pending: Sequence[Change] | None = None
        self.unsettled: Sequence[Change] | None = None
        """A batch whose files kept changing through every check: checked again on the next turn."""
        self.last_passed_ns = 0
        """When the last passing check began reading the code (``time.time_ns()``)."""
        self._reported: set[tuple[str | None, int | None, str]] = set()
        self._pending_reported = False
        self._paused = False

    def __call__(self, batch: Sequence[Change]) -> bool:
        """Handle one batch; returns True when it acted."""
        if not batch and self.unsettled is None:
            return False
        self.pending = None  # a newer batch replaces an action that could not be carried out
        detected = time.monotonic()
        unsettled, self.unsettled = self.unsettled, None
        if unsettled is None:
            self.log.info("wsgi_reload: %s", describe(batch))
        else:  # files kept changing last time: check what they are now, with these changes
            batch = _merged(unsettled, batch)
        batch, result = self._check_until_current(list(batch), detected if unsettled is None else None)
        if result.ok and not result.holds():
            # A worker loaded a changed module after the check began (say, a lazy import whose
            # record came late): the check did not import it. Check with it now.
            batch, result = self._check_until_current(batch, None)
            if result.ok and not result.holds():
                result = CheckResult(False, "stale", "the workers' modules kept changing while the code was checked",
                                     started_ns=result.started_ns)
        if result.stage in ("stale", "paused"):
            # No verdict on the code: fast saves (an editor, a deploy still copying), or no room to
            # store the new code (a full disk). The batch is checked again on the next turn.
            self.unsettled = batch
            if result.stage == "stale":
                self.log.info("wsgi_reload: files are still changing; checking again once they settle")
            else:
                self._pause(result.message)
            return False
        if not result.ok:
            self.refuse(result, save=True)
            return False
        if self.broken is not None:
            self.log.info("wsgi_reload: the code loads again (%s was fixed)", self.broken.file or "the error")
        self.broken = None
        self.last_passed_ns = result.started_ns
        self._reported.clear()
        failed_imports.clear()
        stage = f"{result.stage}, warm" if result.warm else result.stage
        self.log.info("wsgi_reload: check passed (%s, %.0f ms); reloading %s",
                      stage, 1000 * (result.seconds or time.monotonic() - detected), self.server)
        return self._act(batch)

    def _checked(self, batch: list[Change]) -> CheckResult:
        try:
            return self.check([c.path for c in batch if c.kind != "deleted"])
        except OSError as exc:  # the new code cannot be read into the store: a full disk, say
            return CheckResult(False, "paused", f"the new code cannot be stored or checked: {exc.strerror or exc}"
                               + (f" ({exc.filename})" if exc.filename else ""))

    def _check_until_current(self, batch: list[Change], detected: float | None) -> tuple[list[Change], CheckResult]:
        """Check ``batch`` until no file changed while the check ran. A fresh batch (``detected``:
        when it was found) is checked at once, once its files are written, and settles meanwhile;
        one that would not settle last time is not (its files were still being written a turn
        ago: checking them early would only start and throw away a check on every turn of a
        long deploy)."""
        settler = self.settler if detected is not None else None
        if settler is not None:
            settler.written(batch)  # an editor that truncated a file may not have written it yet
            batch = _merged(batch, self.rescan() if self.rescan is not None else [])
        result = self._checked(batch)
        if settler is not None and detected is not None:
            outlasted = time.monotonic() - detected > self.settings.settle
            batch, more = settler.settle(batch, detected)
            if not more:
                return batch, result  # settled with the bytes the check read
            if outlasted:  # (within the window it is the save itself settling: no news)
                self.log.info("wsgi_reload: %s while the check ran; checking again", describe(more))
            result = self._checked(batch)
        for _ in range(MAX_RECHECKS):
            more = list(self.rescan()) if self.rescan is not None else []
            if not more:
                return batch, result
            self.log.info("wsgi_reload: %s while the check ran; checking again", describe(more))
            batch = _merged(batch, more)
            result = self._checked(batch)
        return batch, CheckResult(False, "stale", "files kept changing while the code was checked; "
                                  "waiting for them to settle", started_ns=result.started_ns)

    def _act(self, batch: Sequence[Change]) -> bool:
        try:
            self.action(batch)
        except OSError as exc:  # publishing the checked code failed: a full disk, say
            self.pending = batch
            self._pause(f"the checked code cannot be stored: {exc.strerror or exc}")
            return False
        except ActionFailed as exc:
            self.pending = batch
            if not self._pending_reported:
                self._pending_reported = True
                self.log.warning("wsgi_reload: cannot reload %s yet (%s); trying again every %g s until it works "
                                 "or the next change", self.server, exc, self.settings.interval)
            return False
        if self._pending_reported:
            self.log.info("wsgi_reload: reloaded %s on a retry", self.server)
        self._resume()
        self._pending_reported = False
        self.pending = None
        return True

    def _pause(self, why: str) -> None:
        if not self._paused:
            self._paused = True
            self.log.warning("wsgi_reload: reloading is paused: %s; it goes on by itself once that is fixed, and "
                             "the old code keeps serving meanwhile", why)

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self.log.info("wsgi_reload: reloading goes on")

    def reload_now(self) -> bool:
        """Act without a batch (the code loads, but a worker failed to load it at start)."""
        return self._act([])

    def retry_pending(self) -> None:
        """Carry out an action that failed before, or check a batch that would not settle."""
        if self.unsettled is not None:
            self([])
        elif self.pending is not None:
            self._act(self.pending)

    def has_pending(self) -> bool:
        return self.pending is not None or self.unsettled is not None

    def refuse(self, result: CheckResult, *, old_code_serves: bool = True, save: bool = False) -> None:
        """Record a failed check: watch its file, log it once, and wait for a fix.

        ``old_code_serves`` is False when the workers never loaded the app: then no old code
        is serving, and the log says so.
        """
        self.broken = result
        if result.file:
            # Watched from the moment the check read it, so the fix counts even if it is quick.
            failed_imports.record(result.file, read_at_ns=result.started_ns)
        for path in result.watch_for:  # a missing module: creating it is the fix
            failed_imports.record(path, read_at_ns=result.started_ns)
        if result.key in self._reported:
            # Once per ``save``, in one short line: it was not served (the error was logged before).
            self.log.log(logging.INFO if save else logging.DEBUG, "wsgi_reload: not reloading, still the same "
                         "error: %s", result)
            return
        self._reported.add(result.key)
        if old_code_serves:
            self.log.error("wsgi_reload: not reloading, %s: %s. The old code keeps serving; saving a fix reloads.",
                           what_failed(result), result)
        else:
            self.log.error("wsgi_reload: the app does not load, so the workers have no code to serve: %s. "
                           "Saving a fix reloads.", result)
        if result.details:
            self.log.debug("wsgi_reload: check traceback:\n%s", result.details)


def _merged(batch: Sequence[Change], more: Sequence[Change]) -> list[Change]:
    """``batch`` with the newer changes ``more`` (a file in both: its newer change)."""
    known = {c.path for c in more}
    return sorted([c for c in batch if c.path not in known] + list(more))


def what_failed(result: CheckResult) -> str:
    """'the new code does not load', or what else the check found broken."""
    if result.file and result.file.endswith(".mo"):
        return "the new translation catalog does not parse"
    if result.file and "(template engine " in result.message:
        return "the new template does not compile"
    return "the new code does not load"


def describe(batch: Sequence[Change], limit: int = 5) -> str:
    """'2 files changed: a.py, b.py' with at most ``limit`` names."""
    names = [str(c) for c in batch[:limit]]
    more = f" and {len(batch) - limit} more" if len(batch) > limit else ""
    noun = "file" if len(batch) == 1 else "files"
    return f"{len(batch)} {noun} changed: {', '.join(names)}{more}"
