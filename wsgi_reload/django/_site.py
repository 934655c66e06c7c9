"""What Django itself would watch: templates, locale files, and whatever apps register."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from .._core.settings import Settings, SettingsError

log = logging.getLogger("wsgi_reload.django")


def reload_settings(server_app: str | None = None) -> Settings:
    """The shared settings from ``WSGI_RELOAD_*`` and the ``WSGI_RELOAD`` dict in Django settings.

    The check imports ``app`` when it is set, else what the server itself imports
    (``server_app``: gunicorn's app URI), else ``settings.WSGI_APPLICATION``.
    """
    from django.conf import settings

    overrides = getattr(settings, "WSGI_RELOAD", {}) or {}
    if not isinstance(overrides, dict):
        raise SettingsError(f"settings.WSGI_RELOAD must be a dict of wsgi_reload settings, not {overrides!r}")
    loaded = Settings.load(**overrides)
    if loaded.app is None:
        loaded = loaded.replace(app=server_app or wsgi_target())
    return loaded


def wsgi_target() -> str | None:
    """``settings.WSGI_APPLICATION`` as ``module:callable`` for the pre-reload check."""
    from django.conf import settings

    dotted = getattr(settings, "WSGI_APPLICATION", None)
    if not dotted or "." not in dotted:
        return None
    module, _, name = dotted.rpartition(".")
    return f"{module}:{name}"


def django_watch_patterns() -> list[str]:
    """Files and globs registered through ``autoreload_started``, the way runserver collects them.

    A reloader object is created (never run) and the signal is sent to it, so template
    directories, locale ``.mo`` files and third-party registrations come back as globs.
    """
    from django.utils import autoreload

    collector: Any = autoreload.StatReloader()
    autoreload.autoreload_started.send(sender=collector)
    patterns = [str(path) for path in collector.extra_files]
    for directory, globs in collector.directory_globs.items():
        patterns.extend(os.path.join(str(directory), pattern) for pattern in sorted(globs))
    return patterns


def load_urlconf() -> None:
    """Import the root URLconf: views load lazily from it, and their modules must be watched.
    A site that configured itself without one (``settings.configure()``) has none."""
    from django.conf import settings
    from django.urls import get_resolver

    if not getattr(settings, "ROOT_URLCONF", None):
        return

    get_resolver().url_patterns  # noqa: B018 - importing is the point


def load_urlconf_when_ready() -> None:
    """In a worker: import the URLconf as soon as the apps are ready, from a daemon thread.

    Django imports views on the first request. A worker that has not served yet would
    otherwise import a view saved broken after it started, and answer with an error.
    """

    def run() -> None:
        from django.apps import apps

        deadline = time.monotonic() + 60
        while not apps.ready and time.monotonic() < deadline:
            time.sleep(0.02)
        preload_views()

    threading.Thread(target=run, name="wsgi_reload-urlconf", daemon=True).start()


_views_loaded_in: int | None = None


def preload_views() -> None:
    """Load the URLconf now, in this worker, and say so once."""
    global _views_loaded_in
    if _views_loaded_in == os.getpid():
        return
    _views_loaded_in = os.getpid()
    try:
        load_urlconf()
    except Exception as exc:
        log.warning("wsgi_reload: worker %d cannot load the URLconf (%s: %s)", os.getpid(), type(exc).__name__, exc)
    else:
        log.info("wsgi_reload: worker %d has the views loaded", os.getpid())
