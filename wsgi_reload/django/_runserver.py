"""A reloader for ``manage.py runserver`` built on the shared scanner.

It implements Django's ``BaseReloader`` (``watch_dir``, ``watched_files``, ``tick``,
``notify_file_changed`` and the vetoable ``file_changed`` signal come from it), and adds
the shared change rules (mtime_ns, size and inode; a settle window) and the event backend.
A code change runs the shared pre-reload check first: a broken save keeps this process
serving the old code, the console names the file and line, and the fix restarts it.
Template changes still only reset Django's template loaders, as with Django's own reloader.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from django.utils import autoreload

from .._check.check import CheckResult, check_code, start_warm
from .._core.files import ModuleFiles
from .._core.scanner import Change
from .._core.settings import Settings, SettingsError
from .._core.watcher import Watcher

log = logging.getLogger("wsgi_reload.django")

_STARTED_NS = time.time_ns()
"""Imported while Django sets up, before the URLconf and views load."""


class WsgiReloadReloader(autoreload.BaseReloader):  # type: ignore[misc]
    """Django's reloader interface over :class:`wsgi_reload.Scanner` and :class:`wsgi_reload.Monitor`."""

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__()
        self.settings = settings if settings is not None else _settings()
        self._batches: queue.Queue[Sequence[Change]] = queue.Queue()
        self._module_files = ModuleFiles()
        self.watcher: Watcher | None = None
        self._globbed: tuple[object, list[str]] | None = None
        self._files: tuple[frozenset[str], object, dict[str, int | None]] | None = None

    def django_files(self) -> dict[str, int | None]:
        """What Django would watch: the files of ``sys.modules``, the extra files, those whose
        import failed, and what its directory globs (templates, translations) match. The modules
        this process imported carry when it began loading code: the server answers before the
        first scan, and a save in between must count."""
        # Not through Django's watched_files(): it resolves the path of every module again (its
        # cache goes with each import a request makes), 0.5 to 1 s per scan with four request
        # threads holding the GIL, and a reload scans twice. The modules come from the shared
        # scanner's per-module cache; the globs run again only when a directory's entries change.
        imported = self._module_files()
        # Django's own list also names the files whose import failed (autoreload._error_files).
        stamp = (frozenset([*self.extra_files, *autoreload._error_files]), self._glob_stamp())
        if self._globbed is None or self._globbed[0] != stamp:
            found = [*stamp[0], *(p for directory, patterns in self.directory_globs.items() for pattern in patterns
                                  for p in directory.glob(pattern))]
            self._globbed = (stamp, [str(p) for p in found])
        if self._files is None or self._files[0] is not imported or self._files[1] is not self._globbed:
            files: dict[str, int | None] = dict.fromkeys(self._globbed[1])
            files.update(dict.fromkeys(imported, _STARTED_NS))
            self._files = (imported, self._globbed, files)
        return dict(self._files[2])

    def _glob_stamp(self) -> tuple[tuple[str, int], ...]:
        """The modification times of the directories Django globs in, and of those below them."""
        stamp = []
        for directory in self.directory_globs:
            for parent, _dirs, _files in os.walk(directory):
                try:
                    stamp.append((parent, os.stat(parent).st_mtime_ns))
                except OSError:
                    continue
        return tuple(stamp)

    def tick(self) -> Iterator[None]:
        """The first tick records a baseline; later ones report each changed file once."""
        # Batches are queued for this (the autoreloader's) thread, which checks them: the gate
        # runs here only, so no retry runs on the monitor's thread.
        self.watcher = Watcher(self.settings, self._notify, server="runserver", sources=[self.django_files],
                               on_batch=self._batches.put, on_tick=lambda: None, name="wsgi_reload-runserver",
                               check=self._check)
        self.watcher.start(announce=False)  # the baseline is recorded before it returns: before the first yield
        # Each reload replaces this process, and with it a warm check process started at the
        # first check: that check, the only one, would run cold (a second or more under load).
        start_warm(self.settings, self._module_files())
        gate = self.watcher.gate
        try:
            while True:
                try:
                    batch = self._batches.get(timeout=self.settings.interval)
                except queue.Empty:
                    yield
                    continue
                if any(change.path.endswith(".py") for change in batch):
                    # Django would restart into the new code even when it does not load, and serve
                    # nothing until the fix: check first, and keep this process serving if it fails.
                    gate(batch)
                else:
                    self._notify(batch)  # templates and translations: Django resets its caches
                yield
        finally:
            self.watcher.stop()

    def _check(self, paths: Sequence[str]) -> CheckResult:
        return check_code(paths, self.settings, loaded_modules=self._module_files())

    def _notify(self, batch: Sequence[Change]) -> None:
        for change in batch:
            self.notify_file_changed(Path(change.path))

    @classmethod
    def check_availability(cls) -> bool:
        return True


