"""The uWSGI adapter behind :mod:`wsgi_reload.uwsgi` and the Django app.

The workers only publish the files they imported (after the fork, and after a request that
imported more) into the server's private runtime directory; one watcher process per
server (:mod:`wsgi_reload._server.watcher_process`) scans them, runs the shared pre-reload check and
sends the master SIGHUP, uWSGI's graceful reload (the same as ``uwsgi.reload()``). Nothing
runs in a worker's signal handler, and a worker never waits for a scan or a check.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from .._check.check import checking
from .._check.probe import ask_ready
from .._core.logs import forward_to
from .._core.settings import Settings, SettingsError, missing_extra_files
from . import runtime
from .agent import WorkerAgent
from .generations import adopt
from .launch import UWSGI_LOG_FORMAT, ensure_watcher

_log = logging.getLogger("wsgi_reload.uwsgi")

_LOADED_NS = time.time_ns()
"""About when this process began loading the app (``--import`` runs first). A module file newer
than this changed after it was loaded; ``uwsgi.started_on`` is whole seconds, too coarse."""

HOW_TO_RUN = ("run the app with uwsgi --master and --import wsgi_reload.uwsgi, or remove the import "
              "when not running under uWSGI")


class Publisher:
    """The uWSGI binding of a worker's agent (:class:`wsgi_reload._server.agent.WorkerAgent`): tells it
    whether this worker's app loaded, which uWSGI runs no hook for (with ``--lazy-apps`` that is
    the worker's proof for the chain reload), and when to publish."""

    def __init__(self, directory: str, app_module: str | None,
                 prepare: Callable[[], Iterable[str] | None] | None = None,
                 ready: Callable[[Any], None] | None = None,
                 start_watcher: Callable[[], bool] | None = None) -> None:
        self.agent = WorkerAgent(directory, _LOADED_NS, start_watcher=start_watcher, app_loaded=self.app_loaded)
        self.app_module = app_module
        self.ready = ready
        """--lazy-apps with ``ready_path``: GET it from this worker's app before it says it loaded."""
        self.answered_ready = False
        if ready is not None and app_module is not None and app_module not in sys.modules:
            sys.meta_path.insert(0, _ReadyOnImport(app_module, self._ready))
        self.prepare = prepare
        self.prepared = prepare is None
        self.published_in: int | None = None
        self.load_finished = False
        """False while a --lazy-apps worker may still be importing its app."""

    def app_loaded(self) -> bool | None:
        """True once the app module finished importing; False if it failed; None while unknown."""
        if self.app_module is None:
            return None
        if self._module_loaded():
            return True if self.ready is None or self.answered_ready else None
        return False if self.load_finished else None

    def _ready(self, module: Any) -> None:
        if self.ready is not None and not self.answered_ready:
            self.ready(module)
        self.answered_ready = True

    def _module_loaded(self) -> bool:
        module = None if self.app_module is None else sys.modules.get(self.app_module)
        return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)

    def publish_once_loaded(self, timeout: float = 600.0) -> None:
        """--lazy-apps: publish again as soon as the app has loaded, from a daemon thread (uWSGI
        runs no Python code of ours between the app import and the first request)."""

        if self.app_module is None:
            return  # the app's module is unknown, and the watcher reloads with SIGHUP to the master

        def run() -> None:
            deadline = time.monotonic() + timeout
            while not self.agent.failed and time.monotonic() < deadline:
                if self._module_loaded():
                    try:
                        # Asked here only where uWSGI loaded the app without an import (--wsgi-file).
                        if not self.answered_ready:
                            self._ready(sys.modules.get(self.app_module or ""))
                    except Exception as exc:
                        self.fail(exc)
                        return
                    self.publish_safely()
                    return
                time.sleep(0.01)

        threading.Thread(target=run, name="wsgi_reload-loaded", daemon=True).start()

    def hold_if_the_app_fails(self) -> None:
        """--lazy-apps: if this worker's app import fails while other workers serve, hold it (it
        never accepts) and let the master start it again, instead of serving without an app.

        uWSGI reports a failed app import with PyErr_Print (plugins/python/pyloader.c), which
        calls ``sys.excepthook``: that is where the failure can be seen before the worker
        accepts. Any later error is passed through untouched.
        """
        previous = sys.excepthook

        def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
            previous(kind, value, tb)
            if self.app_loaded() or self.agent.failed:
                return
            sys.excepthook = previous
            self.fail(value)

        sys.excepthook = excepthook

    def fail(self, exc: BaseException) -> None:
        """This --lazy-apps worker's app did not load, or did not answer ``ready_path``."""
        if not self.agent.others_serve():
            # Nothing better to serve: uWSGI goes on without an app, as it always does, and
            # the watcher, told so, reloads as soon as the code loads.
            self.agent.cannot_serve(exc)
            return
        self.agent.failed = True
        self.agent.remove_record()
        # It loaded verified code, so the failure is the environment's (a database down at
        # import): try again after a while, or at once when newer code passes the check.
        self.agent.wait_for_newer_code(exc)
        os._exit(1)  # the master starts this worker again

    def publish(self) -> None:
        """Publish this worker's files (first in each worker: say so, and let Django load its views)."""
        if self.published_in != os.getpid():
            self.published_in = os.getpid()
            _log.info("wsgi_reload: worker %d publishes its modules to the watcher", os.getpid())
        if not self.prepared and self.app_loaded() is not False and self.prepare is not None:
            patterns = self.prepare()
            if patterns is not None:
                self.prepared = True
                self.agent.patterns = list(patterns)
        self.agent.publish()

    def after_request(self) -> None:
        if self.published_in != os.getpid() or not self.prepared:
            self.publish_safely()
            return
        self.agent.after_request()

    def publish_safely(self) -> None:
        try:
            self.publish()
        except Exception:
            _log.exception("wsgi_reload: publishing this worker's modules failed")


