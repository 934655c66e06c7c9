"""The wsgi-reload command against real child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
CLI = [str(BIN / "wsgi-reload")]

SIGNAL_RECORDER = """
import signal, sys, time
path = sys.argv[1]
signal.signal(signal.SIGHUP, lambda *_: open(path, "a").write("HUP\\n"))
open(path, "a").write("ready\\n")
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    time.sleep(0.05)
"""


@pytest.fixture
def app(tmp_path: Path) -> Path:
    (tmp_path / "cli_app.py").write_text(
        "import cli_helper\n\ndef application(environ, start_response):\n    return []\n"
    )
    (tmp_path / "cli_helper.py").write_text("VALUE = 1\n")
    return tmp_path


def start_recorder(record: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_RECORDER, str(record)])
    deadline = time.monotonic() + 10
    while not (record.exists() and "ready" in record.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    record = tmp_path / "signals.txt"
    proc = start_recorder(record)
    yield proc, record
    proc.kill()
    proc.wait()


def wait_for_log(watcher: subprocess.Popen[str], log: list[str], pattern: str, timeout: float = 15) -> None:
    """Read the watcher's stderr until a line holds ``pattern``."""
    assert watcher.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = watcher.stderr.readline()
        log.append(line)
        if pattern in line:
            return
    raise AssertionError(f"no {pattern!r} in {''.join(log)}")


def hups(record: Path) -> int:
    return record.read_text().count("HUP")


