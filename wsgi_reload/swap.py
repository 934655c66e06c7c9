"""Verify before swap, for a gunicorn master that runs none of our code and can only be signalled.

Django under gunicorn with no gunicorn config has no hook in the master, so the watcher
process drives gunicorn's own signals (``Arbiter.handle_ttin``/``handle_ttou``):

1. TTIN once per serving worker: gunicorn forks one more worker each time;
2. wait until as many new workers have published a manifest saying their app loaded;
3. TTOU as many times: ``Arbiter.manage_workers`` retires the oldest workers, the old ones.

A new worker that cannot load never serves: its boot guard (``wsgi_reload.gunicorn``)
holds it, then lets gunicorn try it again. The swap then stays pending and completes
once the new workers have loaded, on a retry or after the next good save.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from .gate import ActionFailed
from .process import Target, TargetError

SIGNAL_GAP = 0.05
"""Two equal signals that reach a Python process before its handler ran count once; space them."""


class Signals(Protocol):
    """All a strategy does to the server: signal one of its processes, and list the master's
    children (gunicorn's ``arbiter.py`` talks to its workers the same way)."""

    def send(self, pid: int, signum: int) -> None:
        """Signal ``pid`` and return once it is delivered; :class:`TargetError` if it is gone."""

    def children(self, pid: int) -> frozenset[int] | None:
        """The pids of a process's children, or None where they cannot be read."""


class Workers(Protocol):
    """What the workers say of themselves (:class:`wsgi_reload.manifest.ManifestReader`): call
    it to read again; then ``live`` are the workers that have a record, ``loaded`` what each
    says of its app, ``app_failed`` and ``failures`` those that say it did not load, and why,
    ``generation_of`` the generation each runs."""

    @property
    def live(self) -> set[int]: ...

    @property
    def loaded(self) -> Mapping[int, bool | None]: ...

    @property
    def app_failed(self) -> set[int]: ...

    @property
    def failures(self) -> Mapping[int, str]: ...

    @property
    def generation_of(self) -> Mapping[int, int | None]: ...

    def __call__(self) -> object: ...


class ProcessSignals:
    """:class:`Signals` for real processes, through pidfds (:class:`wsgi_reload.process.Target`)."""

    def __init__(self, master: Target) -> None:
        self.master = master

    def send(self, pid: int, signum: int) -> None:
        target = self.master if pid == self.master.pid else Target(pid, f"worker {pid}")
        target.send(signum)
        wait_until_delivered(pid, signum)
        time.sleep(SIGNAL_GAP)

    def children(self, pid: int) -> frozenset[int] | None:
        kids = children(pid)
        if kids is None:
            return None
        # Its workers share its process group. A master that is PID 1 (in a container) also
        # adopts orphans, this watcher among them, which lead groups of their own.
        try:
            group = os.getpgid(pid)
        except OSError:
            return kids
        return frozenset(kid for kid in kids if _group_of(kid) == group)


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


class SignalledSwap:
    """One swap of a gunicorn master's workers, carried out (and resumed) by signals.

    ``wanted()`` names the generation the new workers must run (the newest published): a new
    worker that loaded an older one (it was forked before that was published, in a swap still
    under way) is swapped out as well, so that the swap ends with every worker on it.
    """

    def __init__(self, master_pid: int, signals: Signals, manifests: Workers, load_timeout: float,
                 wanted: Callable[[], int | None] = lambda: None) -> None:
        self.master_pid = master_pid
        self.signals = signals
        self.manifests = manifests
        self.load_timeout = load_timeout
        self.wanted = wanted
        self.retiring: set[int] = set()
        self.count = 0
        """How many workers the server runs, which the swap keeps."""
        self.added = 0

    def __call__(self) -> int:
        """Swap the workers; returns how many new ones serve. :class:`ActionFailed` while they
        have not loaded (the old ones serve on); calling again resumes the same swap."""
        self.manifests()
        loaded_now = {pid for pid in self.manifests.live if pid not in self.manifests.app_failed}
        if not self.retiring:
            if not loaded_now:
                raise ActionFailed("no worker of this server is up")
            self.retiring, self.count, self.added = set(loaded_now), len(loaded_now), 0
        # Wait for the new workers' app import only when they were just added; a resumed swap
        # looks once, so the watcher goes on seeing saves meanwhile.
        wait = self.load_timeout if self.added < len(self.retiring) else 0.0
        while True:
            self._add_workers()
            deadline = time.monotonic() + wait
            while True:
                self.manifests()
                new = self.manifests.live - self.retiring
                fresh = {pid for pid in new if pid not in self.manifests.app_failed}
                wanted = self.wanted()
                stale = {pid for pid in fresh
                         if wanted is not None and self.manifests.generation_of.get(pid) not in (None, wanted)}
                if stale or len(fresh) >= self.count:
                    break
                failed = new & self.manifests.app_failed
                if failed:
                    # It says why (ready_path answered 500 there, say): the old workers serve on, and
                    # the swap resumes once new workers load, on a retry or after the next good save.
                    raise ActionFailed(f"a new worker cannot serve the code that passed the check "
                                       f"({self.manifests.failures.get(min(failed)) or 'see its log'}); the old "
                                       "ones serve until new ones can")
                if time.monotonic() >= deadline:
                    raise ActionFailed(f"{len(fresh)} of {self.count} new workers have loaded the app; the old "
                                       "ones serve until all have")
                time.sleep(0.02)
            if not stale:
                break
            self.retiring |= stale  # they retire too; as many more are added (oldest go first)
            wait = self.load_timeout
        for _ in range(self.added):
            self._send(signal.SIGTTOU)  # manage_workers() retires the oldest: the old generation
        count, self.retiring, self.added = self.count, set(), 0
        return count

    def _add_workers(self) -> None:
        """TTIN until as many workers were added as retire, one at a time: two pending TTINs
        would merge into one signal."""
        while self.added < len(self.retiring):
            before = self.signals.children(self.master_pid)
            self._send(signal.SIGTTIN)
            self.added += 1
            deadline = time.monotonic() + 5.0
            while before is not None and self.signals.children(self.master_pid) == before \
                    and time.monotonic() < deadline:
                time.sleep(0.01)

    def _send(self, signum: int) -> None:
        try:
            self.signals.send(self.master_pid, signum)
        except TargetError as exc:
            self.retiring, self.added = set(), 0
            raise ActionFailed(str(exc)) from None


def children(pid: int) -> frozenset[int] | None:
    """The pids of a process's children (Linux), or None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return frozenset(int(p) for p in f.read().split())
    except (OSError, ValueError):
        return None


def exited(pid: int) -> bool:
    """True once ``pid`` has exited: gone, or a zombie its parent has not reaped yet (Linux)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def nudge_as_workers_exit(master: Target, workers: frozenset[int], nudge: int, timeout: float) -> None:
    """Send the master ``nudge`` as each of ``workers`` exits, until all have (or ``timeout``).

    A uWSGI master reaps a dead worker on its next loop turn, and between turns it sleeps in
    ``event_queue_wait`` for ``check_interval``, one second (core/master.c,
    ``uwsgi_master_loop``): a graceful reload waits up to a second for nothing. A signal with
    a handler ends that sleep at once (EINTR), so the master reaps the worker and, once all
    are gone, re-executes itself without waiting for the next turn.
    """
    pending = set(workers)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        gone = {pid for pid in pending if exited(pid)}
        if gone:
            pending -= gone
            try:
                master.send(nudge)
            except TargetError:
                return
        time.sleep(0.005)


def wait_until_delivered(pid: int, signum: int, timeout: float = 1.0) -> None:
    """Wait while ``signum`` is still pending for ``pid`` (Linux's ShdPnd); at once elsewhere."""
    bit = 1 << (signum - 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                pending = next((int(line.split()[1], 16) for line in f if line.startswith("ShdPnd:")), 0)
        except (OSError, ValueError):
            return
        if not pending & bit:
            return
        time.sleep(0.005)


class WorkerChain:
    """uWSGI ``--lazy-apps``: replace the workers one at a time, each only once the one before has
    loaded the app, as ``uwsgi.chain_reload()`` does from inside the master (core/master_checks.c,
    uwsgi_master_check_chain); a watcher outside the master does it worker by worker.

    SIGHUP to a uWSGI worker is its graceful stop (``gracefully_kill``); the master respawns it,
    and with ``--lazy-apps`` the new worker imports the app itself. It proves it loaded by
    publishing a manifest that says so. A new worker that cannot load never serves (its guard
    in ``wsgi_reload.uwsgi_adapter`` holds it), so the chain stops there with the other
    workers serving, and resumes on a retry or after the next good save.
    """

    def __init__(self, signals: Signals, manifests: Workers, load_timeout: float) -> None:
        self.signals = signals
        self.manifests = manifests
        self.load_timeout = load_timeout
        self.retiring: list[int] = []
        self.known: set[int] = set()
        self.signalled: set[int] = set()

    def __call__(self) -> int:
        """Replace every worker; returns how many. :class:`ActionFailed` while one has not loaded."""
        if not self.retiring:
            self.manifests()
            if not self.manifests.live:
                raise ActionFailed("no worker of this server is up")
            # Every worker, loaded or not: after a start with broken code none has the app.
            self.retiring, self.known, self.signalled = sorted(self.manifests.live), set(self.manifests.live), set()
        count = len(self.retiring)
        while self.retiring:
            old = self.retiring[0]
            # A resumed chain looks once, so the watcher goes on seeing saves meanwhile.
            wait = 0.0 if old in self.signalled else self.load_timeout
            if old not in self.signalled:
                self.signalled.add(old)
                try:
                    self.signals.send(old, signal.SIGHUP)
                except TargetError:
                    pass  # already gone: its replacement may be loading
            deadline = time.monotonic() + wait
            while not (fresh := self._loaded() - self.known):
                if time.monotonic() >= deadline:
                    raise ActionFailed(f"the new worker replacing {old} has not loaded the app; the other workers "
                                       "serve until it has")
                time.sleep(0.02)
            self.known |= fresh
            self.retiring.pop(0)
        return count

    def _loaded(self) -> set[int]:
        self.manifests()
        return {pid for pid, loaded in self.manifests.loaded.items() if loaded}


class InPlaceReexec:
    """gunicorn with ``preload_app``: the master itself imported the app, so new code needs a new
    master image. ``wsgi_reload.gunicorn`` turns the master's USR2 into an exec of the master in
    place (same pid: PID 1 in a container), which keeps its children, the old workers, serving
    on the inherited sockets. The new image forks new workers, which prove they loaded by
    publishing a record; then each old worker gets TERM, gunicorn's graceful stop.

    A new image that cannot load the checked generation executes itself again with the one the
    old workers run (``wsgi_reload.gunicorn``), so its workers still come up; the old ones then
    retire the same way.
    """

    def __init__(self, master_pid: int, signals: Signals, manifests: Workers, load_timeout: float) -> None:
        self.master_pid = master_pid
        self.signals = signals
        self.manifests = manifests
        self.load_timeout = load_timeout
        self.old: set[int] = set()
        self.retired: set[int] = set()
        """Old workers sent TERM, finishing their requests: their records may outlive them a moment."""
        self.count = 0

    def __call__(self) -> int:
        """Re-execute the master and retire its old workers; returns how many new ones serve.
        :class:`ActionFailed` while they have not loaded (the old ones serve on); calling again
        resumes."""
        wait = 0.0
        if not self.old:
            self.manifests()
            self.retired = {pid for pid in self.retired if not exited(pid)}
            loaded = self.manifests.live - self.manifests.app_failed - self.retired
            if not loaded:
                raise ActionFailed("no worker of this server is up")
            self.old = set(self.signals.children(self.master_pid) or ()) | self.manifests.live
            self.count = len(loaded)
            try:
                self.signals.send(self.master_pid, signal.SIGUSR2)
            except TargetError as exc:
                self.old = set()
                raise ActionFailed(str(exc)) from None
            wait = self.load_timeout
        deadline = time.monotonic() + wait
        while True:
            self.manifests()
            new = self.manifests.live - self.old
            fresh = new - self.manifests.app_failed
            if len(fresh) >= self.count:
                break
            if new & self.manifests.app_failed:
                failed = min(new & self.manifests.app_failed)
                raise ActionFailed(f"a new worker cannot serve the code that passed the check "
                                   f"({self.manifests.failures.get(failed) or 'see its log'}); the old ones serve "
                                   "until new ones can")
            if time.monotonic() >= deadline:
                raise ActionFailed(f"{len(fresh)} of {self.count} workers of the re-executed master have loaded the "
                                   "app; the old ones serve until all have")
            time.sleep(0.02)
        for pid in sorted(self.old):
            try:
                self.signals.send(pid, signal.SIGTERM)
            except TargetError:
                pass  # gone already
        self.retired |= self.old
        count, self.old = self.count, set()
        return count


Strategy = Callable[[], int]
"""Replace the server's workers; returns how many were replaced. :class:`ActionFailed` while it
cannot finish (the old workers serve on); calling again resumes it."""

STRATEGIES: dict[str, Callable[[int, Signals, Workers, float, Callable[[], int | None]], Strategy]] = {
    "swap": SignalledSwap,
    "reexec": lambda pid, signals, workers, timeout, wanted: InPlaceReexec(pid, signals, workers, timeout),
    "chain": lambda master_pid, signals, workers, timeout, wanted: WorkerChain(signals, workers, timeout),
}
"""How the watcher process replaces workers it can only signal, by the ``replace`` it is given:
``swap`` (gunicorn: TTIN, wait for the new workers' records, TTOU), ``reexec`` (gunicorn with
``preload_app``: USR2, an exec of the master in place, then TERM to the old workers once the new
ones have loaded) and ``chain`` (uWSGI ``--lazy-apps``: one worker at a time). ``signal``
(uWSGI's own graceful reload, re-evaluated on each turn) is the watcher's
:meth:`~wsgi_reload.watch_process._ServerWatch.reconcile`."""
