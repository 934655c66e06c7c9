"""gunicorn adapter: one watcher in the master over what the workers import.

Use it as the config (``gunicorn -c python:wsgi_reload.gunicorn app:app``), star-import it
into a config, or chain it into a config that has hooks of its own::

    import wsgi_reload.gunicorn
    wsgi_reload.gunicorn.install(globals(), interval=0.5)

How it works: every worker writes the list of its module files to a manifest after
``post_worker_init`` (and again after a request that imported more). The master's
watcher thread scans the union of the manifests, the config file and extra files. A
change that passes the pre-reload check swaps the workers, verified: new ones by TTIN,
the old ones retired by TTOU only once the new ones have loaded (a config edit sends
HUP, which re-reads it). With ``preload_app`` the master re-executes itself in place,
keeping its pid, and retires the old workers once its new ones are up. A change that
fails the check does nothing but log.

Module-level names here are read by gunicorn as settings when this module is the
config, so only the hooks below may share a name with a gunicorn setting.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

from . import _genimport, runtime
from ._probe import ask_ready, listener_fds
from .check import Checked, CheckResult, check_code, checking
from .files import ModuleFiles, PathFilter, describe_error
from .generations import (
    RETRY_SECONDS,
    Generation,
    Store,
    is_project_file,
    project_roots,
    recover,
    store_of,
    wait_for_newer,
)
from .hybrid import PatchApplier, PatchPublisher
from .logs import forward_to
from .manifest import ManifestReader, ManifestWriter, manifest_path
from .scanner import Change
from .settings import Settings, SettingsError, missing_extra_files
from .watcher import Watcher

_log = logging.getLogger("wsgi_reload.gunicorn")

_LOADED_NS = time.time_ns()
"""When the config loaded: with preload_app the app is imported after this, in the master."""
_CONFIG_PID = os.getpid()
"""The master: gunicorn imports its config there, before any worker exists."""

PRELOAD_WORKER_CLASSES = ("gunicorn.workers.sync.SyncWorker", "gunicorn.workers.gthread.ThreadWorker",
                          "gunicorn.workers.gasgi.ASGIWorker", "uvicorn_worker._workers.UvicornWorker")
"""Worker classes (and their subclasses) whose preload re-exec is supported. gevent must
monkey-patch before the app is imported, which preload_app prevents."""

HOOK_NAMES = ("when_ready", "post_fork", "post_worker_init", "pre_request", "post_request", "child_exit", "on_exit")

__all__ = [*HOOK_NAMES, "install"]

_overrides: dict[str, Any] = {}
_prepare: list[Callable[[], object]] = []
"""Run in the master before watching starts (the Django app loads its URLconf there)."""
_manifest_dir: str | None = None
_master: _MasterWatch | None = None
_worker: ManifestWriter | None = None
_on_failed_start: Callable[[], object] | None = None
"""Django under gunicorn with no config: starts the watcher of a server started broken."""
_patches: PatchApplier | None = None


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
    """Master: start the one watcher of this server (and retire the old master after a re-exec)."""
    global _master, _manifest_dir
    if checking():
        return
    forward_to(_gunicorn_emitter(server.log))
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
    if cfg.preload_app and not _is_preload_worker(cfg.worker_class):
        _log.error("wsgi_reload: reloading is off: preload_app with the %s worker is not supported "
                   "(it must patch before the app is imported); use the sync or gthread worker, or drop --preload",
                   cfg.worker_class_str)
        return
    if _skips_request_hooks(cfg.worker_class):
        # Its workers never run pre_request or post_request: say what that costs, once.
        _log.warning("wsgi_reload: the %s worker never calls pre_request or post_request, so modules a request "
                     "imports lazily are in every generation but not imported by the check%s",
                     cfg.worker_class_str, "; mode=patch needs pre_request, so changes reload instead"
                     if settings.mode == "patch" else "")
        if settings.mode == "patch":
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
        _manifest_dir = runtime.for_server(os.getpid())
    except (OSError, runtime.RuntimeDirError) as exc:
        _log.error("wsgi_reload: reloading is off: no private runtime directory (%s)", exc)
        return
    runtime.hold_against_cleaners(_manifest_dir)
    _master = _MasterWatch(server, settings, _manifest_dir)
    _master.start()


@_hook
def post_fork(server: Any, worker: Any) -> None:
    """Worker: load the app from the master's verified generation (inherited with the fork)."""
    global _worker, _patches
    if _manifest_dir is None or _master is None:
        return
    loaded_at = _LOADED_NS if server.cfg.preload_app else time.time_ns()
    _worker = ManifestWriter(_manifest_dir, loaded_at)
    if _master.patcher is not None:
        _patches = PatchApplier(_manifest_dir)
    if not server.cfg.preload_app:
        worker.load_wsgi = _load_verified(worker.load_wsgi, worker, _master.store)
    if _skips_request_hooks(type(worker)):
        _drain_uvicorn_before_shutdown()


