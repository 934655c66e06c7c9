"""gunicorn adapter: the hooks that bind a gunicorn server to its watcher process.

Use it as the config (``gunicorn -c python:wsgi_reload.gunicorn app:app``), star-import it
into a config, or chain it into a config that has hooks of its own::

    import wsgi_reload.gunicorn
    wsgi_reload.gunicorn.install(globals(), interval=0.5)

How it works: ``when_ready`` starts the server's one watcher process
(:mod:`wsgi_reload._server.watcher_process`), which the master then only receives signals from. Each
worker loads the app from the newest verified generation, publishes the list of its module
files once it loaded (and again after a request that imported more), and restarts the
watcher if it stops. The watcher checks a change and swaps the workers, verified: new ones
by TTIN, the old ones retired by TTOU only once the new ones have loaded (a config edit
sends HUP, which re-reads it). With ``preload_app`` the master re-executes itself in place
on USR2 (:func:`reexec_in_place`), keeping its pid, and the watcher retires the old
workers once the new ones are up. A change that fails the check does nothing but log.

Module-level names here are read by gunicorn as settings when this module is the
config, so only the hooks below may share a name with a gunicorn setting.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

from ._check.check import checking
from ._check.probe import ask_ready, load_django_urls
from ._core.logs import forward_to
from ._core.settings import Settings, SettingsError, missing_extra_files
from ._server import preload, runtime
from ._server.agent import WorkerAgent
from ._server.generations import adopt
from ._server.launch import ensure_watcher
from ._server.preload import OLD_WORKERS_ENV, gunicorn_emitter, reexec_in_place
from ._server.records import record_path

_log = logging.getLogger("wsgi_reload.gunicorn")

_LOADED_NS = time.time_ns()
"""When the config loaded: with preload_app the app is imported after this, in the master."""

HOOK_NAMES = ("when_ready", "post_fork", "post_worker_init", "pre_request", "post_request", "child_exit", "on_exit")

__all__ = [*HOOK_NAMES, "install"]

_overrides: dict[str, Any] = {}
_prepare: list[Callable[[], object]] = []
"""Run in the master before watching starts (the Django app loads its URLconf there)."""
_runtime_dir: str | None = None
"""This server's private runtime directory: the channel to its watcher process."""
_settings: Settings | None = None
_start_watcher: Callable[[], bool] | None = None
"""Starts the server's watcher process unless one runs (the master at start, a worker to heal it)."""
_agent: WorkerAgent | None = None
"""This worker's side of the channel to the watcher."""


def install(namespace: MutableMapping[str, Any], **settings: Any) -> None:
    """Add the reload hooks to a gunicorn config namespace (pass ``globals()``).

    A hook the config already defines keeps running, before ours. Keyword arguments are
    wsgi_reload settings (``interval``, ``extra_files``, ...) and win over ``WSGI_RELOAD_*``.
    """
    _overrides.clear()
    _overrides.update(settings)
    ours = globals()
    for name in HOOK_NAMES:
        hook = ours[name]
        theirs = namespace.get(name)
        if theirs is None or getattr(theirs, "_wsgi_reload_hook", False):
            namespace[name] = hook
        else:
            namespace[name] = _chain(theirs, hook)


def _chain(theirs: Callable[..., Any], hook: Callable[..., Any]) -> Callable[..., Any]:
    def chained(*args: Any) -> None:
        theirs(*args)
        hook(*args)

    # gunicorn checks a hook's arity through inspect.signature.
    chained.__signature__ = inspect.signature(hook)  # type: ignore[attr-defined]
    chained.__name__ = hook.__name__
    chained._wsgi_reload_hook = True  # type: ignore[attr-defined]
    return chained


def _hook(func: Callable[..., None]) -> Callable[..., None]:
    """Our hooks never take the server down: an error is logged and the server carries on."""

    def guarded(*args: Any) -> None:
        try:
            func(*args)
        except Exception:
            _log.exception("wsgi_reload: %s failed; reloading may not work until a restart", func.__name__)

    guarded.__signature__ = inspect.signature(func)  # type: ignore[attr-defined]
    guarded.__name__ = func.__name__
    guarded.__doc__ = func.__doc__
    guarded._wsgi_reload_hook = True  # type: ignore[attr-defined]
    return guarded


# --- hooks -----------------------------------------------------------------------------


