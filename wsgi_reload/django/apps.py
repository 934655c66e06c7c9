"""The app config: validates the settings, then starts the one watcher fitting the host server."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from django.apps import AppConfig
from django.core import checks

from .._check.check import checking
from .._core.settings import SettingsError
from ._site import reload_settings

log = logging.getLogger("wsgi_reload.django")


class WsgiReloadConfig(AppConfig):  # type: ignore[misc]
    """``"wsgi_reload.django"`` in ``INSTALLED_APPS``."""

    name = "wsgi_reload.django"
    label = "wsgi_reload"
    verbose_name = "wsgi_reload"

    def ready(self) -> None:
        checks.register(check_settings)
        host = detect_host()
        if host is None:
            # runserver, a command, a test or the check: runserver's reloader is the only one to
            # replace. A gunicorn or uWSGI worker imports none of it: its boot is on the path
            # from a save to the first request served with it.
            from . import _runserver

            _runserver.install()
        if checking():
            return
        from . import _generation

        _generation.serve_from_generation()
        try:
            reload_settings()
        except SettingsError as exc:
            # A reload plugin's setting must never stop a site or a management command:
            # manage.py check shows it as the warning wsgi_reload.W001.
            if host is not None:
                log.error("wsgi_reload: reloading is off: %s", exc)
            return
        if host == "gunicorn":
            from . import _gunicorn

            _gunicorn.start()
        elif host == "uwsgi":
            from . import _uwsgi

            _uwsgi.start()
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
    """``manage.py check``: a bad ``WSGI_RELOAD`` setting is the warning ``wsgi_reload.W001``.

    A warning, not an error: an error would stop ``runserver`` and ``migrate``, and a reload
    plugin's typo must never stop a site.
    """
    try:
        reload_settings()
    except SettingsError as exc:
        return [checks.Warning(f"{exc}; gunicorn and uWSGI serve without reloading, runserver reloads with "
                               "the default settings", hint="See the settings table in the wsgi_reload README.",
                               id="wsgi_reload.W001")]
    return []
