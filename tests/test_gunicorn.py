"""Real gunicorn on 127.0.0.1, real HTTP, real file edits."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from servers import (
    BROKEN_SAVES,
    HERE,
    Load,
    Server,
    free_port,
    get,
    greeting,
    gunicorn,
    hold_broken_saves,
    make_app,
    running,
    runtime_dir_of,
    server_env,
    settled_workers,
    the_watcher,
    wait_for_body,
    worker_pids,
    write,
)

from wsgi_reload._check.spawn import descendants

pytestmark = pytest.mark.slow

MODES = {
    "sync": ["-w", "2"],
    "gthread": ["-w", "2", "-k", "gthread", "--threads", "4"],
    "preload": ["-w", "2", "--preload"],
}
RELOADED = r"check passed .*; reloading gunicorn"


@pytest.fixture(params=sorted(MODES))
def mode(request: pytest.FixtureRequest) -> list[str]:
    return MODES[request.param]


def test_an_edit_is_served(tmp_path: Path, mode: list[str]) -> None:
    # Liveness only; benchmarks/compare.py measures the latency.
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, mode), "v1") as server:
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2", timeout=10)
        server.wait_for_log(RELOADED)


def sockets_of(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:"):
                found.add(link)
    return found


def test_no_helper_process_holds_a_socket_of_the_server(tmp_path: Path, mode: list[str]) -> None:
    """gunicorn keeps its listening sockets inheritable (for USR2); the watcher and the check
    processes it starts must not hold a copy, or the port stays bound after the server stops.
    Two of them: the first is fd 3, which the watcher's own lock descriptor happens to replace."""
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, [*mode, "-b", f"127.0.0.1:{free_port()}"]), "v1") as server:
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2")
        server.wait_for_log(RELOADED)
        assert server.proc is not None
        master = sockets_of(server.proc.pid)
        watcher = the_watcher(app)
        for pid in (watcher, *descendants(watcher)):
            assert not sockets_of(pid) & master, f"process {pid} holds the server's sockets"


def test_ten_reloads_under_load_fail_no_request(tmp_path: Path, mode: list[str]) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, mode), "v1") as server, Load(port, threads=4) as load:
        for n in range(2, 12):
            write(app / "greeting.py", greeting(f"v{n}"))
            wait_for_body(port, f"v{n}")
            # Edits closer together than a reload merge into one batch; keep them apart.
            server.wait_for_log("reload done", count=n - 1)
        time.sleep(0.5)
        ok, failures, bodies = load.snapshot()
    assert failures == []
    assert ok > 100
    assert {f"v{n}" for n in range(2, 12)} <= bodies | {"v1"}
    assert server.count(RELOADED) == 10


def test_broken_saves_keep_the_old_code_serving(tmp_path: Path, mode: list[str]) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, mode), "v1") as server, Load(port, threads=4) as load:

        def reloaded(generation: int) -> None:
            server.wait_for_log("reload done", count=generation - 1)
            time.sleep(0.5)  # the old workers finish their last requests

        hold_broken_saves(server, app, load, reloaded)
        _, failures, _ = load.snapshot()
    assert failures == []
    log = server.log()
    assert "SyntaxError" in log and "NameError" in log and "ModuleNotFoundError" in log and "RuntimeError" in log
    assert server.count(RELOADED) == len(BROKEN_SAVES)


def test_a_burst_of_fifty_writes_gives_at_most_two_reloads(tmp_path: Path, mode: list[str]) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, mode), "v1") as server:
        for n in range(50):
            write(app / "greeting.py", greeting(f"burst-{n}"))
            time.sleep(0.01)
        wait_for_body(port, "burst-49")
        time.sleep(3)
        assert 1 <= server.count(RELOADED) <= 2
        assert get(port) == (200, "burst-49")


def test_a_new_module_is_picked_up_and_watched(tmp_path: Path, mode: list[str]) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, mode), "v1"):
        write(app / "extra.py", 'def text():\n    return "extra-1"\n')
        importing = greeting("unused").replace('return "unused"', "return extra.text()")
        write(app / "greeting.py", "import extra\n\n" + importing)
        wait_for_body(port, "extra-1")
        time.sleep(0.5)
        write(app / "extra.py", 'def text():\n    return "extra-2"\n')
        wait_for_body(port, "extra-2")


