"""The table of reload strategies: how the watcher process replaces a server's workers.

Each strategy talks to the server only through :class:`Signals` (signal a process, list a
master's children), as gunicorn's ``arbiter.py`` talks to its workers, and learns what the
workers run only from their records (:class:`Workers`). Each is a resumable step: it
raises :class:`wsgi_reload._core.gate.ActionFailed` while it cannot finish (the old workers serve
on), and calling it again resumes it, so the watcher can go on seeing saves meanwhile.
``tests/test_strategies.py`` runs each on a fake master.

A new worker that cannot load never serves: its boot guard (``wsgi_reload.gunicorn``,
``wsgi_reload._server.uwsgi``) holds it, then lets the server try it again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from .._core.gate import ActionFailed
from .._core.scanner import Change
from .signals import Target, TargetError, exited, holds_listener, start_time

log = logging.getLogger("wsgi_reload.watcher_process")

STEADY_SECONDS = 2.0
"""The master's children unchanged this long: no worker is being started or retired."""

COUNT_SECONDS = 120.0
"""How long after a swap its workers are counted against those before it (see ``SignalledSwap.tick``)."""

SIGNAL_GAP = 0.2
"""Two equal signals that reach a Python process before its handler ran count once; space them.
A master busy on a loaded machine can take longer than 50 ms to run the handler (a TTOU was
lost that way in a CI run, and an old worker served on); only equal signals wait for it."""


class Signals(Protocol):
    """All a strategy does to the server: signal one of its processes, and list the master's
    children (gunicorn's ``arbiter.py`` talks to its workers the same way)."""

    def send(self, pid: int, signum: int) -> None:
        """Signal ``pid`` and return once it is delivered; :class:`TargetError` if it is gone."""

    def wake(self, pid: int, signum: int) -> None:
        """Signal ``pid`` at once, with no gap after an equal one: a wake-up, which counts however
        many arrive together; :class:`TargetError` if it is gone."""

    def children(self, pid: int) -> frozenset[int] | None:
        """The pids of a process's children, exited ones its parent has not reaped included, or
        None where they cannot be read."""

    def exited(self, pid: int) -> bool:
        """Whether a process has exited (a zombie has)."""

    def oldest_first(self, pids: frozenset[int]) -> list[int]:
        """``pids`` in the order they were started, oldest first (gunicorn retires in that order)."""

    def handled(self, pid: int, signum: int) -> None:
        """``pid`` was seen acting on ``signum``: another one may follow at once (see :data:`SIGNAL_GAP`)."""

    def listening(self, pid: int) -> bool:
        """Whether ``pid`` holds a listening socket: a gunicorn master that is stopping has closed its own."""


class Workers(Protocol):
    """What the workers say of themselves (:class:`wsgi_reload._server.records.WorkerRecords`):
    :meth:`refresh` reads again; then ``live`` are the workers that have a record, ``serving`` those whose
    app loaded, ``app_failed`` and ``failures`` those that say it did not load, and why,
    ``generation_of`` the generation each runs."""

    @property
    def live(self) -> set[int]: ...

    @property
    def serving(self) -> set[int]: ...

    @property
    def app_failed(self) -> set[int]: ...

    @property
    def failures(self) -> Mapping[int, str]: ...

    @property
    def generation_of(self) -> Mapping[int, int | None]: ...

    @property
    def generations(self) -> set[int | None]: ...

    def refresh(self) -> None: ...


class SpareSlot(Protocol):
    """Where the watcher asks for a spare worker and finds it (:class:`wsgi_reload._server.spare.Spare`)."""

    def want(self) -> None:
        """Leave the token the next booting worker takes (before the TTIN that starts it)."""

    def withdraw(self) -> None:
        """No spare wanted: a waiting one exits unserved, and is told so at once."""

    def claimant(self) -> int | None:
        """The live worker waiting as the spare, if any."""

    def wanted(self) -> bool:
        """The token is there, not yet taken."""


SPARE = -1
"""The swap's ``trial`` while its first new worker waits as the spare for the next save's trial."""

SPARE_CLAIM_SECONDS = 10.0
"""How long a spare may take to boot as far as Django's import (it is on the cores the workers serve from)."""

SPARE_ATTEMPTS = 3
"""Spares in a row gone before a save used them, after which none is asked for outside a swap
until the next reload (whose own spare is asked for all the same)."""


class Memory(Protocol):
    """Where a strategy keeps the state of a replacement under way, so that a new watcher (the
    last one was killed mid-swap) resumes it instead of starting over with twice the workers."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any] | None) -> None: ...


def saved_at(batch: Sequence[Change]) -> float | None:
    """When the newest file of a batch was saved (its mtime), or None if none is left."""
    times = []
    for change in batch:
        with contextlib.suppress(OSError):
            times.append(os.stat(change.path).st_mtime)
    return max(times, default=None)


def since_the_save(saved: float | None) -> str:
    """How long ago the save was, for a "reload done" line: every mode times it from there."""
    return "time since the save unknown" if saved is None else f"{time.time() - saved:.2f} s after the save"


class Strategy:
    """Replaces the server's workers when called; returns how many were replaced. It raises
    :class:`ActionFailed` while it cannot finish (the old workers serve on), and calling it
    again resumes it. The fields named in ``_STATE`` outlive its watcher (:class:`Memory`)."""

    _STATE: tuple[str, ...] = ()
    memory: Memory | None = None
    workers: int | None = None
    """How many workers the server is configured to run, when the watcher knows (gunicorn's
    config hooks tell it); a strategy that must count new workers uses it."""
    saved_at: float | None = None
    """When the save that this replacement serves was made (wall clock), for its report."""

    def __call__(self) -> int | None:
        """Replace the workers; how many new ones serve, or None when the strategy reports it
        itself once the server's own reload is over."""
        raise NotImplementedError

    def tick(self) -> None:
        """Called on every turn of the watcher, between reloads: housekeeping a strategy may need."""

    def wants_tick(self) -> bool:
        """True while :meth:`tick` has something to look at (the watcher then turns every 2 s)."""
        return False

    def _recall(self) -> bool:
        """Restore a replacement under way; True when there was one."""
        state = None if self.memory is None else self.memory.load()
        if not isinstance(state, dict) or set(state) != set(self._STATE):
            return False
        for name in self._STATE:
            value, default = state[name], getattr(self, name)
            if isinstance(default, int) and isinstance(value, int):
                setattr(self, name, value)
            elif isinstance(value, list) and all(isinstance(pid, int) for pid in value):
                setattr(self, name, type(default)(value))
            else:
                return False
        return True

    def _remember(self, done: bool = False) -> None:
        if self.memory is None:
            return
        state = {name: (sorted(value) if isinstance(value, set) else value)
                 for name in self._STATE for value in [getattr(self, name)]}
        with contextlib.suppress(OSError):  # a full disk: the swap goes on, only not resumable
            self.memory.save(None if done else state)

    def under_way(self) -> bool:
        """A replacement was started and not finished (by this watcher or a killed one)."""
        return bool(getattr(self, self._STATE[0])) and getattr(self, "trial", 0) != SPARE


