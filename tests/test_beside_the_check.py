"""gunicorn's swap starts its first new worker beside the check: real gunicorn, real HTTP.

That worker imports the code under check (the store's trial generation) while the check
imports it too, and holds before serving until the verdict. These tests make the check slow
(a save that sleeps at import), so that the held worker is there for a while, and look at what
each verdict does to it: a pass lets it serve, a refusal makes it exit unserved, and a watcher
killed meanwhile leaves no worker holding undecided code.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from servers import (
    BROKEN_SAVES,
    LIVENESS_TIMEOUT,
    Load,
    Server,
    free_port,
    good_then_broken_pairs,
    greeting,
    gunicorn,
    make_app,
    running,
    runtime_dir_of,
    settled_workers,
    the_watcher,
    wait_for_body,
    worker_pids,
    write,
)

pytestmark = pytest.mark.slow

SLOW = "import time\ntime.sleep({seconds})\n\n"
"""The head of a save whose import (in the check and in a new worker alike) takes this long."""


def booted_beside_the_check(log: str, verdict: str) -> list[int]:
    """Workers started after the last "file changed" line and before the check's verdict line."""
    last_change = log.rfind("file changed")
    end = log.find(verdict, last_change)
    assert last_change >= 0 and end >= 0, log[-3000:]
    return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", log[last_change:end])]


def save_slowly(server: Server, app: Path, version: str, seconds: float) -> set[int]:
    """Save greeting.py answering ``version``, its import taking ``seconds``; return once the
    worker started beside the check is there (its pids)."""
    before = worker_pids(server)
    write(app / "greeting.py", greeting(version, head=SLOW.format(seconds=seconds)))
    deadline = time.monotonic() + LIVENESS_TIMEOUT
    while not (started := worker_pids(server) - before):
        assert time.monotonic() < deadline, "no worker started beside the check"
        time.sleep(0.02)
    return started


def test_a_good_save_is_imported_by_a_new_worker_while_it_is_checked(tmp_path: Path) -> None:
    """The first new worker boots before the check has passed, and is one of the workers that
    serve the new code once it has."""
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, ["-w", "2"]), "v1") as server, Load(port, threads=4) as load:
        write(app / "greeting.py", greeting("v2", head=SLOW.format(seconds=1.5)))
        wait_for_body(port, "v2")
        server.wait_for_log(r"reload done")
        [early] = booted_beside_the_check(server.log(), "check passed")
        time.sleep(1)
        assert early in worker_pids(server)
        _, failures, _ = load.snapshot()
    assert failures == []


LAZY_APP = '''\
def app(environ, start_response):
    import lazy  # a request imports it, not the app's import

    body = lazy.TEXT.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


application = app
'''


def test_a_refused_save_is_never_served_by_the_worker_started_beside_the_check(tmp_path: Path) -> None:
    """The workers have imported lazy.py through requests; a new worker has not. A save breaks
    lazy.py: the new worker's own import of the app passes, the check (which imports what the
    workers run) refuses. The new worker must exit unserved, or its requests would import the
    broken file; the master then runs as many workers as before, all on the old code."""
    app = tmp_path / "app"
    app.mkdir()
    write(app / "app.py", LAZY_APP)
    write(app / "lazy.py", 'TEXT = "v1"\n')
    port = free_port()
    with running(gunicorn(app, port, ["-w", "2"]), "v1") as server, Load(port, threads=4) as load:
        time.sleep(1.5)  # both workers have served, and published lazy.py
        write(app / "lazy.py", SLOW.format(seconds=1.5) + 'undefined_name\nTEXT = "broken"\n')
        server.wait_for_log(r"not reloading, the new code does not load: .*lazy.py:\d+: NameError")
        assert booted_beside_the_check(server.log(), "not reloading"), "no worker was started beside the check"
        time.sleep(2)
        settled_workers(server, 2)
        _, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies == {"v1"}
        write(app / "lazy.py", 'TEXT = "v2"\n')  # the fix
        wait_for_body(port, "v2")
        settled_workers(server, 2)
        _, failures, _ = load.snapshot()
    assert failures == []
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("victim", ["watcher", "held worker"])
def test_kill_9_while_a_worker_holds_the_code_under_check(tmp_path: Path, victim: str) -> None:
    """kill -9 of the watcher (its check dies with it) or of the held worker, while the held
    worker waits for the verdict: the save is still served, nothing fails, and the master ends
    with as many workers as before."""
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, ["-w", "2"]), "v1") as server, Load(port, threads=4) as load:
        held = save_slowly(server, app, "v2", seconds=2)
        time.sleep(0.5)  # it is importing the code under check
        if victim == "watcher":
            watcher = the_watcher(app)
            os.kill(watcher, signal.SIGKILL)
        else:
            os.kill(min(held), signal.SIGKILL)
        wait_for_body(port, "v2")
        server.wait_for_log(r"reload done")
        settled_workers(server, 2)
        load.reset_bodies()
        time.sleep(1)
        _, failures, bodies = load.snapshot()
    assert failures == []
    assert bodies == {"v2"}


