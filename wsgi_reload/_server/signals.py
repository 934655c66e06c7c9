"""Processes to signal, held so that a reused pid is never signalled.

Where the platform has them (Linux 5.3+) a :class:`Target` holds a pidfd: a signal sent
through it reaches that very process or fails, even after its pid was given to another
one. Elsewhere the process's start time is recorded and checked before each signal.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import time

from .._check.probe import listening_inodes, socket_fds


class TargetError(Exception):
    """The process cannot be used as a target; the message says why and what to do."""


PID_MAX = 4_194_304
"""Linux's largest pid (``/proc/sys/kernel/pid_max`` can be at most 2**22)."""


class TargetGone(TargetError):
    """The process has exited (its pid may belong to another process by now)."""


class Target:
    """One live process of this user, to signal and to wait for."""

    def __init__(self, pid: int, description: str | None = None, *, may_be_init: bool = False) -> None:
        """:param may_be_init: pid 1 is the server (its master in a container, as the watcher
            process learns from the master itself); a pid read from a file never is."""
        self.pid = pid
        self.description = description or f"pid {pid}"
        if pid <= 1 and pid != os.getpid() and not (may_be_init and pid == 1):
            raise TargetError(f"refusing to signal {self.description}: not a server process")
        self._pidfd: int | None = None
        if hasattr(os, "pidfd_open"):
            try:
                self._pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                raise TargetGone(f"{self.description} is not running") from None
            except OSError:
                self._pidfd = None  # an old kernel, or a seccomp filter: fall back to the start time
        self.started = start_time(pid)
        if self.started is None:
            self.close()
            raise TargetGone(f"{self.description} is not running")
        owner = process_owner(pid)
        if owner is not None and owner != os.geteuid():
            self.close()
            raise TargetError(f"{self.description} belongs to another user; run wsgi-reload as that user")
        if process_state(pid) == "Z":
            self.close()
            raise TargetGone(f"{self.description} has exited")

    def send(self, signum: int) -> None:
        """Signal this process; :class:`TargetError` when it has exited (its pid may be another's now)."""
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signum)
                return
            if start_time(self.pid) != self.started:
                raise ProcessLookupError
            os.kill(self.pid, signum)
        except ProcessLookupError:
            raise TargetGone(f"{self.description} has exited") from None

    def alive(self) -> bool:
        """True while the process runs (a zombie counts as exited)."""
        if self._pidfd is not None:
            readable, _, _ = select.select([self._pidfd], [], [], 0)
            return not readable
        return start_time(self.pid) == self.started and process_state(self.pid) not in (None, "Z")

    def wait_exit(self, timeout: float | None = None, wake_fd: int | None = None) -> bool:
        """Block until the process exits or ``timeout`` passes; True when it exited.

        :param wake_fd: the read end of a pipe: something written to it ends the wait early
            (False), and is read.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._pidfd is not None:
            readable, _, _ = select.select([self._pidfd, *([] if wake_fd is None else [wake_fd])], [], [], timeout)
            if self._pidfd in readable:
                return True
            _drain(wake_fd, readable)
            return False
        while self.alive():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            readable, _, _ = select.select([] if wake_fd is None else [wake_fd], [], [], 0.2)
            if readable:
                _drain(wake_fd, readable)
                return False
        return True

    def close(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None


def _drain(fd: int | None, readable: list[int]) -> None:
    if fd is not None and fd in readable:
        with contextlib.suppress(OSError):
            os.read(fd, 4096)


def from_pidfile(path: str) -> Target:
    """The process a pidfile names, refusing a pidfile others could have written and a reused pid.

    The pidfile must be owned by this user or root and writable by no one else, and the process
    must have started before the pidfile was last written (else the pid was reused).
    """
    try:
        # O_NONBLOCK: opening a FIFO another user put in the pidfile's place must not block.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.strerror and os.path.islink(path):
            raise TargetError(f"pidfile {path} is a symlink; point --pidfile at the file itself") from None
        raise TargetError(f"cannot read pidfile {path}: {exc.strerror}; is the server running?") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TargetError(f"pidfile {path} is not a regular file; point --pidfile at the file the server writes")
        try:
            raw = os.read(fd, 64)
        except OSError as exc:
            raise TargetError(f"cannot read pidfile {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    text = raw.decode("ascii", errors="replace").strip()
    if st.st_uid not in (os.geteuid(), 0):
        raise TargetError(f"pidfile {path} belongs to another user (uid {st.st_uid}); refusing to trust it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise TargetError(f"pidfile {path} is writable by other users; chmod go-w it to use it")
    if not text.isascii() or not text.isdigit() or len(text) > 10 or int(text) > PID_MAX:
        raise TargetError(f"pidfile {path} holds {text[:20]!r}, not a pid")
    pid = int(text)
    try:
        target = Target(pid, f"pid {pid} from {path}")
    except TargetGone as exc:
        raise TargetGone(f"{exc} (stale pidfile)") from None
    started = start_epoch(pid)
    # Start times are clock ticks from a boot time in whole seconds: allow a second of slack.
    if started is not None and started > st.st_mtime + 1.5:
        target.close()
        raise TargetError(f"pid {pid} from {path} started after the pidfile was written: "
                          "the pid was reused (stale pidfile)")
    return target


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (None when it does not exist).

    Without /proc (not Linux) only existence can be told; the pid itself stands in.
    """
    fields = _stat_fields(pid)
    if fields is not None and len(fields) > 19:
        return int(fields[19])
    if os.path.isdir("/proc/self"):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def start_epoch(pid: int) -> float | None:
    """When the process started, in seconds since the epoch (Linux only).

    Its start is in clock ticks since boot; its age is the time since boot now
    (``/proc/uptime``) less that, and the epoch time is now less its age. (``btime`` in
    ``/proc/stat`` is whole seconds and does not follow a wall clock that was stepped since
    boot, which a paused and resumed virtual machine does: up to seconds off.)
    """
    ticks = start_time(pid)
    if ticks is None:
        return None
    try:
        with open("/proc/uptime", encoding="ascii") as f:
            since_boot = float(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return time.time() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))


def process_state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def exited(pid: int) -> bool:
    """True once ``pid`` has exited: gone, or a zombie its parent has not reaped yet (Linux)."""
    return process_state(pid) in (None, "Z", "X")


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a process of another user counts; a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not exited(pid)


def process_owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def holds_listener(pid: int) -> bool | None:
    """Whether ``pid`` holds a listening socket, TCP or Unix (Linux), or None where that cannot be read."""
    try:
        sockets = socket_fds(pid)
    except OSError:  # gone, not ours to read, or not Linux
        return None
    return bool(sockets) and not listening_inodes(pid=pid, unix=True).isdisjoint(sockets)
