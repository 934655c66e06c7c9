"""The watcher process's strategies for replacing workers, on a fake server (no processes).

A fake master answers signals the way gunicorn's arbiter (TTIN forks one more worker, TTOU
retires the oldest) and uWSGI's master (a worker sent HUP is replaced) do, and its workers
publish what a real worker's record says: loaded, or failed and why. The real servers run
these strategies in tests/test_django.py and tests/test_uwsgi.py.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from wsgi_reload._core.gate import ActionFailed
from wsgi_reload._server import strategies
from wsgi_reload._server.signals import TargetGone
from wsgi_reload._server.strategies import STRATEGIES, InPlaceReexec, SignalledSwap, SignalReload, WorkerChain

MASTER = 100


class FakeServer:
    """Implements both :class:`wsgi_reload._server.strategies.Signals` and
    :class:`wsgi_reload._server.strategies.Workers`."""

    def __init__(self, workers: int, new_worker: Callable[[int], bool | str] = lambda pid: True) -> None:
        self.next_pid = 1000
        self.workers: list[int] = []  # oldest first, as gunicorn's ages order them
        self.records: dict[int, bool | str] = {}
        self.new_worker = new_worker
        """What a worker started from now on says: True (loaded), why it failed, or None: nothing
        yet (a gunicorn worker publishes its record only once its app loaded)."""
        self.sent: list[tuple[int, str]] = []
        for _ in range(workers):
            self.records[self.spawn()] = True
        self.live: set[int] = set()
        self.serving: set[int] = set()
        self.app_failed: set[int] = set()
        self.failures: dict[int, str] = {}
        self.generation = 1
        """The generation a worker started now loads."""
        self.generation_of: dict[int, int | None] = {pid: 1 for pid in self.workers}
        self.generations: set[int | None] = set()
        self.master_reloads = True
        """uWSGI's master answers SIGHUP with a graceful reload; False: it ignores it (one under way)."""
        self.lingering: set[int] = set()
        """Old workers of a uWSGI reload still finishing their requests."""
        self.master_listens = True
        """False: the master closed its listeners (gunicorn's stop does that first)."""
        self.linger = False
        self.stuck: set[int] = set()
        """Workers whose graceful stop (SIGHUP) never ends."""

    def spawn(self) -> int:
        self.next_pid += 1
        self.workers.append(self.next_pid)
        return self.next_pid

    # Signals

    def send(self, pid: int, signum: int) -> None:
        self.sent.append((pid, signal.Signals(signum).name))
        if pid == MASTER and signum == signal.SIGTTIN:
            self.start_worker()
        elif pid == MASTER and signum == signal.SIGTTOU:
            self.records.pop(self.workers.pop(0), None)
        elif pid == MASTER and signum == signal.SIGUSR2:  # an exec in place: the old workers stay its children
            for _ in range(len(self.workers)):
                self.start_worker()
        elif signum == signal.SIGTERM:
            if pid not in self.workers:
                raise TargetGone(f"worker {pid} has exited")
            self.workers.remove(pid)
            self.records.pop(pid, None)
        elif pid == MASTER and signum == signal.SIGHUP:  # uWSGI: a graceful reload of every worker
            if not self.master_reloads:
                return
            old, self.workers = list(self.workers), []
            for worker in old:
                self.records.pop(worker, None)
            if self.linger:
                self.lingering |= set(old)
            for _ in old:
                self.start_worker()
        elif signum == signal.SIGHUP and pid in self.stuck:
            return
        elif signum == signal.SIGKILL and pid in self.workers:  # the master starts another in its place
            self.stuck.discard(pid)
            self.workers.remove(pid)
            self.records.pop(pid, None)
            self.start_worker()
        elif signum == signal.SIGHUP and pid in self.lingering:  # a worker the reload forgot: it stops now
            self.lingering.discard(pid)
        elif signum == signal.SIGHUP:
            if pid not in self.workers:
                raise TargetGone(f"worker {pid} has exited")
            self.workers.remove(pid)
            self.records.pop(pid, None)
            self.start_worker()

    def wake(self, pid: int, signum: int) -> None:
        self.sent.append((pid, signal.Signals(signum).name))

    def start_worker(self) -> None:
        pid = self.spawn()
        self.generation_of[pid] = self.generation
        record = self.new_worker(pid)
        if record is not None:
            self.records[pid] = record

    def children(self, pid: int) -> frozenset[int] | None:
        return frozenset(self.workers) | self.lingering if pid == MASTER else frozenset()

    def exited(self, pid: int) -> bool:
        return pid not in self.workers and pid not in self.lingering

    def oldest_first(self, pids: frozenset[int]) -> list[int]:
        return [pid for pid in self.workers if pid in pids]

    def handled(self, pid: int, signum: int) -> None:
        pass

    def listening(self, pid: int) -> bool:
        return self.master_listens

    # Workers

    def refresh(self) -> None:
        self.live = set(self.records)
        self.serving = {pid for pid, r in self.records.items() if r is True}
        self.app_failed = {pid for pid, r in self.records.items() if isinstance(r, str)}
        self.failures = {pid: r for pid, r in self.records.items() if isinstance(r, str)}
        self.generations = {self.generation_of.get(pid) for pid in self.records}

    def say(self, pid: int, record: bool | str) -> None:
        self.records[pid] = record