@_hook
def post_worker_init(worker: Any) -> None:
    """Worker: with ``ready_path``, GET it from the app; then publish the files this worker
    imported, which tells the master it has loaded."""
    if _master is not None and _master.settings.ready_path:
        try:
            ask_ready(worker.wsgi, _master.settings.ready_path)
        except Exception as exc:
            _say_it_failed(exc)
            retry_later(worker, exc)
            sys.exit(1)  # exit code 1: gunicorn starts another worker; the swap retires the new ones
    if _worker is not None:
        _worker.publish()


@_hook
def pre_request(worker: Any, req: Any) -> None:
    """Worker: in patch mode, apply a newer patch before serving."""
    if _patches is not None:
        _patches.maybe_apply()


@_hook
def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    """Worker: publish again when a request imported more modules (views load lazily)."""
    if _worker is not None:
        _worker.publish_if_grown()


@_hook
def child_exit(server: Any, worker: Any) -> None:
    """Master: forget the manifest of a worker that exited."""
    if _manifest_dir is not None:
        with contextlib.suppress(OSError):
            os.unlink(manifest_path(_manifest_dir, worker.pid))


@_hook
def on_exit(server: Any) -> None:
    """Master: stop watching and remove the manifests."""
    if _master is not None:
        _master.close()


# --- worker side ------------------------------------------------------------------------


def _load_verified(load: Callable[[], None], worker: Any, store: Store) -> Callable[[], None]:
    """Load the app from a verified generation, and never let a failure halt the server.

    The worker imports from the generation the master had when it forked this worker. With
    none yet (the app did not load at start), it waits, telling the master it is alive, until
    the first one passes the check. An import that fails anyway exits with code 1, which
    gunicorn answers by starting another worker, where a boot error would halt it.
    """

    def load_wsgi() -> None:
        finder = _genimport.install(store.directory)
        if finder.generation is None:
            first = wait_for_newer(store, None, None, heartbeat=worker.notify)
            assert first is not None
            finder.set(first.id, first.files)
        try:
            load()
            return
        except Exception as exc:
            _say_it_failed(exc)
            retry_later(worker, exc)
        sys.exit(1)

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


def _say_it_failed(exc: BaseException) -> None:
    """A worker of the config hooks tells the master's swap that it cannot load the checked code."""
    if _worker is not None:
        _worker.app_loaded = lambda: False
        _worker.failure = describe_error(exc)
        with contextlib.suppress(OSError):
            _worker.publish()


def retry_later(worker: Any, exc: BaseException, *, quiet: bool = False) -> None:
    """A worker could not load verified code (the environment's fault: a database down at import):
    say so, and wait :data:`RETRY_SECONDS`, or until newer code passes the check, telling the master
    it is alive. The caller then exits with 1, which gunicorn answers with a new worker.

    :param quiet: log at debug level (the watcher already says what is broken).
    """
    finder = _genimport.installed()
    generation = None if finder is None else finder.generation
    _log.log(logging.DEBUG if quiet else logging.ERROR,
             "wsgi_reload: worker %d cannot load the app from verified code (generation %s: %s); the other "
             "workers serve on, and another worker tries again in %g s or once newer code passes the check",
             os.getpid(), generation, describe_error(exc), RETRY_SECONDS)
    if _manifest_dir is not None:
        wait_for_newer(store_of(_manifest_dir), generation, RETRY_SECONDS, heartbeat=worker.notify)


def _worker_exit(server: Any, worker: Any) -> None:
    """``worker_exit`` for a worker whose master runs none of our code (Django with no gunicorn
    config): remove its manifest, and turn gunicorn's "Worker failed to boot", which halts the
    server, into a held worker that exits with 1 and is tried again, once this server has served."""
    if _worker is None or _manifest_dir is None:
        return
    if worker.booted:
        with contextlib.suppress(OSError):
            os.unlink(_worker.path)
        return
    exc = sys.exc_info()[1]
    if not isinstance(exc, SystemExit) or exc.code not in (server.WORKER_BOOT_ERROR, server.APP_LOAD_ERROR):
        return
    if wait_for_loadable_code(worker, exc.__context__ or exc):
        raise SystemExit(1)


