"""The uWSGI timer behind :mod:`wsgi_reload.uwsgi` and the Django app: scan, check, ``uwsgi.reload()``.

One timer per instance; its signal goes to whichever worker is free. That worker scans,
and when files changed it runs the shared pre-reload check and calls ``uwsgi.reload()``,
the master's graceful reload. A lock file shared by the workers makes sure a change is
checked and acted on once, whichever worker sees it first.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from .check import in_probe
from .logs import forward_to
from .monitor import settle
from .reloader import Reloader
from .scanner import Change, Scanner
from .settings import Settings, SettingsError, missing_extra_files

_log = logging.getLogger("wsgi_reload.uwsgi")

_LOADED_NS = time.time_ns()
"""About when this process began loading the app (``--import`` runs first). A module file newer
than this changed after it was loaded; ``uwsgi.started_on`` is whole seconds, too coarse."""

SIGNAL = 77
"""The uWSGI signal our timer raises. It is fixed, not the first free one: with --lazy-apps
each worker registers it in its own slot, and a respawned worker must overwrite its old
registration, whose handler died with the old process."""

HOW_TO_RUN = ("run the app with uwsgi --master and --import wsgi_reload.uwsgi, or remove the import "
              "when not running under uWSGI")


class _Watcher:
    """The per-process state behind the timer's signal handler."""

    def __init__(self, uwsgi: Any, settings: Settings, prepare: Callable[[], object] | None = None) -> None:
        self.uwsgi = uwsgi
        self.settings = settings
        self.prepare = prepare
        self.app_module = _app_module_name(uwsgi.opt)
        self.scanner = Scanner(settings, modules_loaded_at_ns=_LOADED_NS)
        self.reloader = Reloader(settings, self.trigger, server="uWSGI")
        self.startup_checked = False
        base = os.path.join(tempfile.gettempdir(), f"wsgi-reload-uwsgi-{uwsgi.masterpid()}")
        self.lock_path = base + ".lock"
        self.state_path = base + ".json"

    def trigger(self, batch: Sequence[Change]) -> None:
        self.uwsgi.reload()

    def tick(self, signum: int = 0) -> None:
        """The timer's handler: runs in a worker between requests."""
        try:
            if not self.startup_checked:
                self.startup_checked = True
                if self.prepare is not None:
                    self.prepare()
                if self.app_failed_here():
                    self.recover_startup()
            changes = self.scanner.scan()
            if changes:
                batch = settle(self.scanner.scan, changes, self.settings.settle)
                self.once(_fingerprint(batch), lambda: self.reloader(batch))
        except Exception:
            _log.exception("wsgi_reload: the change check failed; trying again at the next tick")

    def app_failed_here(self) -> bool:
        return self.app_module is not None and self.app_module not in sys.modules and bool(self.settings.app)

    def recover_startup(self) -> None:
        """The app did not load in this process: a broken app, or a save that raced the start."""
        result = self.reloader.check([])
        if not result.ok:
            _log.error("wsgi_reload: the app did not load at startup; watching for a fix")
            self.reloader.refuse(result)
            return

        def reload() -> None:
            _log.warning("wsgi_reload: the app failed to load here but loads now (a save raced the start); "
                         "reloading uWSGI")
            self.trigger(())

        self.once(f"recover:{self.uwsgi.masterpid()}:{self.uwsgi.started_on}", reload)

    def once(self, fingerprint: str, action: Callable[[], object]) -> None:
        """Run ``action`` unless a worker of this instance already ran it for the same fingerprint."""
        with open(self.lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self._last_fingerprint() == fingerprint:
                    _log.debug("wsgi_reload: another worker already handled this change")
                    return
                self._save_fingerprint(fingerprint)
                action()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _last_fingerprint(self) -> str | None:
        try:
            with open(self.state_path, encoding="utf-8") as f:
                value = json.load(f).get("fingerprint")
                return value if isinstance(value, str) else None
        except (OSError, ValueError):
            return None

    def _save_fingerprint(self, fingerprint: str) -> None:
        temporary = f"{self.state_path}.{os.getpid()}"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump({"fingerprint": fingerprint}, f)
        os.replace(temporary, self.state_path)


def _fingerprint(batch: Sequence[Change]) -> str:
    """The changed files and their current state: two workers seeing the same change agree on it."""
    digest = hashlib.sha256()
    for change in batch:
        try:
            st = os.stat(change.path)
            state = f"{st.st_mtime_ns}:{st.st_size}:{st.st_ino}"
        except OSError:
            state = "missing"
        digest.update(f"{change.path}\0{state}\n".encode())
    return digest.hexdigest()


def _text(value: Any) -> str | None:
    if isinstance(value, list):
        value = value[-1] if value else None
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else None


def _app_target(opt: Any) -> str | None:
    """The app the check imports, from --module / --wsgi / --wsgi-file / --file and --callable."""
    callable_name = _text(opt.get("callable")) or "application"
    module = _text(opt.get("module")) or _text(opt.get("wsgi"))
    if module:
        return module if ":" in module else f"{module}:{callable_name}"
    path = _text(opt.get("wsgi-file")) or _text(opt.get("file"))
    if path:
        return f"{os.path.abspath(path)}:{callable_name}"
    return None


def _app_module_name(opt: Any) -> str | None:
    """The module uWSGI loads the app into, to tell whether the app loaded in this process."""
    module = _text(opt.get("module")) or _text(opt.get("wsgi"))
    if module:
        return module.split(":", 1)[0]
    path = _text(opt.get("wsgi-file")) or _text(opt.get("file"))
    if path:
        # uWSGI names it after the path as given: "uwsgi_file_" plus the path with / and . made _.
        name = path.replace(".", "_").replace("/", "_")
        return "uwsgi_file_" + (name[:-3] if name.endswith("_py") else name)
    return None


def _uwsgi_emitter(uwsgi: Any) -> Any:
    def emit(level: int, message: str) -> None:
        uwsgi.log(message)

    return emit


_started: _Watcher | None = None


def start(settings: Settings | None = None, prepare: Callable[[], object] | None = None) -> _Watcher | None:
    """Register the timer and its handler in this uWSGI process; None when reloading is off.

    ``settings`` default to ``WSGI_RELOAD_*``; ``prepare`` runs in the worker before its first
    scan (Django loads its URLconf there, so lazily imported views are watched).
    """
    global _started
    if in_probe():
        return None
    if _started is not None:
        _log.info("wsgi_reload: already watching this uWSGI instance")
        return None
    try:
        import uwsgi
    except ImportError:
        _log.error("wsgi_reload.uwsgi: not running under uWSGI, so nothing is watched; %s", HOW_TO_RUN)
        return None
    forward_to(_uwsgi_emitter(uwsgi))
    if not uwsgi.opt.get("master"):
        _log.error("wsgi_reload.uwsgi: reloading is off: uWSGI runs without --master, which timers "
                   "and graceful reloads need; add --master (master = true in the ini file)")
        return None
    if uwsgi.mule_id():
        return None
    if settings is None:
        try:
            settings = Settings.load()
        except SettingsError as exc:
            _log.error("wsgi_reload: reloading is off: %s", exc)
            return None
    if settings.app is None:
        target = _app_target(uwsgi.opt)
        if target is not None:
            settings = settings.replace(app=target)
    for path in missing_extra_files(settings):
        _log.warning("wsgi_reload: extra file %s does not exist; watching for it to appear", path)

    watcher = _started = _Watcher(uwsgi, settings, prepare)
    lazy = uwsgi.worker_id() > 0  # imported by a worker: --lazy-apps
    if not lazy and uwsgi.signal_registered(SIGNAL):
        _log.error("wsgi_reload: reloading is off: uWSGI signal %d is already used by the app", SIGNAL)
        return None
    uwsgi.register_signal(SIGNAL, "worker", watcher.tick)
    seconds = max(1, round(settings.interval))
    # Lazy workers each register the handler; only the first worker of the instance adds the timer.
    if not lazy or (uwsgi.worker_id() == 1 and _respawns(uwsgi) == 0):
        uwsgi.add_timer(SIGNAL, seconds)
        _log.info("wsgi_reload: watching for code changes every %d s (check: %s)", seconds, settings.check)
    return watcher


def _respawns(uwsgi: Any) -> int:
    """How often this worker was respawned since the instance (re)started: the master's table is new
    after each graceful reload, so 0 means the instance has no timer of ours yet."""
    for worker in uwsgi.workers():
        if worker.get("id") == uwsgi.worker_id():
            return int(worker.get("respawn_count", 0))
    return 0

