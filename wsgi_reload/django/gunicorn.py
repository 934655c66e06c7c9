"""Django under gunicorn, with no gunicorn config: one watcher for the whole server.

Without ``--preload`` the master never imports Django, so the workers elect one of them
(an exclusive lock on a file named after the master's pid) to watch and to send the master
SIGHUP. Its lock dies with it, and a worker of the next generation takes over.

With ``--preload`` Django loads inside the master: the gunicorn adapter's hooks are added
to the running arbiter, and its preload path (USR2, then retiring the old master) applies.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from ..check import CheckResult, check_code
from ..logs import forward_to
from ..monitor import Monitor
from ..reloader import Reloader
from ..scanner import Change, Scanner
from ..settings import Settings
from .files import django_watch_patterns, load_urlconf, reload_settings, with_django_files

log = logging.getLogger("wsgi_reload.django")

_STARTED_NS = time.time_ns()
"""Django loads this module during django.setup(), before the URLconf and views."""


def start() -> None:
    """Start watching for this gunicorn server, from the master (preload) or a worker."""
    server_log = logging.getLogger("gunicorn.error")  # gunicorn's own error log
    forward_to(lambda level, message: server_log.log(level, message))
    gunicorn_adapter = sys.modules.get("wsgi_reload.gunicorn")
    if gunicorn_adapter is not None and getattr(gunicorn_adapter, "_manifest_dir", None):
        log.info("wsgi_reload: the gunicorn config hooks already watch this server")
        return
    arbiter = _arbiter_loading_us()
    if arbiter is not None:
        _install_preload_hooks(arbiter)
        return
    _Candidate(reload_settings()).start()


def _arbiter_loading_us() -> Any:
    """The gunicorn Arbiter whose preload is importing Django right now, if any."""
    from gunicorn.arbiter import Arbiter

    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if frame.f_code.co_name == "setup" and isinstance(candidate, Arbiter):
            return candidate  # Arbiter.setup() imports the app when preload_app is on
        frame = frame.f_back
    return None


def _install_preload_hooks(arbiter: Any) -> None:
    from .. import gunicorn as adapter

    settings = reload_settings()
    adapter._overrides.update(extra_files=(*settings.extra_files, *django_watch_patterns()),
                              **{k: v for k, v in vars(settings).items() if k != "extra_files"})
    cfg = arbiter.cfg
    for name in adapter.HOOK_NAMES:
        hook = getattr(adapter, name)
        current = getattr(cfg, name)
        if getattr(current, "_wsgi_reload_hook", False):
            continue
        default = cfg.settings[name].default
        cfg.set(name, hook if current is default else adapter._chain(current, hook))
    log.info("wsgi_reload: preload_app: watching through the gunicorn adapter's hooks")


class _Candidate:
    """A worker waiting to become the server's one watcher."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.master = os.getppid()
        self.lock_path = os.path.join(tempfile.gettempdir(), f"wsgi-reload-django-gunicorn-{self.master}.lock")

    def start(self) -> None:
        threading.Thread(target=self.run, name="wsgi_reload-django", daemon=True).start()

    def run(self) -> None:
        lock = open(self.lock_path, "a+")  # noqa: SIM115 - held for the life of the process
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # blocks until the watching worker exits
        except OSError as exc:
            log.error("wsgi_reload: cannot lock %s (%s); not watching", self.lock_path, exc)
            return
        self._lock = lock
        try:
            self.watch()
        except Exception:
            log.exception("wsgi_reload: the watcher failed; reloading is off until a restart")

    def watch(self) -> None:
        from django.apps import apps

        while not apps.ready:
            time.sleep(0.05)
        load_urlconf()
        settings = with_django_files(self.settings)
        scanner = Scanner(settings, modules_loaded_at_ns=_STARTED_NS)
        reloader = Reloader(settings, self.trigger, server="gunicorn", check=self.check)
        self.monitor = Monitor(scanner, reloader, name="wsgi_reload-django-monitor").start()
        log.info("wsgi_reload: worker %d watches this server (check: %s)", os.getpid(), settings.check)

    def check(self, paths: Sequence[str]) -> CheckResult:
        return check_code(paths, self.settings, cwd=os.getcwd(), sys_path=list(sys.path))

    def trigger(self, batch: Sequence[Change]) -> None:
        if os.getppid() != self.master:
            log.error("wsgi_reload: the gunicorn master %d is gone; not signalling", self.master)
            return
        os.kill(self.master, signal.SIGHUP)

