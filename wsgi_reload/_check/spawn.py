"""Starting helper interpreters without pipes that a forking server could inherit.

``subprocess.Popen`` waits on an error pipe until every copy of its write end is closed.
When a process forks (a server forking a worker, the watcher's warm process forking a check)
while another of its threads is inside ``Popen``, the child keeps a copy and ``Popen`` hangs
for the child's whole life (the same holds for output pipes read to EOF). ``os.posix_spawn``
reports exec errors without a pipe, and the helpers here hand data in and out through
unlinked temporary files, which nobody waits on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import IO


def python_executable() -> str:
    """A Python interpreter, even where ``sys.executable`` is a server binary (uWSGI)."""
    exe = sys.executable
    if exe and os.path.basename(exe).startswith("python") and os.access(exe, os.X_OK):
        return exe
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for prefix in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix):
        for name in (version, "python3", "python"):
            candidate = os.path.join(prefix, "bin", name)
            if os.access(candidate, os.X_OK):
                return candidate
    return shutil.which(version) or shutil.which("python3") or "python3"


def data_file(data: bytes = b"") -> IO[bytes]:
    """An unlinked temporary file holding ``data``, positioned at its start."""
    f = tempfile.TemporaryFile()
    if data:
        f.write(data)
        f.flush()
        f.seek(0)
    return f


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdin: IO[bytes] | None = None,
    stdout: IO[bytes] | int | None = None,
    stderr: IO[bytes] | int | None = None,
    extra_fd: int | None = None,
    new_session: bool = True,
) -> int:
    """Start ``argv`` and return its pid; ``extra_fd`` appears as fd 3 in the child, which
    inherits no other descriptor besides 0, 1 and 2 (see :func:`inheritable_fds`).

    ``stdout``/``stderr`` are files or descriptors (None: /dev/null). With ``new_session`` the
    child leads its own process group, so :func:`kill_group` reaches what it starts in turn.
    """
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        actions: list[tuple[int, ...]] = []
        for target, source in ((0, stdin), (1, stdout), (2, stderr)):
            fd = devnull if source is None else source if isinstance(source, int) else source.fileno()
            actions.append((os.POSIX_SPAWN_DUP2, fd, target))
        if extra_fd is not None:
            actions.append((os.POSIX_SPAWN_DUP2, extra_fd, 3))
        keep = {0, 1, 2} | ({3} if extra_fd is not None else set())
        for attempt in range(3):
            closes = [(os.POSIX_SPAWN_CLOSE, fd) for fd in inheritable_fds() if fd not in keep]
            try:
                return os.posix_spawn(argv[0], list(argv), dict(env), file_actions=actions + closes,
                                      setsid=new_session)
            except OSError as exc:
                # Another thread closed one of those descriptors in between: list them again.
                if exc.errno != errno.EBADF or attempt == 2:
                    raise
        raise AssertionError("unreachable")
    finally:
        os.close(devnull)


def inheritable_fds() -> list[int]:
    """This process's descriptors that a program it starts would inherit (no close-on-exec flag).

    Python opens its own with the flag; these are the host server's: uWSGI and gunicorn keep
    their listening sockets inheritable for their own re-exec. A helper that kept one would
    hold the port after the server stops, and would make a uWSGI master that re-executes
    itself fail to bind its ``--http`` router's port again (EADDRINUSE: the server is gone).
    Linux (``/proc/self/fd``); elsewhere none are listed.
    """
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return []
    found = []
    for name in names:
        fd = int(name)
        try:
            if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                found.append(fd)
        except OSError:
            continue  # the listing's own descriptor, closed by now
    return found


SOURCE_ENV = "_WSGI_RELOAD_SOURCE"


def python_source(title: str, source: str, env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run ``source`` in a fresh, isolated interpreter (``-I``:
    no user site, no ``PYTHON*`` variables, no script directory on ``sys.path``).

    The source travels in the environment, which the new process takes out of its own before
    anything else runs, so ``ps`` shows a short, honest command line with ``title`` in it,
    not kilobytes of code; and it is the source this process loaded, even if the installed
    package has been upgraded on disk since.
    """
    bootstrap = f"# {title}\nimport os\nexec(compile(os.environ.pop({SOURCE_ENV!r}), {title!r}, 'exec'))"
    return [python_executable(), "-I", "-B", "-c", bootstrap], {**env, SOURCE_ENV: source}


def wait_exit(pid: int, timeout: float) -> tuple[bool, int | None]:
    """Wait up to ``timeout`` seconds for child ``pid`` to exit, without reaping it.

    Returns (exited, return code). The code is negative for a signal, and None when it
    cannot be known: another part of the process reaped the child (gunicorn's master reaps
    every child it sees exit). The leader stays a zombie until :func:`kill_group`, so its
    process group id cannot be reused in between.
    """
    deadline = time.monotonic() + timeout
    pidfd = None
    if hasattr(os, "pidfd_open"):
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(pid)
    try:
        while True:
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return True, None
            if info is not None:
                code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
                return True, code
            left = deadline - time.monotonic()
            if left <= 0:
                return False, None
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(0.01, left))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def kill_group(pid: int) -> None:
    """SIGKILL everything a check interpreter ``pid`` started (:func:`kill_tree`), and reap the
    leader if it is still ours."""
    kill_tree(pid)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s descendants, then the process group it leads. A daemon the app started
    with ``setsid()`` left the group, but the check interpreter is its subreaper, so it is a
    descendant (Linux); killed first, it cannot move on to another parent."""
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """The descendants of ``pid``, from /proc (none where it cannot be read)."""
    found: list[int] = []
    pending = [pid]
    while pending and len(found) < 10_000:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children", encoding="ascii") as f:
                    children = [int(p) for p in f.read().split()]
            except (OSError, ValueError):
                continue
            found.extend(children)
            pending.extend(children)
    return found
