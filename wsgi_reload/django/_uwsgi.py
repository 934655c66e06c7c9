"""Django under uWSGI: the shared uWSGI adapter, with Django's files and URLconf."""

from __future__ import annotations

import logging

from .._server.uwsgi import start as start_adapter
from ._site import django_watch_patterns, load_urlconf_when_ready, preload_views, reload_settings

log = logging.getLogger("wsgi_reload.django")


def prepare() -> list[str] | None:
    """In a worker whose app loaded: load the views, and name what Django itself would watch.

    None while Django is still setting up (``--lazy-apps`` imports us during ``django.setup()``).
    """
    from django.apps import apps

    if not apps.ready:
        return None
    preload_views()
    return django_watch_patterns()


def start() -> None:
    """Publish this process's modules and make sure the server's watcher runs."""
    import uwsgi

    if start_adapter(reload_settings(), prepare=prepare) is not None and uwsgi.worker_id() > 0:
        load_urlconf_when_ready()  # --lazy-apps: load the views as soon as this worker is set up
