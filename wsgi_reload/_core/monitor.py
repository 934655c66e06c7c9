"""Runs a scanner in a daemon thread and reports settled batches of changes.

Two backends share one loop: ``poll`` scans every ``interval`` seconds; ``events`` sleeps
until a watched directory changes, with a slow safety rescan. The events come from the first
entry of :data:`EVENT_SOURCES` that opens: inotify itself (:mod:`.inotify`, standard library
only, asleep while nothing changes), then ``watchfiles``. ``auto`` picks events and falls
back to polling with one log line.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from . import inotify
from .scanner import Change, Scanner

log = logging.getLogger("wsgi_reload.monitor")

EVENTS_RESCAN_SECONDS = 20.0
"""With watchfiles, a full rescan this often; new module directories are also picked up when a record changes."""

MAX_RESTARTS = 5
"""A watcher thread that keeps failing gives up loudly rather than spinning."""

WRITER_POLL_SECONDS = 0.05
"""How often a file still open for writing is looked at again when no settle window is set."""

WRITTEN_POLL_SECONDS = 0.005
"""How often :meth:`Monitor.written` looks again at a file still open for writing (a save is
usually one write and a close, well under this)."""

MAX_SETTLE_SECONDS = 3.0
"""A file that never stops changing (a log under a glob) must not hold a batch back forever."""

NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "afs", "ceph", "glusterfs", "lustre", "gpfs", "vboxsf"}
)
"""inotify starts on these but never hears changes made by other machines."""

BatchHandler = Callable[[Sequence[Change]], object]


class EventSource(Protocol):
    """A backend of file events: it calls the monitor's ``wake`` when a watched directory
    changes; the monitor then scans. Opened by an entry of :data:`EVENT_SOURCES`."""

    @property
    def name(self) -> str: ...

    @property
    def rescan_seconds(self) -> float:
        """How often the monitor rescans anyway, for what no event covers."""

    @property
    def clock(self) -> Callable[[], float] | None:
        """The monotonic time of the latest relevant event, where the backend knows it (the
        settle window is then measured from it); None: from the last scan that found nothing."""

    def set_directories(self, directories: set[str]) -> bool:
        """Watch exactly these directories; True when one was added (look once more)."""

    def stop(self) -> None: ...


class Unavailable(Exception):
    """An event backend does not exist here (the next one of the table is tried); the message
    says why."""


class EventsFailed(Exception):
    """An event backend that exists here could not start (a watch limit): the monitor polls, and
    tries no other backend, which would meet the same limit."""


EventOpener = Callable[[set[str], Callable[[], object], str, Callable[[str, str], int]], EventSource]
"""Opens a backend on (directories, wake, thread name, relevant(directory, name): see
:data:`wsgi_reload._core.inotify.HOLDS`)."""


def _open_inotify(dirs: set[str], wake: Callable[[], object], name: str,
                  relevant: Callable[[str, str], int]) -> EventSource:
    reason = inotify.unavailable()
    if reason is not None:
        raise Unavailable(reason)
    try:
        watcher = inotify.DirectoryWatcher(wake, name, relevant=relevant)
    except OSError as exc:
        raise EventsFailed(exc.strerror or str(exc)) from None
    try:
        watcher.set_directories(dirs)
    except OSError as exc:
        watcher.stop()
        raise EventsFailed(exc.strerror or str(exc)) from None
    return watcher.start()


def _open_watchfiles(dirs: set[str], wake: Callable[[], object], name: str,
                     relevant: Callable[[str, str], int]) -> EventSource:
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        raise Unavailable("watchfiles is not installed: pip install 'wsgi_reload[fast]'") from None
    watcher = _WatchfilesSource(wake, dirs, name)
    reason = watcher.start()
    if reason is not None:
        raise EventsFailed(reason)
    return watcher


EVENT_SOURCES: dict[str, EventOpener] = {"inotify": _open_inotify, "watchfiles": _open_watchfiles}
"""The file-event backends, tried in this order (``backend = "auto"`` or ``"events"``); polling
is the fallback when none starts. inotify itself needs only the standard library (ctypes)."""


def settle(
    scan: Callable[[], list[Change]],
    changes: list[Change],
    quiet_seconds: float,
    sleep: Callable[[float], object] = time.sleep,
    last_event: Callable[[], float] | None = None,
    since: float | None = None,
) -> list[Change]:
    """Keep scanning until the files have been quiet for ``quiet_seconds`` and none of them is
    still open for writing; returns the whole batch.

    An editor that truncates a file, writes half, pauses and writes the rest leaves a file
    that may even import; the kernel knows it is still open for writing (see
    :func:`open_for_writing`). With ``last_event`` (the monotonic time of the latest file
    event in any watched directory) quiet is measured from that event, which every write
    moves; without it, from the last scan that found nothing new. ``since`` is when the batch
    was found (``time.monotonic()``; default: now). ``sleep`` returning True (a stop event's
    ``wait``) ends the wait early.
    """
    batch = {c.path: c for c in changes}
    found = time.monotonic() if since is None else since
    deadline = found + max(MAX_SETTLE_SECONDS, 10 * quiet_seconds)

    def quiet_for() -> float:
        # From the latest event, but never from before the batch was found: the scan can see a
        # write whose event the watcher thread has not read yet.
        return time.monotonic() - max(found, last_event()) if last_event is not None else 0.0

    while True:
        busy = [path for path in batch if open_for_writing(path)]
        if last_event is None:
            if quiet_seconds <= 0 and not busy:
                break
            pause = quiet_seconds if quiet_seconds > 0 else WRITER_POLL_SECONDS
        else:
            pause = quiet_seconds - quiet_for()
            if busy:
                pause = max(pause, WRITER_POLL_SECONDS)
        if pause > 0 and sleep(pause):
            break
        more = scan()
        if not more and not busy and (last_event is None or quiet_for() >= quiet_seconds):
            break
        for change in more:
            earlier = batch.get(change.path)
            if earlier is None or change.kind == "deleted" or earlier.kind == "deleted":
                batch[change.path] = change
        if time.monotonic() > deadline:
            still = f" ({busy[0]} is still open for writing)" if busy else ""
            log.warning("wsgi_reload: files are still changing after %.1f s%s; reporting them now",
                        MAX_SETTLE_SECONDS, still)
            break
    return sorted(batch.values())


def open_for_writing(path: str) -> bool:
    """True when some process has ``path`` open for writing (Linux; False where it cannot be told).

    A read lease can only be taken on a file nobody has open for writing (fcntl(2),
    F_SETLEASE). Taking one needs the file's owner or CAP_LEASE; elsewhere this says False
    and the settle window alone applies. The lease is dropped at once; should a writer open
    the file in that instant, the kernel's lease-break signal is SIGURG, which is ignored by
    default, instead of SIGIO, which would end the process.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except BlockingIOError:
        return True
    except (OSError, AttributeError):
        return False
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


