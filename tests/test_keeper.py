"""Each worker's keeper and the watcher's end of their channel (``_server/launch.py``,
``_KeeperChannel`` in ``_server/watcher_process.py``): real Unix sockets in a real private
runtime directory, and real servers left idle.

The watcher being killed and started again, and the runtime directory removed, under load,
are in tests/test_faults.py, tests/test_generations.py and tests/test_django.py.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import free_port, gunicorn, make_app, running, the_watcher, uwsgi, worker_pids

from wsgi_reload._server import launch
from wsgi_reload._server.watcher_process import _KeeperChannel


@pytest.fixture
def runtime_dir(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    yield str(path)


class Keeper:
    """A keeper's side, as a worker runs it (``launch._connect`` and ``launch._follow``), on a thread."""

    def __init__(self, runtime_dir: str) -> None:
        self.republished = 0
        self.ended = threading.Event()
        channel = launch._connect(runtime_dir)
        assert channel is not None, "no watcher listens"
        self.channel = channel
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        with self.channel:
            launch._follow(self.channel, self.republish, threading.Event())
        self.ended.set()

    def republish(self) -> None:
        self.republished += 1


class Lines(logging.Handler):
    """What the keepers log for the watcher, with the thread that logged each line."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[int | None, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.thread, record.getMessage()))


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("wsgi_reload.watcher_process")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def eventually(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not within the liveness timeout"
        time.sleep(0.01)


def test_a_line_is_logged_by_one_keeper_and_a_republish_reaches_every_one(runtime_dir: str, lines: Lines) -> None:
    channel = _KeeperChannel(runtime_dir)
    channel.listen()
    keepers = [Keeper(runtime_dir), Keeper(runtime_dir)]
    channel.tend()
    eventually(lambda: len(channel.keepers) == 2)
    channel.log_line(logging.WARNING, "wsgi_reload: reload done")
    eventually(lambda: lines.lines)
    channel.republish()
    eventually(lambda: all(keeper.republished == 1 for keeper in keepers))
    assert [line for _, line in lines.lines] == ["wsgi_reload: reload done"]


def test_lines_from_before_any_keeper_connected_go_to_the_first_one(runtime_dir: str, lines: Lines) -> None:
    channel = _KeeperChannel(runtime_dir)
    channel.listen()
    for n in range(3):
        channel.log_line(logging.INFO, f"line {n}")
    Keeper(runtime_dir)
    channel.tend()
    eventually(lambda: len(lines.lines) == 3)
    assert [line for _, line in lines.lines] == ["line 0", "line 1", "line 2"]


def test_a_keeper_that_stops_reading_never_blocks_the_watcher(runtime_dir: str, lines: Lines) -> None:
    """A worker stuck in C code with the GIL, or stopped: its socket's buffer fills. The watcher
    lets that keeper go and hands the lines to one that reads; nothing it does waits."""
    channel = _KeeperChannel(runtime_dir)
    channel.listen()
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.connect(os.path.join(runtime_dir, launch.CHANNEL_NAME))
    channel.tend()
    done = threading.Event()

    def flood() -> None:
        for n in range(20_000):
            channel.log_line(logging.INFO, f"line {n} " + "x" * 100)
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert done.wait(30), "the watcher blocked on a keeper that does not read"
    assert channel.keepers == []  # let go
    reader = Keeper(runtime_dir)
    channel.tend()
    eventually(lambda: lines.lines and lines.lines[-1][1].startswith("line 19999 "))
    numbers = [int(line.split()[1]) for _, line in lines.lines]
    assert numbers == list(range(20_000 - len(numbers), 20_000)) and len(numbers) > 100  # the newest, in order
    assert not reader.ended.is_set()
    stuck.close()


def test_a_keeper_sees_the_watcher_end_even_before_it_was_accepted(runtime_dir: str) -> None:
    channel = _KeeperChannel(runtime_dir)
    channel.listen()
    accepted, waiting = Keeper(runtime_dir), None
    channel.tend()
    waiting = Keeper(runtime_dir)  # in the listen queue: the watcher ends before its next turn
    for keeper in channel.keepers:
        keeper.close()
    assert channel.listener is not None
    channel.listener.close()
    assert accepted.ended.wait(10) and waiting.ended.wait(10)
    assert launch._connect(runtime_dir) is None  # the socket file stays, and refuses


def test_a_runtime_directory_too_deep_for_a_socket_path_still_works(tmp_path: Path) -> None:
    """Unix socket addresses hold about 108 bytes; a deep $TMPDIR must not cut the workers off."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True, mode=0o700)
    assert len(str(deep / launch.CHANNEL_NAME)) > 108
    channel = _KeeperChannel(str(deep))
    channel.listen()
    keeper = Keeper(str(deep))
    channel.tend()
    eventually(lambda: len(channel.keepers) == 1)
    channel.republish()
    eventually(lambda: keeper.republished == 1)


