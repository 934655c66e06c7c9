"""The workers run exactly the bytes that were checked: real gunicorn, real HTTP, real edits.

Each test puts the workers in different states on purpose (one has imported a module and
one has not; workers killed or recycled while the disk is broken), and every body served
must be a version that passed a check.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from servers import (
    BROKEN_SAVES,
    Load,
    Server,
    every_worker_answers,
    free_port,
    get,
    good_then_broken_pairs,
    greeting,
    gunicorn,
    kill_every_worker,
    kill_the_watcher_under_load,
    make_app,
    refused_under_load,
    remove_the_runtime_directory_under_load,
    running,
    runtime_dir_of,
    server_env,
    settled_workers,
    uwsgi,
    wait_for_body,
    wait_for_prefix,
    worker_pids,
    write,
)
from test_gunicorn import MODES

pytestmark = pytest.mark.slow

AS_PID_1 = os.geteuid() == 0 and shutil.which("unshare") is not None
"""gunicorn --preload as PID 1 of a new pid namespace (a container) needs root and unshare."""
KINDS = [*MODES, *(["preload-pid1"] if AS_PID_1 else []), "uwsgi-prefork", "uwsgi-lazy"]
GUNICORN = [*sorted(MODES), *(["preload-pid1"] if AS_PID_1 else [])]
LAZY_BROKEN = 'undefined_name\n\n\ndef text():\n    return "broken"\n'
RESTARTS = r"Autorestarting worker|The work of process \d+ is done"


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def serve(kind: str, app: Path, port: int, args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Server:
    """gunicorn as the README starts it (the config hooks; preload-pid1: the master is PID 1 of
    its own pid namespace, as in a container), or uWSGI with --import."""
    if kind == "preload-pid1":
        server = gunicorn(app, port, [*MODES["preload"], *args], env=env)
        server.argv = ["unshare", "--pid", "--fork", "--mount-proc", *server.argv]
        return server
    if kind in MODES:
        return gunicorn(app, port, [*MODES[kind], *args], env=env)
    return uwsgi(app, port, args, lazy=kind == "uwsgi-lazy", env=env)


def lazy_app(tmp_path: Path) -> Path:
    """The test app plus ``/lazy``, whose view imports lazy_part.py on its first request and
    answers ``<text>@<worker pid>``."""
    app = make_app(tmp_path)
    write(app / "lazy_part.py", 'def text():\n    return "lazy-1"\n')
    write(app / "app.py", '''import os

import greeting


def make_app():
    greeting.setup()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/lazy":
            import lazy_part

            text = f"{lazy_part.text()}@{os.getpid()}"
        else:
            text = greeting.text()
        body = text.encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return app


app = make_app()
application = app
''')
    return app


def test_a_lazy_module_saved_broken_while_one_worker_never_imported_it(tmp_path: Path, kind: str) -> None:
    """The worker that had not imported lazy_part imports it after the broken save; it gets the
    checked bytes, so both workers answer lazy-1 and nothing fails."""
    app = lazy_app(tmp_path)
    port = free_port()
    with running(serve(kind, app, port), "v1") as server:
        status, body = get(port, "/lazy")  # exactly one worker has imported lazy_part now
        assert (status, body.split("@")[0]) == (200, "lazy-1")
        write(app / "lazy_part.py", LAZY_BROKEN)
        server.wait_for_log(rf"not reloading, the new code does not load: {app / 'lazy_part.py'}:1: NameError")
        settled_workers(server, 2)
        assert every_worker_answers(port, "/lazy", "lazy-1") > 20
        write(app / "lazy_part.py", 'def text():\n    return "lazy-3"\n')
        wait_for_prefix(port, "/lazy", "lazy-3", timeout=30)
        assert "loaded before wsgi_reload" not in server.log()  # the README's commands cover the whole app


@pytest.mark.parametrize("kind", ["sync", "uwsgi-prefork"])
def test_a_lazy_module_a_worker_first_imports_while_its_broken_save_is_checked_is_checked_too(
        tmp_path: Path, kind: str) -> None:
    """No worker had imported lazy_part when it was saved broken, so the check does not import
    it. While the (slow) check runs, a request makes a worker import it, from the verified
    bytes. Once the save has settled, the verdict no longer covers what the workers run: the
    watcher checks again, with lazy_part, and refuses the save."""
    app = lazy_app(tmp_path)
    write(app / "greeting.py", greeting("v1", head="import time\ntime.sleep(1.5)\n\n"))  # a slow check
    port = free_port()
    with running(serve(kind, app, port), "v1") as server:
        write(app / "lazy_part.py", LAZY_BROKEN)
        server.wait_for_log(r"1 file changed: .*lazy_part\.py")
        status, body = get(port, "/lazy")  # a worker imports lazy_part now, while the check runs
        assert (status, body.split("@")[0]) == (200, "lazy-1")
        server.wait_for_log(rf"not reloading, the new code does not load: {app / 'lazy_part.py'}:1: NameError")
        settled_workers(server, 2)
        assert every_worker_answers(port, "/lazy", "lazy-1") > 20


def test_good_then_broken_saves_never_serve_an_older_version_after_the_final_one(
        tmp_path: Path, kind: str) -> None:
    app = make_app(tmp_path)
    port = free_port()

    def save_good(version: str) -> str:
        write(app / "greeting.py", greeting(version))
        return version

    with running(serve(kind, app, port), "v1"):
        good_then_broken_pairs(port, save_good, lambda: write(app / "greeting.py", BROKEN_SAVES["name_error"]))


def test_every_worker_killed_while_the_disk_is_broken(tmp_path: Path, kind: str) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(serve(kind, app, port), "v1") as server:
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2")
        write(app / "greeting.py", BROKEN_SAVES["name_error"])
        server.wait_for_log(r"not reloading, the new code does not load")
        time.sleep(1)  # the old workers of the v2 reload have retired
        kill_every_worker(server, "v2")
        write(app / "greeting.py", greeting("v3"))
        wait_for_body(port, "v3")


@pytest.mark.parametrize("kind", KINDS)
def test_max_requests_restarts_under_load_while_the_disk_is_broken(tmp_path: Path, kind: str) -> None:
    """Workers restart every 50 requests; each one loads the verified code. (uWSGI recycles no
    worker younger than --min-worker-lifetime, 10 s by default in core/init.c, so it gets 1.)"""
    app = make_app(tmp_path)
    port = free_port()
    args = ("--max-requests", "50") if kind in GUNICORN else ("--max-requests", "50", "--min-worker-lifetime", "1")
    with running(serve(kind, app, port, args), "v1") as server, Load(port, threads=4) as load:
        write(app / "greeting.py", BROKEN_SAVES["name_error"])
        server.wait_for_log(r"not reloading, the new code does not load")
        restarts = server.count(RESTARTS)
        load.reset_bodies()
        time.sleep(5)
        _, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies == {"v1"}
        assert server.count(RESTARTS) >= restarts + 2
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2")
        time.sleep(1)
        load.reset_bodies()
        time.sleep(3)  # lazy uWSGI workers recycled together answer nothing while they import
        _, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies == {"v2"}


@pytest.mark.parametrize("kind", GUNICORN)
def test_started_broken_stays_up_and_serves_the_fix(tmp_path: Path, kind: str) -> None:
    """gunicorn started with an app that does not load: one line with the file and line, the
    server stays up, and the fix is served. Nothing halts the arbiter."""
    app = make_app(tmp_path)
    write(app / "greeting.py", BROKEN_SAVES["name_error"])
    port = free_port()
    server = serve(kind, app, port)
    with running(server, None):
        server.wait_for_log(rf"{app / 'greeting.py'}:1: NameError")
        time.sleep(2)
        assert server.proc is not None and server.proc.poll() is None
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2")
        with Load(port, threads=4) as load:
            time.sleep(1)
            _, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies == {"v2"}
        log = server.log()
        assert "Worker failed to boot" not in log and "Shutting down: Master" not in log
        assert len(re.findall(r"greeting.py:1: NameError", log)) >= 1


ONLY_IN_WORKERS = (
    'import os\n'
    'if "gunicorn" in open("/proc/%d/cmdline" % os.getppid()).read():\n'
    '    raise RuntimeError("no database from here")\n'
)


def test_an_app_that_fails_only_in_the_workers_is_not_checked_again_and_again(tmp_path: Path) -> None:
    """Started with code that passes the check and fails in every worker (a database only the
    workers cannot reach): one line says so, and the watcher does not check and publish the same
    bytes again each time gunicorn replaces a failed worker. A save then reloads as usual."""
    app = make_app(tmp_path)
    write(app / "greeting.py", greeting("v1", setup=ONLY_IN_WORKERS.replace("\n", "\n    ")))
    port = free_port()
    server = serve("sync", app, port)
    with running(server, None):
        server.wait_for_log(r"although it passed the check: the workers fail where the check does not")
        time.sleep(5)
        assert server.count(r"passed the check; the waiting workers load it") <= 1
        assert server.count(r"although it passed the check") == 1
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2")


def healthz_app(tmp_path: Path, sick_when: str) -> Path:
    """The test app, whose /healthz answers 500 when ``sick_when`` (an expression) is true."""
    app = make_app(tmp_path)
    write(app / "app.py", (app / "app.py").read_text().replace(
        "        body = greeting.text().encode()",
        f'        if environ["PATH_INFO"] == "/healthz" and {sick_when}:\n'
        '            start_response("500 Internal Server Error", [("Content-Length", "0")])\n'
        "            return [b\"\"]\n"
        "        body = greeting.text().encode()"))
    return app


def save_greeting(app: Path, version: str) -> Callable[[], str]:
    def save() -> str:
        write(app / "greeting.py", greeting(version))
        return version

    return save


@pytest.mark.parametrize("kind", KINDS)
def test_ready_path_answering_500_refuses_the_swap(tmp_path: Path, kind: str) -> None:
    """With ready_path=/healthz, new code whose /healthz answers 500 never replaces the old code."""
    app = healthz_app(tmp_path, 'greeting.text() == "sick"')
    port = free_port()
    with running(serve(kind, app, port, env=server_env(ready_path="/healthz")), "v1") as server:
        refused_under_load(server, save_greeting(app, "sick"),
                           r"not reloading, the new code does not load: NotReady: GET /healthz answered 500", "v1",
                           save_greeting(app, "v3"))


@pytest.mark.parametrize("kind", ["sync", "uwsgi-lazy"])
def test_each_new_worker_asks_ready_path_itself(tmp_path: Path, kind: str) -> None:
    """The check's call to ready_path passes, but the new workers' own call answers 500 (what
    differs between the two is the environment, as with a database only workers reach): the new
    code never replaces the old, and the fix is served."""
    from wsgi_reload._check.check import PROBE_ENV

    app = healthz_app(tmp_path, f'greeting.text() == "sick" and not __import__("os").environ.get("{PROBE_ENV}")')
    port = free_port()
    with running(serve(kind, app, port, env=server_env(ready_path="/healthz")), "v1") as server:
        refused_under_load(server, save_greeting(app, "sick"),
                           r"cannot load the app from verified code \(.*NotReady: GET /healthz answered 500", "v1",
                           save_greeting(app, "v3"), seconds=2)


@pytest.mark.parametrize("kind", ["sync", "preload", "uwsgi-prefork", "uwsgi-lazy"])
def test_the_watcher_killed_under_load_comes_back(tmp_path: Path, kind: str) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(serve(kind, app, port), "v1") as server:

        def save() -> str:
            write(app / "greeting.py", greeting("v2"))
            return "v2"

        kill_the_watcher_under_load(server, app, save)


@pytest.mark.parametrize("kind", ["sync", "preload", "uwsgi-prefork", "uwsgi-lazy"])
def test_the_runtime_directory_removed_under_load(tmp_path: Path, kind: str) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(serve(kind, app, port), "v1") as server:
        time.sleep(1)

        def save(version: str) -> Callable[[], str]:
            def run() -> str:
                write(app / "greeting.py", greeting(version))
                return version

            return run

        remove_the_runtime_directory_under_load(server, app, [save("v2"), save("v3")])


@pytest.mark.parametrize("kind", ["sync", "uwsgi-prefork"])
def test_the_runtime_directory_emptied_in_part_under_load(tmp_path: Path, kind: str) -> None:
    """A cleaner that deletes old files but leaves a directory that is not empty (tmpreaper,
    ``find -type f -delete``) takes the watcher's lock and socket, the workers' records and the
    store's checked bytes. Nothing fails meanwhile (a worker that had not imported lazy_part
    imports it all the same), the watcher says so in one line and makes the directory whole
    (every worker's record is back), and the next save is served by every worker."""
    app = lazy_app(tmp_path)
    port = free_port()
    with running(serve(kind, app, port), "v1") as server:
        assert get(port, "/lazy")[1].startswith("lazy-1@")  # one worker has imported lazy_part
        directory = runtime_dir_of(app)
        for entry in list(directory.rglob("*")):
            if not entry.is_dir():
                entry.unlink(missing_ok=True)
        with Load(port, threads=4, path="/lazy") as load:
            server.wait_for_log(r"the runtime directory .* was emptied in part \(.*watcher\.lock.*\)")
            deadline = time.monotonic() + 20
            while not worker_pids(server) <= {int(p.stem) for p in directory.glob("[0-9]*.json")}:
                assert time.monotonic() < deadline, "the workers never wrote their records again"
                time.sleep(0.1)
            write(app / "lazy_part.py", 'def text():\n    return "lazy-2"\n')
            wait_for_prefix(port, "/lazy", "lazy-2")
            time.sleep(1)
            _, failures, _ = load.snapshot()
        assert failures == []
        every_worker_answers(port, "/lazy", "lazy-2")
        assert server.count("emptied in part") == 1
        assert server.count("this watcher retires") == 0


def test_a_glob_of_the_whole_file_system_never_hangs_gunicorn(tmp_path: Path) -> None:
    """WSGI_RELOAD_EXTRA_FILES='/**/*': the expansion is cut with one line, gunicorn serves and
    reloads, and SIGTERM stops it."""
    app = make_app(tmp_path)
    port = free_port()
    server = gunicorn(app, port, ["-w", "2"], env=server_env(extra_files="/**/*"))
    with running(server, "v1"):
        server.wait_for_log(r"the extra_files pattern '/\*\*/\*' matches more than \d+ files or takes longer")
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2")
        assert server.proc is not None
        started = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        server.proc.wait(30)
        assert time.monotonic() - started < 30


def test_extra_files_of_the_root_directory_is_refused_in_one_line(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, ["-w", "2"], env=server_env(extra_files="/")), "v1") as server:
        server.wait_for_log(r"reloading is off: .*WSGI_RELOAD_EXTRA_FILES=.* names the whole file system")
        assert get(port) == (200, "v1")


@pytest.mark.parametrize("kind", ["sync", "uwsgi-prefork"])
def test_a_file_rewritten_every_10_ms_beside_the_code_does_not_hold_a_save(tmp_path: Path, kind: str) -> None:
    """A request log, db.sqlite3 or uploads in the app directory change all the time under
    traffic; only watched files' events count towards the settle window, so the save is not
    held to the 3 s cap."""
    import threading

    app = make_app(tmp_path)
    port = free_port()
    stop = threading.Event()

    def noise() -> None:
        deadline = time.monotonic() + 60
        with open(app / "requests.log", "a") as log:
            while not stop.is_set() and time.monotonic() < deadline:
                log.write("GET / 200\n")
                log.flush()
                time.sleep(0.01)

    with running(serve(kind, app, port), "v1") as server:
        writer = threading.Thread(target=noise, daemon=True)
        writer.start()
        try:
            time.sleep(0.5)
            for n in (2, 3):
                write(app / "greeting.py", greeting(f"v{n}"))
                wait_for_body(port, f"v{n}")
                time.sleep(0.5)
        finally:
            stop.set()
            writer.join(5)
        assert "files are still changing after" not in server.log()
