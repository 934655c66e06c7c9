"""Linux inotify through ctypes: a thread that sleeps in ``poll()`` until a watched directory changes.

Nothing wakes while nothing changes: no timer, no GIL taken on a step. The kernel queues
the events of every watched directory on one descriptor and says so when its queue
overflows (``IN_Q_OVERFLOW``), so a lost event is itself an event. See inotify(7).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable

log = logging.getLogger("wsgi_reload.inotify")

IGNORED, WAKES, HOLDS = 0, 1, 2
"""What the ``relevant(directory, name)`` of :class:`DirectoryWatcher` says of an event: nothing;
wake the monitor (a worker's record in the runtime directory); wake it and hold its settle
window open (a write to a watched file)."""

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

DIRECTORY_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
                  | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
"""Every way a file in a directory, or the directory itself, can change; symlink swaps are moves."""

EVENT_HEADER = struct.Struct("iIII")
"""struct inotify_event: wd, mask, cookie, len, then ``len`` bytes of name."""

MAX_WATCHES_FILE = "/proc/sys/fs/inotify/max_user_watches"


class WatchLimitReached(OSError):
    """inotify_add_watch said ENOSPC: the user's ``fs.inotify.max_user_watches`` is used up."""


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


def unavailable() -> str | None:
    """Why inotify cannot be used here, or None."""
    if _libc() is None:
        return "inotify needs Linux and a C library that has it"
    return None


def max_user_watches() -> int | None:
    """The per-user watch limit, where the kernel tells it."""
    try:
        with open(MAX_WATCHES_FILE, encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


class DirectoryWatcher:
    """Calls ``on_change()`` as changes arrive in any of a set of directories (not recursive;
    a burst read at once is one call). The set can change while it runs: only the difference is added or removed."""

    name = "inotify"
    rescan_seconds = 300.0
    """A full rescan this seldom: the kernel reports a lost event (a queue overflow) as an
    event, so the rescan only guards against what no event covers."""

    def __init__(self, on_change: Callable[[], object], name: str = "wsgi_reload-inotify",
                 relevant: Callable[[str, str], int] = lambda directory, name: HOLDS) -> None:
        libc = _libc()
        if libc is None:
            raise OSError(errno.ENOSYS, "inotify is not available")
        self._libc = libc
        self._fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._on_change = on_change
        self._relevant = relevant
        self._name = name
        self._lock = threading.Lock()
        self._watches: dict[str, int] = {}
        self._paths: dict[int, str] = {}
        self._stop_read, self._stop_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._last_event = 0.0

    def last_event(self) -> float:
        """The :func:`time.monotonic` time the latest event that ``relevant(directory, name)``
        says :data:`HOLDS` was read (0.0 before any): the monitor measures its settle window
        from it, since every write to a watched file moves it. An event it rejects (a request
        log, a database file beside the code) neither moves it nor wakes anyone; one that only
        :data:`WAKES` (a worker's record in the runtime directory) wakes the monitor."""
        return self._last_event

    @property
    def clock(self) -> Callable[[], float]:
        return self.last_event

    @property
    def directories(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._watches)

    def set_directories(self, directories: Iterable[str]) -> bool:
        """Watch exactly these directories; True when one was added (what changed in it before
        the watch has no event, so the caller looks once more). Directories that vanished or
        cannot be read are skipped. Raises :class:`WatchLimitReached` when the limit is hit."""
        wanted = set(directories)
        added = False
        with self._lock:
            for directory in set(self._watches) - wanted:
                wd = self._watches.pop(directory)
                self._paths.pop(wd, None)
                self._libc.inotify_rm_watch(self._fd, wd)
            for directory in sorted(wanted - set(self._watches)):
                wd = self._libc.inotify_add_watch(self._fd, os.fsencode(directory), DIRECTORY_MASK)
                if wd >= 0:
                    self._watches[directory] = wd
                    self._paths[wd] = directory
                    added = True
                    continue
                err = ctypes.get_errno()
                if err == errno.ENOSPC:
                    raise WatchLimitReached(err, f"the inotify watch limit is reached after {len(self._watches)} "
                                            f"directories (fs.inotify.max_user_watches={max_user_watches()})")
                if err not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM):
                    raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")
        return added

    def start(self) -> DirectoryWatcher:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        try:
            os.write(self._stop_write, b"x")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        for fd in (self._fd, self._stop_read, self._stop_write):
            try:
                os.close(fd)
            except OSError:
                pass

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._stop_read, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}  # no timeout: asleep until the kernel has news
            if self._stop_read in ready:
                return
            relevance = self._drain()
            if not relevance:
                continue
            if relevance == HOLDS:
                self._last_event = time.monotonic()
            try:
                self._on_change()
            except Exception:
                log.exception("wsgi_reload: handling a file event failed")

    def _drain(self) -> int:
        """Read every queued event; the most any of them matters (:data:`HOLDS` first)."""
        relevant = IGNORED
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return relevant
            except OSError:
                return relevant
            if not data:
                return relevant
            offset = 0
            while offset + EVENT_HEADER.size <= len(data):
                wd, mask, _cookie, length = EVENT_HEADER.unpack_from(data, offset)
                raw = data[offset + EVENT_HEADER.size:offset + EVENT_HEADER.size + length]
                offset += EVENT_HEADER.size + length
                if mask & IN_Q_OVERFLOW:
                    log.info("wsgi_reload: the inotify event queue overflowed; a full scan follows")
                    relevant = HOLDS
                elif mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                    self._forget(wd, moved=bool(mask & IN_MOVE_SELF))
                    relevant = HOLDS
                elif relevant != HOLDS:
                    name = os.fsdecode(raw.rstrip(b"\0"))
                    directory = self._paths.get(wd)
                    said = HOLDS if directory is None or not name else self._relevant(directory, name)
                    if mask & IN_ISDIR and said != WAKES:
                        said = HOLDS  # a new package directory, say: it must be watched
                    relevant = max(relevant, said)

    def _forget(self, wd: int, moved: bool) -> None:
        """A watched directory was deleted or moved away: the path may come back as another
        directory (``rm -rf app; cp -r new app``), which the next :meth:`set_directories` must
        watch afresh."""
        with self._lock:
            directory = self._paths.pop(wd, None)
            if directory is not None and self._watches.get(directory) == wd:
                del self._watches[directory]
            if moved:
                self._libc.inotify_rm_watch(self._fd, wd)  # it would follow the directory elsewhere