class ProcessSignals:
    """:class:`Signals` for real processes, through pidfds (:class:`wsgi_reload._server.signals.Target`)."""

    def __init__(self, master: Target) -> None:
        self.master = master
        self._last: dict[tuple[int, int], float] = {}

    def _target(self, pid: int) -> Target:
        return self.master if pid == self.master.pid else Target(pid, f"worker {pid}")

    def send(self, pid: int, signum: int) -> None:
        target = self._target(pid)
        # The gap comes before, not after: the caller records a signal as sent the moment it is
        # delivered, so a watcher killed in between leaves the least doubt for the next one.
        # Only an equal signal to the same process needs it: the first of a reload goes at once.
        last = self._last.get((pid, signum))
        if last is not None:
            time.sleep(max(0.0, last + SIGNAL_GAP - time.monotonic()))
        target.send(signum)
        wait_until_delivered(pid, signum)
        self._last[(pid, signum)] = time.monotonic()

    def wake(self, pid: int, signum: int) -> None:
        self._target(pid).send(signum)

    def exited(self, pid: int) -> bool:
        return exited(pid)

    def oldest_first(self, pids: frozenset[int]) -> list[int]:
        # A pid that is gone goes first: stopping it does nothing.
        return sorted(pids, key=lambda pid: (start_time(pid) or 0, pid))

    def handled(self, pid: int, signum: int) -> None:
        self._last.pop((pid, signum), None)

    def listening(self, pid: int) -> bool:
        return holds_listener(pid) is not False

    def children(self, pid: int) -> frozenset[int] | None:
        kids = children(pid)
        if kids is None:
            return None
        # Its workers share its process group. A master that is PID 1 (in a container) also
        # adopts orphans, this watcher among them, which lead groups of their own.
        group = _group_of(pid)
        return kids if group is None else frozenset(kid for kid in kids if _group_of(kid) == group)


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