def wait_for_loadable_code(worker: Any, exc: BaseException) -> bool:
    """A worker of a server whose master runs none of our code could not load the app: wait (see
    :func:`retry_later`) so that the caller exits with 1 and gunicorn starts another worker. False
    when nothing can watch this server, so gunicorn should stop as it would without us.

    The worker says so in its manifest: a swap waiting for it ends at once. If no worker of the
    server serves (it was started broken), that manifest also keeps the watcher from retiring and
    has it check the app, and the worker makes sure the watcher runs: then the fix is checked and
    served, where gunicorn's "Worker failed to boot" would have stopped the server.
    """
    from .watch_process import alive

    assert _worker is not None and _manifest_dir is not None
    workers = ManifestReader(_manifest_dir, accept=alive)
    workers()
    serving = any(loaded is not False for loaded in workers.loaded.values())
    start_watcher = _on_failed_start
    if not serving and start_watcher is None:
        return False
    _say_it_failed(exc)  # a swap under way ends at once; with none serving, the watcher checks the app
    if start_watcher is not None and not serving:
        try:
            start_watcher()
        except Exception as error:  # the settings do not load: nothing can watch
            _log.error("wsgi_reload: cannot watch this server: %s: %s", type(error).__name__, error)
            return False
    retry_later(worker, exc, quiet=not serving)  # with none serving, the watcher's check says once what is broken
    return True


def adopt_worker(worker: Any, directory: str, loaded_at_ns: int, *,
                 before_publish: Callable[[], Sequence[str] | None] | None = None,
                 after_publish: Callable[[], object] | None = None,
                 on_failed_start: Callable[[], object] | None = None) -> None:
    """Give a booting worker this adapter's worker-side hooks, from inside its app import.

    For Django under gunicorn with no gunicorn config: the master runs none of our code, so
    the hooks go into this worker's copy of the config.

    :param before_publish: runs after the app loaded and before the worker serves (an error
        there fails the boot); returns extra patterns to watch (Django's template and locale
        globs). The manifest published after it is the worker's proof that it loaded.
    :param after_publish: runs once the manifest is published.
    :param on_failed_start: starts the server's watcher when the app does not load while no
        worker of the server serves (it was started broken).
    """
    global _manifest_dir, _worker, _on_failed_start
    _manifest_dir = directory
    _on_failed_start = on_failed_start
    _worker = ManifestWriter(directory, loaded_at_ns)
    cfg = worker.cfg

    def loaded(worker: Any) -> None:
        if before_publish is not None:
            patterns = before_publish()
            if patterns is not None and _worker is not None:
                _worker.patterns = list(patterns)
        post_worker_init(worker)
        if after_publish is not None:
            after_publish()

    loaded.__signature__ = inspect.signature(post_worker_init)  # type: ignore[attr-defined]
    _add_hooks(cfg, {"post_worker_init": loaded, "pre_request": pre_request, "post_request": post_request,
                     "worker_exit": _worker_exit})


def watching() -> bool:
    """True in a gunicorn master whose config hooks watch the server (and in its workers)."""
    return _master is not None


def republish_if_missing() -> None:
    """In a worker: publish its manifest again if the runtime directory lost it."""
    if _worker is not None:
        _worker.publish_if_missing()


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


# --- master side ------------------------------------------------------------------------


