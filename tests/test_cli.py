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


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    record = tmp_path / "signals.txt"
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_RECORDER, str(record)])
    deadline = time.monotonic() + 10
    while not (record.exists() and "ready" in record.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    yield proc, record
    proc.kill()
    proc.wait()


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
    watcher = subprocess.Popen([*CLI, "watch", "--pid", str(proc.pid), "--app", "cli_app:application",
                                "--interval", "0.1", "--backend", "poll", str(app / "cli_helper.py")],
                               cwd=app, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
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
    assert f"{app / 'cli_helper.py'}:1: SyntaxError" in err
    assert watcher.returncode == 0


def test_watch_rereads_the_pidfile(app: Path, recorder: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, record = recorder
    pidfile = app / "server.pid"
    pidfile.write_text(f"{proc.pid}\n")
    watcher = subprocess.Popen([*CLI, "watch", "--pidfile", str(pidfile), "--signal", "SIGHUP", "--interval", "0.1",
                                str(app / "*.txt")], cwd=app, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        (app / "new.txt").write_text("hello")
        wait_for_hups(record, 1)
    finally:
        watcher.terminate()
        watcher.wait(10)


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
