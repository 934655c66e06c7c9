"""Django under uWSGI: the shared uWSGI timer, with Django's files and URLconf."""

from __future__ import annotations

import logging
from typing import Any

from ..uwsgi_timer import start as start_timer
from .files import django_watch_patterns, load_urlconf, load_urlconf_when_ready, preload_views, reload_settings

log = logging.getLogger("wsgi_reload.django")


def prepare(watcher: Any) -> None:
    """In the worker, before its first scan: apps are ready, so Django can say what it watches."""
    load_urlconf()
    watcher.scanner.add_patterns(django_watch_patterns())


def start() -> None:
    """Register the uWSGI timer once for the instance (the master, or each lazy worker)."""
    import uwsgi

    watcher = start_timer(reload_settings(), prepare=lambda: prepare(watcher))
    if watcher is None:
        return
    if uwsgi.worker_id() == 0:
        # Prefork: no threads in the master before it forks; each worker loads the views after.
        previous = getattr(uwsgi, "post_fork_hook", None)

        def post_fork() -> None:
            if previous is not None:
                previous()
            preload_views()

        uwsgi.post_fork_hook = post_fork
    else:
        load_urlconf_when_ready()