def slow_app(tmp_path: Path) -> Path:
    """The test app, with a module that takes 1.5 s to import before greeting.py is read."""
    app = make_app(tmp_path)
    write(app / "slow.py", "import time\ntime.sleep(1.5)\n")
    write(app / "app.py", "import slow  # noqa: F401\n" + (app / "app.py").read_text())
    return app


def break_after_check(server: Server, app: Path, load: Load, started: str, done: str) -> None:
    """v2 was saved. Once its reload has ``started`` (the check passed), break greeting.py while
    the new code is still importing slow.py. The new code loads the checked bytes, v2, never the
    broken file: no request fails, nothing but v1 and v2 is served, and the broken save is then
    refused by a check of its own. A fix is served after that."""
    server.wait_for_log(started)
    write(app / "greeting.py", BROKEN_SAVES["syntax"])
    server.wait_for_log(done)
    wait_for_body(load.port, "v2")
    server.wait_for_log(r"not reloading, the new code does not load: .*greeting.py:\d+: SyntaxError")
    time.sleep(1)
    _, failures, bodies = load.snapshot()
    assert failures == []
    assert bodies <= {"v1", "v2"}
    assert {get(load.port)[1] for _ in range(6)} == {"v2"}
    write(app / "greeting.py", greeting("v3"))
    wait_for_body(load.port, "v3")
    server.wait_for_log(done, count=2)
    time.sleep(0.5)  # the old workers finish their last requests
    _, failures, bodies = load.snapshot()
    assert failures == []
    assert bodies <= {"v1", "v2", "v3"}
    assert server.alive()


@pytest.mark.parametrize("mode_name", ["sync", "gthread"])
def test_a_save_that_breaks_the_app_after_the_check_never_reaches_the_workers(tmp_path: Path, mode_name: str) -> None:
    """The new workers import the bytes that were checked, not the disk: here the file breaks
    after the check passed and before the new workers read it (a slow module imported first
    holds them up)."""
    app = slow_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, MODES[mode_name]), "v1") as server, Load(port, threads=4) as load:
        write(app / "greeting.py", greeting("v2"))
        break_after_check(server, app, load, RELOADED, r"reload done: 2 new workers serving")


def test_a_broken_module_the_workers_import_lazily_is_refused(tmp_path: Path, mode: list[str]) -> None:
    """A module imported inside a function is not touched by importing the app: the check
    imports the changed modules the workers had loaded as well."""
    app = make_app(tmp_path)
    write(app / "lazy_part.py", 'def text():\n    return "lazy-1"\n')
    write(app / "greeting.py", "def setup():\n    pass\n\n\ndef text():\n    import lazy_part\n\n"
                               "    return lazy_part.text()\n")
    port = free_port()
    with running(gunicorn(app, port, mode), "lazy-1") as server, Load(port, threads=4) as load:
        # A second of load reaches every worker, so each has imported lazy_part before it changes
        # (a worker importing it lazily during a save reads a half file: see README, Limits).
        time.sleep(1)
        write(app / "lazy_part.py", 'def text():\n    return "lazy-2"\n')  # proves it is watched
        wait_for_body(port, "lazy-2")
        server.wait_for_log(r"reload done")
        time.sleep(0.5)  # the old workers finish their last requests
        load.reset_bodies()
        write(app / "lazy_part.py", 'undefined_name\n\n\ndef text():\n    return "broken"\n')
        server.wait_for_log(rf"not reloading, the new code does not load: {app / 'lazy_part.py'}:1: NameError")
        time.sleep(2)
        _, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies == {"lazy-2"}
        write(app / "lazy_part.py", 'def text():\n    return "lazy-3"\n')
        wait_for_body(port, "lazy-3")


def test_a_save_that_pauses_mid_write_never_reaches_the_workers(tmp_path: Path) -> None:
    """An editor truncates, writes a first part that even imports, pauses 300 ms, then writes the
    rest. File events fire on the first part; the half file must never be served."""
    pytest.importorskip("watchfiles")
    app = make_app(tmp_path)
    port = free_port()
    env = server_env(backend="events")
    with running(gunicorn(app, port, ["-w", "2"], env=env), "v1") as server, Load(port, threads=4) as load:
        for n in range(2, 8):
            source = greeting(f"v{n}")
            first_part = source[:source.index("def text")]  # setup() only: imports, then fails per request
            with open(app / "greeting.py", "w", encoding="utf-8") as f:
                f.write(first_part)
                f.flush()
                os.fsync(f.fileno())
                time.sleep(0.3)
                f.write(source[len(first_part):])
            wait_for_body(port, f"v{n}")
            server.wait_for_log("reload done", count=n - 1)
        time.sleep(0.5)
        _, failures, _ = load.snapshot()
    assert failures == []
    assert server.count(r"wsgi_reload: watching .+ by file events") == 1


