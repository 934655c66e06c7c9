"""The watcher process: the one watcher of a server, whatever the server.

The scan and the check must not run in a worker (a worker's request thread would stop
serving while it waits, and a scan thread in a busy worker queues for the GIL after every
``os.stat``), and not in the master either: uWSGI's runs none of our code, Django under
gunicorn with no config has no hook there, and gunicorn's arbiter is single-threaded. So
the workers only publish records of their modules into the server's private runtime
directory and make sure a watcher process runs; this process does the rest and signals
the server's master, held by a pidfd (docs/design.md says why in full).

Its settings arrive as JSON on standard input (never on the command line, where ``ps``
shows them). An exclusive lock in the runtime directory makes it the only one of its
server; it exits when the master exits, removing the runtime directory, and logs to the
standard error it was given, which is the server's log.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from .._check.check import Checked, CheckResult, check_code, compile_files
from .._core.files import PathFilter
from .._core.gate import ActionFailed
from .._core.scanner import Change, Source
from .._core.settings import Settings
from .._core.watcher import Watcher
from .._hot.transport import PatchPublisher
from . import runtime
from .generations import Generation, project_roots, recover, store_of
from .launch import CHANNEL_NAME, GUNICORN_LOG_FORMAT, LOCK_FD, LOCK_NAME, channel_address
from .records import WorkerRecords, is_record_name
from .signals import Target, TargetError, alive, exited
from .spare import Spare
from .strategies import (
    SPARE,
    STRATEGIES,
    ProcessSignals,
    SignalledSwap,
    SignalReload,
    Strategy,
    children,
    saved_at,
    since_the_save,
)

log = logging.getLogger("wsgi_reload.watcher_process")

RETIRE_AFTER_SECONDS = 10.0
"""With no live worker left to watch for this long (a uWSGI lazy-apps reload moved them to a new
runtime directory), the watcher retires."""


class _RecordMemory:
    """A strategy's state under way, as one record in the runtime directory
    (:class:`wsgi_reload._server.strategies.Memory`)."""

    NAME = "replacing.json"

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def load(self) -> dict[str, Any] | None:
        return runtime.read_record(self.directory, self.NAME)

    def save(self, state: dict[str, Any] | None) -> None:
        if state is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, self.NAME))
        else:
            runtime.write_record(self.directory, self.NAME, state)


NO_WORKER_SECONDS = 2.0
"""How long the check waits for the new worker begun beside it to exist (gunicorn forks one within
milliseconds of a TTIN) before it imports the code itself."""


class _ServerWatch:
    """The watcher of one server, fed by its workers' records."""

    def __init__(self, config: dict[str, Any], target: Target, channel: _KeeperChannel) -> None:
        self.config = config
        self.target = target
        self.channel = channel
        self.runtime_dir: str = config["runtime_dir"]
        self.settings = Settings.load({}, **config["settings"])
        self.signum = signal.Signals["SIG" + config["signal"]]
        self.nudge = signal.Signals["SIG" + config["nudge"]] if config.get("nudge") else None
        self.records = WorkerRecords(self.runtime_dir, accept=alive)
        self.checked_start: set[int] = set()
        replace = config.get("replace", "signal")
        self.replace = replace
        self.strategy: Strategy = STRATEGIES[replace](
            target.pid, ProcessSignals(target), self.records, self.settings.check_timeout,
            lambda: None if self.current is None else self.current.id, _RecordMemory(self.runtime_dir))
        self.strategy.workers = config.get("workers")
        if isinstance(self.strategy, SignalledSwap) and config.get("spare"):
            self.strategy.spare = Spare(self.runtime_dir, notify=channel.generations_changed)
            self.strategy.may_boot = self.may_boot
        if isinstance(self.strategy, SignalReload):
            self.strategy.signum, self.strategy.nudge = self.signum, self.nudge
        how = {"swap": "new workers by TTIN, the old retired by TTOU once those load",
               "reexec": "preload_app: the master re-executes in place, the old workers retire once the new ones load",
               "chain": "a chain: one worker at a time, the next once the new one has loaded"}.get(replace,
                                                                                                   config["signal"])
        server = f"{config['server']} ({how}; master pid {target.pid})"
        self.store = store_of(self.runtime_dir)
        self.end_trial(left=True)
        self.resume = self.strategy.under_way()
        """A watcher killed mid-replacement left one under way: carry it on at the first turn."""
        self.looked_behind = False
        """Whether the first turn has looked for workers on an older generation than the newest."""
        self.roots = project_roots(config["sys_path"])
        self.accept = PathFilter(self.settings.include, self.settings.exclude, base=config["cwd"])
        current = self.store.current_id()
        self.current: Generation | None = None if current is None else self.store.load(current)
        """The newest verified generation: what every process that loads the app imports."""
        self.unloadable: int | None = None
        """A generation that passed the check and that workers could not load (said once)."""
        self.candidate: Generation | None = None
        self.lock: int | None = None
        self.unchecked: list[Change] = []
        """Files that changed while the runtime directory was gone, to check on the next turn."""
        self.config_files: list[str] = config.get("config_files") or []
        self.expected: int | None = config.get("workers")
        self.announced = False
        self.patcher = PatchPublisher(self.runtime_dir, config["cwd"], self.verified_source) \
            if config.get("patch") else None
        self.record_written = threading.Event()
        """Set as a worker's record is written (:meth:`record_event`)."""
        self._turned, self._turn = os.pipe()
        os.set_blocking(self._turn, False)
        """Written at the end of each turn of the watcher thread: the main loop (:meth:`run`) looks again."""
        self.patch_failed: str | None = None
        """Why a worker could not take the last patch (its report, read by another thread)."""
        records: Source = self.records
        if self.patcher is not None:
            patcher = self.patcher
            records = lambda: patcher.remember(self.records())  # noqa: E731
        # The running generation first: for a file in both, the workers' records give the time
        # each loaded it, but the bytes they run are the generation's, read when it was built; a
        # save between the two (a watcher killed meanwhile, a worker respawned) must still count.
        self.watcher = Watcher(self.settings, self.reload, server=server,
                               sources=[self.generation_files, records, lambda: self.config_files],
                               modules_loaded_at_ns=config["loaded_at_ns"],
                               check=self.check, wake_dirs=[self.runtime_dir], wakes_on=self.record_event,
                               name="wsgi_reload-watch-process",
                               on_tick=self.tick)

    def record_event(self, name: str) -> bool:
        """Whether a file event in the runtime directory wakes the monitor: a worker's record
        does (and wakes :meth:`proven_by_a_new_worker` too); the watcher's own files do not."""
        if not is_record_name(name):
            return False
        self.record_written.set()
        return True

    def may_boot(self) -> bool:
        """Whether the code on the disk is what passed the last check: no save refused or waiting."""
        gate = self.watcher.gate
        return gate.broken is None and not gate.has_pending()

    def verified_source(self, path: str) -> bytes | None:
        """A file's bytes as the workers run them: from the newest verified generation."""
        current = self.current
        return None if current is None else self.store.read(current, path)

    def generation_files(self) -> dict[str, int | None]:
        """Every file of the running generation is watched, imported by a worker yet or not."""
        current = self.current
        return {} if current is None else dict.fromkeys(current.files, current.built_ns)

    def check(self, paths: Sequence[str]) -> CheckResult:
        """Read what changed into a candidate generation and check that, not the disk."""
        self.heal()
        base = self.current if self.current is not None else self.candidate
        python = [p for p in self.records.files if p.endswith(".py")]
        candidate = self.store.build(self.roots, base=base, accept=self.accept, extra=[*paths, *python],
                                     patterns=self.records.patterns)
        self.candidate = candidate
        began = self.begin_swap(paths, candidate)
        if not began and self.store.trial_id() is not None:
            # An earlier check's trial (the code changed while it ran) that this one does not take
            # on. (A spare waiting for one waits on: see SignalledSwap.may_boot.)
            self.end_trial()
        result = None
        changed = sorted({*paths, *candidate.changed})
        loaded = set(self.records.files)
        generation = Checked(self.store.directory, candidate.id, candidate.files)
        try:
            if began:
                result = self.proven_by_a_new_worker(changed, generation)
            if result is None:
                result = check_code(changed, self.settings, cwd=self.config["cwd"], sys_path=self.config["sys_path"],
                                    loaded_modules=loaded, generation=generation, server_pid=self.target.pid)
        finally:
            if (result is None or not result.ok) and self.store.trial_id() is not None:
                self.end_trial()
        unchecked = {path for path in changed if path.endswith(".py")} - loaded

        def holds() -> bool:
            self.records()
            return unchecked.isdisjoint(self.records.files)

        return dataclasses.replace(result, holds=holds)

    def proven_by_a_new_worker(self, changed: Sequence[str], generation: Checked) -> CheckResult | None:
        """The verdict of the new worker :meth:`begin_swap` started, when its import is all the
        check would prove: it imported the app from the candidate, every changed file among what
        it imported (and, for Django, the URLconf), and it holds until the verdict. That is the
        check's import, done once, by a real worker, rather than twice on the same cores. None
        (the check runs) when there is more to prove: a changed file it did not import (a module
        the workers import lazily, a template), a ``ready_path``, an import that failed there
        (the check names the error); or when no such worker will say so: a new worker that took
        other code, none started within :data:`NO_WORKER_SECONDS`, the runtime directory gone
        (a temp-file cleaner), or ``check_timeout`` spent."""
        settings, swap = self.settings, self.strategy
        if settings.check != "import" or not settings.app or settings.ready_path \
                or not all(path.endswith(".py") for path in changed) or not isinstance(swap, SignalledSwap):
            return None
        started = time.monotonic()
        compiled = compile_files(changed, generation)
        if not compiled.ok:
            return compiled  # its line and message at once, as the check would
        before = set(self.records.live)
        none_since: float | None = None
        # Woken by each record written, where the monitor hears them as they happen; the master's
        # children (a new worker forked, or none) are looked at on each turn.
        pause = 0.1 if self.watcher.monitor.hears_wakes else 0.005
        while (now := time.monotonic()) < started + settings.check_timeout:
            self.record_written.clear()
            self.records.refresh()
            for held in self.records.held.values():
                if held.generation == generation.id:
                    if not held.loaded or not held.files.issuperset(changed):
                        return None
                    return CheckResult(True, "import by a new worker", started_ns=compiled.started_ns,
                                       seconds=now - started)
            if any(self.records.generation_of.get(pid) == generation.id for pid in self.records.app_failed) \
                    or self.records.live - before or not os.path.isdir(self.runtime_dir):
                return None
            kids = swap.signals.children(self.target.pid)  # (its workers: not an orphan it adopted as PID 1)
            if kids is None or kids - before:
                none_since = None
            elif none_since is None:
                none_since = now
            elif now - none_since > NO_WORKER_SECONDS:
                return None
            self.record_written.wait(pause)
        return None

    def begin_swap(self, paths: Sequence[str], candidate: Generation) -> bool:
        """gunicorn's swap: offer the candidate as the trial and start the first new worker now,
        beside the check, so that its import of the app overlaps the check (it holds before
        serving until the verdict: :meth:`SignalledSwap.begin`). Not for a config change (HUP
        answers that), nor in patch mode, nor with no worker serving, nor while a swap after a
        pass is under way (it carries on after this check); nor when a file changed that new
        workers read from the disk before our finder (Django's settings with no gunicorn
        config): broken, it would fail the worker's boot, which halts gunicorn."""
        swap = self.strategy
        changed = {*paths, *candidate.changed}
        if not isinstance(swap, SignalledSwap) or self.patcher is not None or not self.records.serving \
                or changed & {*self.config_files, *self.records.unchecked} or (swap.retiring and not swap.trial) \
                or candidate.id == 0:  # (0 stands for no trial in the swap's record; only a first generation has it)
            return False
        self.store.offer(candidate)
        try:
            swap.begin(candidate.id)
        except ActionFailed as exc:
            self.store.withdraw(candidate.id)
            self.channel.generations_changed()  # a worker the master forked meanwhile may hold for it
            log.debug("wsgi_reload: no new worker beside the check: %s", exc)
            return False
        self.channel.generations_changed()  # the spare, if one waits, imports it now
        return True

    def end_trial(self, left: bool = False) -> None:
        """The check refused the trial (or, with ``left``, a killed watcher left one undecided):
        withdraw it, so its held workers exit unserved, and undo the swap begun for it. A trial
        that passed (it is the current generation) is a swap to carry on instead."""
        swap = self.strategy
        if left and isinstance(swap, SignalledSwap) and swap.trial in (SPARE, self.store.current_id()):
            return  # a passed trial's swap is carried on; a spare waits on (see SignalledSwap.may_boot)
        self.store.withdraw()
        if isinstance(swap, SignalledSwap):
            try:
                swap.abandon()
            except ActionFailed as exc:
                log.warning("wsgi_reload: %s", exc)
        self.channel.generations_changed()  # after the spare's claim is withdrawn too

    def publish(self) -> None:
        """Make the checked candidate what every process that loads the app imports from now on."""
        if self.candidate is None or self.candidate is self.current:
            return
        keep = {g for g in self.records.generations if g is not None}
        self.store.publish(self.candidate, keep=keep)
        self.current = self.candidate
        self.channel.generations_changed()

    def reload(self, batch: Sequence[Change]) -> None:
        # A reload replaces the workers with the newest generation: none is left behind it to look
        # for (the old workers still publishing while they retire are not behind).
        self.looked_behind = True
        self.publish()
        self.strategy.saved_at = saved_at(batch) or self.strategy.saved_at
        if self.replace == "swap" and not self.records.serving:
            if not self.records.live and children(self.target.pid):
                # Workers run, but none has said what (its record is on the way, or the runtime
                # directory was just made again and they write theirs again): ask again.
                raise ActionFailed("no worker of this server has published what it runs yet")
            # gunicorn started broken: no worker serves, and those that wait for loadable code load
            # this. (uWSGI workers without an app do not wait: the chain replaces them.)
            log.info("wsgi_reload: generation %s passed the check; the waiting workers load it",
                     None if self.current is None else self.current.id)
            return
        if any(change.path in self.config_files for change in batch):
            self.reread_config()
            return
        if self.patcher is not None and batch:
            reason = self.patcher.publish(batch)
            if reason is None:
                log.info("wsgi_reload: patched in place, no restart: each worker takes the new code before its "
                         "next request")
                self.patcher.watch_for_failures(self.patch_failed_in_a_worker)
                return
            log.info("wsgi_reload: not patchable (%s); reloading", reason)
            self.patcher.reset(batch)
        self.replace_workers()

    def replace_workers(self) -> None:
        """Carry out the reload strategy; :class:`ActionFailed` leaves it pending for the gate."""
        started = time.monotonic()
        count = self.strategy()
        if count is not None:
            log.info("wsgi_reload: reload done: %d new worker%s serving%s, %s (%.0f ms after the check passed); "
                     "the old workers retire", count, "" if count == 1 else "s",
                     f", same master pid {self.target.pid}" if self.replace == "reexec" else "",
                     since_the_save(self.strategy.saved_at), 1000 * (time.monotonic() - started))

    def reread_config(self) -> None:
        """The server's config changed: only its own signal re-reads it (gunicorn's HUP, which
        replaces every worker at once: there is nothing to verify before)."""
        old = set(self.records.live)
        try:
            self.target.send(self.signum)
        except TargetError as exc:
            raise ActionFailed(str(exc)) from None
        log.info("wsgi_reload: the server's config changed; %s re-reads it and replaces its workers",
                 self.config["server"])
        threading.Thread(target=self.report_new_workers, args=(old, time.monotonic(), self.strategy.saved_at),
                         name="wsgi_reload-report", daemon=True).start()

    def report_new_workers(self, old: set[int], started: float, saved: float | None,
                           timeout: float = 120.0) -> None:
        """Log once the old workers are gone and every child of the master has loaded (the new
        config may name another number of workers)."""
        while time.monotonic() - started < timeout:
            self.records.refresh()
            fresh = self.records.serving - old
            workers = children(self.target.pid)
            if fresh and all(exited(pid) for pid in old) and workers is not None and workers <= fresh:
                log.info("wsgi_reload: reload done: %d new worker%s serving, %s (%.0f ms after the signal)",
                         len(fresh), "" if len(fresh) == 1 else "s", since_the_save(saved),
                         1000 * (time.monotonic() - started))
                return
            time.sleep(0.05)

    def patch_failed_in_a_worker(self, reason: str) -> None:
        """From the patch publisher's thread: the next turn of the watcher reloads instead."""
        self.patch_failed = reason
        self.watcher.monitor.wake()

    def announce_workers(self) -> None:
        """Say once that the server's workers are up (all of them, when their number is known)."""
        loaded = self.records.serving
        if self.announced or not loaded or (self.expected is not None and len(loaded) < self.expected):
            return
        self.announced = True
        log.info("wsgi_reload: workers up: %d worker%s serving; watching %d files", len(loaded),
                 "" if len(loaded) == 1 else "s", len(self.watcher.scanner.watched_files()))

    def heal(self) -> None:
        """Make a removed (or partly emptied) runtime directory whole again and restore the
        running generation into it; the files that changed since are checked as a batch of their
        own."""
        lost = recover(self.runtime_dir, self.store, self.current, kept=(LOCK_NAME, CHANNEL_NAME))
        if lost is None:
            return
        if not os.path.lexists(os.path.join(self.runtime_dir, LOCK_NAME)):
            # Its lock file is gone: a worker's keeper would start a second watcher on a new one.
            if self.lock is not None:
                os.close(self.lock)
            self.lock = runtime.open_lock(self.runtime_dir, LOCK_NAME)
            with contextlib.suppress(OSError):
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not os.path.lexists(os.path.join(self.runtime_dir, CHANNEL_NAME)):
            try:
                self.channel.listen()  # the keepers connected stay; new workers connect here
            except OSError as exc:
                log.error("wsgi_reload: the workers cannot reach this watcher (%s)", exc)
        self.channel.republish()  # their records may be gone too
        self.unchecked.extend(Change(path, "modified") for path in lost)

    def tick(self) -> None:
        """Housekeeping in the watcher thread: a removed runtime directory, workers whose app failed
        at start, a pending reload."""
        self.heal()
        self.channel.tend()  # a new worker's keeper connects as it boots, and its record wakes us
        if self.current is None:
            # Started before any worker loaded: the first one publishes what it imported.
            current = self.store.current_id()
            self.current = None if current is None else self.store.load(current)
        if self.resume:
            self.resume = False
            log.warning("wsgi_reload: the last watcher stopped while it replaced the workers; carrying that on")
            self.watcher.gate.reload_now()
        elif not self.looked_behind and self.current is not None:
            self.looked_behind = True
            self.reload_workers_behind(self.current.id)
        if self.unchecked:
            batch, self.unchecked = self.unchecked, []
            self.watcher.gate(batch)
        failed = self.waiting_for_code()
        if failed:
            self.checked_start |= failed
            self.recover_start(sorted(failed))
        if self.patch_failed is not None and self.patcher is not None:
            reason, self.patch_failed = self.patch_failed, None
            log.warning("wsgi_reload: a worker could not take the patch (%s); reloading", reason)
            self.patcher.reset([Change(path, "modified") for path in self.patcher.patched])
            self.watcher.gate.reload_now()
        self.watcher.gate.retry_pending()
        if not self.watcher.gate.has_pending():
            try:
                self.strategy.tick()
            except ActionFailed as exc:
                log.warning("wsgi_reload: %s", exc)
        self.announce_workers()
        with contextlib.suppress(OSError):  # full: the main loop has yet to look anyway
            os.write(self._turn, b"\0")

    def reload_workers_behind(self, newest: int) -> None:
        """Workers serving a generation older than the newest verified one, with no replacement
        under way: the last watcher stopped between publishing a generation and replacing the
        workers (or while that replacement waited to be retried). Replace them now. (In patch
        mode the workers took the newest in place, under their older generation's id.)"""
        if self.patcher is not None:
            return
        behind = sorted(pid for pid in self.records.serving
                        if (generation := self.records.generation_of.get(pid)) is not None and generation < newest)
        if behind:
            log.warning("wsgi_reload: worker%s %s run%s older code than generation %d, the newest verified (the last "
                        "watcher stopped before it reloaded them); reloading", "" if len(behind) == 1 else "s",
                        ", ".join(map(str, behind)), "s" if len(behind) == 1 else "", newest)
            self.watcher.gate.reload_now()

    def waiting_for_code(self) -> set[int]:
        """Workers whose app did not load while none serves (the server started broken), not yet
        looked at. A worker that fails while others serve only waits for newer code."""
        if self.records.serving:
            return set()
        return (self.records.app_failed & self.records.live) - self.checked_start

    def recover_start(self, pids: list[int]) -> None:
        """Workers say the app did not load: a broken app, or a save that raced their start."""
        gate = self.watcher.gate
        tried = {self.records.generation_of.get(pid) for pid in pids}
        current = None if self.current is None else self.current.id
        if current is not None and tried == {current} and self.unloadable == current:
            return  # said already; a save reaches the check the usual way
        result = gate.check([])
        if not result.ok:
            gate.refuse(result, old_code_serves=False)
            return
        if self.candidate is not None and not self.candidate.changed and self.current is not None \
                and tried == {current}:
            # The very bytes the workers failed on pass the check: checking and reloading again
            # would only repeat that, as fast as the server replaces its workers. Wait for a save.
            self.unloadable = current
            log.error("wsgi_reload: worker %s cannot load generation %s (%s), although it passed the check: the "
                      "workers fail where the check does not (their environment, or a file outside the project); "
                      "saving a fix reloads", ", ".join(map(str, pids)), self.current.id,
                      self.records.failures.get(pids[0]) or "see its log")
            return
        log.warning("wsgi_reload: worker %s could not load the app, which loads now (a save raced its start); "
                    "reloading", ", ".join(map(str, pids)))
        gate.reload_now()

    def run(self) -> None:
        self.records.refresh()
        self.watcher.start(workers_pending=not self.records.live)
        seen_workers_at: float | None = None
        timeout: float | None = 2.0
        next_turn = 0.0
        while not self.target.wait_exit(timeout, wake_fd=self._turned):
            # The master's workers counted after a swap are looked at 4 times a second (until
            # they match: a few seconds), and workers waiting for loadable code every 2 s: the
            # watcher thread is woken for a turn. Otherwise nothing wakes this loop but the
            # master's exit, a turn of the watcher thread (which is what changes the above) and,
            # with no worker, a look every 2 s whether to retire: an idle server costs nothing here.
            now = time.monotonic()
            period = 0.25 if self.strategy.wants_tick() else 2.0 if self.waiting_for_code() else None
            if period is not None and now >= next_turn:
                next_turn = now + period
                self.watcher.monitor.wake()  # its turn writes to the pipe: looked at again then
            timeout = None if period is None else max(0.0, next_turn - now)
            if not self.records.live:
                timeout = 2.0 if timeout is None else min(timeout, 2.0)
            if self.records.live:
                seen_workers_at = time.monotonic()
            elif seen_workers_at is not None and time.monotonic() - seen_workers_at > RETIRE_AFTER_SECONDS \
                    and children(self.target.pid):
                # The master has workers that publish elsewhere (a --lazy-apps reload's new runtime
                # directory). With none at all it is loading the app again, from this store: stay.
                log.info("wsgi_reload: no worker of this server publishes here any more; this watcher retires")
                break
        self.watcher.stop(timeout=2)
        runtime.remove(self.runtime_dir)