@_hook
def when_ready(server: Any) -> None:
    """Master: start the server's watcher process (once; a re-executed master finds it running)."""
    global _runtime_dir, _settings, _start_watcher
    if checking():
        return
    forward_to(gunicorn_emitter(server.log))
    os.environ.pop(OLD_WORKERS_ENV, None)  # the new image took their sockets over; the watcher retires them
    for prepare in _prepare:
        try:
            prepare()
        except Exception as exc:  # a broken URLconf at start: watch anyway, so its fix reloads
            _log.error("wsgi_reload: preparing to watch failed (%s: %s); watching what loaded",
                       type(exc).__name__, exc)
    cfg = server.cfg
    try:
        settings = Settings.load(**_overrides)
    except SettingsError as exc:
        _log.error("wsgi_reload: reloading is off: %s", exc)
        return
    if settings.app is None and getattr(server.app, "app_uri", None) and cfg.paste is None:
        settings = settings.replace(app=server.app.app_uri)
    if cfg.reload:
        _log.warning("wsgi_reload: gunicorn's own --reload is on as well; do not combine them: "
                     "--reload restarts each worker into broken code. Drop --reload.")
    if _skips_request_hooks(cfg.worker_class):
        # Its workers never run pre_request or post_request: say what that costs, once.
        _log.warning("wsgi_reload: the %s worker never calls pre_request or post_request, so modules a request "
                     "imports lazily are in every generation but not imported by the check%s",
                     cfg.worker_class_str, "; mode=patch needs pre_request, so changes reload instead"
                     if settings.mode == "patch" else "")
        settings = settings.replace(mode="restart") if settings.mode == "patch" else settings
    if settings.mode == "patch" and cfg.preload_app:
        _log.warning("wsgi_reload: mode=patch does not apply with preload_app (workers fork from the master's old "
                     "code); reloading instead")
        settings = settings.replace(mode="restart")
    for name in ("post_fork", "post_worker_init"):
        if not getattr(getattr(cfg, name), "_wsgi_reload_hook", False):
            _log.error("wsgi_reload: reloading is off: the config defines its own %s after importing "
                       "wsgi_reload.gunicorn; call wsgi_reload.gunicorn.install(globals()) at the end of the "
                       "config to chain the hooks", name)
            return
    for path in missing_extra_files(settings):
        _log.warning("wsgi_reload: extra file %s does not exist; watching for it to appear", path)
    try:
        directory = runtime.for_server(os.getpid())
    except (OSError, runtime.RuntimeDirError) as exc:
        _log.error("wsgi_reload: reloading is off: no private runtime directory (%s)", exc)
        return
    _runtime_dir, _settings = directory, settings
    # The one watcher of this server is a process of its own, as under uWSGI: the arbiter is
    # single-threaded, and the watcher talks to it only by signals (docs/design.md).
    _start_watcher = functools.partial(
        ensure_watcher, directory, master_pid=os.getpid(), signal_name="HUP", server="gunicorn", settings=settings,
        loaded_at_ns=_LOADED_NS, replace="reexec" if cfg.preload_app else "swap", config_files=_config_files(cfg),
        patch=settings.mode == "patch", workers=server.num_workers,
        log_file=cfg.errorlog if cfg.errorlog not in (None, "-") else None)
    if cfg.preload_app:
        server.reexec = lambda: reexec_in_place(server, _runtime_dir)  # USR2 from now on: see reexec_in_place
    _start_watcher()


def _config_files(cfg: Any) -> list[str]:
    """The gunicorn config file and ``reload_extra_files``: a change to one is answered by HUP,
    the only signal that makes gunicorn read its config again."""
    files = list(cfg.reload_extra_files or ())
    location = cfg.config
    if location and not location.startswith("python:"):
        files.append(location[len("file:"):] if location.startswith("file:") else location)
    return [os.path.abspath(f) for f in files]


@_hook
def post_fork(server: Any, worker: Any) -> None:
    """Worker: load the app from the server's newest verified generation."""
    global _agent
    if _runtime_dir is None or _settings is None:
        return
    loaded_at = _LOADED_NS if server.cfg.preload_app else time.time_ns()
    _agent = WorkerAgent(_runtime_dir, loaded_at, start_watcher=_start_watcher, app_loaded=lambda: True,
                         patch=_settings.mode == "patch")
    if not server.cfg.preload_app:
        worker.load_wsgi = _load_verified(worker.load_wsgi, worker, _runtime_dir)
    if _skips_request_hooks(type(worker)):
        _drain_uvicorn_before_shutdown()


