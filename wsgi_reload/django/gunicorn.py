"""Django under gunicorn, with no gunicorn config: one watcher for the whole server.

Without ``--preload`` the master never imports Django, so the workers elect one of them
(an exclusive lock on a file named after the master's pid) to watch and to send the master
SIGHUP. Its lock dies with it, and a worker of the next generation takes over.

With ``--preload`` Django loads inside the master: the gunicorn adapter's hooks are added
to the running arbiter, and its preload path (USR2, then retiring the old master) applies.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from types import FrameType
from typing import Any

from ..logs import forward_to
from ..manifest import ManifestWriter, manifest_path
from ..settings import Settings
from ..sidecar import Sidecar
from .files import django_watch_patterns, load_urlconf, load_urlconf_when_ready, reload_settings, with_django_files

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


class _Candidate:
    """A worker waiting to become the server's one watcher."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.master = os.getppid()
        self.lock_path = os.path.join(tempfile.gettempdir(), f"wsgi-reload-django-gunicorn-{self.master}.lock")

    def start(self) -> None:
        threading.Thread(target=self.run, name="wsgi_reload-django", daemon=True).start()

    def run(self) -> None:
        load_urlconf_when_ready()
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
        manifest_dir = tempfile.mkdtemp(prefix=f"wsgi-reload-django-{os.getpid()}-")
        atexit.register(shutil.rmtree, manifest_dir, True)
        writer = ManifestWriter(manifest_path(manifest_dir, os.getpid()), _STARTED_NS)
        writer.publish()
        # The scan runs in a process of its own: in this worker it would queue for the GIL behind requests.
        sidecar = Sidecar(manifest_dir, settings, self.master, "HUP", "gunicorn", _STARTED_NS)
        log.info("wsgi_reload: worker %d watches this server (check: %s)", os.getpid(), settings.check)
        while sidecar.process.poll() is None:
            time.sleep(2)
            writer.publish_if_grown()
        log.error("wsgi_reload: the watcher process exited (code %s); not watching", sidecar.process.returncode)