class _MasterWatch:
    def __init__(self, server: Any, settings: Settings, manifest_dir: str) -> None:
        self.server = server
        self.settings = settings
        self.pid = os.getpid()
        self.manifest_dir = manifest_dir
        self.preload = bool(server.cfg.preload_app)
        self.old_workers = [int(p) for p in os.environ.pop(OLD_WORKERS_ENV, "").split(",") if p.isdigit()]
        self.handing_over = False
        self.served_once = False
        self.batch_started = time.monotonic()
        self.worker_files = ManifestReader(manifest_dir, accept=lambda pid: pid in server.WORKERS)
        self.patcher = PatchPublisher(manifest_dir, os.getcwd()) if settings.mode == "patch" else None
        worker_files: Any = self.worker_files
        if self.patcher is not None:
            if self.preload:
                _log.warning("wsgi_reload: mode=patch does not apply with preload_app (workers fork from the "
                             "master's old code); reloading instead")
                self.patcher = None
            else:
                worker_files = lambda: self.patcher.remember(self.worker_files())  # noqa: E731
        self.store = store_of(manifest_dir)
        self.roots = project_roots()
        self.accept = PathFilter(settings.include, settings.exclude)
        self.previous: Generation | None = None
        self.current: Generation | None = None
        """The newest verified generation: what the master's finder hands every forked worker."""
        self.candidate: Generation | None = None
        """The generation the last check imported."""
        how = ("gunicorn (the master re-executes in place: preload_app)" if self.preload
               else "gunicorn (new workers by TTIN; the old retire by TTOU once those load)")
        self.watcher = Watcher(settings, self.trigger, server=how,
                               sources=[worker_files, self.config_files, self.generation_files],
                               wake_dirs=[manifest_dir], name="wsgi_reload-gunicorn", on_batch=self.on_batch,
                               check=self.check, on_tick=self.tick)
        self.unchecked: list[Change] = []
        """Files that changed while the runtime directory was gone, to check on the next turn."""

    def start(self) -> None:
        self.first_generation()
        self.watcher.start()
        if self.preload:
            self.server.reexec = lambda: reexec_in_place(self.server)  # USR2 from now on: see reexec_in_place
        if self.old_workers:
            threading.Thread(target=self.retire_old_workers, args=(self.old_workers,), name="wsgi_reload-handover",
                             daemon=True).start()
        else:
            threading.Thread(target=self.report_new_workers, args=(set(), time.monotonic(), "up"),
                             name="wsgi_reload-report", daemon=True).start()

    def close(self) -> None:
        self.watcher.stop(timeout=2)
        runtime.remove(self.manifest_dir)

    # What to watch: the union of the live workers' manifests (see __init__), plus the config files.

    def config_files(self) -> list[str]:
        cfg = self.server.cfg
        files = list(cfg.reload_extra_files or ())
        location = cfg.config
        if location and not location.startswith("python:"):
            files.append(location[len("file:"):] if location.startswith("file:") else location)
        return [os.path.abspath(f) for f in files]

    def generation_files(self) -> dict[str, int | None]:
        """Every file of the running generation is watched, imported by a worker yet or not: a
        module a view imports lazily must be in the next generation as soon as it is saved."""
        current = self.current
        return {} if current is None else dict.fromkeys(current.files, current.built_ns)

    # Generations: what the check imports is what the workers run.

    def first_generation(self) -> None:
        """The code the workers start with. After an in-place re-exec it is the generation the new
        image imported; with preload_app, what the master just imported; otherwise it is checked
        first, and the workers wait (gunicorn stays up) until code that loads is saved."""
        reexecuted = _genimport.installed()
        if reexecuted is not None and reexecuted.generation is not None and reexecuted.store == self.store.directory:
            self.current = self.store.load(reexecuted.generation)
        if self.current is None:
            generation = self.store.build(self.roots, accept=self.accept, extra=self.worker_python_files())
            if self.preload:
                result = CheckResult(True, "preload")  # the master itself just imported it
            else:
                result = self.check_generation(generation, [])
            if not result.ok:
                self.watcher.gate.refuse(result, old_code_serves=False)
                _log.error("wsgi_reload: the workers wait, without serving, until code that loads is saved; "
                           "gunicorn stays up")
                self.store.save(generation)
                self.candidate = generation
                self.current = None
                self.store.install()
                return
            self.current = generation
        self.store.publish(self.current)
        self.store.install(self.current)
        if not self.current.complete:
            _log.warning("wsgi_reload: the files beyond that bound are read from the disk by the workers, unchecked")

    def worker_python_files(self) -> list[str]:
        """The project's modules the workers (or, before they publish, this master) imported: in
        the generation even where they lie outside the directories on ``sys.path`` at start."""
        files = self.worker_files.files or ModuleFiles()()
        return [p for p in files if is_project_file(p)]

    def check(self, paths: Sequence[str]) -> CheckResult:
        """Read what changed into a candidate generation and check that, not the disk."""
        self.heal()
        base = self.current if self.current is not None else self.candidate
        candidate = self.store.build(self.roots, base=base, accept=self.accept,
                                     extra=[*paths, *self.worker_python_files()], patterns=self.worker_files.patterns)
        self.candidate = candidate
        return self.check_generation(candidate, [*paths, *candidate.changed])

    def check_generation(self, generation: Generation, changed: Sequence[str]) -> CheckResult:
        return check_code(sorted(set(changed)), self.settings, loaded_modules=self.worker_files.files,
                          generation=Checked(self.store.directory, generation.id, generation.files))

    def publish(self) -> bool:
        """Make the checked candidate what every worker forked from now on imports; False when
        no worker had code to serve before (they were waiting, and now load it themselves)."""
        candidate = self.candidate
        assert candidate is not None
        had_code = self.current is not None
        keep = {g for g in self.worker_files.generations if g is not None}
        self.store.publish(candidate, keep=keep)
        self.store.install(candidate)
        self.previous, self.current = self.current, candidate
        return had_code

    def roll_back(self) -> None:
        """The new workers could not serve the published generation: the old workers' is what
        every worker forked from now on imports again (a respawn of an old one, say)."""
        if self.previous is None:
            return
        keep = {g for g in self.worker_files.generations if g is not None}
        self.store.publish(self.previous, keep=keep)
        self.store.install(self.previous)
        self.current, self.previous = self.previous, None

    def heal(self) -> None:
        """Make a removed runtime directory again and restore the running generation into it; the
        files that changed since are checked as a batch of their own."""
        lost = recover(self.manifest_dir, self.store, self.current)
        if lost:
            self.unchecked.extend(Change(path, "modified") for path in lost)

    def tick(self) -> None:
        """Housekeeping in the watcher thread: a removed runtime directory, a pending reload."""
        self.heal()
        if self.unchecked:
            batch, self.unchecked = self.unchecked, []
            self.on_batch(batch)
        self.watcher.gate.retry_pending()

    # Deciding and reloading.

    def on_batch(self, batch: Sequence[Change]) -> None:
        if self.handing_over:
            _log.info("wsgi_reload: the master is re-executing; its new image picks up these changes")
            return
        self.batch_started = time.monotonic()
        self.watcher.gate(batch)

    def trigger(self, batch: Sequence[Change]) -> None:
        if not self.publish():
            _log.info("wsgi_reload: the waiting workers load the code that passed the check now")
            threading.Thread(target=self.report_new_workers, args=(set(), self.batch_started),
                             name="wsgi_reload-report", daemon=True).start()
            return
        if self.patcher is not None:
            reason = self.patcher.publish(batch)
            if reason is None:
                _log.info("wsgi_reload: patched in place, no restart: each worker takes the new code "
                          "before its next request")
                self.patcher.watch_for_failures(self.fall_back)
                return
            _log.info("wsgi_reload: not patchable (%s); reloading", reason)
            self.patcher.reset(batch)
        config = set(self.config_files())
        self.reload(config_changed=any(change.path in config for change in batch))

    def fall_back(self, reason: str) -> None:
        _log.warning("wsgi_reload: a worker could not take the patch (%s); reloading", reason)
        if self.patcher is not None:
            self.patcher.reset([Change(path, "modified") for path in self.patcher.patched])
        self.reload()

    def reload(self, config_changed: bool = False) -> None:
        if self.preload:
            self.handing_over = True
            _log.info("wsgi_reload: preload_app is on: re-executing the master in place (same pid) so the new "
                      "code loads; the old workers serve until the new ones are up")
            os.kill(self.pid, signal.SIGUSR2)  # handled on the main thread, by reexec_in_place()
            return
        if config_changed:
            # Only a HUP re-reads the gunicorn config; it swaps the workers without waiting for them.
            old_workers = set(self.server.WORKERS)
            os.kill(self.pid, signal.SIGHUP)
            threading.Thread(target=self.report_new_workers, args=(old_workers, self.batch_started),
                             name="wsgi_reload-report", daemon=True).start()
            return
        self.swap_workers()

    def swap_workers(self) -> None:
        """Verify before swap: the old workers retire only once the new ones have loaded the app.

        TTIN adds one worker at a time; a new worker proves it loaded by publishing its
        manifest (post_worker_init runs after the app import). Then TTOU retires one worker per
        signal, and gunicorn's manage_workers() retires the oldest: the old generation. If the
        new workers cannot load within check_timeout, the old generation is made the youngest,
        so the same TTOUs retire the new workers instead, and the old ones keep serving.
        """
        server = self.server
        old = set(server.WORKERS)
        count = server.num_workers
        for _ in range(count):
            # One at a time: two pending TTINs would merge into one signal.
            self._signal_master_and_wait(signal.SIGTTIN, lambda before: server.num_workers > before)
        deadline = time.monotonic() + self.settings.check_timeout
        fresh: set[int] = set()
        failure = None
        while time.monotonic() < deadline:
            new = [(pid, self.worker_files.read(pid)) for pid in list(server.WORKERS) if pid not in old]
            fresh = {pid for pid, manifest in new if manifest is not None and manifest.get("app_loaded") is not False}
            # A new worker that says it cannot load the checked code (ready_path answered 500 there, or
            # the environment differs from the check's) ends the swap now, not after check_timeout.
            failure = next((m.get("failure") for _, m in new if m is not None and m.get("app_loaded") is False), None)
            if len(fresh) >= count or failure is not None:
                break
            time.sleep(0.02)
        loaded = len(fresh) >= count
        real_ages = {pid: worker.age for pid, worker in list(server.WORKERS.items()) if pid in old}
        if not loaded:
            youngest = max((w.age for w in list(server.WORKERS.values())), default=0)
            for offset, pid in enumerate(sorted(real_ages)):
                worker = server.WORKERS.get(pid)
                if worker is not None:
                    # manage_workers() retires the oldest first; far ahead of any respawn in between
                    worker.age = youngest + 1_000_000 + offset
        for _ in range(count):
            self._signal_master_and_wait(signal.SIGTTOU, lambda before: server.num_workers < before)
        if not loaded:
            # Restore the ages only once the new workers are gone (while they are still counted,
            # manage_workers() would retire the oldest), so the next swap retires these first again.
            deadline = time.monotonic() + self.server.cfg.graceful_timeout + 5
            while len(server.WORKERS) > count and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid, age in real_ages.items():
                worker = server.WORKERS.get(pid)
                if worker is not None:
                    worker.age = age
        if loaded:
            self.served_once = True
            _log.info("wsgi_reload: reload done: %s serving, %.0f ms after the change was seen; "
                      "the old workers retire", _workers(count, "new "), 1000 * (time.monotonic() - self.batch_started))
        else:
            self.roll_back()
            if failure is not None:
                _log.error("wsgi_reload: a new worker cannot serve the code that passed the check (%s); the new "
                           "workers retire and the old ones keep serving. Saving a fix reloads.", failure)
            else:
                _log.error("wsgi_reload: the new workers did not load the app within %g s; they retire and the old "
                           "workers keep serving. Saving a fix reloads.", self.settings.check_timeout)

    def _signal_master_and_wait(self, signum: int, done: Callable[[int], bool], timeout: float = 10.0) -> None:
        before = self.server.num_workers
        os.kill(self.pid, signum)
        deadline = time.monotonic() + timeout
        while not done(before) and time.monotonic() < deadline:
            time.sleep(0.01)

    def report_new_workers(self, old_workers: set[int], started: float, what: str = "reload done",
                           timeout: float = 120.0) -> None:
        """Log once every worker of the new generation has loaded its code."""
        while time.monotonic() - started < timeout:
            live = set(self.server.WORKERS)
            fresh = {pid for pid in live - old_workers if self._has_loaded(pid)}
            # Read each time: a HUP that re-reads an edited config can change the worker count.
            if fresh and len(fresh) >= self.server.num_workers:
                self.served_once = True
                if what == "up":
                    _log.info("wsgi_reload: workers up: %s serving; watching %d files",
                              _workers(len(fresh)), len(self.watcher.scanner.watched_files()))
                else:
                    _log.info("wsgi_reload: reload done: %s serving, %.0f ms after the change was seen",
                              _workers(len(fresh), "new "), 1000 * (time.monotonic() - started))
                return
            time.sleep(0.05)
        _log.warning("wsgi_reload: the new workers are not all up %.0f s after the reload", timeout)

    def _has_loaded(self, pid: int) -> bool:
        """The worker's manifest says it loaded the app (it is there, and not a failure)."""
        manifest = self.worker_files.read(pid)
        return manifest is not None and manifest.get("app_loaded") is not False

    def retire_old_workers(self, old_workers: list[int], timeout: float = 120.0) -> None:
        """After an in-place re-exec: once our own workers are up, stop the old image's workers
        (still our children, serving on the inherited sockets) gracefully."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            live = set(self.server.WORKERS)
            if len(live) >= self.server.num_workers and all(self._has_loaded(pid) for pid in live):
                break
            time.sleep(0.05)
        else:
            _log.error("wsgi_reload: the new workers did not come up in %.0f s; the old workers keep serving",
                       timeout)
            return
        for pid in old_workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(OSError):
                os.unlink(manifest_path(self.manifest_dir, pid))
        self.served_once = True
        _log.info("wsgi_reload: reload done: %s serving, same master pid %d; the old workers retire",
                  _workers(len(live), "new "), self.pid)


def reexec_in_place(server: Any) -> None:
    """Replace gunicorn's USR2 re-exec (fork, then exec: a new master pid) by an exec of this very
    process, so the master keeps its pid: as PID 1 in a container, or under a supervisor that
    watches that pid. The listening sockets are inherited (GUNICORN_FD; gunicorn makes them
    inheritable), and so are the old workers, which keep serving until the new image retires them."""
    cfg = server.cfg
    cfg.pre_exec(server)
    environ = dict(cfg.env_orig)
    environ["GUNICORN_PID"] = str(os.getpid())  # read the listeners from GUNICORN_FD; promoted at once
    if server.systemd:
        environ["LISTEN_PID"] = str(os.getpid())
        environ["LISTEN_FDS"] = str(len(server.LISTENERS))
    else:
        environ["GUNICORN_FD"] = ",".join(str(listener.fileno()) for listener in server.LISTENERS)
    environ[OLD_WORKERS_ENV] = ",".join(str(pid) for pid in server.WORKERS)
    if _manifest_dir is not None:
        environ[runtime.RUNTIME_ENV] = _manifest_dir
    if _master is not None and _master.current is not None:
        environ[GENERATION_ENV] = str(_master.current.id)
        if _master.previous is not None:
            environ[PREVIOUS_GENERATION_ENV] = str(_master.previous.id)
    os.chdir(server.START_CTX["cwd"])
    os.execvpe(server.START_CTX[0], server.START_CTX["args"], environ)


OLD_WORKERS_ENV = "_WSGI_RELOAD_OLD_WORKERS"
"""Set across an in-place re-exec: the old image's workers, for the new image to retire."""
GENERATION_ENV = "_WSGI_RELOAD_GENERATION"
"""Set across an in-place re-exec: the verified generation the new image imports the app from."""
PREVIOUS_GENERATION_ENV = "_WSGI_RELOAD_PREVIOUS_GENERATION"
"""The generation the old workers run, to fall back to if the new image cannot load."""