@pytest.mark.parametrize("workers", ["1", "8"])
def test_every_worker_serves_the_new_code(tmp_path: Path, workers: str) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, ["-w", workers]), "v1") as server:
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2")
        server.wait_for_log(rf"reload done: {workers} new workers? serving")
        time.sleep(0.5)  # the old workers finish their last requests
        assert {get(port)[1] for _ in range(40)} == {"v2"}


def test_chdir(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    port = free_port()
    server = gunicorn(app, port, ["--chdir", str(app)])
    server.cwd = tmp_path
    with running(server, "v1"):
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2")


MESSAGE_GREETING = (
    "from pathlib import Path\n\nMESSAGE = (Path(__file__).parent / 'message.txt').read_text().strip()\n\n\n"
    "def setup():\n    pass\n\n\ndef text():\n    return MESSAGE\n"
)


@pytest.mark.parametrize("how", ["env", "gunicorn-option"])
def test_extra_files_reload(tmp_path: Path, how: str) -> None:
    app = make_app(tmp_path)
    write(app / "message.txt", "hello")
    write(app / "greeting.py", MESSAGE_GREETING)
    port = free_port()
    if how == "env":
        server = gunicorn(app, port, env=server_env(extra_files="*.txt"))
    else:
        server = gunicorn(app, port, ["--reload-extra-file", "message.txt"])
    with running(server, "hello"):
        time.sleep(0.5)
        write(app / "message.txt", "bonjour")
        wait_for_body(port, "bonjour")


def test_a_config_change_reloads(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    config = app / "gunicorn_conf.py"
    write(config, "from wsgi_reload.gunicorn import *  # noqa\nworkers = 1\n")
    port = free_port()
    with running(gunicorn(app, port, config=str(config)), "v1") as server:
        time.sleep(0.5)
        write(config, "from wsgi_reload.gunicorn import *  # noqa\nworkers = 3\n")
        server.wait_for_log(rf"{config}")
        server.wait_for_log(r"reload done: 3 new workers serving")


def test_install_chains_the_configs_own_hooks(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    config = app / "gunicorn_conf.py"
    marker = tmp_path / "marker"
    write(config, f"""
import wsgi_reload.gunicorn

def when_ready(server):
    open({str(marker)!r}, "a").write("ready\\n")

def post_worker_init(worker):
    open({str(marker)!r}, "a").write("worker\\n")

wsgi_reload.gunicorn.install(globals(), interval=0.5)
""")
    port = free_port()
    with running(gunicorn(app, port, ["-w", "2"], config=str(config)), "v1"):
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2")
        time.sleep(1)
    lines = marker.read_text().split()
    assert lines.count("ready") == 1
    assert lines.count("worker") >= 4  # two workers, twice


def test_a_hook_defined_after_the_star_import_is_named_clearly(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    config = app / "gunicorn_conf.py"
    write(config, "from wsgi_reload.gunicorn import *  # noqa\n\ndef post_worker_init(worker):\n    pass\n")
    port = free_port()
    with running(gunicorn(app, port, config=str(config)), "v1") as server:
        server.wait_for_log(r"install\(globals\(\)\)")
        assert server.alive()


def test_a_bad_setting_is_one_clear_line_and_the_server_keeps_serving(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, env=server_env(interval="soon")), "v1") as server:
        server.wait_for_log(r"WSGI_RELOAD_INTERVAL='soon' is not a number")
        assert server.count(r"WSGI_RELOAD_INTERVAL") == 1
        write(app / "greeting.py", greeting("v2"))
        time.sleep(2)
        assert get(port) == (200, "v1")


def test_combining_with_gunicorns_own_reload_warns(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, ["--reload"]), "v1") as server:
        server.wait_for_log(r"do not combine them")


needs_gevent = pytest.mark.skipif(importlib.util.find_spec("gevent") is None, reason="gevent is not installed")


@needs_gevent
def test_gevent_workers_reload(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, ["-k", "gevent", "-w", "2"]), "v1"), Load(port) as load:
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2")
        _, failures, _ = load.snapshot()
    assert failures == []


@needs_gevent
def test_creating_a_missing_module_is_the_fix(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, ["-w", "2"]), "v1") as server:
        write(app / "greeting.py", "import newmod\n\n" + greeting("unused").replace('return "unused"',
                                                                                   "return newmod.TEXT"))
        server.wait_for_log(r"greeting.py:1: ModuleNotFoundError: No module named 'newmod'")
        assert get(port) == (200, "v1")
        write(app / "newmod.py", 'TEXT = "from-newmod"\n')  # no other save: its appearance is the fix
        wait_for_body(port, "from-newmod")


