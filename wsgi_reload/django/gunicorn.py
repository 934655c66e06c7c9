"""Django under gunicorn, with no gunicorn config: one watcher for the whole server.

Without ``--preload`` the master never imports Django, so each worker publishes its module
list into the server's private runtime directory and makes sure the server's one watcher
process runs (:mod:`wsgi_reload.watch_process`); that process checks a change and sends
the master SIGHUP.

With ``--preload`` Django loads inside the master: the gunicorn adapter's hooks are added
to the running arbiter, and its preload path (USR2, then retiring the old master) applies.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from types import FrameType
from typing import Any

from .. import runtime
from ..logs import forward_to
from ..manifest import ManifestWriter
from ..settings import Settings
from ..watch_process import ensure_watcher
from .files import django_watch_patterns, load_urlconf, preload_views, reload_settings

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
    _WorkerPublisher(reload_settings()).start()


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

    def prepare() -> None:
        # In the master once the preload finished: the views load before the workers fork.
        load_urlconf()
        adapter._overrides.update(vars(settings), extra_files=(*settings.extra_files, *django_watch_patterns()))

    adapter._prepare.append(prepare)
    cfg = arbiter.cfg
    for name in adapter.HOOK_NAMES:
        hook = getattr(adapter, name)
        current = getattr(cfg, name)
        if getattr(current, "_wsgi_reload_hook", False):
            continue
        default = cfg.settings[name].default
        cfg.set(name, hook if current is default else adapter._chain(current, hook))
    log.info("wsgi_reload: preload_app: watching through the gunicorn adapter's hooks")


class _WorkerPublisher:
    """A worker's part: publish its modules to the server's runtime directory, and make sure the
    server's one watcher process runs. The scan and the check happen there, never in a worker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.master = os.getppid()

    def start(self) -> None:
        threading.Thread(target=self.run, name="wsgi_reload-django", daemon=True).start()

    def run(self) -> None:
        from django.apps import apps

        deadline = time.monotonic() + 60
        while not apps.ready and time.monotonic() < deadline:
            time.sleep(0.02)
        preload_views()
        try:
            directory = runtime.for_server(self.master)
            writer = ManifestWriter(directory, _STARTED_NS, patterns=django_watch_patterns())
            writer.publish()
            started = ensure_watcher(directory, master_pid=self.master, signal_name="HUP", server="gunicorn",
                                     settings=self.settings, loaded_at_ns=_STARTED_NS)
        except (OSError, runtime.RuntimeDirError) as exc:
            log.error("wsgi_reload: reloading is off: %s", exc)
            return
        if started:
            log.info("wsgi_reload: worker %d started this server's watcher process (pid %d)", os.getpid(), started)
        log.info("wsgi_reload: worker %d publishes its modules to the watcher", os.getpid())
        while True:
            time.sleep(2)
            writer.publish_if_grown()
