"""uWSGI adapter: importing it makes the app import the verified generation and starts the server's watcher.

Enable it with ``--import wsgi_reload.uwsgi`` (``import = wsgi_reload.uwsgi`` in an ini
file), or with ``import wsgi_reload.uwsgi`` in the app module. ``--import`` runs before
the app loads, so it keeps watching even when the app itself fails to import; an import
inside the app only runs if the app gets that far.

The workers publish the files they import; one watcher process per server scans them, runs
the shared pre-reload check and sends the master SIGHUP, uWSGI's graceful reload. Outside
uWSGI, or without ``--master``, importing it logs one line that says how to run it, and
nothing more.
"""

from ._server.uwsgi import start

watcher = start()
