"""Faults injected into real servers under load: processes killed or stopped at random moments,
mid-check and mid-swap included, and the disk under the runtime directory full. Each time the
server serves on (only requests in flight in a killed worker may fail) and the saves are
served. (The runtime directory removed and every worker killed while the disk is broken have
their cases in tests/test_generations.py and tests/test_django.py.)
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from servers import (
    Load,
    Server,
    free_port,
    get,
    greeting,
    gunicorn,
    make_app,
    processes,
    running,
    runtime_dir_of,
    server_env,
    the_watcher,
    uwsgi,
    wait_for_body,
    watcher_processes,
    worker_pids,
    write,
)

from wsgi_reload._check.check import CHECK_TITLE
from wsgi_reload._check.warm import WARM_TITLE
from wsgi_reload._core.files import PathFilter
from wsgi_reload._server.generations import store_of

pytestmark = pytest.mark.slow

COLD_CHECK = CHECK_TITLE
WARM_PROCESS = WARM_TITLE
RELOADS = r"check passed .*; reloading uWSGI"


def serve(kind: str, app: Path, port: int) -> Server:
    return gunicorn(app, port, ["-w", "2"]) if kind == "gunicorn" else uwsgi(app, port)


def descendants(roots: set[int]) -> dict[int, tuple[str, int, str]]:
    table = processes()
    found: dict[int, tuple[str, int, str]] = {}
    grew = True
    while grew:
        grew = False
        for pid, (state, ppid, command) in table.items():
            if pid not in found and (ppid in roots or ppid in found) and state != "Z":
                found[pid] = (state, ppid, command)
                grew = True
    return found


def ours(server: Server, app: Path) -> dict[int, tuple[str, int, str]]:
    """The server's processes and those of its watcher process."""
    assert server.proc is not None
    return descendants({server.proc.pid, *watcher_processes(app)})


def check_children(server: Server, app: Path) -> list[int]:
    """Check interpreters: a cold one, or one the warm process forked (with its command line)."""
    family = ours(server, app)
    servers = set(warm_processes(server, app))
    return [pid for pid, (_, ppid, command) in family.items() if COLD_CHECK in command or ppid in servers]


def warm_processes(server: Server, app: Path) -> list[int]:
    """The warm processes themselves, not the checks they forked."""
    family = ours(server, app)
    return [pid for pid, (_, ppid, command) in family.items()
            if WARM_PROCESS in command and WARM_PROCESS not in family.get(ppid, ("", 0, ""))[2]]


LAZY_SLOW_APP = '''\
import time

time.sleep(0.8)


def app(environ, start_response):
    import greeting

    body = greeting.text().encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


application = app
'''


def killer(server: Server, app: Path, which: str, within: float, killed: list[int]) -> threading.Thread:
    """A thread that kill -9s the first process of ``which`` kind (``check``: a check child;
    ``warm``: the warm process that forks them) it sees within ``within`` seconds, at a random
    moment of its life."""

    def run() -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            # Mid-check: once a check child runs, kill it or the warm process that forked it.
            if check_children(server, app):
                time.sleep(random.uniform(0, 0.2))
                found = check_children(server, app) if which == "check" else warm_processes(server, app)
                for pid in found:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                    except OSError:
                        pass
                return
            time.sleep(0.01)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("kind", ["gunicorn", "uwsgi"])
