"""gunicorn's ``preload_app``: the master's own import of the app, and its re-exec in place.

With ``preload_app`` the master imports the app, so the master is what must load verified
code: at the first start it imports from a generation read just before (and waits for a fix
instead of halting when that does not load); on USR2 it executes itself in place, keeping
its pid, and the new image imports the generation that passed the check, falling back to
the old workers' generation if that cannot load. The watcher retires the old workers once
the new ones are up (:class:`wsgi_reload._server.strategies.InPlaceReexec`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .._check.probe import listener_fds
from .._core.files import ModuleFiles, describe_error
from .._core.logs import forward_to
from . import genimport, runtime
from .generations import Generation, Store, project_roots, store_of

_log = logging.getLogger("wsgi_reload.gunicorn")

_CONFIG_PID = os.getpid()
"""The master: gunicorn imports its config there, before any worker exists."""


def reexec_in_place(server: Any, runtime_dir: str | None) -> None:
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
    if runtime_dir is not None:
        environ[runtime.RUNTIME_ENV] = runtime_dir
        current = store_of(runtime_dir).current_id()  # the watcher published it before the USR2
        running = genimport.installed()
        if current is not None:
            environ[GENERATION_ENV] = str(current)
        if running is not None and running.generation is not None and running.generation != current:
            environ[PREVIOUS_GENERATION_ENV] = str(running.generation)
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
        forward_to(gunicorn_emitter(logging.getLogger("gunicorn.error")))
        finder = genimport.installed()
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


def install() -> None:
    """In the master, as gunicorn imports its config: guard its preload of the app (see
    :func:`_guard_preload`), and in a re-executed master import the generation that passed."""
    if os.environ.get(OLD_WORKERS_ENV):
        _import_reexec_generation()
    _guard_preload()


def gunicorn_emitter(glog: Any) -> Callable[[int, str], None]:
    """Our log lines, into gunicorn's own log at their level."""
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