class _KeeperChannel:
    """The watcher's end of its one channel to the workers: a Unix socket in the runtime
    directory (``launch.CHANNEL_NAME``) to which every worker's keeper stays connected
    (:func:`wsgi_reload._server.launch.keep_watcher_running`). The keepers learn that the
    watcher ended from their connection's end of file, and this end writes them one JSON object
    a line: a log line for one of them to log; to all, that the runtime directory was made
    again, or that the generations changed. Nothing here blocks: a keeper whose buffer is full
    is let go (it connects again), and connections are accepted whenever something is sent and
    on each turn of the watcher thread."""

    BACKLOG_BYTES = 64 * 1024
    """How much of the log lines kept while no keeper is connected (the oldest go first): they
    go to the next keeper in one write, which must fit in its empty socket buffer."""

    def __init__(self, runtime_dir: str) -> None:
        self.runtime_dir = runtime_dir
        self.keepers: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.unsent: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()

    def listen(self) -> None:
        """Listen at the channel's path, in place of any socket there (a watcher's that ended,
        or the path in a runtime directory made again); OSError when it cannot."""
        directory = runtime.open_dir(self.runtime_dir)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(CHANNEL_NAME, dir_fd=directory)
            listener.bind(channel_address(self.runtime_dir, directory))
            listener.listen(socket.SOMAXCONN)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        finally:
            os.close(directory)
        with self._lock:
            if self.listener is not None:
                self.listener.close()
            self.listener = listener

    def tend(self) -> None:
        """Accept the keepers waiting to connect, and let go of those that have gone."""
        with self._lock:
            self._accept()
            for keeper in list(self.keepers):
                try:
                    gone = keeper.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    self._drop(keeper)

    def log_line(self, level: int, message: str) -> None:
        """Have one keeper log ``message`` through its server's logger (the first to connect,
        when none is connected now)."""
        line = json.dumps({"log": [level, message]}).encode() + b"\n"
        with self._lock:
            self._accept()
            if not any(self._send(keeper, line) for keeper in list(self.keepers)):
                self.unsent.append(line)
                kept = sum(map(len, self.unsent))
                while kept > self.BACKLOG_BYTES:
                    kept -= len(self.unsent.popleft())

    def republish(self) -> None:
        """Have every keeper write its worker's record again (the runtime directory was made again)."""
        self._to_every_keeper(b'{"republish": true}\n')

    def generations_changed(self) -> None:
        """Tell every worker that a generation was published or a trial withdrawn: one holding
        for its verdict reads the store at once (:func:`wsgi_reload._server.launch.wait_for_news`)."""
        self._to_every_keeper(b'{"generations": true}\n')

    def _to_every_keeper(self, line: bytes) -> None:
        with self._lock:
            self._accept()
            for keeper in list(self.keepers):
                self._send(keeper, line)

    def _accept(self) -> None:
        while self.listener is not None:
            try:
                keeper, _ = self.listener.accept()
            except OSError:  # none waiting (BlockingIOError), or the listener closed
                return
            keeper.setblocking(False)
            self.keepers.append(keeper)
            if self.unsent and self._send(keeper, b"".join(self.unsent)):
                self.unsent.clear()

    def _send(self, keeper: socket.socket, line: bytes) -> bool:
        try:
            sent = keeper.send(line)
        except OSError:
            sent = 0
        if sent == len(line):
            return True
        self._drop(keeper)  # gone, or not reading: a part of a line would garble the rest
        return False

    def _drop(self, keeper: socket.socket) -> None:
        keeper.close()
        with contextlib.suppress(ValueError):
            self.keepers.remove(keeper)