@pytest.mark.parametrize("which", ["check", "warm"])
def test_a_check_process_killed_at_random_loses_nothing(tmp_path: Path, kind: str, which: str) -> None:
    """Ten saves; every other one has its check child (or the warm process that forks checks)
    killed with -9 while the check runs (as the OOM killer would). Nothing fails, and every save
    is served: a check killed from outside says nothing of the code, so it runs again."""
    random.seed(os.getpid())
    app = make_app(tmp_path)
    # An app that takes 0.8 s to import, as a larger one does: the check is there to be killed.
    # greeting.py is imported by requests, so the check imports it (under gunicorn a new
    # worker's import of the app would otherwise be the verdict, and no check would run).
    write(app / "app.py", LAZY_SLOW_APP)
    port = free_port()
    killed: list[int] = []
    with running(serve(kind, app, port), "v1") as server, Load(port, threads=4) as load:
        for n in range(2, 12):
            kill = killer(server, app, which, 3.0, killed) if n % 2 == 0 else None
            write(app / "greeting.py", greeting(f"v{n}"))
            if kill is not None:
                kill.join(5)
            wait_for_body(port, f"v{n}")  # a check killed from outside is run again
        _, failures, _ = load.snapshot()
    assert failures == []
    if which == "check":
        assert len(killed) >= 3, f"only {len(killed)} of 5 checks were caught running"
    else:  # killed once, the warm process is not started again: the checks run cold, as one line says
        assert killed and server.count(r"checks run cold, each in a fresh interpreter \(it exited\)") == 1


def test_the_watcher_stopped_for_10_s_loses_no_save(tmp_path: Path) -> None:
    """SIGSTOP of uWSGI's watcher process for 10 s while three saves land, then SIGCONT: the
    last save is served, the queued saves make one reload, and nothing fails."""
    app = make_app(tmp_path)
    port = free_port()
    with running(uwsgi(app, port), "v1") as server, Load(port, threads=4) as load:
        watcher = the_watcher(app)
        reloads = server.count(RELOADS)
        os.kill(watcher, signal.SIGSTOP)
        try:
            for n in (2, 3, 4):
                write(app / "greeting.py", greeting(f"v{n}"))
                time.sleep(3)
            time.sleep(1)
        finally:
            os.kill(watcher, signal.SIGCONT)
        wait_for_body(port, "v4")
        time.sleep(1)
        _, failures, bodies = load.snapshot()
        assert failures == []
        assert "v2" not in bodies and "v3" not in bodies
        assert server.count(RELOADS) == reloads + 1


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a small tmpfs needs root")
@pytest.mark.parametrize("kind", ["gunicorn", "uwsgi"])
def test_a_full_disk_pauses_reloading_until_there_is_room(tmp_path: Path, kind: str) -> None:
    """The runtime directory on a 4 MB tmpfs that fills up under a running server: a save is not
    lost and no request fails; one line says reloading is paused and why, and once there is room
    again the save is served."""
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=1777", "tmpfs", str(tiny)], check=True)
    try:
        app = make_app(tmp_path)
        port = free_port()
        env = server_env()
        env["TMPDIR"] = str(tiny)  # the runtime directory's base (no private XDG_RUNTIME_DIR here)
        env.pop("XDG_RUNTIME_DIR", None)
        server = gunicorn(app, port, ["-w", "2"], env=env) if kind == "gunicorn" else uwsgi(app, port, env=env)
        with running(server, "v1"), Load(port, threads=4) as load:
            filler = tiny / "filler"
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            write(app / "greeting.py", greeting("v2"))
            server.wait_for_log(r"reloading is paused: .*No space left on device")
            time.sleep(2)
            assert get(port) == (200, "v1")
            filler.unlink()
            wait_for_body(port, "v2")
            server.wait_for_log(r"reloading goes on")
            _, failures, _ = load.snapshot()
        assert failures == []
        assert server.count(r"reloading is paused") == 1
    finally:
        subprocess.run(["umount", "-l", str(tiny)], check=False)


@pytest.mark.parametrize("kind", ["gunicorn", "uwsgi"])
@pytest.mark.parametrize("which", ["one", "all"])
def test_workers_killed_at_random_through_ten_reloads(tmp_path: Path, kind: str, which: str) -> None:
    """Ten saves, each followed at a random moment (mid-check or mid-swap, often) by kill -9 of one
    worker, old or new, or of every worker: every save is served, and only requests in flight in
    a killed worker (4 client threads: at most 4 a kill) fail."""
    random.seed(os.getpid())
    app = make_app(tmp_path)
    port = free_port()
    kills = 0
    with running(serve(kind, app, port), "v1") as server, Load(port, threads=4) as load:
        for n in range(2, 12):
            write(app / "greeting.py", greeting(f"v{n}"))
            time.sleep(random.uniform(0, 1.5))
            deadline = time.monotonic() + 3  # a uWSGI prefork reload has no worker for a moment
            while time.monotonic() < deadline:
                workers = sorted(worker_pids(server))
                if workers:
                    for pid in (workers if which == "all" else [random.choice(workers)]):
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
                    kills += 1
                    break
                time.sleep(0.05)
            wait_for_body(port, f"v{n}")
        time.sleep(1)
        _, failures, _ = load.snapshot()
    assert kills >= 8
    assert len(failures) <= 4 * kills, failures[:5]