def test_the_table_names_each_strategy() -> None:
    server = FakeServer(2)
    assert isinstance(STRATEGIES["swap"](MASTER, server, server, 1.0, lambda: None, None), SignalledSwap)
    assert isinstance(STRATEGIES["chain"](MASTER, server, server, 1.0, lambda: None, None), WorkerChain)
    assert isinstance(STRATEGIES["reexec"](MASTER, server, server, 1.0, lambda: None, None), InPlaceReexec)
    assert isinstance(STRATEGIES["signal"](MASTER, server, server, 1.0, lambda: None, None), SignalReload)


def test_reexec_signals_the_master_once_and_retires_the_old_workers_once_the_new_load() -> None:
    server = FakeServer(2)
    old = list(server.workers)
    assert InPlaceReexec(MASTER, server, server, load_timeout=1.0)() == 2
    assert server.sent == [(MASTER, "SIGUSR2"), (old[0], "SIGTERM"), (old[1], "SIGTERM")]
    assert not set(old) & set(server.workers) and len(server.workers) == 2


def test_reexec_retires_nothing_while_the_new_workers_load_and_resumes_without_a_second_exec() -> None:
    server = FakeServer(2, new_worker=lambda pid: None)
    reexec = InPlaceReexec(MASTER, server, server, load_timeout=0.1)
    with pytest.raises(ActionFailed, match="0 of 2 workers of the re-executed master have loaded"):
        reexec()
    assert server.sent == [(MASTER, "SIGUSR2")]  # the old workers serve on
    for pid in server.workers[2:]:
        server.say(pid, True)
    assert reexec() == 2
    assert [name for _, name in server.sent] == ["SIGUSR2", "SIGTERM", "SIGTERM"]


def test_reexec_ends_at_once_when_a_new_worker_says_it_cannot_serve() -> None:
    server = FakeServer(2, new_worker=lambda pid: "NotReady: GET /healthz answered 500")
    with pytest.raises(ActionFailed, match="cannot serve the code that passed the check .NotReady"):
        InPlaceReexec(MASTER, server, server, load_timeout=60.0)()
    assert server.sent == [(MASTER, "SIGUSR2")]


def test_swap_adds_a_worker_per_worker_then_retires_the_old_ones() -> None:
    server = FakeServer(2)
    old = list(server.workers)
    assert SignalledSwap(MASTER, server, server, load_timeout=1.0)() == 2
    assert server.sent == [(MASTER, "SIGTTIN"), (MASTER, "SIGTTIN"), (MASTER, "SIGTTOU"), (MASTER, "SIGTTOU")]
    assert not set(old) & set(server.workers) and len(server.workers) == 2


def test_swap_retires_an_old_worker_as_each_new_one_serves_and_resumes_once_they_have() -> None:
    """One new worker first; the rest once it serves (alone it loads sooner on a busy machine).
    Nothing retires while a new worker loads; each that serves retires the oldest old one."""
    server = FakeServer(2, new_worker=lambda pid: None)
    old = list(server.workers)
    swap = SignalledSwap(MASTER, server, server, load_timeout=0.1)
    with pytest.raises(ActionFailed, match="0 of 2 new workers have loaded"):
        swap()
    assert [name for _, name in server.sent] == ["SIGTTIN"]
    server.say(server.workers[2], True)
    with pytest.raises(ActionFailed, match="1 of 2 new workers have loaded"):
        swap()
    assert [name for _, name in server.sent] == ["SIGTTIN", "SIGTTIN", "SIGTTOU"]
    assert old[0] not in server.workers and old[1] in server.workers
    server.say(server.workers[2], True)
    assert swap() == 2
    assert [name for _, name in server.sent] == ["SIGTTIN", "SIGTTIN", "SIGTTOU", "SIGTTOU"]  # no TTIN again