def _settings() -> Settings:
    from ._site import reload_settings, wsgi_target

    try:
        return reload_settings()
    except SettingsError:
        return Settings(app=wsgi_target())  # manage.py check shows the problem as wsgi_reload.W001


def get_reloader() -> Any:
    """What ``django.utils.autoreload.get_reloader`` returns once the app is installed."""
    return WsgiReloadReloader()


LISTENER_ENV = "_WSGI_RELOAD_RUNSERVER_FD"
"""The listening socket runserver's reloader process holds, inherited by each server process."""


def install() -> None:
    """Make runserver's autoreloader use :class:`WsgiReloadReloader`, and keep its port open
    across restarts."""
    autoreload.get_reloader = get_reloader
    if os.environ.get(autoreload.DJANGO_AUTORELOAD_ENV) == "true":
        _adopt_listener()
    elif not getattr(autoreload.run_with_reloader, "_wsgi_reload", False):
        autoreload.run_with_reloader = _holding_the_port(autoreload.run_with_reloader)


def _holding_the_port(run_with_reloader: Any) -> Any:
    """Django's reloader process restarts the server process by running a new one after the old
    one exited, and each binds the port itself: connections in between are refused. Bind it
    once here instead; each server process inherits it (Django runs them with close_fds=False)
    and connections wait in its backlog while the next one starts."""

    def run(main_func: Any, *args: Any, **kwargs: Any) -> Any:
        command = getattr(main_func, "__self__", None)
        host, port = getattr(command, "addr", None), str(getattr(command, "port", ""))
        if host is not None and port.isdigit():
            family = socket.AF_INET6 if getattr(command, "use_ipv6", False) else socket.AF_INET
            try:
                listener = socket.socket(family, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((host, int(port)))
                listener.listen(64)
            except OSError as exc:
                log.debug("wsgi_reload: not holding the runserver port (%s); Django binds it", exc)
            else:
                listener.set_inheritable(True)
                os.environ[LISTENER_ENV] = str(listener.fileno())
                _held.append(listener)  # open for the life of this process
        return run_with_reloader(main_func, *args, **kwargs)

    run._wsgi_reload = True  # type: ignore[attr-defined]
    return run


_held: list[socket.socket] = []
"""The reloader process's listening socket (garbage collection would close it)."""


def _adopt_listener() -> None:
    """In a server process: use the inherited listening socket instead of binding the port."""
    fd = os.environ.get(LISTENER_ENV, "")
    if not fd.isdigit():
        return
    from django.core.servers import basehttp

    def server_bind(self: Any) -> None:
        self.socket.close()
        self.socket = socket.socket(fileno=os.dup(int(fd)))
        self.server_address = self.socket.getsockname()
        host, port = self.server_address[:2]
        self.server_name = socket.getfqdn(host)
        self.server_port = port
        self.setup_environ()
        _servers.append(self)

    basehttp.WSGIServer.server_bind = server_bind
    _count_connections(basehttp)
    exit_for_reload = autoreload.trigger_reload

    def trigger_reload(filename: str) -> None:
        # Connections still queued on the shared socket go to the next process; every connection
        # this process accepted is answered before it exits. Django's server_close() does not
        # wait for them: its request threads are daemons, which socketserver does not join.
        for server in _servers:
            server.shutdown()  # stop accepting (called from the reloader's thread, not the server's)
        _connections.drain(DRAIN_SECONDS)
        for server in _servers:
            server.server_close()  # the parent keeps the port open
        exit_for_reload(filename)

    autoreload.trigger_reload = trigger_reload


class _Connection:
    """One accepted connection: whether a request on it has begun to arrive and is not answered yet."""

    __slots__ = ("socket", "busy", "dropped", "quiet_since")

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.busy = False
        self.dropped = False
        self.quiet_since = time.monotonic()
        """Its accept, or the end of its last answer: since then nothing was asked on it."""

    def has_unread_bytes(self) -> bool:
        try:
            return bool(self.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing buffered (EAGAIN), or reset by the client: nothing to answer
            return False


class _Connections(threading.Condition):
    """The connections this server process accepted and has not closed, for a restart to wait for.

    Counting from the accept, not from the parsed request: a request whose bytes are still
    arriving when the restart begins is answered too (a count of parsed requests let the
    process exit between a connection's accept and its handler thread's first read).
    """

    def __init__(self) -> None:
        super().__init__()
        self.open: dict[int, _Connection] = {}
        self.closing = False

    def opened(self, sock: socket.socket) -> _Connection:
        with self:
            entry = self.open[id(sock)] = _Connection(sock)
            return entry

    def closed(self, sock: socket.socket) -> None:
        with self:
            self.open.pop(id(sock), None)
            self.notify_all()

    def drain(self, seconds: float) -> None:
        """Wait, at most ``seconds``, until every accepted connection is closed. A connection on
        which no request has come for :data:`QUIET_SECONDS` (a browser's preconnect, a kept-alive
        one between requests) is shut down, as any HTTP/1.1 server closes an idle connection;
        one whose request has begun is answered first. A connection accepted just before is
        given that long: a client sends its request a moment after its connect returns, and a
        busy client thread can take milliseconds to, while the old process had accepted it at
        once (closing it then failed a request in a test under load)."""
        self.closing = True
        deadline = time.monotonic() + seconds
        with self:
            while self.open and time.monotonic() < deadline:
                for entry in list(self.open.values()):
                    if not entry.busy and not entry.dropped and time.monotonic() - entry.quiet_since >= QUIET_SECONDS \
                            and not entry.has_unread_bytes():
                        entry.dropped = True
                        with contextlib.suppress(OSError):
                            entry.socket.shutdown(socket.SHUT_RDWR)  # its handler reads the end and returns
                self.wait(0.05)


class _MarkingReader(socket.SocketIO):
    """A connection's raw reader that marks the connection busy once request bytes arrive."""

    def __init__(self, sock: socket.socket, entry: _Connection) -> None:
        super().__init__(sock, "rb")
        self.entry = entry

    def readinto(self, b: Any) -> int | None:
        n = super().readinto(b)
        if n:
            self.entry.busy = True
        return n


def _count_connections(basehttp: Any) -> None:
    """Track each connection of runserver's server from its accept (in the accepting thread)
    to its close, and each request on it from its first byte to its answer."""
    verify = basehttp.WSGIServer.verify_request
    shutdown_request = basehttp.WSGIServer.shutdown_request

    def verify_request(self: Any, request: Any, client_address: Any) -> bool:
        if isinstance(request, socket.socket):
            _connections.opened(request)
        return bool(verify(self, request, client_address))

    def close(self: Any, request: Any) -> None:
        try:
            shutdown_request(self, request)
        finally:
            _connections.closed(request)

    basehttp.WSGIServer.verify_request = verify_request
    basehttp.WSGIServer.shutdown_request = close

    setup = basehttp.WSGIRequestHandler.setup

    def setup_reader(self: Any) -> None:
        setup(self)
        entry = _connections.open.get(id(self.connection))
        if entry is not None and entry.socket is self.connection:
            self.rfile.close()  # the file setup() made; the socket stays open
            self.rfile = io.BufferedReader(_MarkingReader(self.connection, entry))

    basehttp.WSGIRequestHandler.setup = setup_reader
    serve_one = basehttp.ServerHandler.run

    def run(self: Any, application: Any) -> None:
        try:
            serve_one(self, application)
        finally:
            entry = _connections.open.get(id(self.request_handler.connection))
            if entry is not None:
                entry.busy = False
                entry.quiet_since = time.monotonic()
            if _connections.closing:
                self.request_handler.close_connection = True  # no keep-alive into a stopping process

    basehttp.ServerHandler.run = run


_connections = _Connections()

DRAIN_SECONDS = 30.0
"""A restart waits this long at most for the connections in flight."""

QUIET_SECONDS = 0.25
"""A connection on which no request has come for this long is closed at a restart; one accepted
or answered more recently may still be sending its request."""

_servers: list[Any] = []
"""The server of this process, adopting the reloader process's socket."""
