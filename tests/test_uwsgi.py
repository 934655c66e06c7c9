"""Real uWSGI (built from PyPI) on 127.0.0.1, real HTTP, real file edits."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from servers import (
    BIN,
    BROKEN_SAVES,
    Load,
    free_port,
    get,
    greeting,
    hold_broken_saves,
    make_app,
    running,
    server_env,
    the_watcher,
    uwsgi,
    wait_for_body,
    write,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("uwsgi", path=str(BIN)) is None, reason="uWSGI is not installed"),
]

RELOADED = r"check passed .*; reloading uWSGI"
INSTANCE_READY = r"publishes its modules to the watcher"
"""Each worker of each generation says so once."""
APP_READY = r"WSGI app 0 \(mountpoint=''\) ready"


def wait_for_instance(server: object, generation: int, variant: dict[str, object], processes: int = 2) -> None:
    """Wait until the n-th instance has every worker's app loaded, so the next save races no import."""
    server.wait_for_log(INSTANCE_READY, count=generation * processes)  # type: ignore[attr-defined]
    if variant.get("lazy"):
        server.wait_for_log(APP_READY, count=generation * processes)  # type: ignore[attr-defined]


@pytest.fixture(params=["prefork-import", "prefork-in-app", "lazy-import", "lazy-in-app"])
def variant(request: pytest.FixtureRequest) -> dict[str, object]:
    forking, enable = request.param.split("-", 1)
    return {"lazy": forking == "lazy", "enable": enable}


def test_an_edit_is_served(tmp_path: Path, variant: dict[str, object]) -> None:
    # Liveness only; benchmarks/compare.py measures the latency.
    app = make_app(tmp_path)
    port = free_port()
    with running(uwsgi(app, port, **variant), "v1") as server:  # type: ignore[arg-type]
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2", timeout=10)
        server.wait_for_log(RELOADED)


def caught_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))


def test_the_prefork_master_takes_a_nudge_from_the_watcher(tmp_path: Path) -> None:
    """A graceful reload reaps each old worker on the master's next loop turn, a second apart
    (core/master.c); the master gets a do-nothing SIGWINCH handler so the watcher can end that
    wait as each worker exits. The handler is there in each generation of the master."""
    app = make_app(tmp_path)
    port = free_port()
    with running(uwsgi(app, port, lazy=False, enable="import"), "v1") as server:
        assert server.proc is not None
        assert caught_signals(server.proc.pid) & (1 << (signal.SIGWINCH - 1))
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2", timeout=10)
        wait_for_instance(server, 2, {"lazy": False})
        assert caught_signals(server.proc.pid) & (1 << (signal.SIGWINCH - 1))  # the re-executed master too
        assert server.count(r"wsgi_reload: .*Traceback|Exception") == 0


def test_ten_reloads_under_load_fail_no_request(tmp_path: Path, variant: dict[str, object]) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(uwsgi(app, port, **variant), "v1") as server, Load(port, threads=4) as load:  # type: ignore[arg-type]
        for n in range(2, 12):
            write(app / "greeting.py", greeting(f"v{n}"))
            wait_for_body(port, f"v{n}")
            wait_for_instance(server, n, variant)
        time.sleep(0.5)
        ok, failures, bodies = load.snapshot()
    assert failures == []
    assert ok > 100
    assert server.count(RELOADED) == 10


def test_broken_saves_keep_the_old_code_serving(tmp_path: Path, variant: dict[str, object]) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(uwsgi(app, port, **variant), "v1") as server, Load(port, threads=4) as load:  # type: ignore[arg-type]
        hold_broken_saves(server, app, load, lambda generation: wait_for_instance(server, generation, variant))
        _, failures, _ = load.snapshot()
    assert failures == []
    assert server.count(RELOADED) == len(BROKEN_SAVES)


@pytest.mark.parametrize("lazy", [False, True], ids=["prefork", "lazy"])
def test_a_request_log_in_the_app_directory_holds_up_no_save(tmp_path: Path, lazy: bool) -> None:
    """uWSGI logging every request into a file beside the code, under load: a good save is
    served, a broken one refused while the old code serves, the fix served, nothing fails, and
    no save waits for the log to be quiet (the settle window ignores files nobody imports)."""
    app = make_app(tmp_path)
    port = free_port()
    server = uwsgi(app, port, lazy=lazy, request_log=app / "requests.log")
    with running(server, "v1"), Load(port, threads=4) as load:
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2")
        wait_for_instance(server, 2, {"lazy": lazy})
        load.reset_bodies()
        write(app / "greeting.py", BROKEN_SAVES["name_error"])
        server.wait_for_log(r"not reloading, the new code does not load: .*greeting.py:1: NameError")
        time.sleep(1)
        assert load.snapshot()[2] == {"v2"}
        write(app / "greeting.py", greeting("v3"))
        wait_for_body(port, "v3")
        _, failures, _ = load.snapshot()
    assert failures == []
    assert (app / "requests.log").stat().st_size > 10_000  # the log did grow under load
    assert server.count(r"still changing") == 0