def test_a_first_new_worker_that_loads_slowly_is_not_taken_for_a_lost_ttin() -> None:
    """The first new worker takes longer than a second to load: the second is not started yet
    by design, which must not read as a TTIN that never arrived (one worker too many)."""
    server = FakeServer(2, new_worker=lambda pid: None)
    with pytest.raises(ActionFailed):
        SignalledSwap(MASTER, server, server, load_timeout=1.3)()
    assert [name for _, name in server.sent] == ["SIGTTIN"]


def test_swap_ends_at_once_when_a_new_worker_says_it_cannot_serve() -> None:
    server = FakeServer(2, new_worker=lambda pid: "NotReady: GET /healthz answered 500")
    swap = SignalledSwap(MASTER, server, server, load_timeout=60.0)  # would wait a minute for a load
    with pytest.raises(ActionFailed, match="cannot serve the code that passed the check .NotReady: GET /healthz"):
        swap()
    assert "SIGTTOU" not in [name for _, name in server.sent]  # the old workers serve on


def test_swap_replaces_a_new_worker_that_loaded_an_older_generation_too() -> None:
    """Generation 2 is published while the swap's first new worker had already loaded 1: that
    worker retires as well, one more is added, and every worker left runs 2."""
    server = FakeServer(2)
    old = list(server.workers)

    def new_worker(pid: int) -> bool:
        server.generation = 2  # published once the first new worker had forked
        return True

    server.new_worker = new_worker
    assert SignalledSwap(MASTER, server, server, load_timeout=1.0, wanted=lambda: 2)() == 2
    assert [name for _, name in server.sent] == ["SIGTTIN", "SIGTTIN", "SIGTTIN"] + ["SIGTTOU"] * 3
    assert not set(old) & set(server.workers) and len(server.workers) == 2
    assert {server.generation_of[pid] for pid in server.workers} == {2}


def test_swap_replaces_new_workers_that_all_loaded_an_older_generation() -> None:
    """A watcher killed mid-swap left two new workers that both loaded generation 1; 2 has been
    published since. The next watcher retires them too and goes on at once with new ones (it
    waited for a new worker it never asked for, until its timeout)."""
    server = FakeServer(2)
    old = list(server.workers)
    server.send(MASTER, signal.SIGTTIN)
    server.send(MASTER, signal.SIGTTIN)
    server.generation = 2
    memory = DictMemory()
    memory.save({"retiring": sorted(old), "count": 2, "ran": 2, "added": 2, "retired": 0, "adding": [], "leaving": [],
                 "recount": 0, "trial": 0, "spared": 0})
    assert SignalledSwap(MASTER, server, server, 1.0, wanted=lambda: 2, memory=memory)() == 2
    assert not set(old) & set(server.workers) and len(server.workers) == 2
    assert {server.generation_of[pid] for pid in server.workers} == {2}


def test_swap_of_a_server_with_no_worker_up_does_nothing() -> None:
    server = FakeServer(0)
    with pytest.raises(ActionFailed, match="no worker of this server is up"):
        SignalledSwap(MASTER, server, server, load_timeout=0.1)()
    assert server.sent == []


def test_chain_replaces_one_worker_at_a_time() -> None:
    server = FakeServer(3)
    old = list(server.workers)
    assert WorkerChain(server, server, load_timeout=1.0)() == 3
    assert server.sent == [(pid, "SIGHUP") for pid in old]
    assert not set(old) & set(server.workers)


def test_chain_replaces_once_more_a_worker_that_loaded_an_older_generation() -> None:
    """Generation 2 is published once the chain's first new worker has loaded 1: that worker is
    replaced once more at the end, and every worker left runs 2."""
    server = FakeServer(2)
    old = list(server.workers)
    first: list[int] = []

    def new_worker(pid: int) -> bool:
        if not first:
            first.append(pid)  # it loaded 1; 2 is published right after
            server.generation = 2
        return True

    server.new_worker = new_worker
    assert WorkerChain(server, server, load_timeout=1.0, wanted=lambda: server.generation)() == 3
    assert server.sent == [(old[0], "SIGHUP"), (old[1], "SIGHUP"), (first[0], "SIGHUP")]
    assert {server.generation_of[pid] for pid in server.workers} == {2}


def test_chain_stops_at_a_worker_whose_replacement_has_not_loaded() -> None:
    server = FakeServer(2, new_worker=lambda pid: None)
    first, second = server.workers
    chain = WorkerChain(server, server, load_timeout=0.1)
    with pytest.raises(ActionFailed, match=f"the new worker replacing {first} has not loaded"):
        chain()
    assert server.sent == [(first, "SIGHUP")]  # the second old worker serves on
    server.say(server.workers[-1], True)
    server.new_worker = lambda pid: True
    assert chain() == 2
    assert server.sent == [(first, "SIGHUP"), (second, "SIGHUP")]


