"""Django under gunicorn, with no gunicorn config: one watcher for the whole server.

Without ``--preload`` the master never imports Django, so our code first runs in each new
worker, while ``django.setup()`` imports ``wsgi_reload.django``. From there the worker
takes the gunicorn adapter's worker-side hooks into its own copy of the config
(:func:`adopt_booting_worker`): it loads the URLconf before it serves, publishes its module
list as its proof that it loaded, makes sure the server's one watcher process runs
(:mod:`wsgi_reload._server.watcher_process`), and, once the server has served, a failed boot holds
the worker instead of halting gunicorn. The watcher process checks a change and swaps
the workers by TTIN and TTOU (:mod:`wsgi_reload._server.strategies`).

With ``--preload`` Django loads inside the master: the gunicorn adapter's hooks are added
to the running arbiter, and its preload path (an in-place re-exec) applies.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from .._check.check import checking
from .._check.probe import ask_ready
from .._core.logs import forward_to
from .._core.settings import Settings, SettingsError
from .._server import runtime, spare
from .._server.generations import adopt
from .._server.launch import ensure_watcher, keep_watcher_running, wait_for_news, wake
from ._site import django_watch_patterns, load_urlconf, reload_settings

log = logging.getLogger("wsgi_reload.django")

_STARTED_NS = time.time_ns()
"""Django loads this module during django.setup(), before the URLconf and views."""


def _log_to_gunicorn() -> None:
    server_log = logging.getLogger("gunicorn.error")  # gunicorn's own error log
    forward_to(lambda level, message: server_log.log(level, message))


def start() -> None:
    """From the app's ``ready()``: route our log lines into gunicorn's, and in a preloading master
    hand the watching to the gunicorn adapter's hooks (workers were adopted at import)."""
    _log_to_gunicorn()
    if _config_hooks_watch():
        log.info("wsgi_reload: the gunicorn config hooks already watch this server")
        return
    arbiter = _arbiter_loading_us()
    if arbiter is not None:
        _install_preload_hooks(arbiter)
    elif not _adopted:
        log.error("wsgi_reload: reloading is off: this gunicorn worker was not found booting (a custom worker "
                  "class?); use the gunicorn config instead: gunicorn -c python:wsgi_reload.gunicorn ...")


def _config_hooks_watch() -> bool:
    adapter = sys.modules.get("wsgi_reload.gunicorn")
    return adapter is not None and bool(adapter.watching())


_adopted = False


def adopt_booting_worker() -> None:
    """In a gunicorn worker importing Django: take the adapter's worker-side hooks (see above)."""
    global _adopted
    found = _booting_worker()
    if found is None or _config_hooks_watch() or checking():
        return
    arbiter, worker = found
    if arbiter.cfg.preload_app:
        return
    _log_to_gunicorn()  # before the models load: a worker whose models fail never gets to ready()
    from .. import gunicorn as adapter

    state: dict[str, Settings] = {}
    # The check imports what gunicorn itself imports, whatever WSGI_APPLICATION says.
    server_app = None if arbiter.cfg.paste else getattr(arbiter.app, "app_uri", None)
    try:
        directory = runtime.for_server(arbiter.pid)
    except (OSError, runtime.RuntimeDirError) as exc:
        log.error("wsgi_reload: reloading is off: %s", exc)
        return

    def start_watcher() -> bool:
        """Make sure the server's watcher runs; True if this worker started it."""
        if "settings" not in state:
            state["settings"] = reload_settings(server_app)  # a worker whose app failed before the URLconf
        settings = state["settings"]
        return ensure_watcher(directory, master_pid=arbiter.pid, signal_name="TTIN", server="gunicorn",
                              replace="swap", settings=settings, loaded_at_ns=_STARTED_NS, spare=settings.spare)

    loaded_at = _STARTED_NS
    if spare.claim(directory):
        _wait_as_the_spare(directory, worker, start_watcher)
        loaded_at = time.time_ns()  # the project's modules load from here on
    try:
        # From here on (models, URLconf, views) the worker imports the newest verified generation.
        adopt(directory, cover="start gunicorn with -c python:wsgi_reload.gunicorn to load them checked", trial=True)
    except (OSError, runtime.RuntimeDirError) as exc:
        log.error("wsgi_reload: reloading is off: %s", exc)
        return

    def before_publish() -> list[str] | None:
        try:
            settings = state["settings"] = reload_settings(server_app)
        except SettingsError:
            return None  # the app's ready() says so
        try:
            load_urlconf()
            if settings.ready_path:
                ask_ready(worker.wsgi, settings.ready_path)
        except Exception as exc:
            # The worker waits, exits, and gunicorn starts another; the old workers serve on, or,
            # if none has served yet, the watcher checks the fix.
            code = adapter.wait_for_loadable_code(worker, exc)
            if code is not None:
                raise SystemExit(code) from None
            raise
        return django_watch_patterns()

    adapter.adopt_worker(worker, directory, loaded_at, start_watcher=start_watcher, before_publish=before_publish,
                         loaded="; it has the views loaded")
    _adopted = True
    earlier = _project_apps_before_us()
    if earlier and runtime.first_report(directory, "apps-before-us"):
        log.warning("wsgi_reload: %s come%s before \"wsgi_reload.django\" in INSTALLED_APPS, so a save that breaks "
                    "%s while new workers start would stop gunicorn; list \"wsgi_reload.django\" first",
                    ", ".join(earlier), "s" if len(earlier) == 1 else "", "it" if len(earlier) == 1 else "them")