def _import_reexec_generation() -> None:
    """In a re-executed master, before gunicorn preloads the app: import from the generation
    that passed the check, not from the disk."""
    directory = os.environ.get(runtime.RUNTIME_ENV)
    wanted = os.environ.pop(GENERATION_ENV, "")
    if not directory or not wanted.isdigit() or not runtime.is_private_dir(directory):
        return
    store = store_of(directory)
    generation = store.load(int(wanted))
    if generation is not None:
        store.install(generation)


def _guard_preload() -> None:
    """The master's own import of the app (``preload_app``) must never halt gunicorn.

    At the first start the master imports from a generation read just before, so the workers'
    lazy imports later get the same bytes; if the app does not load, the master says so once
    and waits for a save that changes the project's files, then tries that. After an in-place
    re-exec it imports the generation that passed the check; if that fails anyway (the
    environment's fault: a port the old workers still hold, a database down), the master
    executes itself once more with the generation the old workers run.
    """
    from gunicorn.app.base import BaseApplication

    load_once = BaseApplication.wsgi
    previous = os.environ.pop(PREVIOUS_GENERATION_ENV, "")

    def wsgi(self: Any) -> Any:
        if os.getpid() != _CONFIG_PID or self.callable is not None:
            return load_once(self)  # a worker, or loaded already
        forward_to(_gunicorn_emitter(logging.getLogger("gunicorn.error")))
        finder = _genimport.installed()
        if finder is not None and finder.generation is not None:
            old_workers = [int(p) for p in os.environ.get(OLD_WORKERS_ENV, "").split(",") if p.isdigit()]
            try:
                with _adopting_listeners_of(old_workers):
                    return load_once(self)
            except Exception as exc:
                if not previous.isdigit():
                    raise
                _log.error("wsgi_reload: the re-executed master cannot load the code that passed the check (%s); "
                           "it executes itself again with the code the old workers run (same pid)", describe_error(exc))
                environ = dict(os.environ)
                environ[GENERATION_ENV] = previous
                os.execvpe(sys.executable, [sys.executable, *sys.argv], environ)
        return _first_preload(self, load_once)

    BaseApplication.wsgi = wsgi