def master_pids(server: Server) -> set[int]:
    return {int(pid) for pid in re.findall(r"Listening at: \S+ \((\d+)\)", server.log())}


def preload_reloads_under_load(server: Server, app: Path, port: int, reloads: int = 3) -> None:
    with Load(port, threads=4) as load:
        for n in range(2, 2 + reloads):
            write(app / "greeting.py", greeting(f"v{n}"))
            wait_for_body(port, f"v{n}")
            server.wait_for_log(r"reload done: 2 new workers serving, same master pid", count=n - 1)
        time.sleep(0.5)  # the old workers finish their last requests
        _, failures, _ = load.snapshot()
    assert failures == []


METRICS_APP = """import socket
import threading

import greeting

metrics = socket.socket()
metrics.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
metrics.bind(("127.0.0.1", {port}))  # a metrics port opened at import, as prometheus_client's start_http_server
metrics.listen()


def answer():
    while True:
        connection, _ = metrics.accept()
        connection.sendall(("metrics " + greeting.text()).encode())
        connection.close()


threading.Thread(target=answer, daemon=True).start()


def app(environ, start_response):
    body = greeting.text().encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def metrics(port: int) -> str:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        return connection.recv(100).decode()


def test_preload_with_a_port_opened_at_import_reloads(tmp_path: Path) -> None:
    """The master opens a metrics port at import. The check binds a free port instead of the one
    the master holds, and the re-executed master takes the socket over from its old workers,
    which still hold it: a good save is served, and the metrics port answers with the new code."""
    app = make_app(tmp_path)
    metrics_port = free_port()
    write(app / "app.py", METRICS_APP.format(port=metrics_port))
    port = free_port()
    with running(gunicorn(app, port, MODES["preload"]), "v1") as server:
        assert metrics(metrics_port) == "metrics v1"
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2")
        server.wait_for_log(rf"the re-executed master takes port {metrics_port} over from its old workers")
        assert metrics(metrics_port) == "metrics v2"
        assert "Address already in use" not in server.log()


def test_preload_keeps_the_master_pid(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, MODES["preload"]), "v1") as server:
        first = master_pids(server)
        preload_reloads_under_load(server, app, port)
        assert master_pids(server) == first and len(first) == 1
        assert server.proc is not None and server.proc.poll() is None


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="running gunicorn as PID 1 of a new pid namespace needs root and unshare")
def test_preload_as_pid_1_in_a_container(tmp_path: Path) -> None:
    """As PID 1, retiring the old master (gunicorn's USR2 recipe) would end the container."""
    app = make_app(tmp_path)
    port = free_port()
    server = gunicorn(app, port, MODES["preload"])
    server.argv = ["unshare", "--pid", "--fork", "--mount-proc", *server.argv]
    with running(server, "v1"):
        assert master_pids(server) == {1}
        preload_reloads_under_load(server, app, port)
        assert master_pids(server) == {1}
        assert server.proc is not None and server.proc.poll() is None


def test_preload_a_save_after_the_check_never_reaches_the_reexecuted_master(tmp_path: Path) -> None:
    app = slow_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, MODES["preload"]), "v1") as server, Load(port, threads=4) as load:
        write(app / "greeting.py", greeting("v2"))
        break_after_check(server, app, load, r"Handling signal: usr2",
                          r"reload done: 2 new workers serving, same master pid")
        assert len(master_pids(server)) == 1