@_hook
def post_worker_init(worker: Any) -> None:
    """Worker: with ``ready_path``, GET it from the app; then publish the files this worker
    imported, which tells the watcher it has loaded."""
    if _agent is None:
        return
    timeout = 2 * (_settings or Settings()).check_timeout + 10
    if not _agent.may_serve(timeout, heartbeat=worker.notify, alive=lambda: bool(worker.alive),
                            prove=load_django_urls):
        sys.exit(0)  # not a boot error: gunicorn starts another worker, which loads the running code
    if _settings is not None and _settings.ready_path:
        try:
            ask_ready(worker.wsgi, _settings.ready_path)
        except Exception as exc:
            _agent.cannot_serve(exc)
            _agent.wait_for_newer_code(exc, heartbeat=worker.notify)
            sys.exit(1)  # exit code 1: gunicorn starts another worker; the swap retires the new ones
    _agent.publish()
    if not worker.cfg.preload_app and _agent.superseded():
        # Not a boot error: gunicorn starts another worker, which loads the newest generation.
        # (A preloading master's workers run the master's code; its re-execution replaces them.)
        _log.debug("wsgi_reload: worker %d loaded code older than the newest verified; it exits unserved",
                   os.getpid())
        _agent.remove_record()
        sys.exit(0)
    _agent.keep_watcher_running()


@_hook
def pre_request(worker: Any, req: Any) -> None:
    """Worker: in patch mode, apply a newer patch before serving."""
    if _agent is not None:
        _agent.before_request()


@_hook
def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    """Worker: publish again when a request imported more modules (views load lazily)."""
    if _agent is not None:
        _agent.after_request()


@_hook
def child_exit(server: Any, worker: Any) -> None:
    """Master: forget the record of a worker that exited."""
    if _runtime_dir is not None:
        with contextlib.suppress(OSError):
            os.unlink(record_path(_runtime_dir, worker.pid))


@_hook
def on_exit(server: Any) -> None:
    """Master: remove the runtime directory a preloading master made before ``when_ready``
    turned reloading off. With reloading on, the watcher process removes it once the master has
    exited (removed here, the watcher could take it for a temp-file cleaner's work and make it
    again in the instant before the master exits)."""
    if _runtime_dir is None:
        runtime.remove(runtime.created)


# --- worker side ------------------------------------------------------------------------


def _load_verified(load: Callable[[], None], worker: Any, directory: str) -> Callable[[], None]:
    """Load the app from the server's newest verified generation, and never let a failure halt
    the server: an import that fails exits with code 1, which gunicorn answers by starting
    another worker, where a boot error would halt it (see :func:`wait_for_loadable_code`)."""

    def load_wsgi() -> None:
        if _agent is not None:
            _agent.keep_watcher_running()
        # At the very first start there is no generation yet: the first worker reads one, and
        # its own import of the app is that generation's check (the watcher says if it fails).
        adopt(directory, cover="import it in the gunicorn config, or use --preload, to load them checked", trial=True)
        try:
            load()
            return
        except Exception as exc:
            code = wait_for_loadable_code(worker, exc)
            if code is None:
                raise
        sys.exit(code)

    return load_wsgi


UVICORN_GRACE_SECONDS = 0.1


def _drain_uvicorn_before_shutdown() -> None:
    """uvicorn's graceful shutdown closes every connection that has no request under way yet
    (``shutdown()`` in ``uvicorn/protocols/http/h11_impl.py`` and ``httptools_impl.py``),
    including one it accepted an instant before, whose client then sees a reset: a reload would
    fail a request. Here the worker first stops accepting, then gives such connections a moment
    to send their request, which they then finish, before uvicorn's own shutdown runs."""
    import asyncio

    from uvicorn.server import Server

    if getattr(Server.shutdown, "_wsgi_reload", False):
        return
    shutdown = Server.shutdown

    async def drained_shutdown(self: Any, sockets: Any = None) -> None:
        for listener in self.servers:
            listener.close()
        await asyncio.sleep(UVICORN_GRACE_SECONDS)
        await shutdown(self, sockets)

    drained_shutdown._wsgi_reload = True  # type: ignore[attr-defined]
    Server.shutdown = drained_shutdown  # type: ignore[method-assign]


def _worker_exit(server: Any, worker: Any) -> None:
    """``worker_exit`` for a worker whose master runs none of our code (Django with no gunicorn
    config): remove its record, and turn gunicorn's "Worker failed to boot", which halts the
    server, into a held worker that exits with 1 and is tried again, once this server has served."""
    if _agent is None:
        return
    if worker.booted:
        _agent.remove_record()
        return
    exc = sys.exc_info()[1]
    if not isinstance(exc, SystemExit) or exc.code not in (server.WORKER_BOOT_ERROR, server.APP_LOAD_ERROR):
        return
    code = wait_for_loadable_code(worker, exc.__context__ or exc)
    if code is not None:
        raise SystemExit(code)


