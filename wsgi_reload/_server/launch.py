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
import sys
import threading
import time
from collections.abc import Callable, Sequence

from .._check import spawn
from .._core.settings import Settings
from . import runtime

# The watcher's own logger: the lines a worker logs for it (forward_pending_lines) read as its.
log = logging.getLogger("wsgi_reload.watcher_process")

LOCK_NAME = "watcher.lock"
LOCK_FD = 3
"""The descriptor the new watcher finds the locked ``watcher.lock`` on."""

GUNICORN_LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
UWSGI_LOG_FORMAT = "%(message)s"


def ensure_watcher(runtime_dir: str, *, master_pid: int, signal_name: str, server: str, settings: Settings,
                   loaded_at_ns: int, log_format: str = GUNICORN_LOG_FORMAT, replace: str = "signal",
                   nudge_signal: str | None = None, config_files: Sequence[str] = (), patch: bool = False,
                   workers: int | None = None, log_file: str | None = None) -> bool:
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


HEAL_SECONDS = 1.0
"""How often each worker makes sure its server's watcher process runs."""

_keeper: threading.Thread | None = None


def keep_watcher_running(runtime_dir: str, start: Callable[[], bool],
                         republish: Callable[[], object] | None = None) -> None:
    """In a worker: from now on, every :data:`HEAL_SECONDS`, start the server's watcher process
    again if it has gone (``start`` is :func:`ensure_watcher` with this server's arguments), and
    call ``republish`` (which writes this worker's record again if it is missing) once the
    runtime directory is back after a removal. A ``kill -9`` of the watcher, an out-of-memory
    kill or a temp-file cleaner must not end reloading silently."""
    global _keeper
    if _keeper is not None and _keeper.is_alive() and getattr(_keeper, "pid", None) == os.getpid():
        return

    def run() -> None:
        while True:
            time.sleep(HEAL_SECONDS)
            if not runtime.is_private_dir(runtime_dir):
                continue  # removed: the watcher makes it again (or the server is stopping)
            try:
                forward_pending_lines(runtime_dir)
                if republish is not None:
                    republish()
                if start():
                    log.warning("wsgi_reload: this server's watcher process had stopped; worker %d started a new "
                                "one", os.getpid())
            except Exception:
                log.exception("wsgi_reload: starting the watcher process again failed")

    _keeper = threading.Thread(target=run, name="wsgi_reload-keeper", daemon=True)
    _keeper.pid = os.getpid()  # type: ignore[attr-defined]
    _keeper.start()


PENDING_LOG = "log.pending"
"""Lines the watcher could not write to the server's log, for a worker to log for it."""


def forward_pending_lines(runtime_dir: str) -> None:
    """In a worker: log, through the server's logger, the lines the watcher could not write
    (see :class:`_ServerLogHandler`); the one worker that takes the file first logs them."""
    path = os.path.join(runtime_dir, PENDING_LOG)
    taken = f"{path}.{os.getpid()}"
    try:
        os.rename(path, taken)  # atomic: no line is logged twice, none lost to a later append
    except OSError:
        return
    data = runtime.read_bytes(runtime_dir, os.path.basename(taken), limit=1024 * 1024) or b""
    with contextlib.suppress(OSError):
        os.unlink(taken)
    for raw in data.decode("utf-8", "replace").splitlines():
        with contextlib.suppress(ValueError, TypeError):
            level, message = json.loads(raw)
            log.log(int(level), "%s", message)