def test_preload_with_reloading_turned_off_leaves_no_runtime_directory(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    port = free_port()
    env = server_env(extra_files="/")
    with running(gunicorn(app, port, ["--preload"], env=env), "v1") as server:
        server.wait_for_log(r"reloading is off: .*names the whole file system")
        assert server.alive()
        directory = runtime_dir_of(app)  # the preloading master made one before reloading was turned off
    assert not directory.exists(), "the runtime directory outlived the server"


def test_config_module_names_do_not_shadow_gunicorn_settings() -> None:
    from gunicorn.config import KNOWN_SETTINGS

    import wsgi_reload.gunicorn as adapter

    setting_names = {s.name for s in KNOWN_SETTINGS}
    assert set(vars(adapter)) & setting_names == set(adapter.HOOK_NAMES)


def test_configs_reload_config_exports_the_hooks() -> None:
    namespace: dict[str, object] = {}
    exec((HERE.parent / "configs" / "reload_config.py").read_text(), namespace)
    import wsgi_reload.gunicorn as adapter

    for name in adapter.HOOK_NAMES:
        assert namespace[name] is getattr(adapter, name)


FREEZE_THE_MASTER = '''
import os, subprocess
def mark(name):
    try:
        os.close(os.open(os.path.join({dir!r}, name), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False
if open(os.path.join({dir!r}, "master.pid")).read() == str(os.getppid()):
    if not mark("first") and mark("second"):
        subprocess.Popen(["sh", "-c", "sleep 2.5; kill -CONT %d" % os.getppid()])
        os.kill(os.getppid(), 19)
'''


def test_a_ttou_the_master_never_handled_leaves_no_old_worker_serving(tmp_path: Path) -> None:
    """The master is stopped (SIGSTOP, 2.5 s) by the second new worker of a swap as it loads, so
    the swap's TTOUs wait in the kernel, where the SIGCONT discards them (as two that reach a busy
    master before its handler ran merge into one, only more so). The old workers those TTOUs were
    for are stopped all the same: only the new code is served after the swap, and the master ends
    with two workers again."""
    app = make_app(tmp_path)
    port = free_port()
    with running(gunicorn(app, port, ["-w", "2"]), "v1") as server, Load(port, threads=4) as load:
        assert server.proc is not None
        (tmp_path / "master.pid").write_text(str(server.proc.pid))
        write(app / "greeting.py", greeting("v2", setup=FREEZE_THE_MASTER.format(dir=str(tmp_path))
                                            .replace("\n", "\n    ")))
        server.wait_for_log("reload done")
        assert (tmp_path / "second").exists(), "the master was never stopped"
        time.sleep(1.0)  # the old workers finish their last requests
        load.reset_bodies()
        time.sleep(3)
        _, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies == {"v2"}
        deadline = time.monotonic() + 20
        while len(worker_pids(server)) != 2:
            assert time.monotonic() < deadline, f"the master runs {len(worker_pids(server))} workers"
            time.sleep(0.2)


HOLD_THE_SECOND_WORKER = '''
import os, time
with open("/proc/%d/cmdline" % os.getppid(), "rb") as f:
    worker = b"gunicorn" in f.read()  # not the watcher's check process
try:
    os.close(os.open(os.path.join({dir!r}, "first"), os.O_CREAT | os.O_EXCL))
except FileExistsError:
    while worker and os.path.exists(os.path.join({dir!r}, "hold")):
        time.sleep(0.05)
'''


def test_a_save_while_a_worker_still_boots_keeps_every_worker(tmp_path: Path) -> None:
    """The server's second worker is still loading the app (held at its import) when a save is
    checked and swapped: the swap counts it among the server's workers, and once it has booted
    (on the older generation: it exits, and its replacement loads the new one) the master runs
    two workers again, all serving the new code. Counted from those serving alone, the swap
    would end with one worker."""
    app = make_app(tmp_path)
    (tmp_path / "hold").touch()
    write(app / "greeting.py", greeting("v1", setup=HOLD_THE_SECOND_WORKER.format(dir=str(tmp_path))
                                        .replace("\n", "\n    ")))
    port = free_port()
    with running(gunicorn(app, port, ["-w", "2"]), None) as server:
        wait_for_body(port, "v1")
        time.sleep(1)  # the watcher has read the first worker's record
        assert server.count("workers up") == 0, "the second worker was not held"
        write(app / "greeting.py", greeting("v2"))
        server.wait_for_log("reload done")
        (tmp_path / "hold").unlink()
        with Load(port, threads=4) as load:
            settled = settled_workers(server, 2)
            time.sleep(3)  # a swap that counted one worker retires the second after STEADY_SECONDS
            assert worker_pids(server) == settled, server.log()[-3000:]
            load.reset_bodies()
            time.sleep(1)
            _, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies == {"v2"}