@pytest.mark.parametrize("lazy", [False, True], ids=["prefork", "lazy"])
def test_an_instance_started_broken_recovers_once_fixed(tmp_path: Path, lazy: bool) -> None:
    app = make_app(tmp_path)
    write(app / "greeting.py", BROKEN_SAVES["missing_import"])
    port = free_port()
    server = uwsgi(app, port, lazy=lazy)
    server.ready_pattern = None
    with running(server, None):
        server.wait_for_log(r"the app does not load, so the workers have no code to serve")
        assert get(port)[0] == 500  # uWSGI: "no python application found"
        write(app / "greeting.py", greeting("fixed"))
        wait_for_body(port, "fixed")
        # Said once for the server, not once per worker, and never "the old code keeps serving".
        assert server.count(r"the app does not load") == 1
        assert server.count(r"old code keeps serving") == 0


@pytest.mark.parametrize("lazy", [False, True], ids=["prefork", "lazy"])
def test_a_burst_of_fifty_writes_gives_at_most_two_reloads(tmp_path: Path, lazy: bool) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(uwsgi(app, port, lazy=lazy), "v1") as server:
        for n in range(50):
            write(app / "greeting.py", greeting(f"burst-{n}"))
            time.sleep(0.01)
        wait_for_body(port, "burst-49")
        time.sleep(3)
        assert 1 <= server.count(RELOADED) <= 2
        assert get(port) == (200, "burst-49")


@pytest.mark.parametrize("args, processes", [(["--threads", "4"], 2), ([], 8), ([], 1)],
                         ids=["threads", "8-processes", "1-process"])
def test_worker_layouts_reload(tmp_path: Path, args: list[str], processes: int) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(uwsgi(app, port, args, processes=processes), "v1") as server, Load(port) as load:
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2")
        server.wait_for_log(INSTANCE_READY, count=2 * processes)
        time.sleep(0.5)
        assert {get(port)[1] for _ in range(30)} == {"v2"}
        _, failures, _ = load.snapshot()
    assert failures == []


@pytest.mark.parametrize("threads", [None, "2"], ids=["default-single-thread", "two-threads"])
def test_single_threaded_workers_get_one_line_with_the_fix(tmp_path: Path, threads: str | None) -> None:
    app = make_app(tmp_path)
    port = free_port()
    server = uwsgi(app, port, ["--threads", threads] if threads else ["--threads", "1"])
    with running(server, "v1"):
        server.wait_for_log(r"wsgi_reload: watching .+ by ")
        warning = r"single-threaded, so a graceful reload can reset a connection.*add --threads 2"
        assert server.count(warning) == (1 if threads is None else 0)


PAUSE_AFTER_ACCEPT = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

/* Widens the instant between accept() and the start of a request in uWSGI: once the file
   named by PAUSE_FILE exists, say which pid accepted a TCP connection, then pause a second.
   (Only TCP: the watcher process inherits the preload too, and accepts its Unix socket's
   connections from the workers' keepers.) */
int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real) real = dlsym(RTLD_NEXT, "accept4");
    int client = real(fd, addr, len, flags);
    const char *pause_file = getenv("PAUSE_FILE");
    struct sockaddr_storage local;
    socklen_t local_len = sizeof local;
    if (client >= 0 && pause_file && access(pause_file, F_OK) == 0
            && getsockname(fd, (struct sockaddr *)&local, &local_len) == 0 && local.ss_family == AF_INET) {
        FILE *f = fopen(pause_file, "w");
        if (f) { fprintf(f, "%d", getpid()); fclose(f); }
        usleep(1000000);
    }
    return client;
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the accept() pause shim")
@pytest.mark.parametrize("threads", ["1", "2"])
def test_why_single_threaded_workers_can_reset_a_connection_on_reload(tmp_path: Path, threads: str) -> None:
    """The reason behind the start-up warning, shown on real uWSGI: a worker that has accepted a
    connection but not begun reading it is not yet in_request, and the graceful-stop signal
    makes a single-threaded worker exit there (gracefully_kill() in core/uwsgi.c). A worker with
    two threads only stops accepting and answers. A shim pauses the worker right after accept()
    to hold that instant open; nothing else is changed."""
    shim = tmp_path / "pause_after_accept.so"
    source = tmp_path / "pause_after_accept.c"
    source.write_text(PAUSE_AFTER_ACCEPT)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(shim), str(source), "-ldl"], check=True)
    app = make_app(tmp_path)
    port = free_port()
    pause_file = tmp_path / "paused"
    env = server_env()
    env.update(LD_PRELOAD=str(shim), PAUSE_FILE=str(pause_file))
    server = uwsgi(app, port, ["--threads", threads], processes=1, env=env)
    with running(server, "v1"):
        pause_file.write_text("")
        connection = socket.create_connection(("127.0.0.1", port), timeout=10)
        connection.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 10
        while not pause_file.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.01)
        worker = int(pause_file.read_text())
        pause_file.unlink()
        os.kill(worker, signal.SIGHUP)  # what the reload sends each worker
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := connection.recv(65536):
                answer += chunk
        connection.close()
        if threads == "1":
            assert answer == b"", "a single-threaded worker exits with the accepted connection unanswered"
        else:
            assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"v1")