def _wait_as_the_spare(directory: str, worker: Any, start_watcher: Callable[[], bool]) -> None:
    """This worker took the spare's token (:mod:`wsgi_reload._server.spare`): wait here, with
    Django imported and none of the project's apps, for the next save's trial, and then carry
    on booting with it; or exit unserved (exit code 0: gunicorn starts another worker)."""
    try:
        keep_watcher_running(directory, start_watcher)
    except Exception as exc:  # the settings do not load: the boot goes on and says why
        log.debug("wsgi_reload: no spare: %s", exc)
        spare.withdraw(directory)
        return
    log.info("wsgi_reload: worker %d waits as the spare, Django imported, to load the next save", os.getpid())
    # gunicorn kills a worker that has not told it it is alive for its whole timeout (0: never).
    period = worker.cfg.timeout / 3 if worker.cfg.timeout else 3600.0
    # A graceful stop (TERM) ends the wait at once: the worker's own handler notes it, and the
    # keeper's event wakes this thread. Not where gevent or eventlet run the signal handlers in
    # their hub: there the wait looks at the worker every second.
    previous = signal.getsignal(signal.SIGTERM)
    plain = type(worker).__module__ in ("gunicorn.workers.sync", "gunicorn.workers.gthread")
    if plain and callable(previous):
        handler = previous

        def stop(signum: int, frame: FrameType | None) -> None:
            handler(signum, frame)
            wake()

        signal.signal(signal.SIGTERM, stop)
    else:
        period = min(period, 1.0)
    try:
        # (With the watcher not reachable, a look every 0.25 s: the wait may be long.)
        go_on = spare.wait_for_trial(directory, period=period, wait=lambda seconds: wait_for_news(seconds, 0.25),
                                     heartbeat=worker.notify, alive=lambda: bool(worker.alive))
    finally:
        if plain and callable(previous):
            signal.signal(signal.SIGTERM, previous)
    if not go_on:
        log.debug("wsgi_reload: worker %d, the spare, exits unserved (withdrawn, stopped, or a file it read from "
                  "the disk changed)", os.getpid())
        raise SystemExit(0)


def _project_apps_before_us() -> list[str]:
    """The INSTALLED_APPS entries before ours that are not installed packages (the project's own)."""
    from django.conf import settings

    earlier = []
    for entry in settings.INSTALLED_APPS:
        if entry.startswith("wsgi_reload.django"):
            break
        module = sys.modules.get(entry.rsplit(".apps.", 1)[0])
        path = getattr(module, "__file__", None) or ""
        if not entry.startswith("django.") and "-packages" + os.sep not in path:
            earlier.append(entry)
    return earlier


def _booting_worker() -> tuple[Any, Any] | None:
    """The Arbiter and worker of the gunicorn worker process booting right now, if any."""
    frame = _arbiter_frame("spawn_worker")  # Arbiter.spawn_worker() runs the worker's boot
    worker = None if frame is None else frame.f_locals.get("worker")
    if frame is None or worker is None or worker.booted:
        return None
    return frame.f_locals["self"], worker


def _arbiter_loading_us() -> Any:
    """The gunicorn Arbiter whose preload is importing Django right now, if any."""
    frame = _arbiter_frame("setup")  # Arbiter.setup() imports the app when preload_app is on
    return None if frame is None else frame.f_locals["self"]


def _arbiter_frame(method: str) -> FrameType | None:
    """The frame of the gunicorn Arbiter's ``method`` on this thread's call stack, if any."""
    from gunicorn.arbiter import Arbiter

    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == method and isinstance(frame.f_locals.get("self"), Arbiter):
            return frame
        frame = frame.f_back
    return None


def _install_preload_hooks(arbiter: Any) -> None:
    from .. import gunicorn as adapter

    settings = reload_settings()

    def prepare() -> dict[str, Any]:
        # In the master once the preload finished: the views load before the workers fork.
        load_urlconf()
        return dict(vars(settings), extra_files=(*settings.extra_files, *django_watch_patterns()))

    adapter.add_to_running_arbiter(arbiter, prepare)
    log.info("wsgi_reload: preload_app: watching through the gunicorn adapter's hooks")