def wait_for_loadable_code(worker: Any, exc: BaseException) -> int | None:
    """A worker could not load the app: wait (see :meth:`WorkerAgent.wait_for_newer_code`), and
    return the code for the caller to exit with, so that gunicorn starts another worker: 1, or 0
    for code that has not passed the check (the check names what is wrong with it; 1 would log
    an error of the worker's). None when nothing can watch this server, so gunicorn should stop
    as it would without us.

    The worker says so in its record: a swap waiting for it ends at once. If no worker of the
    server serves (it was started broken), that record also keeps the watcher from retiring and
    has it check the app, and the worker makes sure the watcher runs: then the fix is checked and
    served, where gunicorn's "Worker failed to boot" would have stopped the server.
    """
    assert _agent is not None
    serving = _agent.others_serve()
    start_watcher = _agent.start_watcher
    if not serving and start_watcher is None:
        return None
    _agent.cannot_serve(exc)  # a swap under way ends at once; with none serving, the watcher checks the app
    if start_watcher is not None and not serving:
        try:
            start_watcher()
        except Exception as error:  # the settings do not load: nothing can watch
            _log.error("wsgi_reload: cannot watch this server: %s: %s", type(error).__name__, error)
            return None
    # With none serving, the watcher's check says once what is broken.
    _agent.wait_for_newer_code(exc, quiet=not serving, heartbeat=worker.notify)
    return 0 if _agent.unverified() else 1


def adopt_worker(worker: Any, directory: str, loaded_at_ns: int, *, start_watcher: Callable[[], bool],
                 before_publish: Callable[[], Sequence[str] | None] | None = None, loaded: str = "") -> None:
    """Give a booting worker this adapter's worker-side hooks, from inside its app import.

    For Django under gunicorn with no gunicorn config: the master runs none of our code, so
    the hooks go into this worker's copy of the config, and the workers start the watcher.

    :param start_watcher: starts the server's watcher unless one runs; True if it did. Called
        once the worker loaded, when the app does not load while no worker of the server serves
        (it was started broken), and whenever the watcher has stopped.
    :param before_publish: runs after the app loaded and before the worker serves (an error
        there fails the boot); returns extra patterns to watch (Django's template and locale
        globs). The record published after it is the worker's proof that it loaded.
    :param loaded: what else has loaded, for the log line that says the worker published.
    """
    global _agent
    _agent = WorkerAgent(directory, loaded_at_ns, start_watcher=start_watcher, app_loaded=lambda: True)
    cfg = worker.cfg

    def published(worker: Any) -> None:
        if before_publish is not None:
            patterns = before_publish()
            if patterns is not None and _agent is not None:
                _agent.patterns = list(patterns)
        try:
            if start_watcher():
                _log.info("wsgi_reload: worker %d started this server's watcher process", os.getpid())
        except Exception as exc:  # the settings do not load: nothing watches (the app says why)
            _log.debug("wsgi_reload: no watcher: %s", exc)
            if _agent is not None:
                _agent.start_watcher = None
        post_worker_init(worker)
        _log.info("wsgi_reload: worker %d publishes its modules to the watcher%s", os.getpid(), loaded)

    published.__signature__ = inspect.signature(post_worker_init)  # type: ignore[attr-defined]
    _add_hooks(cfg, {"post_worker_init": published, "pre_request": pre_request, "post_request": post_request,
                     "worker_exit": _worker_exit})


def watching() -> bool:
    """True in a gunicorn master whose config hooks watch the server (and in its workers)."""
    return _settings is not None


def add_to_running_arbiter(arbiter: Any, prepare: Callable[[], Mapping[str, Any]]) -> None:
    """Add this adapter's hooks to an arbiter whose preload is importing the app right now (Django
    with ``--preload`` and no gunicorn config); its ``when_ready`` then watches the server.

    :param prepare: runs in the master once the app loaded, before the workers fork; returns
        settings that win over ``WSGI_RELOAD_*`` (Django's, with its template globs).
    """

    def prepared() -> None:
        _overrides.update(prepare())

    _prepare.append(prepared)
    cfg = arbiter.cfg
    _add_hooks(cfg, {name: globals()[name] for name in HOOK_NAMES})


def _add_hooks(cfg: Any, hooks: Mapping[str, Callable[..., Any]]) -> None:
    """Set each hook in a live gunicorn config; one the user set keeps running, before ours."""
    for name, hook in hooks.items():
        current = getattr(cfg, name)
        if getattr(current, "_wsgi_reload_hook", False):
            continue
        cfg.set(name, hook if current is cfg.settings[name].default else _chain(current, hook))


def _skips_request_hooks(worker_class: type) -> bool:
    """uvicorn's gunicorn workers run the app through uvicorn, which calls no gunicorn request hook."""
    return any(c.__module__.startswith("uvicorn_worker") for c in worker_class.__mro__)


if not checking():
    preload.install()