def wait_for_hups(record: Path, count: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while hups(record) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hups(record) == count


def test_check_prints_ok_and_exits_zero(app: Path) -> None:
    done = subprocess.run([*CLI, "check", "cli_app:application"], cwd=app, capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout == "OK: cli_app:application loads\n"


def test_check_prints_the_error_and_exits_one(app: Path) -> None:
    (app / "cli_helper.py").write_text("VALUE = 1\nundefined_name\n")
    done = subprocess.run([*CLI, "check", "cli_app:application"], cwd=app, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stdout == f"ERROR: {app / 'cli_helper.py'}:2: NameError: name 'undefined_name' is not defined\n"


def test_watch_signals_the_process_only_for_code_that_loads(
    app: Path, recorder: tuple[subprocess.Popen[bytes], Path]
) -> None:
    proc, record = recorder
    watcher, log = start_watch(app, "--pid", str(proc.pid), "--app", "cli_app:application", "--interval", "0.1",
                               "--backend", "poll", str(app / "cli_helper.py"))
    try:
        (app / "cli_helper.py").write_text("VALUE = 2\n")
        wait_for_hups(record, 1)
        (app / "cli_helper.py").write_text("VALUE = (\n")
        time.sleep(2)
        assert hups(record) == 1
        (app / "cli_helper.py").write_text("VALUE = 3\n")
        wait_for_hups(record, 2)
        assert proc.poll() is None
    finally:
        watcher.terminate()
        _, err = watcher.communicate(timeout=10)
    output = "".join(log) + err
    assert f"{app / 'cli_helper.py'}:1: SyntaxError" in output
    assert "[wsgi-reload]" not in output
    assert watcher.returncode == 0


def start_watch(app: Path, *args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """``wsgi-reload watch ARGS`` with its baseline recorded (its start line was logged)."""
    watcher = subprocess.Popen([*CLI, "watch", *args], cwd=app, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    wait_for_log(watcher, log, "wsgi_reload: watching")
    return watcher, log


def test_watch_rereads_the_pidfile(app: Path, recorder: tuple[subprocess.Popen[bytes], Path]) -> None:
    first, first_record = recorder
    second_record = app / "second.txt"
    second = start_recorder(second_record)
    pidfile = app / "server.pid"
    pidfile.write_text(f"{first.pid}\n")
    watcher, log = start_watch(app, "--pidfile", str(pidfile), "--signal", "SIGHUP", "--interval", "0.1",
                               str(app / "*.py"))
    try:
        (app / "new.py").write_text("A = 1\n")
        wait_for_hups(first_record, 1)
        pidfile.write_text(f"{second.pid}\n")  # a restarted server wrote its new pid
        (app / "new.py").write_text("A = 2\n")
        wait_for_hups(second_record, 1)
        assert hups(first_record) == 1
    finally:
        watcher.terminate()
        _, err = watcher.communicate(timeout=10)
        second.kill()
        second.wait()
    output = "".join(log) + err
    assert "by file events" in output
    assert "changes detected" not in output  # watchfiles' own lines stay out of ours


def test_a_signal_that_could_not_be_sent_is_retried(app: Path, recorder: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, record = recorder
    pidfile = app / "server.pid"
    pidfile.write_text(f"{proc.pid}\n")
    watcher, log = start_watch(app, "--pidfile", str(pidfile), "--interval", "0.1", "--backend", "poll",
                               str(app / "cli_helper.py"))
    try:
        pidfile.unlink()  # the server is between two pidfiles
        (app / "cli_helper.py").write_text("VALUE = 2\n")
        wait_for_log(watcher, log, "cannot reload")
        assert hups(record) == 0
        pidfile.write_text(f"{proc.pid}\n")
        wait_for_hups(record, 1)  # no second save needed
        wait_for_log(watcher, log, "on a retry")
    finally:
        watcher.terminate()
        watcher.wait(10)


def test_watch_with_pid_stops_when_its_process_exits(app: Path) -> None:
    proc = subprocess.Popen(["sleep", "60"])
    watcher, _ = start_watch(app, "--pid", str(proc.pid), str(app / "cli_helper.py"))
    proc.kill()
    proc.wait()
    assert watcher.wait(15) == 1
    assert watcher.stderr is not None
    assert f"pid {proc.pid} has exited; nothing left to signal" in watcher.stderr.read()


def test_version_and_help(app: Path) -> None:
    from wsgi_reload import __version__

    done = subprocess.run([*CLI, "--version"], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, f"wsgi-reload {__version__}\n")
    done = subprocess.run([*CLI, "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert "``" not in done.stdout
    assert "examples:" in done.stdout and "wsgi-reload check myapp:app" in done.stdout
    watch_help = subprocess.run([*CLI, "watch", "--help"], capture_output=True, text=True).stdout
    assert "--backend {auto,poll,events}" in watch_help and "file events" in watch_help


@pytest.mark.parametrize("args, message", [
    (["check", "not an app"], "app='not an app' is not valid"),
    (["check", "cli_app:application", "--timeout", "inf"], "check_timeout=inf is not a number of seconds"),
    (["check", "cli_app:application", "--chdir", "nowhere"], "--chdir nowhere: no such directory"),
])
def test_check_bad_usage_exits_two(app: Path, args: list[str], message: str) -> None:
    done = subprocess.run([*CLI, *args], cwd=app, capture_output=True, text=True)
    assert done.returncode == 2
    assert message in done.stderr


def run_watch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "watch", *args], cwd=cwd, capture_output=True, text=True, timeout=30)


def test_a_stale_pidfile_is_a_clear_error(app: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (app / "server.pid").write_text(str(gone.pid))
    done = run_watch("--pidfile", "server.pid", "cli_helper.py", cwd=app)
    assert done.returncode == 2
    assert f"pid {gone.pid} from server.pid is not running (stale pidfile)" in done.stderr


def test_a_missing_pidfile_is_a_clear_error(app: Path) -> None:
    done = run_watch("--pidfile", "nowhere.pid", "cli_helper.py", cwd=app)
    assert done.returncode == 2
    assert "cannot read pidfile nowhere.pid" in done.stderr


def test_a_missing_path_is_a_clear_error(app: Path, recorder: tuple[subprocess.Popen[bytes], Path]) -> None:
    done = run_watch("--pid", str(recorder[0].pid), "no_such_dir", cwd=app)
    assert done.returncode == 2
    assert "no such file or directory: no_such_dir" in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as another user")
def test_another_users_process_is_refused(app: Path) -> None:
    other = subprocess.Popen(["sleep", "30"], user=65534)
    try:
        done = run_watch("--pid", str(other.pid), "cli_helper.py", cwd=app)
    finally:
        other.kill()
        other.wait()
    assert done.returncode == 2
    assert "belongs to another user" in done.stderr


def test_pid_one_is_refused(app: Path) -> None:
    done = run_watch("--pid", "1", "cli_helper.py", cwd=app)
    assert done.returncode == 2
    assert "refusing to signal pid 1" in done.stderr


@pytest.mark.parametrize("kind, content, message", [
    ("fifo", None, "is not a regular file"),
    ("directory", None, "is not a regular file"),
    ("huge", b"99999999999999999999\n", "not a pid"),
    ("negative", b"-5\n", "not a pid"),
    ("empty", b"", "not a pid"),
    ("junk", b"\x00\xff\x12abc\n", "not a pid"),
    ("unicode digits", "١٢٣\n".encode(), "not a pid"),
    ("past pid_max", b"4194305\n", "not a pid"),
])
def test_a_hostile_pidfile_is_one_line_and_exit_two(app: Path, kind: str, content: bytes | None,
                                                    message: str) -> None:
    pidfile = app / "server.pid"
    if kind == "fifo":
        os.mkfifo(pidfile)
    elif kind == "directory":
        pidfile.mkdir()
    else:
        assert content is not None
        pidfile.write_bytes(content)
    done = run_watch("--pidfile", str(pidfile), "cli_helper.py", cwd=app)  # a hang fails by its timeout
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_verbose_and_the_import_path_go_before_or_after_the_command(app: Path) -> None:
    for args in (["-v", "check", "cli_app:application"], ["check", "-v", "cli_app:application"],
                 ["check", "cli_app.py:application", "-v"]):
        done = subprocess.run([*CLI, *args], cwd=app, capture_output=True, text=True)
        assert done.returncode == 0, (args, done.stderr)
    done = subprocess.run([*CLI, "check"], cwd=app, capture_output=True, text=True)
    assert done.returncode == 2 and "required: app\n" in done.stderr


def test_a_module_planted_in_the_app_directory_cannot_shadow_the_standard_library(app: Path) -> None:
    """``wsgi-reload check`` run from a directory someone else can write: their uuid.py must not
    run in place of the standard library's (the app's directory comes after it)."""
    marker = app / "planted-ran"
    (app / "uuid.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (app / "cli_app.py").write_text("import uuid\n\ndef application(environ, start_response):\n    return []\n")
    done = subprocess.run([*CLI, "check", "cli_app:application"], cwd=app, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not marker.exists()
    # --pythonpath says explicitly what comes first.
    done = subprocess.run([*CLI, "check", "--pythonpath", str(app), "cli_app:application"], cwd=app,
                          capture_output=True, text=True)
    assert marker.exists()


@pytest.mark.skipif(not (BIN / "uwsgi").exists(), reason="uWSGI is not installed")
def test_watch_touch_reloads_a_server_that_watches_a_file_only_for_code_that_loads(tmp_path: Path) -> None:
    """``--touch`` for servers that reload when a file is touched, here uWSGI's ``--touch-reload``
    (mod_wsgi's daemon mode does the same with the WSGI script): a good save is served, a broken
    one leaves the file untouched and the old code serving, and the fix is served; no request
    fails."""
    from servers import Load, free_port, greeting, make_app, running, uwsgi, wait_for_body, write

    app = make_app(tmp_path)
    touch = tmp_path / "reload.touch"
    touch.write_text("")
    port = free_port()
    server = uwsgi(app, port, ["--touch-reload", str(touch)], lazy=True, enable="none")
    with running(server, "v1"), Load(port, threads=4) as load:
        watcher, log = start_watch(app, "--touch", str(touch), "--app", "app:application", str(app))
        try:
            write(app / "greeting.py", greeting("v2"))
            wait_for_body(port, "v2")
            # The server reads the disk as it reloads: the broken save waits until both workers
            # have (docs/limits.md: the CLI has no generations).
            server.wait_for_log(r"WSGI app 0 \(mountpoint=''\) ready", count=4)
            touched = touch.stat().st_mtime_ns
            write(app / "greeting.py", greeting("broken").replace('"broken"', '"broken'))
            wait_for_log(watcher, log, "not reloading")
            time.sleep(2)  # uWSGI looks at the file every second
            assert touch.stat().st_mtime_ns == touched
            wait_for_body(port, "v2")
            write(app / "greeting.py", greeting("v3"))
            wait_for_body(port, "v3")
        finally:
            watcher.terminate()
            watcher.communicate(timeout=10)
        _, failures, _ = load.snapshot()
    assert failures == []