def test_chain_kills_a_worker_whose_graceful_stop_outlasts_the_mercy(monkeypatch: pytest.MonkeyPatch) -> None:
    """uWSGI does not time a worker stopped from outside its master: a graceful stop that never
    ends would hold the chain for good. After the mercy the chain kills that worker; the master
    starts its replacement and the chain goes on."""
    import wsgi_reload._server.strategies as strategies

    monkeypatch.setattr(strategies, "CHAIN_MERCY_SECONDS", 0.2)
    server = FakeServer(2)
    first, second = server.workers
    server.stuck.add(first)
    assert WorkerChain(server, server, load_timeout=5.0)() == 2
    assert server.sent == [(first, "SIGHUP"), (first, "SIGKILL"), (second, "SIGHUP")]
    assert not {first, second} & set(server.workers) and len(server.workers) == 2


class DictMemory:
    """:class:`wsgi_reload._server.strategies.Memory` in a dict: what a killed watcher leaves for the next."""

    def __init__(self) -> None:
        self.state: dict[str, object] | None = None

    def load(self) -> dict[str, object] | None:
        return None if self.state is None else dict(self.state)

    def save(self, state: dict[str, object] | None) -> None:
        self.state = None if state is None else dict(state)


@pytest.mark.parametrize("name", ["swap", "reexec", "chain"])
def test_a_new_watcher_resumes_a_replacement_the_killed_one_left_under_way(name: str) -> None:
    """The watcher is killed while the new workers load: the next watcher's strategy carries the
    same replacement on (no second round of TTIN, USR2 or HUP, so no doubled workers), and it
    ends with as many workers as before, none of them old."""
    server = FakeServer(2, new_worker=lambda pid: None)
    old = set(server.workers)
    memory = DictMemory()
    first = STRATEGIES[name](MASTER, server, server, 0.05, lambda: None, memory)
    with pytest.raises(ActionFailed):
        first()
    sent = list(server.sent)
    assert memory.state is not None
    del first  # killed
    for pid in server.workers:
        if pid not in old:
            server.say(pid, True)
    server.new_worker = lambda pid: True
    second = STRATEGIES[name](MASTER, server, server, 1.0, lambda: None, memory)
    assert second.under_way()
    assert second() == 2
    assert server.sent[:len(sent)] == sent
    # No second round: a swap had sent its first TTIN only (the rest follow once that one serves).
    assert [s[1] for s in server.sent].count("SIGTTIN") == (2 if name == "swap" else 0)
    assert not [s for s in server.sent[len(sent):] if s[1] == "SIGUSR2"]
    assert not old & set(server.workers) and len(server.workers) == 2
    assert not second.under_way()


def test_a_resumed_swap_tells_whether_a_ttin_it_had_announced_arrived() -> None:
    """The watcher was killed between a TTIN reaching the master and its record of it: the record
    names the master's children before that TTIN, so the next watcher sees the worker it forked
    and sends no second one; the swap ends with as many workers as before, none of them old."""
    server = FakeServer(2)
    old = set(server.workers)
    memory = DictMemory()
    server.send(MASTER, signal.SIGTTIN)
    before = sorted(server.workers)
    server.send(MASTER, signal.SIGTTIN)  # delivered; the record still says it is about to be sent
    memory.save({"retiring": sorted(old), "count": 2, "ran": 2, "added": 1, "retired": 0, "adding": before,
                 "leaving": [], "recount": 0, "trial": 0, "spared": 0})
    second = SignalledSwap(MASTER, server, server, 1.0, memory=memory)
    assert second() == 2
    assert [name for _, name in server.sent].count("SIGTTIN") == 2
    assert not old & set(server.workers) and len(server.workers) == 2


def test_a_swap_right_after_a_swap_does_not_count_the_workers_still_leaving() -> None:
    """A save lands while the workers the last swap retired still finish their requests: the next
    swap waits for as many new workers as serve, not for those too."""
    server = FakeServer(2)
    memory = DictMemory()
    swap_ = SignalledSwap(MASTER, server, server, 0.5, memory=memory)
    assert swap_() == 2
    leaving = {1001, 1002}
    for pid in leaving:  # TTOU'd, still finishing a request: their records are there
        server.records[pid] = True
    assert swap_() == 2
    assert [name for _, name in server.sent].count("SIGTTIN") == 4