def test_only_lines_of_the_protocol_are_acted_on(runtime_dir: str, lines: Lines) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(runtime_dir, launch.CHANNEL_NAME))
    listener.listen()
    keeper = Keeper(runtime_dir)
    conn, _ = listener.accept()
    conn.sendall(b"not json\n[1, 2]\n" + json.dumps({"log": ["WARNING", "x"]}).encode() + b"\n"
                 + json.dumps({"republish": 1}).encode() + b"\n" + json.dumps({"log": [30, "said"]}).encode()
                 + b"\n")
    eventually(lambda: lines.lines)
    conn.close()
    assert keeper.ended.wait(10)
    assert [line for _, line in lines.lines] == ["said"] and keeper.republished == 0
    listener.close()


def switches(pid: int, thread: str | None = None) -> int | None:
    """The context switches so far of the process's threads named ``thread`` (all of them when
    None); None when it has no such thread."""
    total = None
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as comm:
                if thread is not None and comm.read().strip() != thread:
                    continue
            with open(f"/proc/{pid}/task/{tid}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        total = (total or 0) + int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])
    return total


@pytest.mark.parametrize("kind", ["gunicorn", "uwsgi"])
def test_an_idle_server_costs_nothing_for_reloading(tmp_path: Path, kind: str) -> None:
    """Started as the README says, left idle: each worker's keeper thread sleeps in the kernel
    until the watcher writes to it or ends, and the watcher process until a file event or its
    master's exit: not one wake of either in 3 s."""
    app = make_app(tmp_path)
    port = free_port()
    server = gunicorn(app, port, ["-w", "2"]) if kind == "gunicorn" else uwsgi(app, port)
    with running(server, "v1"):
        time.sleep(2.5)  # past the start-up's own traffic on the channel, and its first turns
        workers = sorted(worker_pids(server))
        watcher = the_watcher(app)

        def wakes() -> dict[int, int | None]:
            return {**{pid: switches(pid, launch.KEEPER_THREAD) for pid in workers}, watcher: switches(watcher)}

        before = wakes()
        assert None not in before.values(), f"a worker without a keeper thread: {before}"
        time.sleep(3)
        assert wakes() == before


def test_a_worker_waiting_for_news_sleeps_until_the_watcher_says_the_generations_changed(runtime_dir: str) -> None:
    """A worker holding for its verdict (``await_verdict`` with ``launch.wait_for_news``) is woken
    by the watcher's word over the keeper's connection, and does not wake before it."""
    channel = _KeeperChannel(runtime_dir)
    channel.listen()
    worker = subprocess.Popen([sys.executable, "-c", f"""
import time
from wsgi_reload._server import launch
launch.keep_watcher_running({runtime_dir!r}, start=lambda: False)
while not launch._connected:
    time.sleep(0.01)
print("connected", flush=True)
began = time.monotonic()
launch.wait_for_news(60)
print(time.monotonic() - began, flush=True)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "connected"
        time.sleep(1)
        channel.generations_changed()
        waited = float(worker.stdout.readline())
        assert worker.wait(30) == 0
    finally:
        worker.kill()
    assert 1 <= waited < 30  # not before the word came, and not at the end of its 60 s either


def test_the_keeper_republishes_for_the_worker_a_spare_became(runtime_dir: str) -> None:
    """A spare starts its keeper with nothing to write again; the worker it becomes names its
    record's writer to the same keeper: a watcher that made the runtime directory again gets the
    record written again (else its next swap would not count that worker)."""
    channel = _KeeperChannel(runtime_dir)
    channel.listen()
    worker = subprocess.Popen([sys.executable, "-c", f"""
import time
from wsgi_reload._server import launch
launch.keep_watcher_running({runtime_dir!r}, start=lambda: False)  # as the spare
launch.keep_watcher_running({runtime_dir!r}, start=lambda: False, republish=lambda: print("republished", flush=True))
while not launch._connected:
    time.sleep(0.01)
print("connected", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "connected"
        channel.republish()
        assert worker.stdout.readline().strip() == "republished"
    finally:
        worker.kill()


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "start-time"])
def test_the_watchers_wait_for_its_master_ends_at_a_word_on_its_pipe_or_at_the_exit(pidfd: bool) -> None:
    """The watcher's main loop waits on its master with no timeout when idle: a write to its
    pipe (a turn of the watcher thread) must end that wait, and so must the master's exit."""
    from wsgi_reload._server.signals import Target

    master = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    target = Target(master.pid)
    if not pidfd:
        target.close()  # as where there are no pidfds: the start time is checked instead
    readable, writable = os.pipe()
    try:
        done = threading.Event()
        results: list[bool] = []

        def wait() -> None:
            results.append(target.wait_exit(None, wake_fd=readable))
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        time.sleep(0.3)
        assert not done.is_set()
        os.write(writable, b"\0")
        assert done.wait(10) and results == [False]
        os.set_blocking(readable, False)
        with pytest.raises(BlockingIOError):
            os.read(readable, 1)  # the word was read: the next wait does not end at once for it
        master.kill()
        master.wait()
        assert target.wait_exit(None, wake_fd=readable) is True
    finally:
        master.kill()
        os.close(readable)
        os.close(writable)
