"""Django app: add ``"wsgi_reload.django"`` to ``INSTALLED_APPS`` and the site reloads gracefully.

Under gunicorn and uWSGI one watcher per server triggers the server's own graceful
reload after the shared pre-reload check (``django.setup()``, the WSGI application and
the root URLconf, in a fresh interpreter). Under ``manage.py runserver`` the app gives
Django's autoreloader a reloader class built on the shared scanner.
"""

import sys as _sys

if "gunicorn.arbiter" in _sys.modules:
    # Imported by django.setup() in a booting gunicorn worker: take the reload hooks now, before
    # the models and the rest of the apps load, so that a failure there is held, not fatal.
    from ._gunicorn import adopt_booting_worker as _adopt

    _adopt()