def test_after_a_resumed_swap_a_worker_lost_to_a_repeated_ttou_is_added_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The killed watcher's last TTOU reached the master before its record: the next watcher sends
    it again, which retires one new worker too many. Once the workers are steady it adds one."""
    monkeypatch.setattr(strategies, "STEADY_SECONDS", 0.05)
    server = FakeServer(2)
    old = set(server.workers)
    memory = DictMemory()
    server.send(MASTER, signal.SIGTTIN)
    server.send(MASTER, signal.SIGTTIN)
    server.send(MASTER, signal.SIGTTOU)  # delivered; the record says none was sent
    memory.save({"retiring": sorted(old), "count": 2, "ran": 2, "added": 2, "retired": 0, "adding": [], "leaving": [],
                 "recount": 0, "trial": 0, "spared": 0})
    second = SignalledSwap(MASTER, server, server, 1.0, memory=memory)
    assert second() == 2
    assert len(server.workers) == 1 and second.wants_tick()
    tick_until_settled(second)
    assert len(server.workers) == 2 and not old & set(server.workers)


class FakeArbiter(FakeServer):
    """A master that keeps a number of workers, as gunicorn's arbiter does: TTIN and TTOU change
    it (TTOU retires the oldest), and a worker that exits is replaced while fewer run. One TTOU
    can be lost, as two that reach a busy master before its handler ran are."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.wanted_workers = workers
        self.lose_ttou: list[bool] = []
        """For each TTOU from now on, whether the master misses it."""

    def send(self, pid: int, signum: int) -> None:
        if pid == MASTER and signum == signal.SIGTTIN:
            self.wanted_workers += 1
        elif pid == MASTER and signum == signal.SIGTTOU:
            if self.lose_ttou and self.lose_ttou.pop(0):
                self.sent.append((pid, "SIGTTOU"))
                return
            self.wanted_workers -= 1
        super().send(pid, signum)
        if signum == signal.SIGTERM and len(self.workers) < self.wanted_workers:
            self.start_worker()