class Monitor:
    """Calls ``on_batch(changes)`` once per settled batch, from a daemon thread.

    With ``settles`` False it calls ``on_batch`` as soon as a scan finds changes, and the
    handler settles the batch itself through :meth:`settle` (the gate checks the code
    meanwhile).
    """

    def __init__(
        self,
        scanner: Scanner,
        on_batch: BatchHandler,
        *,
        wake_dirs: Iterable[str] = (),
        wakes_on: Callable[[str], bool] = lambda name: True,
        name: str = "wsgi_reload-monitor",
        on_tick: Callable[[], object] | None = None,
        tick_pending: Callable[[], bool] = lambda: False,
        settles: bool = True,
    ) -> None:
        self.scanner = scanner
        self.settings = scanner.settings
        self.on_batch = on_batch
        self._settles = settles
        self.backend = "poll"
        self._wake_dirs = tuple(wake_dirs)
        self._wakes_on = wakes_on
        self._name = name
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._events: EventSource | None = None
        self._rescan_seconds = EVENTS_RESCAN_SECONDS
        self._first: list[Change] = []
        self._on_tick = on_tick
        self._relevance: tuple[frozenset[tuple[str, str]], frozenset[str], frozenset[str]] = \
            (frozenset(), frozenset(), frozenset())
        self._on_tick_pending = tick_pending
        self._resolved: dict[str, tuple[str, frozenset[str]]] = {}
        """Each watched directory's resolved path and the symlink parents on its way, kept until
        a file event that matters (see :meth:`_resolve`)."""
        self._resolved_at: float | None = None

    def start(self) -> Monitor:
        """Record the baseline and choose the backend, then watch in a daemon thread.

        When this returns, a save counts: tests and adapters can edit right away.
        """
        if self._thread is None:
            self._first = self._safe_scan()
            if self.settings.backend != "poll":
                self._start_events()
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop watching and wait for the thread to end."""
        self._stop.set()
        self._wake.set()
        if self._events is not None:
            self._events.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def wake(self) -> None:
        """Scan now instead of at the next tick."""
        self._wake.set()

    @property
    def hears_wakes(self) -> bool:
        """Whether ``wakes_on`` is asked about each event in the ``wake_dirs`` as it happens (the
        inotify backend); otherwise only a scan finds what changed there."""
        return self._events is not None and self._events.clock is not None

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def describe(self) -> str:
        """How it watches: 'file events' or 'polling every N s'."""
        if self.backend == "events" and self._events is not None:
            return f"file events ({self._events.name}; a safety rescan every {self._rescan_seconds:g} s)"
        return f"polling every {self.settings.interval:g} s"

    def _run(self) -> None:
        for attempt in range(1, MAX_RESTARTS + 1):
            try:
                self._loop()
                return
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("wsgi_reload: the watcher thread failed (%d of %d); restarting it",
                              attempt, MAX_RESTARTS)
                self._stop.wait(1.0)
        log.critical("wsgi_reload: the watcher thread failed %d times; reloading is OFF until a restart",
                     MAX_RESTARTS)

    def _loop(self) -> None:
        if self._first:
            first, self._first = self._first, []
            self._report(first)
        if self._events is not None:
            self._wake.set()  # a change made while inotify was starting has no event: look again now
        while not self._stop.is_set():
            timeout = self._rescan_seconds if self._events is not None else self.settings.interval
            if self._on_tick is not None and self._on_tick_pending():
                timeout = min(timeout, self.settings.interval)
            if not self._wake.wait(timeout):
                self._resolved.clear()  # the safety rescan resolves every directory afresh too
            self._wake.clear()
            if self._stop.is_set():
                break
            changes = self._safe_scan()
            if changes:
                self._report(changes)
            if self._on_tick is not None:
                self._on_tick()
            if self._events is not None:
                self._watch_dirs()

    def _watch_dirs(self) -> None:
        assert self._events is not None
        try:
            if self._events.set_directories(self._dirs_to_watch()):
                self._wake.set()  # what was saved in a new directory before its watch has no event
        except OSError as exc:
            if self._stop.is_set():
                return  # stopping: the descriptor was closed under it
            self._events.stop()
            self._events = None
            self.backend = "poll"
            log.warning("wsgi_reload: file events stopped (%s); polling every %s s from now on",
                        exc.strerror or exc, self.settings.interval)

    def _safe_scan(self) -> list[Change]:
        try:
            return self.scanner.scan()
        except Exception:
            log.exception("wsgi_reload: scanning for changes failed; trying again at the next tick")
            return []

    def _report(self, changes: list[Change]) -> None:
        try:
            self.on_batch(self.settle(changes)[0] if self._settles else changes)
        except Exception:
            log.exception("wsgi_reload: handling a change failed")

    def written(self, changes: Sequence[Change]) -> None:
        """Wait until no file of ``changes`` is open for writing (:func:`open_for_writing`), for at
        most the settle window's cap."""
        deadline = time.monotonic() + MAX_SETTLE_SECONDS
        while any(open_for_writing(c.path) for c in changes if c.kind != "deleted") and time.monotonic() < deadline:
            if self._stop.wait(WRITTEN_POLL_SECONDS):
                return

    def settle(self, changes: list[Change], since: float | None = None) -> tuple[list[Change], list[Change]]:
        """Wait until the files of ``changes`` have settled (:func:`settle`, by this monitor's
        backend and settings) and return the whole batch and what changed meanwhile.

        :param since: when the batch was found (``time.monotonic()``; default: now).
        """
        more: list[Change] = []

        def scan() -> list[Change]:
            found = self._safe_scan()
            more.extend(found)
            return found

        clock = None if self._events is None else self._events.clock
        return settle(scan, changes, self.settings.settle, self._stop.wait, clock, since), more

    def _dirs_to_watch(self) -> set[str]:
        """The directories to hear events from, resolved (inotify watches what a path pointed
        at when it was added), plus the directory of each symlink on the way to them: a release
        switch (``current -> releases/r2``) changes nothing inside the old release, only the
        link, and resolving again then moves the watches to the new release.

        It also records which events matter (:meth:`_relevant`): in a directory that holds
        watched files only those files' events do, so a request log, a SQLite database or
        uploads beside the code neither wake the monitor nor hold its settle window open; in a
        directory of a glob or on a symlink's way, every event does. An event in the runtime
        directory (``wake_dirs``: a worker's record) wakes the monitor but does not hold the
        window: it is no save in progress. Only the names ``wakes_on`` accepts wake it: each wake
        is a scan, and the watcher's own files there (the swap's state, the store) change many
        times in every reload."""
        # Listed afresh, not taken from the last scan: a tick may have added a file since (the
        # file a failed check names), and its directory must be watched from this turn on.
        names: set[tuple[str, str]] = set()
        every: set[str] = set()
        by_dir: dict[str, list[str]] = {}
        for path in self.scanner.watched_files():
            by_dir.setdefault(os.path.dirname(path), []).append(os.path.basename(path))
        growing = self.scanner.growing_dirs()
        for directory in (*self._wake_dirs, *growing):
            by_dir.setdefault(directory, [])
        clock = None if self._events is None else self._events.clock
        stamp = None if clock is None else clock()
        if stamp is None or stamp != self._resolved_at:
            self._resolved.clear()
            self._resolved_at = stamp
        every.update(self._resolve(d)[0] for d in growing)
        wakes = frozenset(self._resolve(d)[0] for d in self._wake_dirs)
        watched: set[str] = set()
        for directory, files in by_dir.items():
            # A watched file whose directory does not exist yet (an extra file still to come):
            # the nearest directory that does exist hears the missing one being made.
            nearest = directory
            while not os.path.isdir(nearest) and os.path.dirname(nearest) != nearest:
                nearest = os.path.dirname(nearest)
            resolved, parents = self._resolve(nearest)
            watched.add(resolved)
            if nearest != directory:
                every.add(resolved)
            names.update((resolved, name) for name in files)
            watched.update(parents)
            every.update(parents)
        self._relevance = (frozenset(names), frozenset(every), wakes)
        return watched

    def _resolve(self, directory: str) -> tuple[str, frozenset[str]]:
        """``directory`` resolved, and the directories of the symlinks on its way.

        Kept until the next file event that holds a batch (a save, a symlink switched, a
        directory made, moved or removed: the events backend's clock moves), or the safety
        rescan: only those can change where a path leads. A worker's record wakes the monitor
        too, a dozen times in a reload, and resolving every directory each time (a realpath and
        an lstat per component, for a hundred directories of a Django site) was most of the
        watcher's work in a reload."""
        found = self._resolved.get(directory)
        if found is None:
            found = self._resolved[directory] = (os.path.realpath(directory), frozenset(symlink_parents(directory)))
        return found

    def _relevant(self, directory: str, name: str) -> int:
        names, every, wakes = self._relevance
        if directory in every or (directory, name) in names:
            return inotify.HOLDS
        return inotify.WAKES if directory in wakes and self._wakes_on(name) else inotify.IGNORED

    def _start_events(self) -> None:
        dirs = self._dirs_to_watch()
        network = _network_mount(dirs)
        reasons = []
        if network:
            reasons.append(f"{network[0]} is on a {network[1]} filesystem, where inotify misses remote changes")
        else:
            for name, opener in EVENT_SOURCES.items():
                try:
                    self._events = opener(dirs, self._wake.set, self._name + "-events", self._relevant)
                except Unavailable as exc:
                    reasons.append(f"{name}: {exc}")
                    continue
                except EventsFailed as exc:
                    reasons.append(str(exc))
                    break
                self.backend = "events"
                self._rescan_seconds = self._events.rescan_seconds
                return
        level = logging.WARNING if self.settings.backend == "events" else logging.INFO
        log.log(level, "wsgi_reload: file events unavailable (%s); polling every %s s", "; ".join(reasons),
                self.settings.interval)


