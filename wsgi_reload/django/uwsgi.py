"""Django under uWSGI: the shared uWSGI timer, with Django's files and URLconf."""

from __future__ import annotations

import logging

from ..uwsgi_timer import start as start_timer
from .files import load_urlconf, reload_settings, with_django_files

log = logging.getLogger("wsgi_reload.django")


def start() -> None:
    """Register the uWSGI timer once for the instance (the master, or each lazy worker)."""
    start_timer(with_django_files(reload_settings()), prepare=load_urlconf)