def tick_until_settled(swap_: SignalledSwap, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while swap_.wants_tick():
        assert time.monotonic() < deadline, "the swap did not settle"
        swap_.tick()
        time.sleep(0.02)


def test_a_swap_counts_a_worker_still_booting_among_the_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A save lands while the second worker still loads (the server's start, a --max-requests
    restart): the swap replaces the one serving, and the master keeps its two workers once the
    booting one serves rather than retiring it as one too many."""
    monkeypatch.setattr(strategies, "STEADY_SECONDS", 0.05)
    server = FakeArbiter(2)
    booting = server.workers[1]
    del server.records[booting]  # forked, no record yet
    swap_ = SignalledSwap(MASTER, server, server, 1.0, memory=DictMemory())
    assert swap_() == 1
    server.say(booting, True)
    tick_until_settled(swap_)
    assert len(server.workers) == 2 and booting in server.workers


def test_a_ttou_the_master_missed_leaves_no_old_worker_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second TTOU of a swap is lost: the old worker it was for is stopped all the same (the
    master replaces it with a worker of the new code), and once steady the one worker too many is
    retired, so the server ends with as many workers as before, none of them old."""
    monkeypatch.setattr(strategies, "STEADY_SECONDS", 0.05)
    server = FakeArbiter(2)
    old = set(server.workers)
    server.generation = 2
    server.lose_ttou = [False, True]
    swap_ = SignalledSwap(MASTER, server, server, 1.0)
    assert swap_() == 2
    assert not old & set(server.workers) and len(server.workers) == 3
    tick_until_settled(swap_)
    assert len(server.workers) == 2 and server.wanted_workers == 2
    assert {server.generation_of[pid] for pid in server.workers} == {2}


def test_a_master_that_is_stopping_is_not_sent_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """gunicorn stopped after a swap: its workers exit one by one and none replaces them. That is
    not a worker missing: no TTIN (seen on a real gunicorn whose gevent worker took the graceful
    timeout to exit: "the master runs 1 workers, 1 fewer than before the reload", twice)."""
    monkeypatch.setattr(strategies, "STEADY_SECONDS", 0.05)
    server = FakeArbiter(2)
    swap_ = SignalledSwap(MASTER, server, server, 1.0)
    assert swap_() == 2
    server.master_listens = False
    server.records.pop(server.workers.pop(0))  # one worker done stopping, one still finishing
    sent = len(server.sent)
    for _ in range(20):  # 0.4 s: the steady time eight times over
        swap_.tick()
        time.sleep(0.02)
    assert server.sent[sent:] == []


def test_a_master_that_seemed_not_to_listen_once_is_counted_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reading of the master's listeners that finds none while it serves (the master is not
    stopping) does not end the counting: the worker too many is still retired."""
    monkeypatch.setattr(strategies, "STEADY_SECONDS", 0.05)
    server = FakeArbiter(2)
    server.generation = 2
    server.lose_ttou = [False, True]
    swap_ = SignalledSwap(MASTER, server, server, 1.0)
    assert swap_() == 2 and len(server.workers) == 3
    readings = iter([False])
    server.listening = lambda pid: next(readings, True)  # type: ignore[method-assign]
    tick_until_settled(swap_)
    assert len(server.workers) == 2


def test_a_swap_begun_beside_the_check_carries_on_once_it_passed() -> None:
    """begin() starts one new worker while the check runs; it holds (no record) until the
    verdict. After a pass the swap adds the rest and retires exactly the old workers."""
    server = FakeArbiter(2)
    old = set(server.workers)
    server.generation = 2
    server.new_worker = lambda pid: None
    swap_ = SignalledSwap(MASTER, server, server, 1.0, lambda: 2)
    swap_.begin(2)
    assert [name for _, name in server.sent] == ["SIGTTIN"]
    [held] = set(server.workers) - old
    server.records[held] = True  # the check passed: the held worker serves
    server.new_worker = lambda pid: True
    assert swap_() == 2
    assert not old & set(server.workers) and held in server.workers and len(server.workers) == 2
    assert [name for _, name in server.sent if name != "SIGTERM"] == ["SIGTTIN", "SIGTTIN", "SIGTTOU", "SIGTTOU"]
    assert not swap_.under_way()


def test_a_one_worker_swap_waits_for_the_held_worker_to_see_the_verdict() -> None:
    """With one worker, the held worker is the whole swap: it serves a few ms after the pass
    (once it has seen the verdict). The swap waits for that, rather than look once, fail, and
    log "cannot reload yet" until a retry."""
    server = FakeArbiter(1)
    server.generation = 2
    server.new_worker = lambda pid: None
    swap_ = SignalledSwap(MASTER, server, server, 5.0, lambda: 2)
    swap_.begin(2)
    [held] = set(server.workers) - {min(server.workers)}
    timer = threading.Timer(0.2, lambda: server.records.__setitem__(held, True))  # it saw the verdict
    timer.start()
    try:
        assert swap_() == 1
    finally:
        timer.cancel()
    assert server.workers == [held]


def test_a_swap_begun_for_code_the_check_refused_retires_no_old_worker_early(monkeypatch: pytest.MonkeyPatch) -> None:
    """The held worker exits unserved and the master starts one of the running code in its
    place. Only once that one serves is the one worker too many retired: a TTOU at once would
    stop an old worker first (with one worker, none would serve meanwhile)."""
    monkeypatch.setattr(strategies, "STEADY_SECONDS", 0.05)
    server = FakeArbiter(2)
    old = set(server.workers)
    server.generation = 2
    server.new_worker = lambda pid: None
    swap_ = SignalledSwap(MASTER, server, server, 1.0)
    swap_.begin(2)
    [held] = set(server.workers) - old
    swap_.abandon()
    assert [name for _, name in server.sent] == ["SIGTTIN"]
    server.generation, server.new_worker = 1, lambda pid: True
    server.workers.remove(held)  # it exits; the master replaces it
    server.start_worker()
    tick_until_settled(swap_)
    assert len(server.workers) == 2 and {server.generation_of[pid] for pid in server.workers} == {1}
    assert [name for _, name in server.sent].count("SIGTTOU") == 1 and server.wanted_workers == 2


def test_a_swap_whose_ttous_all_arrived_retires_nothing_more(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(strategies, "STEADY_SECONDS", 0.05)
    server = FakeArbiter(2)
    swap_ = SignalledSwap(MASTER, server, server, 1.0)
    assert swap_() == 2
    tick_until_settled(swap_)
    assert len(server.workers) == 2 and [name for _, name in server.sent].count("SIGTTOU") == 2


def test_a_swap_makes_up_for_a_ttin_that_never_reached_the_master() -> None:
    """The record counts a TTIN the master never got (a watcher killed before it was sent): the
    swap sees one new worker too few for a second, sends one more, and still retires exactly the
    old workers."""
    server = FakeServer(2)
    old = set(server.workers)
    memory = DictMemory()
    server.send(MASTER, signal.SIGTTIN)  # the only TTIN that arrived; the record says two
    memory.save({"retiring": sorted(old), "count": 2, "ran": 2, "added": 2, "retired": 0, "adding": [], "leaving": [],
                 "recount": 0, "trial": 0, "spared": 0})
    second = SignalledSwap(MASTER, server, server, 3.0, memory=memory)
    with pytest.raises(ActionFailed):  # a resumed swap looks once
        second()
    time.sleep(1.05)
    assert second() == 2
    assert not old & set(server.workers) and len(server.workers) == 2


def test_reexec_waits_for_as_many_new_workers_as_configured_not_as_live() -> None:
    """A killed watcher sent USR2 and never retired the old workers, so the master has four; the
    next re-exec waits for the two workers the config names, then retires all four."""
    server = FakeServer(4)
    old = set(server.workers)
    reexec = InPlaceReexec(MASTER, server, server, load_timeout=1.0)
    reexec.workers = 2
    server.new_worker = lambda pid: True if len(server.workers) <= 6 else None  # the new image forks two
    assert reexec() == 2
    assert not old & set(server.workers)


def test_reexec_once_more_when_the_new_image_loaded_an_older_generation() -> None:
    """The USR2 was for generation 1, and 2 passed its check meanwhile (the watcher that sent it
    was killed): the new image's workers run 1, so the master is re-executed once more, and
    every worker left runs 2."""
    server = FakeServer(2)
    bumped: list[int] = []

    def new_worker(pid: int) -> bool:
        if not bumped:
            bumped.append(pid)
            server.generation = 2  # published once the first image had started
        return True

    server.new_worker = new_worker
    reexec = InPlaceReexec(MASTER, server, server, load_timeout=1.0, wanted=lambda: server.generation)
    assert reexec() == 2
    assert [name for _, name in server.sent].count("SIGUSR2") == 2
    assert {server.generation_of[pid] for pid in server.workers} == {2}


def test_signal_reload_signals_once_and_waits_for_the_old_workers_to_finish() -> None:
    """uWSGI ignores a reload signal during a reload: while an old worker still finishes its
    requests, no second signal goes out; once they are gone and the new ones run the wanted
    generation, nothing more is sent."""
    server = FakeServer(2)
    server.linger = True
    server.generation = 2
    reload = SignalReload(MASTER, server, server, wanted=lambda: 2)
    assert reload() is None  # it reports itself once the server's reload is over
    assert server.sent == [(MASTER, "SIGHUP")]
    for _ in range(3):
        assert reload.wants_tick()
        reload.tick()
    assert server.sent == [(MASTER, "SIGHUP")]
    server.lingering.clear()
    reload.tick()
    assert server.sent == [(MASTER, "SIGHUP")] and not reload.wants_tick()


def test_signal_reload_sends_nothing_when_the_workers_run_the_wanted_generation() -> None:
    server = FakeServer(2)
    reload = SignalReload(MASTER, server, server, wanted=lambda: 1)
    reload()
    assert server.sent == [] and not reload.wants_tick()


def test_signal_reload_once_more_for_a_generation_published_during_the_reload() -> None:
    server = FakeServer(2)
    server.linger = True
    wanted = [2]
    server.generation = 2
    reload = SignalReload(MASTER, server, server, wanted=lambda: wanted[0])
    reload()
    wanted[0] = 3  # passed its check while the old workers finished
    reload.tick()
    assert [name for _, name in server.sent] == ["SIGHUP"]  # still under way: a signal now would be lost
    server.generation = 3
    server.lingering.clear()
    reload.tick()
    assert [name for _, name in server.sent] == ["SIGHUP", "SIGHUP"]
    server.lingering.clear()
    reload.tick()
    assert {server.generation_of[pid] for pid in server.workers} == {3} and not reload.wants_tick()


def test_signal_reload_sends_again_when_the_signal_was_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """The master ignored the signal (it was still starting up from the last reload): once no old
    worker has exited for LOST_SIGNAL_SECONDS, the signal is sent again."""
    monkeypatch.setattr(strategies, "LOST_SIGNAL_SECONDS", 0.05)
    server = FakeServer(2)
    server.master_reloads = False
    server.generation = 2
    reload = SignalReload(MASTER, server, server, wanted=lambda: 2)
    reload()
    reload.tick()
    assert [name for _, name in server.sent] == ["SIGHUP"]
    time.sleep(0.06)
    server.master_reloads = True
    reload.tick()
    assert [name for _, name in server.sent] == ["SIGHUP", "SIGHUP"]
    reload.tick()
    assert {server.generation_of[pid] for pid in server.workers} == {2}


def test_signal_reload_stops_the_workers_of_a_master_that_never_reloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A uWSGI master stuck in a reload ignores every signal: after UNANSWERED_SIGNALS of them
    its workers are stopped gracefully (each one's SIGHUP), which ends that reload."""
    monkeypatch.setattr(strategies, "LOST_SIGNAL_SECONDS", 0.0)
    server = FakeServer(2)
    server.master_reloads = False
    server.generation = 2
    old = list(server.workers)
    reload = SignalReload(MASTER, server, server, wanted=lambda: 2)
    for _ in range(strategies.UNANSWERED_SIGNALS + 1):
        reload.tick()
    signalled = [(MASTER, "SIGHUP")] * strategies.UNANSWERED_SIGNALS
    assert server.sent == [*signalled, (old[0], "SIGHUP"), (old[1], "SIGHUP")]
    reload.tick()
    assert {server.generation_of[pid] for pid in server.workers} == {2}


