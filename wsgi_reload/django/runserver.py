"""A reloader for ``manage.py runserver`` built on the shared scanner.

It implements Django's ``BaseReloader`` (``watch_dir``, ``watched_files``, ``tick``,
``notify_file_changed`` and the vetoable ``file_changed`` signal come from it), and adds
the shared change rules (mtime_ns, size and inode; a settle window) and the event backend.
Template changes still only reset Django's template loaders, as with Django's own reloader.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from django.utils import autoreload

from ..monitor import Monitor
from ..scanner import Change, Scanner
from ..settings import Settings, SettingsError

log = logging.getLogger("wsgi_reload.django")


class WsgiReloadReloader(autoreload.BaseReloader):  # type: ignore[misc]
    """Django's reloader interface over :class:`wsgi_reload.Scanner` and :class:`wsgi_reload.Monitor`."""

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__()
        self.settings = settings if settings is not None else _settings()
        self._batches: queue.Queue[Sequence[Change]] = queue.Queue()
        self.monitor: Monitor | None = None

    def django_files(self) -> set[str]:
        return {str(path) for path in self.watched_files()}

    def tick(self) -> Iterator[None]:
        """The first tick records a baseline; later ones report each changed file once."""
        scanner = Scanner(self.settings, watch_modules=False, sources=[self.django_files])
        scanner.scan()  # the baseline, before the first yield
        self.monitor = Monitor(scanner, self._batches.put, name="wsgi_reload-runserver")
        self.monitor.start()
        try:
            while True:
                try:
                    batch = self._batches.get(timeout=self.settings.interval)
                except queue.Empty:
                    yield
                    continue
                for change in batch:
                    self.notify_file_changed(Path(change.path))
                yield
        finally:
            self.monitor.stop()

    @classmethod
    def check_availability(cls) -> bool:
        return True


def _settings() -> Settings:
    from .files import reload_settings

    try:
        return reload_settings()
    except SettingsError:
        return Settings()


def get_reloader() -> Any:
    """What ``django.utils.autoreload.get_reloader`` returns once the app is installed."""
    return WsgiReloadReloader()


def install() -> None:
    """Make runserver's autoreloader use :class:`WsgiReloadReloader`."""
    autoreload.get_reloader = get_reloader