@contextlib.contextmanager
def _adopting_listeners_of(old_workers: Sequence[int]) -> Iterator[None]:
    """While the re-executed master imports the app: a port the app binds at import (a metrics
    port) is still held by the old workers, which inherited it from the old image and serve
    until the new ones are up, so the bind fails with EADDRINUSE. Take their listening socket
    instead (``pidfd_getfd``, Linux 5.6+): the app gets the very socket, already listening."""
    import socket

    bind = socket.socket.bind

    def adopting_bind(self: socket.socket, address: Any) -> None:
        try:
            bind(self, address)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or not isinstance(address, tuple) or len(address) < 2:
                raise
            fd = _listener_of(old_workers, int(address[1]))
            if fd is None:
                raise
            try:
                os.dup2(fd, self.fileno(), inheritable=False)
            finally:
                os.close(fd)
            _log.info("wsgi_reload: the re-executed master takes port %s over from its old workers", address[1])

    socket.socket.bind = adopting_bind  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        socket.socket.bind = bind  # type: ignore[method-assign]


SYS_PIDFD_GETFD = 438
"""pidfd_getfd(2), the same number on every Linux architecture (asm-generic/unistd.h)."""


def _listener_of(pids: Sequence[int], port: int) -> int | None:
    """A duplicate of the socket listening on ``port`` that one of ``pids`` holds, or None."""
    import ctypes

    for pid in pids:
        for fd in listener_fds(pid, port):
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                break
            try:
                duplicate = ctypes.CDLL(None, use_errno=True).syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
            finally:
                os.close(pidfd)
            if duplicate >= 0:
                return int(duplicate)
    return None