WATCHER_MODES = {
    "gunicorn": lambda app, port: gunicorn(app, port, ["-w", "2"]),
    "gunicorn-preload": lambda app, port: gunicorn(app, port, ["-w", "2", "--preload"]),
    "uwsgi": lambda app, port: uwsgi(app, port),
    "uwsgi-lazy-apps": lambda app, port: uwsgi(app, port, lazy=True),
}


@pytest.mark.parametrize("mode", sorted(WATCHER_MODES))
def test_a_watcher_killed_between_publishing_a_generation_and_reloading(tmp_path: Path, mode: str) -> None:
    """The watcher published a verified generation and was killed before its reload began (no
    replacement under way in its record): the code on the disk is that generation's, so the
    next watcher sees no change, but finds the workers on older code than the newest verified
    generation, and reloads them. (The test publishes with the store's own code, as the killed
    watcher did, while the watcher is stopped.)"""
    app = make_app(tmp_path)
    port = free_port()
    with running(WATCHER_MODES[mode](app, port), "v1") as server:
        runtime = str(runtime_dir_of(app.resolve()))
        watcher = the_watcher(app)
        os.kill(watcher, signal.SIGSTOP)
        try:
            write(app / "greeting.py", greeting("v2"))
            store = store_of(runtime)
            current = store.current_id()
            assert current is not None
            base = store.load(current)
            store.publish(store.build(base.roots, base=base, accept=PathFilter(base=str(app))))
        finally:
            os.kill(watcher, signal.SIGKILL)
        wait_for_body(port, "v2")
        # In two full runs one uWSGI worker's graceful stop never ended (not understood; uWSGI
        # does not time a worker stopped from outside its master): the chain kills it after
        # its 60 s mercy. A liveness bound above that.
        server.wait_for_log(r"reload done", timeout=90)
        assert "older code than generation" in server.log()
        time.sleep(1)  # the old workers finish their last requests
        assert {get(port)[1] for _ in range(10)} == {"v2"}


@pytest.mark.parametrize("mode", sorted(WATCHER_MODES))
def test_the_watcher_killed_at_random_through_ten_reloads(tmp_path: Path, mode: str) -> None:
    """The server's watcher process killed with -9 at a random moment after each of ten saves
    (mid-check, mid-swap or idle): a worker starts a new one, which carries on a swap the killed
    one left under way, every save is served, nothing fails, and one watcher runs at the end,
    with as many workers as at the start."""
    random.seed(os.getpid())
    app = make_app(tmp_path)
    port = free_port()
    with running(WATCHER_MODES[mode](app, port), "v1") as server, Load(port, threads=4) as load:
        workers = 2  # every mode runs two (a count taken at start once caught one of them restarting)
        for n in range(2, 12):
            write(app / "greeting.py", greeting(f"v{n}"))
            time.sleep(random.uniform(0, 1.0))
            for pid in watcher_processes(app):
                os.kill(pid, signal.SIGKILL)
            wait_for_body(port, f"v{n}", timeout=15)  # liveness: typically 1 to 3 s
        # The last kill may leave a swap under way: the next watcher carries it on to the end.
        deadline, steady = time.monotonic() + 40, 0
        while steady < 10 and time.monotonic() < deadline:  # the same count for 2 s
            steady = steady + 1 if len(worker_pids(server)) == workers else 0
            time.sleep(0.2)
        _, failures, _ = load.snapshot()
        the_watcher(app)  # exactly one
        assert {get(port)[1] for _ in range(10)} == {"v11"}  # no old worker left
        assert len(worker_pids(server)) == workers
    assert failures == []