class SignalledSwap(Strategy):
    """One swap of a gunicorn master's workers, carried out (and resumed) by signals
    (``Arbiter.handle_ttin``/``handle_ttou``):

    1. TTIN once per serving worker: gunicorn forks one more worker each time;
    2. wait until as many new workers have published a record saying their app loaded;
    3. TTOU as many times: ``Arbiter.manage_workers`` retires the oldest workers, the old ones.

    ``wanted()`` names the generation the new workers must run (the newest published): a new
    worker that loaded an older one (it was forked before that was published, in a swap still
    under way) is swapped out as well, so that the swap ends with every worker on it.
    """

    _STATE = ("retiring", "count", "ran", "added", "retired", "adding", "leaving", "recount", "trial", "spared")

    def __init__(self, master_pid: int, signals: Signals, records: Workers, load_timeout: float,
                 wanted: Callable[[], int | None] = lambda: None, memory: Memory | None = None) -> None:
        self.master_pid = master_pid
        self.signals = signals
        self.records = records
        self.load_timeout = load_timeout
        self.wanted = wanted
        self.retiring: set[int] = set()
        self.count = 0
        """How many workers serve: as many new ones must serve before the swap ends."""
        self.ran = 0
        """How many workers the master ran as the swap began, booting ones included (at the
        server's start, or a ``--max-requests`` restart): the number it keeps. Those serving
        alone would have :meth:`tick` retire the booting one as a worker too many."""
        self.added = 0
        self.retired = 0
        """TTOUs sent so far (a swap resumed mid-retirement must not send them again)."""
        self.adding: set[int] = set()
        """The master's children just before a TTIN that is not yet counted in ``added``."""
        self.leaving: set[int] = set()
        """Workers retired by a swap that may still be finishing their requests: not counted
        among the workers of the next swap (that would wait for more new workers than serve)."""
        self.memory = memory
        self.recount = 0
        """Once a swap a killed watcher left under way was finished: how many workers the server
        had before it, to count them against once steady (0: nothing to count). Kept in the
        record too, for the watcher after the next one, and not changed by later swaps."""
        self.trial = 0
        """The generation under check that this swap was begun for (:meth:`begin`): its first new
        worker holds with that code until the verdict. 0: none (begun after a pass); :data:`SPARE`:
        that worker waits as the spare for the next save's trial."""
        self.spared = 0
        """1 once this swap has asked for the next swap's spare (see :meth:`_ask_during_the_swap`)."""
        self._count_until = time.monotonic() + COUNT_SECONDS
        self.spare: SpareSlot | None = None
        """Keep a spare worker waiting for the next save (Django with no gunicorn config), or None."""
        self._spare_due_until = time.monotonic() + COUNT_SECONDS
        """Until when a spare is asked for once every worker serves (0: none is due)."""
        self._spare_asked_at = 0.0
        self._spare_failures = 0
        self.may_boot: Callable[[], bool] = lambda: True
        """Whether a new worker may boot now: it reads from the disk what the watcher cannot
        check first (Django's settings, with no gunicorn config), so not while a save of the code
        is refused or not yet checked (a boot that fails halts gunicorn)."""
        self._surplus_expected = 0
        """Workers :meth:`abandon` left one too many each (said at debug level when retired)."""
        self._seen: frozenset[int] | None = None
        self._short_since: float | None = None
        self._seen_at = 0.0
        self.resumed = self._recall() and bool(self.retiring)
        if self.resumed and self.adding:
            # Killed around a TTIN: it was delivered if the master forked a worker after it.
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                kids = self.signals.children(self.master_pid)
                if kids is not None and kids - self.adding - self.retiring:
                    self.added += 1
                    break
                time.sleep(0.02)
            self.adding = set()

    def begin(self, trial: int) -> None:
        """Start the swap's first new worker while the check still runs: it imports the code
        under check (the store's trial, generation ``trial``, never 0) and holds before serving
        until the verdict, so that its import overlaps the check instead of following it. After
        a pass, calling the swap carries it on; after a refusal, :meth:`abandon` undoes it. Does
        nothing while a swap begun after a pass is under way.

        A spare waiting for this (:data:`SPARE`) is that worker: it imports the trial from where it
        waits, and no TTIN is sent. One that is gone is given up, and a worker is started as above."""
        if self.trial == SPARE and not self._spare_on_its_way():
            self._give_up_the_spare("the spare worker is gone")
        if self.trial == SPARE:
            self._spare_failures = 0
        if self.trial:
            # An earlier check's trial, superseded (the code changed while it ran): its held worker
            # exits, and the master's replacement holds on this one. Nothing else changes.
            self.trial = trial
            self._remember()
            return
        if self.retiring:
            return
        self.records.refresh()
        self.leaving &= self.records.live
        self._start()
        self.trial = trial
        self._remember()
        self._add_workers(upto=1)

    def abandon(self) -> None:
        """The check refused the code :meth:`begin` started a worker for. That worker exits
        unserved and the master starts another in its place, which loads the running code: one
        worker more than before per TTIN sent. :meth:`tick` retires as many of the oldest once
        every worker serves, as after a swap, or the next swap's start does if it comes first
        (a TTOU now would retire an old worker before its replacement serves: with one worker,
        none would serve meanwhile)."""
        if not self.trial:
            return
        if self.spare is not None:
            self.spare.withdraw()
        self._surplus_expected = self.added
        if not self.recount:
            self.recount = self.ran
        self._count_until = time.monotonic() + COUNT_SECONDS
        self.retiring, self.added, self.retired, self.trial = set(), 0, 0, 0
        self._remember()
        self._spare_due_until = time.monotonic() + COUNT_SECONDS

    def _start(self) -> None:
        """The workers serving now (as of the last read of the records) are the ones to replace.
        More of them than the server ran before the last swap or refused trial (saves that come
        faster than :meth:`tick` finds the workers steady): the oldest extra ones retire now,
        so that each refused save adds no worker to the next swap."""
        loaded_now = self.records.serving - self.leaving
        if not loaded_now:
            raise ActionFailed("no worker of this server is up")
        if self.recount and len(loaded_now) > self.recount:
            self._retire(self.signals.oldest_first(frozenset(loaded_now))[:len(loaded_now) - self.recount])
            loaded_now -= self.leaving
        # A booting worker is not replaced (it loads the newest generation, or exits to be
        # replaced by one that does, see WorkerAgent.superseded), but it is one of the server's.
        kids = self.signals.children(self.master_pid) or frozenset()
        self.ran = len(loaded_now | (kids - self.leaving))
        self.retiring, self.count, self.added, self.retired = set(loaded_now), len(loaded_now), 0, 0
        self._remember()

    def __call__(self) -> int:
        """Swap the workers; returns how many new ones serve. :class:`ActionFailed` while they
        have not loaded (the old ones serve on); calling again resumes the same swap."""
        if self.trial == SPARE:
            self._give_up_the_spare()  # no trial was begun for this reload: it starts afresh
        self.records.refresh()
        self.leaving &= self.records.live
        if not self.retiring:
            self._start()
        held = bool(self.trial)
        if held:
            self.trial = 0  # the check passed: the held worker serves
            self._remember()
        # Wait for the new workers' app import only when they were just added, or for the held
        # worker, which serves once it sees the verdict (in a few ms); a resumed swap looks once,
        # so the watcher goes on seeing saves meanwhile.
        wait = self.load_timeout if self.added < len(self.retiring) or held else 0.0
        while True:
            # One new worker first, the rest once it serves: alone it imports the app sooner than
            # beside the others (on a busy machine they share the cores with the old workers), so
            # the new code is served sooner; the swap as a whole takes about as long.
            # (New workers found on an older generation are among ``retiring``: one more each.)
            self._add_workers(upto=len(self.retiring) - self.count + 1)
            deadline = time.monotonic() + wait
            while True:
                self._make_up_for_a_lost_ttin()
                self.records.refresh()
                new = self.records.live - self.retiring
                fresh = new & self.records.serving
                if fresh and self.added < len(self.retiring):
                    self._add_workers()
                wanted = self.wanted()
                stale = {pid for pid in fresh
                         if wanted is not None and self.records.generation_of.get(pid) not in (None, wanted)}
                if stale:
                    break
                # Each new worker that serves retires an old one at once (TTOU: the master retires
                # its oldest), rather than all of them at the end: more of the requests reach the
                # new code sooner, and fewer workers run at once.
                while self.retired < min(len(fresh), self.added):
                    self._send(signal.SIGTTOU)
                    self.retired += 1
                    self._remember()
                if len(fresh) >= self.count:
                    break
                # The swap resumes once new workers load, on a retry or after the next good save.
                _fail_if_a_new_worker_cannot_serve(self.records, new, wanted)
                if time.monotonic() >= deadline:
                    raise ActionFailed(f"{len(fresh)} of {self.count} new workers have loaded the app; the old "
                                       "ones serve until all have")
                time.sleep(0.02)
            if not stale:
                break
            self.retiring |= stale  # they retire too; as many more are added (oldest go first)
            self._remember()
            wait = self.load_timeout
        while self.retired < self.added:
            before = self._old_left()
            self._send(signal.SIGTTOU)  # manage_workers() retires the oldest: the old generation
            self.retired += 1
            self._remember()
            if self.retired < self.added:
                # An old worker gone says the master ran its handler, so the next TTOU cannot
                # merge with this one; without that sign it waits the whole gap.
                deadline = time.monotonic() + SIGNAL_GAP
                while self._old_left() >= before and time.monotonic() < deadline:
                    time.sleep(0.005)
                if self._old_left() < before:
                    self.signals.handled(self.master_pid, signal.SIGTTOU)
        # Each old worker is told to stop by us as well, not only by the master: two TTOUs that
        # reach a busy master before its handler ran count once, and the worker that TTOU was for
        # would serve the old code on. Stopped, it is replaced by a worker that loads the new code;
        # tick() then retires the one worker too many. A second SIGTERM changes nothing for a
        # worker the master stopped (the master repeats it every turn of its loop).
        for pid in self.retiring & (self.signals.children(self.master_pid) or frozenset()):
            self._stop(pid)
        self._ask_during_the_swap()
        self.leaving = {pid for pid in self.leaving | self.retiring if pid in self.records.live}
        if not self.recount:
            self.recount = self.ran
        self._count_until = time.monotonic() + COUNT_SECONDS
        self.resumed = False
        count, self.retiring, self.added, self.retired = self.count, set(), 0, 0
        if self.spared:
            # The next swap begins now, with the spare as its first new worker (see begin()).
            # (It keeps this swap's count: a worker booting now, a --max-requests restart, is
            # not among the serving ones, and is retired at the next swap as one on an older
            # generation.)
            self.spared, self._spare_failures = 0, 0
            self.records.refresh()
            self.retiring = self.records.serving - self.leaving
            self.added, self.trial = 1, SPARE
        self._remember()  # only what is leaving, or the spare's swap: nothing is under way
        return count

    def _ask_during_the_swap(self) -> None:
        """Every new worker of this swap serves and the old ones retire: have gunicorn start the
        next swap's spare now, and wait until it has stopped, Django imported, before this swap
        ends. A new worker reads some files from the disk that no check covers (Django's
        settings): this one reads them while this swap's own new workers do, right after a check
        passed them, not after a "reload done" that the next save may follow at once (a worker
        that fails to boot halts gunicorn)."""
        if self.spare is None or self.spared or not self.may_boot():
            return
        if not self._leave_the_token():
            return
        self.spared = 1
        self._remember()
        self._send(signal.SIGTTIN)
        self._spare_asked_at = time.monotonic()
        deadline = self._spare_asked_at + SPARE_CLAIM_SECONDS
        while self.spare.wanted() and time.monotonic() < deadline:
            time.sleep(0.02)

    def wants_tick(self) -> bool:
        if self.recount:
            return True
        if self.spare is None:
            return False
        if self.trial == SPARE:
            return self.spare.wanted()  # until a booting worker has taken the token
        return not self.retiring and not self.trial and self._spare_due()

    def _spare_due(self) -> bool:
        return self._spare_failures < SPARE_ATTEMPTS and time.monotonic() < self._spare_due_until

    def _spare_on_its_way(self) -> bool:
        """A worker waits as the spare, or one is booting that will take the token."""
        return self.spare is not None and (self.spare.claimant() is not None or (
            self.spare.wanted() and time.monotonic() - self._spare_asked_at < SPARE_CLAIM_SECONDS))

    def _give_up_the_spare(self, why: str = "") -> None:
        """Undo the swap begun for the spare, as for a refused trial: gunicorn replaced it (or
        replaces it once it exits) with a worker that loads the running code, one too many, which
        :meth:`tick` retires once every worker serves."""
        if why:
            self._spare_failures += 1
            log.debug("wsgi_reload: %s; undoing the swap begun for it", why)
            if self._spare_failures == SPARE_ATTEMPTS:
                log.warning("wsgi_reload: the last %d spare workers were gone before a save used them; no spare "
                            "until the next reload: its new workers boot from scratch", SPARE_ATTEMPTS)
        self.abandon()

    def _leave_the_token(self) -> bool:
        """The token for the next booting worker; False (said at debug level) where it cannot be left."""
        assert self.spare is not None
        try:
            self.spare.want()
        except OSError as exc:
            log.debug("wsgi_reload: no spare: %s", exc)
            return False
        return True

    def _tend_the_spare(self) -> int | None:
        """The spare waiting, if one does; one that is gone (or never took the token) is given up."""
        assert self.spare is not None
        claimant = self.spare.claimant()
        if claimant is not None:
            return claimant
        if not self.spare.wanted():
            self._give_up_the_spare("the spare worker is gone")
        elif time.monotonic() - self._spare_asked_at >= SPARE_CLAIM_SECONDS:
            self._give_up_the_spare(f"no booting worker took the spare's token within {SPARE_CLAIM_SECONDS:g} s")
        return None  # (or it is booting: not yet told apart from a worker too many)

    def _ask_for_a_spare(self) -> None:
        """Outside a swap (at the server's start, or after a spare was given up): begin the next
        swap now, with its first new worker booted as far as Django and waiting as the spare
        (:mod:`wsgi_reload._server.spare`)."""
        assert self.spare is not None
        if not self.may_boot():
            return
        kids = self.signals.children(self.master_pid)
        self.records.refresh()
        if not kids or kids - self.records.serving - self.leaving:
            # A worker is booting: it could take the token, and the swap begun now would not
            # count it among the server's workers. Asked again on a later turn.
            return
        self._spare_due_until = 0.0
        self._start()
        self.trial = SPARE
        if not self._leave_the_token():
            self.retiring, self.added, self.retired, self.trial = set(), 0, 0, 0
            self._remember()
            return
        self._spare_asked_at = time.monotonic()
        self._remember()
        self._add_workers(upto=1)

    def tick(self) -> None:
        """After a swap: once its old workers are gone and the master's children have been steady
        for :data:`STEADY_SECONDS`, the master runs as many workers as before the swap. One more
        is a TTOU it never handled (the old worker was stopped, and the master replaced it); one
        fewer, a TTOU a killed watcher had sent and the next one sent again. Too many: TTOU, and
        the oldest (which the master retires) is stopped as above, in case that TTOU is lost too;
        too few: TTIN. Then the children are counted again, until they match."""
        spare = None
        if self.spare is not None and self.trial == SPARE:
            spare = self._tend_the_spare()
            if spare is None:
                return
        elif self.retiring:
            return
        elif self.spare is not None and not self.trial and self._spare_due():
            self._ask_for_a_spare()
            if self.trial == SPARE:
                return  # it boots: counted from a later turn, once it has taken the token
        if not self.recount:
            return
        now = time.monotonic()
        if now > self._count_until:
            # Never steady with every worker serving (a child that is no worker, such as gunicorn's
            # dirty arbiter, or a worker that cannot load): stop counting rather than look forever.
            log.debug("wsgi_reload: the master's workers did not settle; not counting them")
            self.recount = 0
            self._remember()
            return
        kids = self.signals.children(self.master_pid)
        if kids is None:
            return
        kids -= {spare}  # the spare waits, with no record; it is counted once it serves
        if self.leaving - kids:
            self.leaving &= kids  # gone: a later worker may reuse the pid
            self._remember()
        if kids & self.leaving:
            return
        if kids != self._seen:
            self._seen, self._seen_at = kids, now
            return
        if now - self._seen_at < STEADY_SECONDS:
            return
        self._seen = None
        if len(kids) != self.recount and not self.signals.listening(self.master_pid):
            # gunicorn's stop closes the listeners first, then waits for its workers: they are
            # not missing, the server is going (and this watcher with it). Looked at again on
            # the next turn rather than given up: one wrong reading must not end the counting.
            return
        if len(kids) == self.recount:
            self.recount = 0
            self._remember()
        elif len(kids) > self.recount:
            self.records.refresh()
            if kids - self.records.serving:
                # gunicorn retires the oldest, which would keep a worker that cannot serve (or
                # has not yet loaded) over one that does: wait until every worker serves.
                return
            if spare is not None and self.signals.oldest_first(kids | {spare})[0] == spare:
                # gunicorn would retire the spare, the oldest (the others were restarted since,
                # by --max-requests): let it go instead; the surplus is counted again without it.
                self._give_up_the_spare()
                return
            surplus = self.signals.oldest_first(kids)[:len(kids) - self.recount]
            # Expected after a refused trial; otherwise the master missed a TTOU, worth a line.
            log.log(logging.DEBUG if len(surplus) <= self._surplus_expected else logging.INFO,
                    "wsgi_reload: the master runs %d worker(s), %d more than before the reload; retiring the "
                    "oldest", len(kids), len(surplus))
            self._surplus_expected = 0
            self._retire(surplus)
        else:
            log.info("wsgi_reload: the master runs %d worker(s), %d fewer than before the reload; adding them",
                     len(kids), self.recount - len(kids))
            for _ in range(self.recount - len(kids)):
                self._send(signal.SIGTTIN)

    def _make_up_for_a_lost_ttin(self) -> None:
        """Fewer new workers than the TTINs sent so far have started exist (booting ones
        included) for a second: a TTIN counted in ``added`` never reached the master (a killed
        watcher's, say). Send one more, not counted, so the TTOUs still match the TTINs that
        arrived. (New workers that retire too, ``stale``, are among ``retiring``.)"""
        kids = self.signals.children(self.master_pid)
        started = self.count - (len(self.retiring) - self.added)
        if kids is None or len(kids - self.retiring - self.leaving) >= started:
            self._short_since = None
            return
        now = time.monotonic()
        if self._short_since is None:
            self._short_since = now
        elif now - self._short_since >= 1.0:  # gunicorn replaces a worker that died at once
            self._short_since = None
            self._send(signal.SIGTTIN)

    def _add_workers(self, upto: int | None = None) -> None:
        """TTIN until as many workers were added as retire (or ``upto``), one at a time: two
        pending TTINs would merge into one signal."""
        while self.added < min(len(self.retiring), len(self.retiring) if upto is None else upto):
            before = self.signals.children(self.master_pid)
            self.adding = set(before or ())
            self._remember()  # a watcher killed right after the TTIN leaves the next one able to tell
            self._send(signal.SIGTTIN)
            self.added, self.adding = self.added + 1, set()
            self._remember()
            deadline = time.monotonic() + 5.0
            while before is not None and self.signals.children(self.master_pid) == before \
                    and time.monotonic() < deadline:
                time.sleep(0.005)
            if before is not None and self.signals.children(self.master_pid) != before:
                self.signals.handled(self.master_pid, signal.SIGTTIN)  # it forked: the next TTIN goes at once

    def _retire(self, pids: Sequence[int]) -> None:
        """One TTOU per worker (the master runs one worker fewer each), and each of them stopped
        as well, in case a TTOU is lost or the master picks an older one that is leaving anyway."""
        self.leaving |= set(pids)
        self._remember()
        for pid in pids:
            self._send(signal.SIGTTOU)
            self._stop(pid)

    def _old_left(self) -> int:
        return len(self.retiring & (self.signals.children(self.master_pid) or frozenset()))

    def _stop(self, pid: int) -> None:
        with contextlib.suppress(TargetError):  # it has exited already
            self.signals.send(pid, signal.SIGTERM)

    def _send(self, signum: int) -> None:
        try:
            self.signals.send(self.master_pid, signum)
        except TargetError as exc:
            self.retiring, self.added, self.retired = set(), 0, 0
            self._remember()
            raise ActionFailed(str(exc)) from None


