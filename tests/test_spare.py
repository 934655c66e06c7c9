"""The spare worker: Django under gunicorn with no gunicorn config, as the README starts it.

Once the workers are steady the watcher has gunicorn start one worker more, which stops with
Django imported and waits; the next save's trial is loaded by it (``wsgi_reload._server.spare``).
Real gunicorn, the real example project, real files; the spare is found by its claim in the
server's runtime directory and by its log line.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from servers import (
    Load,
    Server,
    free_port,
    get,
    processes,
    running,
    runtime_dir_of,
    server_env,
    spares,
    wait_for_body,
    worker_pids,
    write,
)
from test_django import LIVENESS, django_gunicorn, greeting_view, make_site, page
from test_keeper import switches

from wsgi_reload._server import runtime, spare
from wsgi_reload._server.generations import store_of

pytestmark = pytest.mark.slow

WAITS = r"wsgi_reload: worker (\d+) waits as the spare"
PUBLISHES = r"wsgi_reload: worker (\d+) publishes its modules"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return make_site(tmp_path)


def start(site: Path, port: int, *args: str, **settings: str) -> Server:
    return django_gunicorn(site, port, ["-w", "2", *args], server_env(**settings))


def master_children(server: Server) -> set[int]:
    assert server.proc is not None
    return {pid for pid, (state, ppid, _) in processes().items() if ppid == server.proc.pid and state != "Z"}


def the_spare(server: Server, site: Path, other_than: int | None = None) -> int:
    """Wait until a worker waits as the spare (its claim in the runtime directory, a child of the
    master, and its log line); its pid."""
    deadline = time.monotonic() + LIVENESS
    runtime_dir_of(site)  # the server's watcher has made its directory
    while True:
        claims = sorted(spares())  # a claim of another test's server is not the master's child
        said = {int(pid) for pid in re.findall(WAITS, server.log())}
        live = [pid for pid in claims if pid in said and pid in master_children(server) and pid != other_than]
        if live:
            return live[0]
        assert time.monotonic() < deadline, f"no spare waits; claims {claims}:\n{server.log()[-3000:]}"
        time.sleep(0.05)


def first_publisher_after(server: Server, mark: int) -> int | None:
    found = re.search(PUBLISHES, server.log()[mark:])
    return None if found is None else int(found.group(1))


def steady(server: Server, site: Path, serving: str) -> None:
    """Two workers serve ``serving`` and one more waits as the spare: three children of the
    master, the same for a second."""
    deadline = time.monotonic() + LIVENESS
    while True:
        children = master_children(server)
        if len(children) == 3 and the_spare(server, site) in children:
            time.sleep(1)
            if master_children(server) == children:
                break
        assert time.monotonic() < deadline, f"the master runs {children}:\n{server.log()[-3000:]}"
        time.sleep(0.2)
    assert {get(server.port)[1] for _ in range(20)} == {serving}


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_each_save_is_loaded_by_the_spare_that_waited_for_it(site: Path, worker_class: str) -> None:
    """Under load: at each save the spare, not a worker started then, is the first to load it,
    and a new spare waits afterwards."""
    port = free_port()
    with running(start(site, port, "-k", worker_class), page("hello")) as server, Load(port, threads=4) as load:
        for n in range(1, 4):
            waiting = the_spare(server, site)
            time.sleep(0.2)  # its keeper connected
            mark = len(server.log())
            greeting_view(site, f"spare-{n}")
            wait_for_body(port, page(f"spare-{n}"), timeout=LIVENESS)
            server.wait_for_log(r"reload done", count=n)
            assert first_publisher_after(server, mark) == waiting, server.log()[mark:]
            assert re.search(r"check passed \(import by a new worker", server.log()[mark:])
            assert waiting in worker_pids(server)
        steady(server, site, page("spare-3"))
        _, failures, _ = load.snapshot()
    assert failures == []


def test_the_spare_killed_at_random_moments_loses_no_save(site: Path) -> None:
    """kill -9 of the spare while it waits, at the save, or while it imports the save: gunicorn
    starts another worker, the save is served all the same, and a spare waits again."""
    port = free_port()
    rng = random.Random(os.environ.get("PYTEST_XDIST_WORKER", "0"))
    with running(start(site, port), page("hello")) as server, Load(port, threads=4):
        for n, when in enumerate(["waiting", "at the save", "importing", "waiting", "importing"], start=1):
            waiting = the_spare(server, site)
            if when == "waiting":
                os.kill(waiting, signal.SIGKILL)
                time.sleep(rng.uniform(0, 0.5))
            greeting_view(site, f"killed-{n}")
            if when != "waiting":
                time.sleep(0 if when == "at the save" else rng.uniform(0.005, 0.03))
                os.kill(waiting, signal.SIGKILL)
            wait_for_body(port, page(f"killed-{n}"), timeout=LIVENESS)
            deadline = time.monotonic() + LIVENESS
            while {get(port)[1] for _ in range(20)} != {page(f"killed-{n}")}:
                assert time.monotonic() < deadline, f"older code still served after save {n} ({when})"
            the_spare(server, site, other_than=waiting)
        steady(server, site, page("killed-5"))


def test_a_save_of_the_settings_is_not_loaded_by_the_spare(site: Path) -> None:
    """The spare read the settings from the disk before it stopped: a save of them is loaded by
    a worker that reads them afresh, and the spare exits unserved."""
    views = site / "shop" / "views.py"
    write(views, views.read_text().replace(
        "from django.http", "from django.conf import settings\nfrom django.http").replace(
        '{"greeting": GREETING}', '{"greeting": getattr(settings, "SITE_GREETING", GREETING)}'))
    port = free_port()
    with running(start(site, port), page("hello")) as server, Load(port, threads=4) as load:
        waiting = the_spare(server, site)
        mark = len(server.log())
        settings = site / "mysite" / "settings.py"
        write(settings, settings.read_text() + '\nSITE_GREETING = "from the settings"\n')
        wait_for_body(port, page("from the settings"), timeout=LIVENESS)
        server.wait_for_log(r"reload done")
        assert waiting not in master_children(server)
        assert waiting not in {int(pid) for pid in re.findall(PUBLISHES, server.log()[mark:])}
        steady(server, site, page("from the settings"))
        _, failures, _ = load.snapshot()
    assert failures == []


def test_a_broken_save_is_refused_with_a_spare_waiting_and_the_fix_is_served(site: Path) -> None:
    """The spare loads the broken save, which the check refuses: it exits unserved, and no new
    spare boots while the code on the disk is refused (a new worker reads the settings from the
    disk, and one that fails to boot halts gunicorn). The fix is served, and a spare waits again."""
    port = free_port()
    with running(start(site, port), page("hello")) as server, Load(port, threads=4) as load:
        waiting = the_spare(server, site)
        views = site / "shop" / "views.py"
        good = views.read_text()
        load.reset_bodies()
        write(views, good + "\nundefined_name\n")
        server.wait_for_log(r"not reloading, the new code does not load")
        mark = len(server.log())
        time.sleep(4)
        _, failures, bodies = load.snapshot()
        assert failures == [] and bodies == {page("hello")}
        assert waiting not in master_children(server)  # it loaded the refused code, and exited unserved
        assert not re.search(WAITS, server.log()[mark:]), "a spare booted while the code on the disk was refused"
        write(views, good.replace('GREETING = "hello"', 'GREETING = "fixed"'))
        wait_for_body(port, page("fixed"), timeout=LIVENESS)
        steady(server, site, page("fixed"))
        _, failures, _ = load.snapshot()
    assert failures == []


def test_workers_recycled_by_max_requests_younger_than_the_spare(site: Path) -> None:
    """--max-requests restarts serving workers while the spare waits, so the spare is older than
    some workers at the save (gunicorn's TTOU retires the oldest): every save is still served,
    and then nothing older."""
    port = free_port()
    with running(start(site, port, "--max-requests", "1000"), page("hello")) as server, \
            Load(port, threads=4) as load:
        for n in range(1, 5):
            server.wait_for_log(r"Autorestarting worker", count=2 * n)
            greeting_view(site, f"recycled-{n}")
            wait_for_body(port, page(f"recycled-{n}"), timeout=LIVENESS)
            deadline = time.monotonic() + LIVENESS
            while {get(port)[1] for _ in range(20)} != {page(f"recycled-{n}")}:
                assert time.monotonic() < deadline, f"older code still served after save {n}"
        _, failures, _ = load.snapshot()
        # (Not before every save: outside a swap no spare is asked for while a worker boots, and
        # one older than every serving worker is let go rather than retired by a TTOU.)
        assert server.count(WAITS) >= 2
    assert failures == []


def test_a_spare_waiting_costs_nothing_and_stops_at_once(site: Path) -> None:
    """Idle, the spare's threads do not wake (it tells gunicorn it is alive every third of the
    timeout, 40 s here); a TERM (gunicorn's stop, or a TTOU that picks it) ends its wait at once,
    not at that tell."""
    port = free_port()
    with running(start(site, port, "--timeout", "120"), page("hello")) as server:
        waiting = the_spare(server, site)
        time.sleep(2)
        before = switches(waiting)
        time.sleep(3)
        assert switches(waiting) == before
        began = time.monotonic()
        os.kill(waiting, signal.SIGTERM)
        while waiting in master_children(server):
            assert time.monotonic() - began < 10, "the spare did not stop at a TERM"
            time.sleep(0.05)


def test_the_runtime_directory_removed_while_a_spare_waits(site: Path) -> None:
    """A temp-file cleaner removes the runtime directory, the spare's claim with it, after a save
    that a spare loaded: the spare waiting exits unserved, the next save is served by every
    worker (the one that was the spare wrote its record again, else the swap would leave it
    serving: see tests/test_keeper.py), and a new spare waits."""
    port = free_port()
    with running(start(site, port), page("hello")) as server, Load(port, threads=4) as load:
        first = the_spare(server, site)
        greeting_view(site, "before")
        wait_for_body(port, page("before"), timeout=LIVENESS)
        waiting = the_spare(server, site, other_than=first)
        time.sleep(0.5)
        directory = runtime_dir_of(site)
        # rm -rf, in one step (a removal that the watcher's own writes race would leave a part)
        gone = directory.with_name(directory.name + ".gone")
        os.rename(directory, gone)
        shutil.rmtree(gone)
        the_spare(server, site, other_than=waiting)
        assert waiting not in master_children(server)
        greeting_view(site, "restored")
        wait_for_body(port, page("restored"), timeout=LIVENESS)
        steady(server, site, page("restored"))  # (the worker that was the spare, if not retired as one too many, too)
        _, failures, _ = load.snapshot()
    assert failures == []


def test_no_spare_when_turned_off(site: Path) -> None:
    port = free_port()
    with running(start(site, port, SPARE="0"), page("hello")) as server:
        server.wait_for_log(PUBLISHES, count=2)  # both workers up: a save now replaces both
        greeting_view(site, "no spare")
        wait_for_body(port, page("no spare"), timeout=LIVENESS)
        server.wait_for_log(r"reload done")
        time.sleep(4)
        assert server.count(WAITS) == 0
        assert len(master_children(server)) == 2


# --- the wait itself, on real files --------------------------------------------------------


def _waiter(tmp_path: Path, directory: str, module_mtime: float | None, touch: bool) -> bool:
    """In a child process: import a module of ours, take the token, and wait as the spare until
    the test offers a trial; touch the module meanwhile if asked."""
    code = textwrap.dedent(f"""
        import os, sys, threading, time
        sys.path.insert(0, {str(tmp_path)!r})
        import spared_module
        from wsgi_reload._server import runtime, spare
        from wsgi_reload._server.generations import store_of
        assert spare.claim({directory!r})
        store = store_of({directory!r})
        def offer():
            time.sleep(0.3)
            if {touch!r}:
                with open(spared_module.__file__, "a") as f:
                    f.write("# saved while the spare waited\\n")
            runtime.write_atomic(store.directory, "trial", b"7")
        threading.Thread(target=offer).start()
        print(spare.wait_for_trial({directory!r}, period=0.05, wait=time.sleep, heartbeat=lambda: None))
        """)
    module = tmp_path / "spared_module.py"
    module.write_text("VALUE = 1\n")
    if module_mtime is not None:
        os.utime(module, (module_mtime, module_mtime))
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "True"


@pytest.mark.parametrize(("mtime", "touch", "goes_on"), [
    ("long ago", False, True),
    ("long ago", True, False),
    # Saved just before the process started: it may have read the old bytes under the new time.
    ("just now", False, False),
])
def test_the_spare_goes_on_only_if_no_file_it_read_changed(tmp_path: Path, mtime: str, touch: bool,
                                                          goes_on: bool) -> None:
    directory = runtime.create()
    try:
        store = store_of(directory)
        os.makedirs(store.directory, exist_ok=True)
        runtime.write_atomic(store.directory, "current", b"3")  # the generation the workers run
        spare.want(directory)
        assert _waiter(tmp_path, directory, time.time() - 3600 if mtime == "long ago" else None, touch) is goes_on
        assert not [name for name in os.listdir(directory) if name.startswith("spare")]
    finally:
        runtime.remove(directory)


def test_a_withdrawn_spare_stops_waiting(tmp_path: Path) -> None:
    """One worker takes the token; the watcher withdraws it while that worker waits: the wait
    ends, unserved."""
    directory = runtime.create()
    try:
        store = store_of(directory)
        os.makedirs(store.directory, exist_ok=True)
        runtime.write_atomic(store.directory, "current", b"3")
        spare.want(directory)
        assert spare.claim(directory) and not spare.claim(directory)  # one worker takes the token
        assert spare.claimant(directory) == os.getpid()
        answer: list[bool] = []
        waiter = threading.Thread(target=lambda: answer.append(spare.wait_for_trial(
            directory, period=0.05, wait=time.sleep, heartbeat=lambda: None)), daemon=True)
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive()  # no trial yet: it waits
        spare.withdraw(directory)
        waiter.join(timeout=5)
        assert answer == [False]
        assert spare.claimant(directory) is None
    finally:
        runtime.remove(directory)