def _text(value: Any) -> str | None:
    if isinstance(value, list):
        value = value[-1] if value else None
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else None


def _app_target(opt: Any) -> str | None:
    """The app the check imports, from --module / --wsgi / --wsgi-file / --file and --callable."""
    callable_name = _text(opt.get("callable")) or "application"
    module = _text(opt.get("module")) or _text(opt.get("wsgi"))
    if module:
        return module if ":" in module else f"{module}:{callable_name}"
    path = _text(opt.get("wsgi-file")) or _text(opt.get("file"))
    if path:
        return f"{os.path.abspath(path)}:{callable_name}"
    return None


def _app_module_name(opt: Any) -> str | None:
    """The module uWSGI loads the app into, to tell whether the app loaded in this process."""
    module = _text(opt.get("module")) or _text(opt.get("wsgi"))
    if module:
        return module.split(":", 1)[0]
    path = _text(opt.get("wsgi-file")) or _text(opt.get("file"))
    if path:
        # uWSGI names it after the path as given: "uwsgi_file_" plus the path with / and . made _.
        name = path.replace(".", "_").replace("/", "_")
        return "uwsgi_file_" + (name[:-3] if name.endswith("_py") else name)
    return None


class _ReadyOnImport:
    """A ``sys.meta_path`` entry that makes one module's import also GET ``ready_path`` from it.

    uWSGI's --lazy-apps worker accepts requests as soon as the app module is imported and runs
    none of our code in between, so asking afterwards would let it serve until the answer came.
    Asked inside the import, a failure is a failed import: the worker never serves it.
    """

    def __init__(self, module_name: str, ask: Callable[[Any], None]) -> None:
        self.module_name = module_name
        self.ask = ask

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.module_name:
            return None
        sys.meta_path.remove(self)  # once, and so that the search below does not find us again
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if find is None else find(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _AskingLoader(spec.loader, self.ask)
                return spec
        return None


class _AskingLoader:
    def __init__(self, loader: Any, ask: Callable[[Any], None]) -> None:
        self.loader = loader
        self.ask = ask

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        self.ask(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, is_package: the real loader's
        return getattr(self.loader, name)


def _app_callable(opt: Any) -> str:
    module = _text(opt.get("module")) or _text(opt.get("wsgi")) or ""
    return module.split(":", 1)[1] if ":" in module else _text(opt.get("callable")) or "application"


def _ask_ready(callable_name: str, path: str, module: Any) -> None:
    """GET ``path`` from the app, ``callable_name`` in the module uWSGI loaded it into."""
    app = getattr(module, callable_name, None)
    if app is not None:
        ask_ready(app, path)


def _threads(opt: Any) -> int:
    value = _text(opt.get("threads"))
    try:
        return int(value) if value else 1
    except ValueError:
        return 1


def _accept_nudges() -> str | None:
    """In the master: give SIGWINCH a handler that does nothing, so that the watcher can end the
    master's one-second sleep between loop turns when an old worker exits (see
    :func:`wsgi_reload._server.strategies.nudge_as_workers_exit`). Returns the signal's name, or None when the
    app already handles SIGWINCH (the reload then waits for the master's turns)."""
    try:
        if signal.getsignal(signal.SIGWINCH) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            return None
        signal.signal(signal.SIGWINCH, _nudged)
    except (ValueError, OSError):  # not the main thread
        return None
    return "WINCH"


def _nudged(signum: int, frame: Any) -> None:
    """Nothing to do: the signal's arrival already woke the master."""


def _chain_hook(uwsgi: Any, name: str, hook: Callable[[], None]) -> None:
    previous = getattr(uwsgi, name, None)

    def chained() -> None:
        if previous is not None:
            previous()
        hook()

    setattr(uwsgi, name, chained)


_started: Publisher | None = None

_ROUTERS = ("http", "https", "fastrouter", "rawrouter", "sslrouter")
"""uWSGI's gateway options: each runs a router process of the master's."""


def start(settings: Settings | None = None,
          prepare: Callable[[], Iterable[str] | None] | None = None) -> Publisher | None:
    """Publish this uWSGI process's modules and make sure the server's watcher runs; None when off.

    ``settings`` default to ``WSGI_RELOAD_*``; ``prepare`` runs in each worker once its app
    loaded and returns extra patterns to watch, or None when it is not ready yet (Django loads
    its URLconf there, so lazily imported views are watched, and names its template and
    locale files).
    """
    global _started
    if checking():
        return None
    if _started is not None:
        _log.info("wsgi_reload: already watching this uWSGI instance")
        return None
    try:
        import uwsgi
    except ImportError:
        _log.error("wsgi_reload: not running under uWSGI, so nothing is watched; %s", HOW_TO_RUN)
        return None
    forward_to(lambda level, message: uwsgi.log(message))
    if not uwsgi.opt.get("master"):
        _log.error("wsgi_reload: reloading is off: uWSGI runs without --master, which graceful reloads "
                   "need; add --master (master = true in the ini file)")
        return None
    if uwsgi.mule_id():
        return None
    if settings is None:
        try:
            settings = Settings.load()
        except SettingsError as exc:
            _log.error("wsgi_reload: reloading is off: %s", exc)
            return None
    if settings.app is None:
        target = _app_target(uwsgi.opt)
        if target is not None:
            settings = settings.replace(app=target)
    master = uwsgi.masterpid()
    try:
        directory = runtime.for_server(master)
        # Before the app loads (--import): the app imports the newest verified generation.
        adopt(directory, cover="start uWSGI with --import wsgi_reload.uwsgi to load them checked")
        # --lazy-apps workers import the app themselves (worker_id is set while this is imported);
        # a chain needs to know the app's module to tell when a new worker has loaded it.
        lazy = uwsgi.worker_id() > 0 and _app_module_name(uwsgi.opt) is not None
        nudge = _accept_nudges() if uwsgi.worker_id() == 0 else None
        start_watcher = functools.partial(
            ensure_watcher, directory, master_pid=master, signal_name="HUP", server="uWSGI", settings=settings,
            loaded_at_ns=_LOADED_NS, log_format=UWSGI_LOG_FORMAT, replace="chain" if lazy else "signal",
            nudge_signal=nudge)
        started = start_watcher()
    except (OSError, runtime.RuntimeDirError) as exc:
        _log.error("wsgi_reload: reloading is off: %s", exc)
        return None
    if started:
        if uwsgi.worker_id() == 0 and nudge is None:
            _log.info("wsgi_reload: SIGWINCH already has a handler here, so a graceful reload reaps the old "
                      "workers on uWSGI's one-second master loop turns instead of at once")
        for path in missing_extra_files(settings):
            _log.warning("wsgi_reload: extra file %s does not exist; watching for it to appear", path)
        routers = [name for name in _ROUTERS if uwsgi.opt.get(name)]
        if routers and not lazy:
            # core/master_utils.c uwsgi_destroy_processes(): a reload SIGKILLs every gateway, and
            # the master starts them again once it has re-executed itself.
            _log.warning("wsgi_reload: uWSGI's graceful reload kills its %s router, so requests in flight "
                         "through it fail at each reload; add --lazy-apps (the workers are replaced one at "
                         "a time and the router stays), or use --http-socket behind your proxy",
                         "/".join(f"--{name}" for name in routers))
        if _threads(uwsgi.opt) < 2:
            # core/uwsgi.c gracefully_kill(): a single-threaded worker not inside a request exits at
            # once, so a connection it accepted in that instant is reset; a plugin cannot change that.
            _log.warning("wsgi_reload: uWSGI workers are single-threaded, so a graceful reload can reset a "
                         "connection accepted in the instant it starts; add --threads 2 (threads = 2) to drop none")
    app_module = _app_module_name(uwsgi.opt)
    ready = None
    if settings.ready_path and uwsgi.worker_id() > 0 and app_module is not None:
        ready = functools.partial(_ask_ready, _app_callable(uwsgi.opt), settings.ready_path)
    publisher = _started = Publisher(directory, app_module, prepare, ready, start_watcher)
    # Each worker starts the watcher process again if it stops (never the master: no thread of
    # ours runs in uWSGI's master loop).
    keep = publisher.agent.keep_watcher_running
    if uwsgi.worker_id() == 0:
        publisher.load_finished = True  # prefork: the app loads in the master, before the fork
        _chain_hook(uwsgi, "post_fork_hook", publisher.publish)
        _chain_hook(uwsgi, "post_fork_hook", keep)
    else:
        keep()
        publisher.publish()  # --lazy-apps: what this worker has so far; the app's modules follow
        publisher.hold_if_the_app_fails()
        publisher.publish_once_loaded()
    _chain_hook(uwsgi, "after_req_hook", publisher.after_request)
    return publisher
