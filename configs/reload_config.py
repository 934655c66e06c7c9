# gunicorn config that reloads gracefully when the code changes:
#
#     gunicorn -c configs/reload_config.py myapp:app
#
# Settings come from WSGI_RELOAD_* environment variables (see the README). To add the
# hooks to a config that defines hooks of its own, end that config with:
#
#     import wsgi_reload.gunicorn
#     wsgi_reload.gunicorn.install(globals())
from wsgi_reload.gunicorn import *  # noqa: F401,F403
