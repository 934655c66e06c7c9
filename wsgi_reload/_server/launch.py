"""The workers' side of the watcher process: start it unless one runs, keep it running, and log
the lines it could not.

Every worker imports this while it boots, so it imports nothing of the watcher's own side
(:mod:`wsgi_reload._server.watcher_process`): a new worker's boot is on the path from a save to
the first request served with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence

from .._check import spawn
from .._core.settings import Settings
from . import runtime

# The watcher's own logger: the lines a worker logs for it (see _follow) read as its.
log = logging.getLogger("wsgi_reload.watcher_process")

LOCK_NAME = "watcher.lock"
LOCK_FD = 3
"""The descriptor the new watcher finds the locked ``watcher.lock`` on."""

GUNICORN_LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
UWSGI_LOG_FORMAT = "%(message)s"


def ensure_watcher(runtime_dir: str, *, master_pid: int, signal_name: str, server: str, settings: Settings,
                   loaded_at_ns: int, log_format: str = GUNICORN_LOG_FORMAT, replace: str = "signal",
                   nudge_signal: str | None = None, config_files: Sequence[str] = (), patch: bool = False,
                   workers: int | None = None, log_file: str | None = None, spare: bool = False) -> bool:
    """Start this server's watcher process unless one runs; True when this call started it.

    :param replace: how a reload replaces the workers: ``"signal"`` sends the master
        ``signal_name``, and then ``nudge_signal`` (when given) as each old worker exits
        (:func:`wsgi_reload._server.strategies.nudge_as_workers_exit`); any other is a strategy of
        :data:`wsgi_reload._server.strategies.STRATEGIES` (``swap``, ``reexec``, ``chain``).
    :param config_files: the server's own config: a change to one is answered by ``signal_name``
        alone (gunicorn re-reads its config only on HUP).
    :param patch: try to patch a change into the running workers first
        (:mod:`wsgi_reload._hot.transport`; the workers apply it before their next request).
    :param workers: how many workers the server runs, for the one "workers up" line.
    :param spare: keep a spare worker waiting for the next save (:mod:`wsgi_reload._server.spare`;
        gunicorn's swap, for Django with no gunicorn config).
    :param log_file: the server's log file; standard error (inherited) when None.

    The caller takes the server's watcher lock before it spawns, and the watcher inherits the
    locked descriptor, so of several workers racing here exactly one starts a watcher. The
    watcher forks once more and its first process exits at once (reaped here), so no worker is
    left with a zombie child when a watcher ends.
    """
    lock = runtime.open_lock(runtime_dir, LOCK_NAME)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        config = {
            "runtime_dir": runtime_dir,
            "master_pid": master_pid,
            "signal": signal_name,
            "replace": replace,
            "nudge": nudge_signal,
            "server": server,
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(settings).items()},
            "loaded_at_ns": loaded_at_ns,
            "cwd": os.getcwd(),
            "sys_path": [p or os.getcwd() for p in sys.path],
            "log_format": log_format,
            "config_files": [os.path.abspath(p) for p in config_files],
            "patch": patch,
            "workers": workers,
            "spare": spare,
            "log_file": log_file,
        }
        package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        bootstrap = (f"import sys; sys.path.insert(0, {package_parent!r}); "
                     "from wsgi_reload._server.watcher_process import main; main()")
        with spawn.data_file(json.dumps(config).encode()) as stdin:
            first = spawn.spawn([spawn.python_executable(), "-I", "-c", bootstrap], env=os.environ, stdin=stdin,
                                stdout=2, stderr=2, extra_fd=lock)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(first, 0)  # it forks the watcher and exits
        return True
    finally:
        os.close(lock)  # the watcher's copy of the descriptor keeps the lock


CHANNEL_NAME = "watcher.sock"
"""The watcher's Unix socket in the runtime directory, where every worker's keeper stays connected."""

RETRY_SECONDS = 1.0
"""The longest a keeper waits before it looks again for a watcher that is starting, or for a
runtime directory that is not there."""

KEEPER_THREAD = "wsgi_reload"
"""The keeper thread's name in the operating system (``ps -L``, ``top -H``)."""

_keeper: threading.Thread | None = None
_connected = False
"""Whether this worker's keeper is connected to the watcher now."""
_news: threading.Event | None = None
"""Set by the keeper when the watcher says the generations changed. Made with the keeper, in
the worker: under gevent, once the worker has patched ``threading``, so that waiting on it
lets the keeper's greenlet run."""
_republish: Callable[[], object] | None = None
"""What the keeper calls when the watcher made the runtime directory again; the last caller of
:func:`keep_watcher_running` that names one sets it (a spare's keeper goes on for the worker
the spare becomes)."""


def _republish_now() -> None:
    if _republish is not None:
        _republish()


def wake() -> None:
    """End a :func:`wait_for_news` under way now (from a signal handler in the same worker)."""
    if _news is not None:
        _news.set()


def wait_for_news(seconds: float, unconnected: float = 0.005) -> None:
    """In a worker: sleep until the watcher says the store's generations changed (one was
    published, or a trial withdrawn), or ``seconds`` pass; ``unconnected`` seconds at most
    while this worker's keeper is not connected to it. A worker holding for a verdict so hears
    it at once, not at a poll."""
    news = _news
    if _connected and news is not None:
        news.wait(seconds)
        news.clear()
    else:
        time.sleep(min(seconds, unconnected))


def keep_watcher_running(runtime_dir: str, start: Callable[[], bool],
                         republish: Callable[[], object] | None = None) -> None:
    """In a worker: from now on, start the server's watcher process again whenever it stops
    (``start`` is :func:`ensure_watcher` with this server's arguments), log the lines the
    watcher hands over, and call ``republish`` (which writes this worker's record again if it is
    missing) when the watcher says it made the runtime directory again. A ``kill -9`` of the
    watcher, an out-of-memory kill or a temp-file cleaner must not end reloading silently.

    A thread (a greenlet under gevent) stays connected to the watcher's socket and sleeps in
    the kernel until the watcher writes to it or ends (the connection's end of file): an idle
    server costs nothing here, and a watcher that stopped is started again at once.
    """
    global _keeper, _news, _republish
    if republish is not None or _keeper is None or getattr(_keeper, "pid", None) != os.getpid():
        _republish = republish
    if _keeper is not None and _keeper.is_alive() and getattr(_keeper, "pid", None) == os.getpid():
        return
    news = _news = threading.Event()

    def run() -> None:
        global _connected
        _name_this_thread(KEEPER_THREAD)
        wait = 0.05
        while True:
            try:
                channel = _connect(runtime_dir)
                if channel is None:
                    # A watcher starting (it listens once its interpreter is up), none (started
                    # here), or no runtime directory: the watcher makes it again, or the server
                    # is stopping. A watcher that cannot listen said so; it is looked for each second.
                    if runtime.is_private_dir(runtime_dir):
                        if start():
                            log.warning("wsgi_reload: this server's watcher process had stopped; worker %d "
                                        "started a new one", os.getpid())
                        else:
                            _republish_now()
                    time.sleep(wait)
                    wait = min(wait * 2, RETRY_SECONDS)
                    continue
                wait = 0.05
                _connected = True
                try:
                    with channel:
                        _follow(channel, _republish_now, news)
                finally:
                    _connected = False
                    news.set()  # whoever waits for news asks the store again
            except Exception:
                log.exception("wsgi_reload: keeping the watcher process running failed")
                time.sleep(RETRY_SECONDS)

    _keeper = threading.Thread(target=run, name="wsgi_reload-keeper", daemon=True)
    _keeper.pid = os.getpid()  # type: ignore[attr-defined]
    _keeper.start()


def _name_this_thread(name: str) -> None:
    """Name this thread for the operating system, unless it is the process's main one (a
    greenlet under gevent runs on it)."""
    native = threading.get_native_id()
    if native != os.getpid():
        with contextlib.suppress(OSError):
            with open(f"/proc/self/task/{native}/comm", "w") as comm:
                comm.write(name[:15])


def channel_address(runtime_dir: str, directory_fd: int | None = None) -> str:
    """The watcher socket's address: its path, or, when that is too long for a Unix socket
    address (108 bytes), the same file reached through ``directory_fd``, a descriptor on the
    runtime directory, in ``/proc/self/fd``."""
    path = os.path.join(runtime_dir, CHANNEL_NAME)
    if len(os.fsencode(path)) < 100 or directory_fd is None:
        return path
    return f"/proc/self/fd/{directory_fd}/{CHANNEL_NAME}"


def _connect(runtime_dir: str) -> socket.socket | None:
    """A connection to the server's watcher, or None when none listens."""
    try:
        directory = runtime.open_dir(runtime_dir)
    except OSError:
        return None
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        channel.connect(channel_address(runtime_dir, directory))
    except OSError:
        channel.close()
        return None
    finally:
        os.close(directory)
    return channel


def _follow(channel: socket.socket, republish: Callable[[], object] | None, news: threading.Event) -> None:
    """Carry out what the watcher writes, one JSON object a line, until it ends: ``{"log":
    [level, message]}`` (a line to log through the server's logger, which the watcher can no
    longer reach), ``{"republish": true}`` (the runtime directory was made again) and
    ``{"generations": true}`` (see :func:`wait_for_news`)."""
    pending = b""
    while True:
        try:
            data = channel.recv(65536)
        except OSError:
            data = b""  # reset: a watcher that ended before it accepted this connection
        if not data:
            return  # the watcher ended, or let this keeper go: connect again
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            entry = message.get("log")
            if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int):
                log.log(entry[0], "%s", entry[1])
            if message.get("republish") is True and republish is not None:
                republish()
            if message.get("generations") is True:
                news.set()