def _fail_if_a_new_worker_cannot_serve(records: Workers, new: set[int], wanted: int | None = None) -> None:
    """A new worker says it cannot load the checked code, and why (``ready_path`` answered 500
    there, say): the replacement ends now, not at its timeout, and the old workers serve on.
    A worker that failed on another generation (a save the check refused, imported beside the
    check) is not one: it exits unserved, and the master starts another."""
    failed = {pid for pid in new & records.app_failed
              if wanted is None or records.generation_of.get(pid) in (None, wanted)}
    if failed:
        raise ActionFailed(f"a new worker cannot serve the code that passed the check "
                           f"({records.failures.get(min(failed)) or 'see its log'}); the old ones serve until new "
                           "ones can")


def children(pid: int) -> frozenset[int] | None:
    """The pids of a process's children (Linux), or None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return frozenset(int(p) for p in f.read().split())
    except (OSError, ValueError):
        return None


NUDGE_EVERY = 0.01
"""How often the master is nudged again while an old worker it has not reaped lies dead."""


def nudge_as_workers_exit(signals: Signals, master_pid: int, workers: frozenset[int], nudge: int,
                          timeout: float) -> None:
    """Wake the master with ``nudge`` while one of ``workers`` has exited and the master has not
    reaped it, until it has reaped them all, or has started a process that is none of them
    (its new workers, once it has re-executed itself), or ``timeout``.

    A uWSGI master reaps a dead worker on its next loop turn, and between turns it sleeps in
    ``event_queue_wait`` for ``check_interval``, one second (core/master.c,
    ``uwsgi_master_loop``): a graceful reload waits up to a second for nothing. A signal with
    a handler ends that sleep at once (EINTR), so the master reaps the worker and, once all
    are gone, re-executes itself without waiting for the next turn. It ends only a sleep under
    way: one that lands between the master's ``waitpid`` and its next sleep is spent, and the
    master sleeps the whole second. So the nudge goes again every :data:`NUDGE_EVERY` while a
    dead worker lies unreaped (measured with 2 workers under load: the second worker of about
    one reload in three was reaped 0.2 to 1 s after it died when each exit got one nudge).
    """
    pending = set(workers)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        children = signals.children(master_pid)
        if children is None:
            return  # the master is gone
        if children - workers:
            # Started after the reload signal: its new workers. Past the reaping, a child the
            # reload does not stop (none is in uWSGI 2.0's own set: it stops its routers,
            # spoolers, mules and plain daemons) must not keep this loop going.
            return
        pending &= children
        if any(signals.exited(pid) for pid in pending):
            try:
                signals.wake(master_pid, nudge)
            except TargetError:
                return
        time.sleep(NUDGE_EVERY)


def wait_until_delivered(pid: int, signum: int, timeout: float = 1.0) -> None:
    """Wait while ``signum`` is still pending for ``pid`` (Linux's ShdPnd); at once elsewhere, and
    for a process that has exited (a zombie keeps its pending signals and never takes them)."""
    bit = 1 << (signum - 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                fields = dict(line.split(":", 1) for line in f if line.startswith(("State:", "ShdPnd:")))
            pending = int(fields.get("ShdPnd", "0").strip(), 16)
        except (OSError, ValueError):
            return
        if not pending & bit or fields.get("State", "").strip()[:1] in ("Z", "X"):
            return
        time.sleep(0.005)


CHAIN_MERCY_SECONDS = 60.0
"""A worker the chain stopped gracefully that has not exited after this long is killed. uWSGI
gives the workers of its own reloads the same mercy (``--worker-reload-mercy``, 60 s by
default), but it does not time a worker signalled from outside the master: a graceful stop
that never ends (a worker stuck in a request, or in its own exit) would hold the chain for good."""


class WorkerChain(Strategy):
    """uWSGI ``--lazy-apps``: replace the workers one at a time, each only once the one before has
    loaded the app, as ``uwsgi.chain_reload()`` does from inside the master (core/master_checks.c,
    uwsgi_master_check_chain); a watcher outside the master does it worker by worker.

    SIGHUP to a uWSGI worker is its graceful stop (``gracefully_kill``); the master respawns it,
    and with ``--lazy-apps`` the new worker imports the app itself. It proves it loaded by
    publishing a record that says so. A new worker that cannot load never serves (its guard
    in ``wsgi_reload._server.uwsgi`` holds it), so the chain stops there with the other
    workers serving, and resumes on a retry or after the next good save.
    """

    _STATE = ("retiring", "known", "signalled")

    def __init__(self, signals: Signals, records: Workers, load_timeout: float,
                 memory: Memory | None = None, wanted: Callable[[], int | None] = lambda: None) -> None:
        self.signals = signals
        self.records = records
        self.load_timeout = load_timeout
        self.wanted = wanted
        """The generation every worker must run at the end (the newest published): a worker the
        chain started before a newer one was published is replaced once more."""
        self.retiring: list[int] = []
        self.known: set[int] = set()
        self.signalled: set[int] = set()
        self.memory = memory
        self._signalled_at: dict[int, float] = {}
        """When each worker was stopped (by this watcher: a resumed chain counts from its start)."""
        self._recall()

    def __call__(self) -> int:
        """Replace every worker; returns how many. :class:`ActionFailed` while one has not loaded."""
        if not self.retiring:
            self.records.refresh()
            if not self.records.live:
                raise ActionFailed("no worker of this server is up")
            # Every worker, loaded or not: after a start with broken code none has the app.
            self.retiring, self.known, self.signalled = sorted(self.records.live), set(self.records.live), set()
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
                self._remember()
            deadline = time.monotonic() + wait
            while not (fresh := self._loaded() - self.known):
                self._no_mercy_after(old)
                if time.monotonic() >= deadline:
                    raise ActionFailed(f"the new worker replacing {old} has not loaded the app; the other workers "
                                       "serve until it has")
                time.sleep(0.02)
            self.known |= fresh
            self.retiring.pop(0)
            if not self.retiring:
                self.retiring = self._stale()
                count += len(self.retiring)
            self._remember(done=not self.retiring)
        return count

    def _no_mercy_after(self, old: int) -> None:
        """Kill ``old`` if its graceful stop has lasted :data:`CHAIN_MERCY_SECONDS`; the master
        then starts its replacement, which loads the app."""
        since = self._signalled_at.setdefault(old, time.monotonic())
        if time.monotonic() - since < CHAIN_MERCY_SECONDS or self.signals.exited(old):
            return
        log.warning("wsgi_reload: worker %d has not stopped %.0f s after its graceful stop; killing it (SIGKILL), "
                    "as uWSGI's own reloads do", old, CHAIN_MERCY_SECONDS)
        self._signalled_at[old] = math.inf  # once
        with contextlib.suppress(TargetError):
            self.signals.send(old, signal.SIGKILL)

    def _stale(self) -> list[int]:
        """Live workers that loaded an older generation than the one wanted now."""
        wanted = self.wanted()
        if wanted is None:
            return []
        return sorted(pid for pid in self.records.serving
                      if self.records.generation_of.get(pid) not in (None, wanted))

    def _loaded(self) -> set[int]:
        self.records.refresh()
        return set(self.records.serving)


class InPlaceReexec(Strategy):
    """gunicorn with ``preload_app``: the master itself imported the app, so new code needs a new
    master image. ``wsgi_reload.gunicorn`` turns the master's USR2 into an exec of the master in
    place (same pid: PID 1 in a container), which keeps its children, the old workers, serving
    on the inherited sockets. The new image forks new workers, which prove they loaded by
    publishing a record; then each old worker gets TERM, gunicorn's graceful stop.

    A new image that cannot load the checked generation executes itself again with the one the
    old workers run (``wsgi_reload.gunicorn``), so its workers still come up; the old ones then
    retire the same way.
    """

    _STATE = ("old", "count")

    def __init__(self, master_pid: int, signals: Signals, records: Workers, load_timeout: float,
                 memory: Memory | None = None, wanted: Callable[[], int | None] = lambda: None) -> None:
        self.master_pid = master_pid
        self.signals = signals
        self.records = records
        self.load_timeout = load_timeout
        self.wanted = wanted
        """The generation the new image must run (the newest published): one that loaded an
        older one (a USR2 sent before a newer save passed, by a watcher since killed) is
        re-executed once more."""
        self.old: set[int] = set()
        self.leaving: set[int] = set()
        """Old workers sent TERM, finishing their requests: their records may outlive them a moment."""
        self.count = 0
        self.memory = memory
        self._recall()

    def __call__(self) -> int:
        """Re-execute the master and retire its old workers; returns how many new ones serve.
        :class:`ActionFailed` while they have not loaded (the old ones serve on); calling again
        resumes."""
        wait = 0.0
        if not self.old:
            self.records.refresh()
            self.leaving = {pid for pid in self.leaving if not exited(pid)}
            loaded = self.records.serving - self.leaving
            if not loaded:
                raise ActionFailed("no worker of this server is up")
            self.old = set(self.signals.children(self.master_pid) or ()) | self.records.live
            # The new image forks as many workers as the config says; the live ones can be more
            # (old workers a killed watcher sent USR2 for and never retired).
            self.count = self.workers or len(loaded)
            try:
                self.signals.send(self.master_pid, signal.SIGUSR2)
            except TargetError as exc:
                self.old = set()
                raise ActionFailed(str(exc)) from None
            self._remember()
            wait = self.load_timeout
        deadline = time.monotonic() + wait
        while True:
            self.records.refresh()
            new = self.records.live - self.old
            fresh = new & self.records.serving
            if len(fresh) >= self.count:
                break
            _fail_if_a_new_worker_cannot_serve(self.records, new)
            if time.monotonic() >= deadline:
                raise ActionFailed(f"{len(fresh)} of {self.count} workers of the re-executed master have loaded the "
                                   "app; the old ones serve until all have")
            time.sleep(0.02)
        for pid in sorted(self.old):
            try:
                self.signals.send(pid, signal.SIGTERM)
            except TargetError:
                pass  # gone already
        self.leaving |= self.old
        count, self.old = self.count, set()
        self._remember(done=True)
        wanted = self.wanted()
        if wanted is not None and any(self.records.generation_of.get(pid) not in (None, wanted) for pid in fresh):
            return self()  # the new image runs an older generation: once more, for the newest
        return count


NUDGE_SECONDS = 65.0
"""How long the old workers of a graceful reload are followed: uWSGI's default mercy is 60 s."""

UNANSWERED_SIGNALS = 2
"""Reload signals in a row after which the workers still run the generations they ran before:
the next time its workers are stopped instead (see :meth:`SignalReload.stop_workers`)."""

RELOAD_PATIENCE_SECONDS = 60.0
"""A reload whose old workers have begun to exit is followed this long (uWSGI's default mercy)."""

LOST_SIGNAL_SECONDS = 3.0
"""A signalled reload none of whose old workers has exited after this long was lost (uWSGI
ignores a reload signal while it is still starting up from the last one): signal again. A
graceful stop lets a worker finish its request; if every worker is in a long one, the signal
sent again is ignored as part of the reload under way, which does no harm."""


class SignalReload(Strategy):
    """The server's own graceful reload of all its workers at once (uWSGI's SIGHUP to the
    master), reconciled: the live workers are made to run the current generation.

    Signal only when a live worker runs another generation and no reload is under way: a
    reload is under way while a worker that was live at the signal still runs (it is finishing
    its requests), or while none is up (the master is loading the app again). uWSGI ignores a
    reload signal that arrives during a reload, so a second one then would be lost; once the
    reload is over, the new workers say which generation they loaded, and only if it is not the
    current one is the master signalled again. It runs after each batch and on every turn of the
    watcher (a worker's record wakes it), and it reports itself when a reload is over.

    :param nudge: a signal the master handles with nothing, sent as each old worker exits, so
        that it reaps it at once (see :func:`nudge_as_workers_exit`).
    """

    def __init__(self, master_pid: int, signals: Signals, records: Workers, wanted: Callable[[], int | None], *,
                 signum: int = signal.SIGHUP, nudge: int | None = None) -> None:
        self.master_pid = master_pid
        self.signals = signals
        self.records = records
        self.wanted = wanted
        self.signum = signum
        self.nudge = nudge
        self.signalled: set[int] | None = None
        """The live workers when the master was last signalled, while that reload is under way."""
        self.signalled_at = 0.0
        self.unanswered = 0
        """Reload signals sent in a row after which the workers ran no other generation."""
        self.signalled_generations: frozenset[int | None] = frozenset()
        self.hurried = False
        """The workers left in the reload under way were told to stop (see :meth:`hurry`)."""

    def __call__(self) -> None:
        self.tick()

    def under_way(self) -> bool:
        return False  # nothing to resume: the next watcher reconciles from the records alone

    def wants_tick(self) -> bool:
        wanted = self.wanted()
        return wanted is not None and (self.signalled is not None or self.records.generations != {wanted})

    def tick(self) -> None:
        wanted = self.wanted()
        if wanted is None:
            return
        self.records.refresh()  # a worker may have published since the last scan
        live = self.records.live
        if not live:
            return  # between two generations: the next workers load the current one
        if self.signalled is not None:
            waited = time.monotonic() - self.signalled_at
            # By process: a signalled worker whose record is gone may still be finishing requests.
            retiring = {pid for pid in self.signalled if not self.signals.exited(pid)}
            lost = retiring == self.signalled and waited >= LOST_SIGNAL_SECONDS
            if retiring and not lost and waited < RELOAD_PATIENCE_SECONDS:
                if retiring != self.signalled and waited >= LOST_SIGNAL_SECONDS and not self.hurried:
                    self.hurry(retiring)
                return
            if not retiring:
                log.info("wsgi_reload: reload done: %d worker%s serving generation %s, %s (%.0f ms after the signal)",
                         len(live), "" if len(live) == 1 else "s", "/".join(map(str, sorted(
                             g for g in self.records.generations if g is not None))), since_the_save(self.saved_at),
                         1000 * waited)
            self.signalled = None
        if self.records.generations == {wanted}:
            self.unanswered = 0
            return
        if self.unanswered >= UNANSWERED_SIGNALS:
            self.stop_workers(live)
            return
        workers = self.signals.children(self.master_pid)
        try:
            self.signals.send(self.master_pid, self.signum)
        except TargetError as exc:
            log.error("wsgi_reload: cannot reload the server: %s", exc)
            return
        # Unanswered: the workers run the very generations they ran at the last signal.
        generations = frozenset(self.records.generations)
        self.unanswered = self.unanswered + 1 if generations == self.signalled_generations else 1
        self.signalled_generations = generations
        # The workers by their records (read just now), not the master's children: those can
        # include processes that are no workers (uWSGI's --http router), which would hold it
        # "under way".
        self.signalled, self.signalled_at, self.hurried = set(live), time.monotonic(), False
        if self.nudge is not None and workers:
            threading.Thread(target=nudge_as_workers_exit, name="wsgi_reload-nudge", daemon=True,
                             args=(self.signals, self.master_pid, workers, self.nudge, NUDGE_SECONDS)).start()

    def hurry(self, left: set[int]) -> None:
        """Some old workers of the reload under way exited, these have not for a while. uWSGI
        tells each worker to stop as the reload begins (``grace_them_all``); a worker started
        again in that instant (its predecessor died by ``kill -9`` as the signal arrived) is
        never told, and the master waits for it forever. Tell the ones left, gracefully (a
        worker's SIGHUP): one that was told already is finishing its requests, and a second
        SIGHUP changes nothing for it."""
        self.hurried = True
        log.info("wsgi_reload: the reload is waiting for worker%s %s; telling %s to stop gracefully",
                 "" if len(left) == 1 else "s", ", ".join(map(str, sorted(left))), "it" if len(left) == 1 else "them")
        for pid in sorted(left):
            with contextlib.suppress(TargetError):
                self.signals.send(pid, signal.SIGHUP)

    def stop_workers(self, live: set[int]) -> None:
        """The master answered none of the last reload signals with workers of the current
        generation. uWSGI ignores a reload signal while it is reloading, and a reload never ends
        when workers that died during it (a kill -9 as it began) were started again: they were
        never told to stop, and the master waits for them. Stop them gracefully (a uWSGI
        worker's SIGHUP), which ends that reload; without one under way, the master just starts
        them again, and the next signal reloads it."""
        log.warning("wsgi_reload: the server did not reload after %d signals; stopping its workers %s gracefully",
                    self.unanswered, ", ".join(map(str, sorted(live))))
        for pid in sorted(live):
            with contextlib.suppress(TargetError):
                self.signals.send(pid, signal.SIGHUP)
        self.unanswered = 0
        self.signalled, self.signalled_at, self.hurried = set(live), time.monotonic(), True



STRATEGIES: dict[str, Callable[[int, Signals, Workers, float, Callable[[], int | None], Memory | None],
                               Strategy]] = {
    "swap": SignalledSwap,
    "reexec": lambda pid, signals, workers, timeout, wanted, memory: InPlaceReexec(pid, signals, workers, timeout,
                                                                                   memory, wanted),
    "chain": lambda pid, signals, workers, timeout, wanted, memory: WorkerChain(signals, workers, timeout, memory,
                                                                                 wanted),
    "signal": lambda pid, signals, workers, timeout, wanted, memory: SignalReload(pid, signals, workers, wanted),
}
"""How the watcher process replaces workers it can only signal, by the ``replace`` it is given:
``swap`` (gunicorn: TTIN, wait for the new workers' records, TTOU), ``reexec`` (gunicorn with
``preload_app``: USR2, an exec of the master in place, then TERM to the old workers once the new
ones have loaded), ``chain`` (uWSGI ``--lazy-apps``: one worker at a time) and ``signal``
(uWSGI's own graceful reload of every worker, re-evaluated on each turn)."""
