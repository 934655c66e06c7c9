"""The runserver reloader against Django's BaseReloader contract, on real files."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import django
import pytest
from django.conf import settings

if not settings.configured:
    settings.configure(INSTALLED_APPS=[], USE_I18N=False)
    django.setup()

from django.utils import autoreload  # noqa: E402

from wsgi_reload import Settings  # noqa: E402
from wsgi_reload.django._runserver import WsgiReloadReloader  # noqa: E402


class Recording(WsgiReloadReloader):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__(Settings(interval=0.05, settle=0.05, backend="poll"))
        self.notified: list[Path] = []

    def notify_file_changed(self, path: Path) -> None:
        self.notified.append(path)


@pytest.fixture
def reloader() -> Iterator[Recording]:
    r = Recording()
    yield r
    if r.watcher is not None:
        r.watcher.stop()


def ticks_until(reloader: Recording, ticker: Iterator[None], count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(reloader.notified) < count and time.monotonic() < deadline:
        next(ticker)
    time.sleep(0.3)
    for _ in range(5):
        next(ticker)


def test_it_is_a_django_base_reloader() -> None:
    assert issubclass(WsgiReloadReloader, autoreload.BaseReloader)
    assert WsgiReloadReloader.check_availability()


def test_the_first_tick_records_and_does_not_trigger(tmp_path: Path, reloader: Recording) -> None:
    target = tmp_path / "a.py"
    target.write_text("x = 1\n")
    reloader.extra_files.add(target)
    ticker = reloader.tick()
    next(ticker)
    for _ in range(5):
        next(ticker)
    assert reloader.notified == []


def test_a_changed_file_triggers_once(tmp_path: Path, reloader: Recording) -> None:
    target = tmp_path / "a.py"
    target.write_text("x = 1\n")
    reloader.extra_files.add(target)
    ticker = reloader.tick()
    next(ticker)
    target.write_text("x = 22\n")
    ticks_until(reloader, ticker, 1)
    assert reloader.notified == [target]


@pytest.mark.parametrize("globs, changed", [
    (["*.html"], "page.html"),
    (["**/*.html"], "deep/deeper/page.html"),
    (["**/*.html", "deep/*.html"], "deep/page.html"),  # overlapping: still once
    (["*.txt", "**/*.html"], "deep/deeper/page.html"),  # nested
])
def test_globs(tmp_path: Path, reloader: Recording, globs: list[str], changed: str) -> None:
    (tmp_path / "deep" / "deeper").mkdir(parents=True)
    for name in ("page.html", "deep/page.html", "deep/deeper/page.html", "notes.txt"):
        (tmp_path / name).write_text("a")
    for pattern in globs:
        reloader.watch_dir(tmp_path, pattern)
    ticker = reloader.tick()
    next(ticker)
    (tmp_path / changed).write_text("bb")
    ticks_until(reloader, ticker, 1)
    assert reloader.notified == [tmp_path / changed]


def test_a_file_that_failed_to_import_is_watched(tmp_path: Path, reloader: Recording) -> None:
    broken = tmp_path / "broken_for_runserver.py"
    broken.write_text("def f(:\n")
    autoreload._error_files.append(str(broken))
    try:
        assert broken in set(reloader.watched_files())
        ticker = reloader.tick()
        next(ticker)
        broken.write_text("def f():\n    pass\n")
        ticks_until(reloader, ticker, 1)
        assert reloader.notified == [broken]
    finally:
        autoreload._error_files.remove(str(broken))
