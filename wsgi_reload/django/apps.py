"""The app config: validates the settings, then starts the one watcher fitting the host server."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from django.apps import AppConfig
from django.core import checks

from ..check import in_probe
from ..settings import SettingsError
from .files import reload_settings

log = logging.getLogger("wsgi_reload.django")


class WsgiReloadConfig(AppConfig):  # type: ignore[misc]
    """``"wsgi_reload.django"`` in ``INSTALLED_APPS``."""

    name = "wsgi_reload.django"
    label = "wsgi_reload"
    verbose_name = "wsgi_reload"

    def ready(self) -> None:
        checks.register(check_settings)
        from . import runserver

        runserver.install()
        if in_probe():
            return
        try:
            reload_settings()
        except SettingsError as exc:
            # manage.py check reports it as wsgi_reload.E001; the site serves without reloading.
            log.error("wsgi_reload: reloading is off: %s", exc)
            return
        host = detect_host()
        if host == "gunicorn":
            from . import gunicorn

            gunicorn.start()
        elif host == "uwsgi":
            from . import uwsgi

            uwsgi.start()
        else:
            log.debug("wsgi_reload: not under gunicorn or uWSGI (runserver uses its own reloader); not watching")


def detect_host() -> str | None:
    """``gunicorn``, ``uwsgi`` or None for anything else (a plain WSGI server, tests, commands)."""
    if "uwsgi" in sys.modules:
        return "uwsgi"
    try:
        import uwsgi  # noqa: F401 - only importable inside uWSGI
    except ImportError:
        pass
    else:
        return "uwsgi"
    if "gunicorn.arbiter" in sys.modules and os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn"):
        return "gunicorn"
    return None


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``manage.py check``: a bad ``WSGI_RELOAD`` setting is ``wsgi_reload.E001``."""
    try:
        reload_settings()
    except SettingsError as exc:
        return [checks.Error(str(exc), hint="See the settings table in the wsgi_reload README.",
                             id="wsgi_reload.E001")]
    return []