def _first_preload(app: Any, load_once: Callable[[Any], Any]) -> Any:
    try:
        store = store_of(runtime.for_server(os.getpid()))
    except (OSError, runtime.RuntimeDirError):
        return load_once(app)  # when_ready says reloading is off, and why
    roots = project_roots()
    generation = store.build(roots, extra=ModuleFiles()())
    store.install(generation)
    reported: set[str] = set()
    while True:
        try:
            loaded = load_once(app)
        except Exception as exc:
            key = describe_error(exc)
            if key not in reported:
                reported.add(key)
                _log.error("wsgi_reload: the app does not load (%s); gunicorn stays up, without listening yet, and "
                           "loads it again as soon as a file of the project changes", key)
            for name, module in list(sys.modules.items()):
                if getattr(module, "__file__", None) in generation.files:
                    del sys.modules[name]  # the next try imports them again, from the next generation
            generation = _next_generation(store, roots, generation)
            store.install(generation)
            continue
        store.publish(generation)
        return loaded


def _next_generation(store: Store, roots: Sequence[str], base: Generation, poll: float = 0.25) -> Generation:
    """Wait until a project file changes; returns the generation of the files as they are then."""
    while True:
        time.sleep(poll)
        generation = store.build(roots, base=base, extra=base.files)
        if generation.changed:
            time.sleep(poll)  # let a save that is still being written settle
            return store.build(roots, base=base, extra=base.files)


if not checking():
    if os.environ.get(OLD_WORKERS_ENV):
        _import_reexec_generation()
    _guard_preload()


def _workers(count: int, adjective: str = "") -> str:
    return f"{count} {adjective}worker" + ("" if count == 1 else "s")


def _skips_request_hooks(worker_class: type) -> bool:
    """uvicorn's gunicorn workers run the app through uvicorn, which calls no gunicorn request hook."""
    return any(c.__module__.startswith("uvicorn_worker") for c in worker_class.__mro__)


def _is_preload_worker(worker_class: type) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" in PRELOAD_WORKER_CLASSES for c in worker_class.__mro__)


def _gunicorn_emitter(glog: Any) -> Callable[[int, str], None]:
    def emit(level: int, message: str) -> None:
        if level >= logging.ERROR:
            glog.error(message)
        elif level >= logging.WARNING:
            glog.warning(message)
        elif level >= logging.INFO:
            glog.info(message)
        else:
            glog.debug(message)

    return emit
