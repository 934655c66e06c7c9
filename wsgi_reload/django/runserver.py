"""A reloader for ``manage.py runserver`` built on the shared scanner.

It implements Django's ``BaseReloader`` (``watch_dir``, ``watched_files``, ``tick``,
``notify_file_changed`` and the vetoable ``file_changed`` signal come from it), and adds
the shared change rules (mtime_ns, size and inode; a settle window) and the event backend.
A code change runs the shared pre-reload check first: a broken save keeps this process
serving the old code, the console names the file and line, and the fix restarts it.
Template changes still only reset Django's template loaders, as with Django's own reloader.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from django.utils import autoreload

from ..files import ModuleFiles
from ..gate import ReloadGate
from ..monitor import Monitor
from ..scanner import Change, Scanner
from ..settings import Settings, SettingsError

log = logging.getLogger("wsgi_reload.django")

_STARTED_NS = time.time_ns()
"""Imported while Django sets up, before the URLconf and views load."""


class WsgiReloadReloader(autoreload.BaseReloader):  # type: ignore[misc]
    """Django's reloader interface over :class:`wsgi_reload.Scanner` and :class:`wsgi_reload.Monitor`."""

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__()
        self.settings = settings if settings is not None else _settings()
        self._batches: queue.Queue[Sequence[Change]] = queue.Queue()
        self._module_files = ModuleFiles()
        self.monitor: Monitor | None = None

    def django_files(self) -> dict[str, int | None]:
        """What Django would watch; the modules this process imported carry when it began loading
        code: the server answers before the first scan, and a save in between must count."""
        imported = self._module_files()
        return {str(path): _STARTED_NS if str(path) in imported else None for path in self.watched_files()}

    def tick(self) -> Iterator[None]:
        """The first tick records a baseline; later ones report each changed file once."""
        scanner = Scanner(self.settings, watch_modules=False, sources=[self.django_files])
        self.monitor = Monitor(scanner, self._batches.put, name="wsgi_reload-runserver")
        self.monitor.start()  # the baseline is recorded before it returns, so before the first yield
        gate = ReloadGate(self.settings, self._notify, server="runserver", rescan=scanner.scan)
        try:
            while True:
                try:
                    batch = self._batches.get(timeout=self.settings.interval)
                except queue.Empty:
                    yield
                    continue
                if any(change.path.endswith(".py") for change in batch):
                    # Django would restart into the new code even when it does not load, and serve
                    # nothing until the fix: check first, and keep this process serving if it fails.
                    gate(batch)
                else:
                    self._notify(batch)  # templates and translations: Django resets its caches
                yield
        finally:
            self.monitor.stop()

    def _notify(self, batch: Sequence[Change]) -> None:
        for change in batch:
            self.notify_file_changed(Path(change.path))

    @classmethod
    def check_availability(cls) -> bool:
        return True


def _settings() -> Settings:
    from .files import reload_settings, wsgi_target

    try:
        return reload_settings()
    except SettingsError:
        return Settings(app=wsgi_target())  # manage.py check shows the problem as wsgi_reload.W001


def get_reloader() -> Any:
    """What ``django.utils.autoreload.get_reloader`` returns once the app is installed."""
    return WsgiReloadReloader()


def install() -> None:
    """Make runserver's autoreloader use :class:`WsgiReloadReloader`."""
    autoreload.get_reloader = get_reloader