class ReapingMaster:
    """A uWSGI master in a graceful reload whose old workers have died: each nudge that reaches it
    in its sleep reaps them; a nudge that lands between its waitpid() and its sleep is spent."""

    def __init__(self, workers: set[int], spent: int) -> None:
        self.zombies = set(workers)
        self.spent = spent
        """How many nudges in a row land outside the master's sleep."""
        self.nudges = 0
        self.looked = 0
        self.kept = {9000}
        """A child the reload does not stop: it never exits."""
        self.new_workers: set[int] = set()

    def send(self, pid: int, signum: int) -> None:
        raise AssertionError("a nudge goes by wake(): no gap between equal ones")

    def wake(self, pid: int, signum: int) -> None:
        assert (pid, signum) == (MASTER, signal.SIGWINCH)
        self.nudges += 1
        if self.nudges > self.spent:
            self.zombies.clear()  # reaped: the master re-executes itself and forks new workers
            self.new_workers = {201, 202}

    def children(self, pid: int) -> frozenset[int] | None:
        self.looked += 1
        return frozenset(self.zombies | self.kept | self.new_workers)

    def exited(self, pid: int) -> bool:
        return pid in self.zombies

    def oldest_first(self, pids: frozenset[int]) -> list[int]:
        return sorted(pids)

    def handled(self, pid: int, signum: int) -> None:
        pass

    def listening(self, pid: int) -> bool:
        return True