@pytest.mark.parametrize("second", ["good", "broken"])
def test_a_save_while_a_worker_holds_the_code_under_check(tmp_path: Path, second: str) -> None:
    """A second save lands while the first is checked and a worker holds it: the watcher checks
    again, with both. The held worker's trial is superseded (it exits unserved) and the next one
    is held on the new trial; a good second save is served, a broken one refused with the old
    code serving. Either way no trial is left offered and the master ends with 2 workers."""
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, ["-w", "2"]), "v1") as server, Load(port, threads=4) as load:
        save_slowly(server, app, "v2", seconds=1.5)
        time.sleep(0.3)
        if second == "good":
            write(app / "greeting.py", greeting("v3", head=SLOW.format(seconds=0.5)))
            wait_for_body(port, "v3")
            server.wait_for_log(r"reload done")
        else:
            write(app / "greeting.py", SLOW.format(seconds=0.5) + "undefined_name\n")
            server.wait_for_log(r"not reloading, the new code does not load: .*greeting.py:\d+: NameError")
        assert "while the check ran; checking again" in server.log()
        settled_workers(server, 2)
        load.reset_bodies()
        time.sleep(1)
        _, failures, bodies = load.snapshot()
        assert not (runtime_dir_of(app) / "generations" / "trial").exists()
    assert failures == []
    assert bodies == ({"v3"} if second == "good" else {"v1"})


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_rapid_refused_saves_leave_the_server_at_its_worker_count(tmp_path: Path, worker_class: str) -> None:
    """Each refused save leaves one worker too many for a moment (the worker started beside the
    check exits unserved, and the master replaces it). Good and broken saves faster than that
    settles must not add up: every swap replaces the 2 workers the server runs, no older
    version is served after the final one, and the server ends with 2 workers."""
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, ["-w", "2", "-k", worker_class]), "v1") as server:

        def save_good(name: str) -> str:
            write(app / "greeting.py", greeting(name))
            return name

        good_then_broken_pairs(port, save_good, lambda: write(app / "greeting.py", BROKEN_SAVES["name_error"]))
        server.wait_for_log(r"reload done")
        settled_workers(server, 2)
        swaps = [int(n) for n in re.findall(r"reload done: (\d+) new worker", server.log())]
        assert swaps and set(swaps) == {2}, swaps
        # A worker that imported a refused save beside the check is no new worker of a swap.
        assert "cannot serve the code that passed the check" not in server.log()


def test_a_worker_booting_when_a_swap_begins_never_serves_the_older_code(tmp_path: Path) -> None:
    """A worker that the master started before a save (it replaced one killed by the OOM
    killer) is still importing the older code when the swap for the save begins, so that swap
    does not count it among the workers to replace, and ends before it has loaded. Once loaded,
    it sees the newer generation and exits unserved, and its replacement loads the new code."""
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, ["-w", "2"]), "v1") as server:
        write(app / "greeting.py", greeting("v2", head=SLOW.format(seconds=4)))  # slow to import
        wait_for_body(port, "v2", timeout=LIVENESS_TIMEOUT)
        server.wait_for_log(r"reload done")
        serving = settled_workers(server, 2)
        killed = min(serving)
        # Before the load starts: a request in flight to a killed worker fails, by the kill.
        os.kill(killed, signal.SIGKILL)  # its replacement imports v2 for 4 s
        time.sleep(0.5)
        write(app / "greeting.py", greeting("v3"))
        with Load(port, threads=4) as load:
            wait_for_body(port, "v3")
            server.wait_for_log(r"reload done", count=2)
            # The swap's old worker serves v2 until the master has retired it, as in any swap.
            deadline = time.monotonic() + LIVENESS_TIMEOUT
            while (serving - {killed}) & worker_pids(server):
                assert time.monotonic() < deadline, "the swap's old worker never retired"
                time.sleep(0.05)
            load.reset_bodies()
            time.sleep(6)  # the replacement has long finished importing v2
            _, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies == {"v3"}
        settled_workers(server, 2)


IMPORTED_BY = "import os\nwith open({marker!r}, 'a') as _f:\n    _f.write(f'{{os.getpid()}}\\n')\n\n"
"""The head of a save that notes the pid of each process that imports it."""


def test_a_save_the_new_worker_imported_is_not_imported_again_by_the_check(tmp_path: Path) -> None:
    """The app is imported once per reload, by the workers: the new worker started beside the
    check imports the save, and its import is the verdict. Every process that imported the save
    is a gunicorn worker (a check process would note its pid too), and the log says which proof
    it was. A lazy module is still the check's to import (the refusal tests above)."""
    app = make_app(tmp_path)
    marker = tmp_path / "imported_by"
    port = free_port()
    with running(gunicorn(app, port, ["-w", "2"]), "v1") as server, Load(port, threads=4) as load:
        write(app / "greeting.py", greeting("v2", head=IMPORTED_BY.format(marker=str(marker))))
        wait_for_body(port, "v2")
        server.wait_for_log(r"reload done")
        settled_workers(server, 2)
        _, failures, _ = load.snapshot()
        importers = {int(pid) for pid in marker.read_text().split()}
        booted = {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", server.log())}
    assert failures == []
    assert importers and importers <= booted, (importers - booted, server.log()[-3000:])
    assert server.count(r"check passed \(import by a new worker") == 1