class _ServerLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Standard error, which is the server's log, until the server replaces it under us: a uWSGI
    master with a logger (``--req-logger``, ``--logger``, ``--log-master``) hands its workers a
    socket to it, and makes a new one on each reload, so the watcher's copy then leads nowhere.
    From then on each line goes to a worker's keeper, which logs it through the server's own
    logger (:class:`_KeeperChannel`)."""

    def __init__(self, master_pid: int, channel: _KeeperChannel) -> None:
        super().__init__(sys.stderr)
        self.master_pid = master_pid
        self.channel = channel

    def _stale(self) -> bool:
        try:
            ours = os.readlink("/proc/self/fd/2")
            theirs = os.readlink(f"/proc/{self.master_pid}/fd/2")
        except OSError:
            return False
        return ours != theirs and ours.startswith("socket:") and theirs.startswith("socket:")

    def emit(self, record: logging.LogRecord) -> None:
        if not self._stale():
            super().emit(record)
            return
        try:
            self.channel.log_line(record.levelno, record.getMessage())
        except Exception:
            self.handleError(record)


def main() -> None:
    """Entry point of the watcher process."""
    config: dict[str, Any] = json.loads(sys.stdin.read())
    channel = _KeeperChannel(config["runtime_dir"])
    handler: logging.Handler = _ServerLogHandler(config["master_pid"], channel)
    unopened = None
    if config.get("log_file"):
        try:
            handler = logging.FileHandler(config["log_file"])
        except OSError as exc:
            unopened = exc
    handler.setFormatter(logging.Formatter(config.get("log_format", GUNICORN_LOG_FORMAT), "%Y-%m-%d %H:%M:%S %z"))
    root = logging.getLogger("wsgi_reload")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # it stops with its master, not with a terminal's ^C
    if unopened is not None:
        log.warning("wsgi_reload: cannot open the server's log file (%s); logging to standard error", unopened)

    # The worker that spawned us holds the server's watcher lock on file descriptor 3 for us.
    try:
        fcntl.flock(LOCK_FD, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, OSError):
        return
    if os.fork():
        os._exit(0)  # the spawning worker reaps this first process at once; the watcher is nobody's zombie
    runtime.hold_against_cleaners(config["runtime_dir"])
    try:
        channel.listen()
    except OSError as exc:
        log.error("wsgi_reload: the workers cannot reach this watcher (%s), so they look for it once a second "
                  "and a watcher that stops is started again only then", exc)
    try:
        target = Target(config["master_pid"], f"the {config['server']} master (pid {config['master_pid']})",
                        may_be_init=True)
    except TargetError as exc:
        log.error("wsgi_reload: not watching: %s", exc)
        return
    with contextlib.suppress(KeyboardInterrupt):
        _ServerWatch(config, target, channel).run()
