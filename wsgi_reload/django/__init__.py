"""Django app: add ``"wsgi_reload.django"`` to ``INSTALLED_APPS`` and the site reloads gracefully.

Under gunicorn and uWSGI one watcher per server triggers the server's own graceful
reload after the shared pre-reload check (``django.setup()``, the WSGI application and
the root URLconf, in a fresh interpreter). Under ``manage.py runserver`` the app gives
Django's autoreloader a reloader class built on the shared scanner.
"""