def test_the_master_is_nudged_again_while_a_dead_worker_lies_unreaped() -> None:
    """A nudge that lands outside the master's sleep is spent and the master would sleep a whole
    second: it goes again until the master has reaped every old worker, then stops."""
    master = ReapingMaster({101, 102}, spent=3)
    strategies.nudge_as_workers_exit(master, MASTER, frozenset({101, 102, 9000}), signal.SIGWINCH, timeout=60.0)
    assert master.nudges == 4 and not master.zombies
    # Done once the new workers are there, not when the kept child exits (it never does).
    assert master.looked == 5


def test_no_nudge_before_an_old_worker_has_exited() -> None:
    master = ReapingMaster(set(), spent=0)
    alive = {101, 102}
    master.children = lambda pid: frozenset(alive)  # type: ignore[method-assign]
    strategies.nudge_as_workers_exit(master, MASTER, frozenset(alive), signal.SIGWINCH, timeout=0.1)
    assert master.nudges == 0


def test_signal_reload_tells_a_worker_the_reload_forgot_to_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """uWSGI's reload stopped one old worker but never told the other (started again by the
    master in the instant the reload began): once the others have exited and it has not for
    LOST_SIGNAL_SECONDS, it is told to stop gracefully, once, and the reload ends."""
    monkeypatch.setattr(strategies, "LOST_SIGNAL_SECONDS", 0.05)
    server = FakeServer(2)
    server.linger = True
    server.generation = 2
    old = list(server.workers)
    reload = SignalReload(MASTER, server, server, wanted=lambda: 2)
    reload()
    server.lingering.discard(old[0])  # the one uWSGI told has finished and exited
    reload.tick()
    assert server.sent == [(MASTER, "SIGHUP")]  # not yet: it may be finishing a request
    time.sleep(0.06)
    reload.tick()
    reload.tick()
    assert server.sent == [(MASTER, "SIGHUP"), (old[1], "SIGHUP")]
    assert not server.lingering
    reload.tick()
    assert not reload.wants_tick() and {server.generation_of[pid] for pid in server.workers} == {2}



LISTENER = """
import socket, sys, time
kind, path = sys.argv[1:]
s = socket.socket(socket.AF_UNIX if kind == "unix" else socket.AF_INET)
if kind != "unbound":
    s.bind(path if kind == "unix" else ("127.0.0.1", 0))
    s.listen()
sys.stdout.write("up\\n")
sys.stdout.flush()
time.sleep(60)
"""


@pytest.mark.parametrize(("kind", "holds"), [("unbound", False), ("tcp", True), ("unix", True)])
def test_holds_listener_reads_real_sockets(tmp_path: Path, kind: str, holds: bool) -> None:
    """The real /proc reading behind the fake master's ``listening``: a TCP or a Unix listening
    socket counts, an unbound one does not, and a process that is gone is unknown."""
    import subprocess
    import sys

    from wsgi_reload._server.signals import holds_listener

    child = subprocess.Popen([sys.executable, "-c", LISTENER, kind, str(tmp_path / "sock")], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"
        assert holds_listener(child.pid) is holds
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert holds_listener(child.pid) is None