def symlink_parents(path: str) -> set[str]:
    """The resolved directories that hold a symlink found on the way to ``path``."""
    parents: set[str] = set()
    walked = os.sep
    for part in os.path.abspath(path).split(os.sep):
        if not part:
            continue
        walked = os.path.join(walked, part)
        if os.path.islink(walked):
            parents.add(os.path.realpath(os.path.dirname(walked)))
    return parents


def _network_mount(dirs: Iterable[str]) -> tuple[str, str] | None:
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    mounts.sort(key=lambda m: len(m[0]), reverse=True)
    for d in dirs:
        for mount_point, fstype in mounts:
            mount_point = mount_point.replace("\\040", " ")
            if d == mount_point or d.startswith(mount_point.rstrip("/") + "/"):
                if fstype in NETWORK_FILESYSTEMS:
                    return d, fstype
                break
    return None


def _identity(dirs: Iterable[str]) -> frozenset[tuple[str, int, int]]:
    found = set()
    for directory in dirs:
        try:
            st = os.stat(directory)
        except OSError:
            continue
        found.add((directory, st.st_dev, st.st_ino))
    return frozenset(found)


class _WatchfilesSource:
    """A watchfiles thread over the watched directories that only wakes the monitor."""

    name = "watchfiles"
    rescan_seconds = EVENTS_RESCAN_SECONDS
    clock = None  # watchfiles debounces and batches its events; the settle window counts from scans

    def __init__(self, wake: Callable[[], object], dirs: set[str], name: str) -> None:
        self._wake = wake
        self._dirs = dirs
        self._identity = _identity(dirs)
        self._name = name
        self._stop = threading.Event()
        self._restart = threading.Event()
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._error: str | None = None

    def start(self) -> str | None:
        """Start the thread; returns why it could not start, or None."""
        threading.Thread(target=self._run, name=self._name, daemon=True).start()
        self._started.wait(10)
        return self._error

    def stop(self) -> None:
        self._stop.set()

    def set_directories(self, directories: set[str]) -> bool:
        """Watch these directories; a path that is another directory now (``mv app.new app``)
        counts as a change too, since the old watch went with the old directory. (The thread
        wakes the monitor itself once the new watches are up.)"""
        identity = _identity(directories)
        with self._lock:
            if directories != self._dirs or identity != self._identity:
                self._dirs, self._identity = directories, identity
                self._restart.set()
        return False

    def _run(self) -> None:
        from watchfiles import watch

        quiet = logging.getLogger("watchfiles")
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.WARNING)  # its "N changes detected" lines would sit among ours

        while not self._stop.is_set():
            with self._lock:
                dirs = sorted(self._dirs)
                self._restart.clear()
            if not dirs:
                self._started.set()
                while not (self._restart.is_set() or self._stop.wait(0.5)):
                    pass
                continue
            fresh = True
            try:
                for changes in watch(
                    *dirs,
                    recursive=False,
                    debounce=50,
                    step=20,
                    rust_timeout=1000,
                    yield_on_timeout=True,
                    stop_event=self._stop,
                    raise_interrupt=False,
                    ignore_permission_denied=True,
                ):
                    self._started.set()
                    if changes or fresh:
                        # Fresh: the directories changed and inotify was rebuilt; what was saved in
                        # between has no event, so the monitor looks once more.
                        self._wake()
                        fresh = False
                    if self._restart.is_set() or self._stop.is_set():
                        break
            except Exception as exc:  # watch limit reached, inotify missing, a directory vanished
                if not self._started.is_set():
                    self._error = f"{type(exc).__name__}: {exc}"
                    self._started.set()
                    return
                log.warning("wsgi_reload: file events failed (%s); restarting them", exc)
                self._wake()
                self._stop.wait(1.0)
