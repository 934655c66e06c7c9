"""The one watcher of a server: scan what it runs, check the code, reload it.

Every adapter builds the same :class:`Watcher` and configures three things:

- where the file list comes from: this process's ``sys.modules``, or the records the
  workers publish (:mod:`wsgi_reload._server.records`), plus extra files and globs;
- what the check imports (the settings' ``app``, in a fresh interpreter);
- what a reload does (signal a verified process, say).

For a server it runs in the server's one watcher process (:mod:`wsgi_reload._server.watcher_process`);
the ``wsgi-reload watch`` command runs it in its own process. ``manage.py runserver``'s reloader and
the in-process :class:`wsgi_reload.hot.HotReloader` use it too: this is the one place a
scanner, a monitor and a gate are put together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from .._check.check import CheckResult
from .gate import ReloadGate
from .monitor import Monitor
from .scanner import Change, Scanner, Source
from .settings import Settings

log = logging.getLogger("wsgi_reload.watcher")


class Watcher:
    """Scanner, check-then-act gate and monitor thread, wired together."""

    def __init__(
        self,
        settings: Settings,
        action: Callable[[Sequence[Change]], object],
        *,
        server: str,
        sources: Iterable[Source] = (),
        watch_modules: bool = False,
        modules_loaded_at_ns: int | None = None,
        check: Callable[[Sequence[str]], CheckResult] | None = None,
        wake_dirs: Iterable[str] = (),
        wakes_on: Callable[[str], bool] = lambda name: True,
        name: str = "wsgi_reload-watcher",
        on_batch: Callable[[Sequence[Change]], object] | None = None,
        on_tick: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.server = server
        self.scanner = Scanner(settings, watch_modules=watch_modules, sources=sources,
                               modules_loaded_at_ns=modules_loaded_at_ns)
        self.gate = ReloadGate(settings, action, server=server, check=check, rescan=self.scanner.scan)
        self.monitor = Monitor(self.scanner, on_batch or self.gate, wake_dirs=wake_dirs, wakes_on=wakes_on, name=name,
                               on_tick=on_tick or self.gate.retry_pending,
                               tick_pending=self.gate.has_pending, settles=on_batch is not None)
        if on_batch is None:
            self.gate.settler = self.monitor  # the gate checks while the batch settles

    def start(self, announce: bool = True, workers_pending: bool = False) -> Watcher:
        """Record the baseline and start watching.

        :param announce: log one line that says what is watched, how, and what a change does.
        :param workers_pending: a server's watcher, started before its workers loaded the app:
            the files they load join once they say what they run ("workers up").
        """
        self.monitor.start()
        if announce:
            count = len(self.scanner.watched_files())
            what = f"{count} file{'' if count == 1 else 's'}"
            if workers_pending:  # "workers up" says how many once they have loaded
                what = f"the app's files once the workers load them ({what} so far)" if count else \
                    "the app's files once the workers load them"
            log.info("wsgi_reload: watching %s, by %s; check: %s; a good change reloads %s", what,
                     self.monitor.describe(), self.check_description(), self.server)
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        self.monitor.stop(timeout)

    def check_description(self) -> str:
        mode = self.settings.check
        if mode == "import" and self.settings.app:
            return f"import {self.settings.app}"
        if mode == "import":
            return "compile only (no app to import was found: set WSGI_RELOAD_APP)"
        return mode