def test_uwsgi_protocol_socket(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    port = free_port()
    with running(uwsgi(app, port, socket_option="--socket"), None) as server:
        wait_for_body(server.port, "v1")
        server.wait_for_log(INSTANCE_READY)
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(server.port, "v2")


def cpu_ticks(pid: int) -> int:
    """CPU time a process has used (user and system), in clock ticks."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.mark.parametrize("lazy", [False, True], ids=["prefork", "lazy"])
def test_the_http_router_setup_reloads_each_save(tmp_path: Path, lazy: bool) -> None:
    """``--http``: uWSGI's router process binds the port and forwards to the workers. A prefork
    reload kills the router and the re-executed master binds its port again, which failed
    (EADDRINUSE, and the server was gone) while the watcher held an inherited copy of the
    socket. Each save is served; with --lazy-apps (the router stays) no request fails, while a
    prefork server says at start that requests in flight through the router fail at each
    reload (uWSGI kills it). After the reloads the watcher spends no CPU."""
    app = make_app(tmp_path)
    port = free_port()
    variant = {"lazy": lazy}
    with running(uwsgi(app, port, socket_option="--http", lazy=lazy), "v1") as server, \
            Load(port, threads=4) as load:
        for n in (2, 3):
            write(app / "greeting.py", greeting(f"v{n}"))
            wait_for_body(port, f"v{n}")
            wait_for_instance(server, n, variant)
        watcher = the_watcher(app)
        time.sleep(1)
        before = cpu_ticks(watcher)
        time.sleep(5)
        used = cpu_ticks(watcher) - before
        assert get(port)[1] == "v3"
        _, failures, _ = load.snapshot()
    killed_router = "requests in flight through it fail at each reload"
    if lazy:
        assert failures == []
        assert killed_router not in server.log()
    else:
        assert all(f.startswith(("ConnectionResetError", "RemoteDisconnected", "ConnectionRefusedError"))
                   for f in failures), failures
        assert server.count(killed_router) == 1
    assert "Address already in use" not in server.log()
    assert used <= 5, f"the idle watcher used {used} clock ticks of CPU in 5 s"


@pytest.mark.parametrize("lazy", [False, True], ids=["prefork", "lazy"])
def test_wsgi_file(tmp_path: Path, lazy: bool) -> None:
    app = make_app(tmp_path)
    port = free_port()
    server = uwsgi(app, port, lazy=lazy, target=["--wsgi-file", "app.py"])
    with running(server, "v1"):
        write(app / "greeting.py", BROKEN_SAVES["syntax"])
        time.sleep(3)
        assert get(port) == (200, "v1")
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2")


def test_without_master_it_says_so_and_the_app_serves(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    port = free_port()
    server = uwsgi(app, port)
    server.argv.remove("--master")
    server.ready_pattern, server.ready_count = r"reloading is off", 1
    with running(server, "v1") as server:
        assert server.count(r"add --master") == 1


def test_importing_outside_uwsgi_is_one_clear_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import wsgi_reload.uwsgi; print('app carries on')"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout == "app carries on\n"
    assert done.stderr.strip().count("\n") == 0
    assert "not running under uWSGI" in done.stderr and "--import wsgi_reload.uwsgi" in done.stderr


def test_lazy_apps_a_save_after_the_check_never_reaches_the_new_workers(tmp_path: Path) -> None:
    """--lazy-apps: the workers are replaced one at a time. Here the code breaks after the check
    passed and while the first new worker imports a slow module: every new worker imports the
    checked bytes (v2), never the broken file, which its own check then refuses."""
    app = make_app(tmp_path)
    write(app / "slow.py", "import time\ntime.sleep(1.5)\n")
    write(app / "app.py", "import slow  # noqa: F401\n" + (app / "app.py").read_text())
    port = free_port()
    server = uwsgi(app, port, lazy=True)
    with running(server, "v1"), Load(port, threads=4) as load:
        wait_for_instance(server, 1, {"lazy": True})
        write(app / "greeting.py", greeting("v2"))
        server.wait_for_log(RELOADED)
        server.wait_for_log(r"respawned worker|Respawned uWSGI worker")
        write(app / "greeting.py", BROKEN_SAVES["syntax"])
        server.wait_for_log(r"not reloading, the new code does not load: .*greeting.py:\d+: SyntaxError")
        server.wait_for_log(r"reload done: 2 new workers serving")
        wait_for_body(port, "v2")
        time.sleep(1)
        _, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies <= {"v1", "v2"}
        assert {get(port)[1] for _ in range(6)} == {"v2"}
        write(app / "greeting.py", greeting("v3"))
        wait_for_body(port, "v3")
        server.wait_for_log(r"reload done: 2 new workers serving", count=2)
        time.sleep(0.5)
        _, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies <= {"v1", "v2", "v3"}
