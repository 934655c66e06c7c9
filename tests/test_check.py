"""The pre-reload check, the reloader's decisions, the settings and the monitor."""

from __future__ import annotations

import contextlib
import decimal
import email.message
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wsgi_reload import Change, Monitor, ReloadGate, Scanner, Settings, SettingsError
from wsgi_reload._check.check import check_code, compile_files, import_app
from wsgi_reload._check.warm import checks_forked, close_all, wait_ready
from wsgi_reload._core.files import failed_imports


@pytest.fixture(autouse=True)
def _clean_failed_imports() -> None:
    failed_imports.clear()


def app_dir(tmp_path: Path, helper: str = 'VALUE = "v1"\n') -> Path:
    (tmp_path / "probe_app.py").write_text(
        "import probe_helper\n\ndef application(environ, start_response):\n    return [probe_helper.VALUE]\n"
    )
    (tmp_path / "probe_helper.py").write_text(helper)
    return tmp_path


def check(tmp_path: Path, mode: str = "import", timeout: float = 30.0) -> object:
    settings = Settings(check=mode, app="probe_app:application", check_timeout=timeout)
    return check_code([str(tmp_path / "probe_helper.py")], settings, cwd=str(tmp_path), sys_path=[str(tmp_path)])


def test_good_code_passes(tmp_path: Path) -> None:
    result = check(app_dir(tmp_path))
    assert result.ok and str(result) == "OK"


def test_a_syntax_error_names_file_and_line_without_starting_python(tmp_path: Path) -> None:
    result = check(app_dir(tmp_path, 'x = 1\nVALUE = "v1\n'))
    assert not result.ok
    assert (result.stage, result.file, result.line) == ("compile", str(tmp_path / "probe_helper.py"), 2)
    assert "SyntaxError" in str(result)


@pytest.mark.parametrize("source, error, line", [
    ("x = 1\n\nundefined_name\n", "NameError", 3),
    ("import no_such_module_anywhere\n", "ModuleNotFoundError", 1),
    ('def build():\n    raise RuntimeError("no config")\n\nbuild()\n', "RuntimeError", 2),
])
def test_an_import_time_error_names_file_and_line(tmp_path: Path, source: str, error: str, line: int) -> None:
    result = check(app_dir(tmp_path, source))
    assert not result.ok
    assert result.stage == "import"
    assert (result.file, result.line) == (str(tmp_path / "probe_helper.py"), line)
    assert error in result.message
    assert "Traceback" in result.details


def test_compile_mode_does_not_import(tmp_path: Path) -> None:
    assert check(app_dir(tmp_path, "undefined_name\n"), mode="compile").ok
    assert not check(app_dir(tmp_path, "undefined_name\n"), mode="import").ok


def test_off_mode_checks_nothing(tmp_path: Path) -> None:
    assert check(app_dir(tmp_path, "def f(:\n"), mode="off").ok


def test_a_slow_import_times_out(tmp_path: Path) -> None:
    result = check(app_dir(tmp_path, "import time\ntime.sleep(30)\n"), timeout=1)
    assert not result.ok and result.stage == "timeout"
    assert "check_timeout" in result.message


def test_a_missing_callable_is_an_error(tmp_path: Path) -> None:
    result = import_app("probe_app:nope", cwd=str(app_dir(tmp_path)), sys_path=[str(tmp_path)])
    assert not result.ok and "nope" in result.message


def test_a_factory_call_is_supported(tmp_path: Path) -> None:
    app_dir(tmp_path)
    (tmp_path / "factory_app.py").write_text("def create(name):\n    assert name == 'x'\n    return lambda e, s: []\n")
    assert import_app("factory_app:create('x')", cwd=str(tmp_path), sys_path=[str(tmp_path)]).ok
    assert not import_app("factory_app:create('y')", cwd=str(tmp_path), sys_path=[str(tmp_path)]).ok


def test_the_check_uses_the_given_environment_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app_dir(tmp_path, 'import os\nVALUE = os.environ["NEEDED_BY_APP"]\nopen("data.txt").read()\n')
    (tmp_path / "data.txt").write_text("here")
    monkeypatch.setenv("NEEDED_BY_APP", "1")
    assert import_app("probe_app:application", cwd=str(tmp_path), sys_path=[str(tmp_path)]).ok
    monkeypatch.delenv("NEEDED_BY_APP")
    assert not import_app("probe_app:application", cwd=str(tmp_path), sys_path=[str(tmp_path)]).ok


def test_compile_files_writes_no_bytecode(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("x = 1\n")
    assert compile_files([str(tmp_path / "m.py")]).ok
    assert not (tmp_path / "__pycache__").exists()


def test_a_same_size_same_second_edit_is_not_hidden_by_stale_bytecode(tmp_path: Path) -> None:
    app_dir(tmp_path, "VALUE = 1\n")
    helper = tmp_path / "probe_helper.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", "import probe_helper"], cwd=tmp_path, env=env, check=True)  # a .pyc
    assert list((tmp_path / "__pycache__").glob("probe_helper.*.pyc"))
    st = helper.stat()
    helper.write_text("VALUE = X\n")  # same size, compiles, fails at import
    os.utime(helper, ns=(st.st_atime_ns, st.st_mtime_ns))
    result = check_code([str(helper)], Settings(check="import", app="probe_app:application"),
                        cwd=str(tmp_path), sys_path=[str(tmp_path)])
    assert not result.ok and "NameError" in result.message
    assert not list((tmp_path / "__pycache__").glob("probe_helper.*.pyc"))


DAEMON_APP = """import os, sys, time

import wsgi_reload

if wsgi_reload.checking():
    open(os.path.join(os.path.dirname(__file__), "checked"), "a").write("x")
started, told = os.pipe()
pid = os.fork()
if pid == 0:
    os.setsid()  # out of the check's process group and session
    if os.fork() == 0:
        with open(os.path.join(os.path.dirname(__file__), "daemons"), "a") as f:
            f.write(f"{os.getpid()}\\n")
        os.write(told, b"up")
        time.sleep(120)
    os._exit(0)
os.waitpid(pid, 0)
os.read(started, 2)  # the daemon runs, and has written its pid


def application(environ, start_response):
    start_response("200 OK", [])
    return [b"ok"]
"""


def test_twenty_checks_of_an_app_that_starts_a_daemon_leave_no_process_behind(tmp_path: Path) -> None:
    """The check interpreter is the subreaper of everything the app starts: a setsid() daemon
    comes back to it when its parent exits, and is killed when the check ends."""
    (tmp_path / "daemon_app.py").write_text(DAEMON_APP)
    settings = Settings(check="import", app="daemon_app:application")
    sys_path = [str(tmp_path), *sys.path]  # the app imports wsgi_reload too
    for _ in range(20):
        assert check_code([], settings, cwd=str(tmp_path), sys_path=sys_path).ok
    daemons = [int(p) for p in (tmp_path / "daemons").read_text().split()]
    assert len(daemons) == 20
    deadline = time.monotonic() + 10
    while (left := [pid for pid in daemons if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []
    assert (tmp_path / "checked").read_text() == "x" * 20  # wsgi_reload.checking() was true in each


def test_a_check_that_times_out_leaves_no_daemon_behind(tmp_path: Path) -> None:
    """The app starts a setsid() daemon and then hangs: at check_timeout the check interpreter's
    descendants (the daemon came back to it as its subreaper) are killed with its group."""
    (tmp_path / "daemon_app.py").write_text(DAEMON_APP.replace("os.waitpid(pid, 0)\n",
                                                                "os.waitpid(pid, 0)\ntime.sleep(60)\n", 1))
    settings = Settings(check="import", app="daemon_app:application", check_timeout=3)
    result = check_code([], settings, cwd=str(tmp_path), sys_path=[str(tmp_path), *sys.path])
    assert not result.ok
    [daemon] = [int(p) for p in (tmp_path / "daemons").read_text().split()]
    deadline = time.monotonic() + 10
    while alive(daemon) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(daemon)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_a_port_the_server_holds_does_not_fail_the_check(tmp_path: Path) -> None:
    """The app opens a metrics port at import; a --preload master (here: this process) holds it
    already. The check binds a free port instead; a port someone else holds still fails."""
    import socket

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    (tmp_path / "metrics_app.py").write_text(
        f"import socket\nmetrics = socket.socket()\nmetrics.bind(('127.0.0.1', {port}))\nmetrics.listen()\n"
        "def application(environ, start_response):\n    return []\n")
    settings = Settings(check="import", app="metrics_app:application")
    try:
        assert check_code([], settings, cwd=str(tmp_path), sys_path=[str(tmp_path), *sys.path]).ok
        other = check_code([], settings, cwd=str(tmp_path), sys_path=[str(tmp_path), *sys.path],
                           server_pid=os.getppid())
        assert not other.ok and "Address already in use" in other.message
    finally:
        held.close()


def test_checking_is_false_outside_a_check() -> None:
    import wsgi_reload

    assert wsgi_reload.checking() is False


# --- the reloader --------------------------------------------------------------------------


def test_a_broken_batch_never_triggers_and_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app_dir(tmp_path, "VALUE = (\n")
    settings = Settings(app="probe_app:application")
    triggered: list[object] = []
    reloader = ReloadGate(settings, triggered.append,
                        check=lambda paths: check_code(paths, settings, cwd=str(tmp_path), sys_path=[str(tmp_path)]))
    batch = [Change(str(tmp_path / "probe_helper.py"), "modified")]
    with caplog.at_level(logging.INFO, logger="wsgi_reload"):
        assert reloader(batch) is False
        assert reloader(batch) is False
    assert triggered == []
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"{tmp_path / 'probe_helper.py'}:1:" in errors[0].getMessage()
    assert str(tmp_path / "probe_helper.py") in failed_imports()
    (tmp_path / "probe_helper.py").write_text("VALUE = 2\n")
    assert reloader(batch) is True
    assert triggered == [batch]
    assert failed_imports() == {}


# --- settings ------------------------------------------------------------------------------


def test_settings_come_from_the_environment_and_keywords_win() -> None:
    settings = Settings.load({"WSGI_RELOAD_INTERVAL": "0.5", "WSGI_RELOAD_EXTRA_FILES": "a.txt, templates/**/*.html",
                              "WSGI_RELOAD_CHECK": "compile"}, check="off")
    assert settings.interval == 0.5
    assert settings.extra_files == ("a.txt", "templates/**/*.html")
    assert settings.check == "off"
    assert settings.spare is True
    for word, value in (("0", False), ("off", False), ("False", False), ("1", True), (" yes ", True)):
        assert Settings.load({"WSGI_RELOAD_SPARE": word}).spare is value


def test_every_bad_setting_is_named_at_once_on_one_line() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.load({"WSGI_RELOAD_INTERVAL": "inf", "WSGI_RELOAD_BACKND": "poll"}, settle=-1, colour="blue")
    message = str(info.value)
    assert "\n" not in message
    for part in ("WSGI_RELOAD_INTERVAL='inf'", "WSGI_RELOAD_BACKND; did you mean WSGI_RELOAD_BACKEND?",
                 "settle=-1 is out of range", "unknown wsgi_reload setting 'colour'"):
        assert part in message


@pytest.mark.parametrize("environ, kwargs, message", [
    ({"WSGI_RELOAD_INTERVALL": "1"}, {},
     "unknown environment variable WSGI_RELOAD_INTERVALL; did you mean WSGI_RELOAD_INTERVAL?"),
    ({"WSGI_RELOAD_INTERVAL": "soon"}, {}, "WSGI_RELOAD_INTERVAL='soon' is not a number"),
    ({}, {"backend": "inotify"}, "backend='inotify' is not valid: use one of auto, poll, events"),
    ({}, {"check": "yes"}, "check='yes' is not valid: use one of import, compile, off"),
    ({}, {"interval": 0}, "interval=0 is out of range: give seconds from 0.01 to 3600"),
    ({"WSGI_RELOAD_INTERVAL": "inf"}, {}, "WSGI_RELOAD_INTERVAL='inf' is not a number of seconds"),
    ({"WSGI_RELOAD_INTERVAL": "1e10"}, {}, "WSGI_RELOAD_INTERVAL='1e10' is out of range"),
    ({"WSGI_RELOAD_SETTLE": "inf"}, {}, "WSGI_RELOAD_SETTLE='inf' is not a number of seconds"),
    ({"WSGI_RELOAD_CHECK_TIMEOUT": "inf"}, {}, "WSGI_RELOAD_CHECK_TIMEOUT='inf' is not a number of seconds"),
    ({}, {"check_timeout": float("nan")}, "check_timeout=nan is not a number of seconds"),
    ({}, {"extra_file": "x"}, "unknown wsgi_reload setting 'extra_file'; did you mean extra_files?"),
    ({}, {"colour": "blue"}, "unknown wsgi_reload setting 'colour'"),
    ({}, {"app": "not an app"}, "app='not an app' is not valid"),
    ({"WSGI_RELOAD_READY_PATH": "healthz"}, {}, "WSGI_RELOAD_READY_PATH='healthz' is not valid: give a URL path"),
    ({}, {"ready_path": "/a b"}, "ready_path='/a b' is not valid"),
    ({"WSGI_RELOAD_SPARE": "maybe"}, {}, "WSGI_RELOAD_SPARE='maybe' is not valid: give True or False"),
    ({}, {"spare": "no"}, "spare='no' is not valid: give True or False"),
])
def test_bad_settings_fail_with_one_clear_line(
    environ: dict[str, str], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.load(environ, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# --- a check that cannot hang ----------------------------------------------------------------


@pytest.fixture(params=["cold", "warm"])
def warm(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Each check below runs in a fresh interpreter, and forked from a warm probe process."""
    yield request.param == "warm"
    close_all()


PRELOADED = [json.__file__, email.message.__file__, decimal.__file__]
"""Standard-library modules for a warm probe process to import first (any installed ones do)."""


def probe(tmp_path: Path, source: str, app: str = "probe_app:application", timeout: float = 30.0,
          warm: bool = False, warm_from: list[str] | None = None) -> object:
    (tmp_path / "probe_app.py").write_text(source)
    sys_path = [str(tmp_path), *sys.path[1:]]
    if warm:
        (tmp_path / "warm_up.py").write_text(APP)
        import_app("warm_up:application", cwd=str(tmp_path), sys_path=sys_path, warm_from=PRELOADED)  # starts it
        assert wait_ready(), "the warm probe process never became ready"
    return import_app(app, cwd=str(tmp_path), sys_path=sys_path, timeout=timeout,
                      warm_from=PRELOADED if warm else warm_from)


APP = "\ndef application(environ, start_response):\n    return []\n"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.parametrize("spawn", [
    "import subprocess\nCHILD = subprocess.Popen(['sleep', '75']).pid\n",
    "import os, time\nCHILD = os.fork()\nif CHILD == 0:\n    time.sleep(75)\n    os._exit(0)\n",
], ids=["child-process", "fork"])
def test_a_child_started_at_import_neither_fails_nor_holds_up_the_check(tmp_path: Path, spawn: str, warm: bool) -> None:
    source = spawn + "open('child.pid', 'w').write(str(CHILD))\n" + APP
    result = probe(tmp_path, source, timeout=60, warm=warm)
    assert result.ok, result  # valid code; before, "took longer than 30 s" and 75 s of waiting
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child), "the check left the app's child process running"


def test_an_error_report_over_64_kib_is_read_whole(tmp_path: Path, warm: bool) -> None:
    result = probe(tmp_path, "raise RuntimeError('x' * 200_000)\n", warm=warm)
    assert not result.ok and result.stage == "import"
    assert (result.file, result.line) == (str(tmp_path / "probe_app.py"), 1)
    assert result.message.startswith("RuntimeError: xxx") and len(result.message) < 2000


@pytest.mark.parametrize("source, words", [
    ("import os\nos._exit(0)\n", "exited with code 0"),
    ("import ctypes\nctypes.string_at(0)\n", "crashed (SIGSEGV)"),
])
def test_an_exit_or_a_crash_at_import_names_the_users_file(tmp_path: Path, source: str, words: str, warm: bool) -> None:
    (tmp_path / "probe_helper.py").write_text(source)
    result = probe(tmp_path, "import probe_helper\n" + APP, warm=warm)
    assert not result.ok
    assert result.file == str(tmp_path / "probe_helper.py")
    assert words in result.message


def test_a_missing_app_module_names_the_app_spec_not_importlib(tmp_path: Path) -> None:
    result = import_app("nosuch:app", cwd=str(tmp_path), sys_path=[str(tmp_path)])
    assert not result.ok and result.file is None
    assert "No module named 'nosuch' (the app is nosuch:app)" in result.message
    assert "importlib" not in str(result)


def test_a_missing_import_names_the_importing_file_and_line(tmp_path: Path, warm: bool) -> None:
    result = probe(tmp_path, "x = 1\nimport no_such_module_here\n" + APP, warm=warm)
    assert (result.file, result.line) == (str(tmp_path / "probe_app.py"), 2)
    assert "No module named 'no_such_module_here'" in result.message


def test_a_missing_callable_names_the_module_file(tmp_path: Path, warm: bool) -> None:
    result = probe(tmp_path, "x = 1\n", app="probe_app:app", warm=warm)
    assert result.file == str(tmp_path / "probe_app.py")
    assert "has no attribute 'app' (the app is probe_app:app)" in result.message


def test_a_hang_names_the_file_still_running(tmp_path: Path, warm: bool) -> None:
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(60)\n")
    result = probe(tmp_path, "import slow\n" + APP, timeout=1, warm=warm)
    assert result.stage == "timeout" and result.file == str(tmp_path / "slow.py")


def test_a_warm_check_reads_the_project_afresh_and_survives_a_hang(tmp_path: Path) -> None:
    """Forked checks share the warm process's installed packages, never the project: an edit
    between two checks is seen, and a check that hung and was killed leaves it usable."""
    assert probe(tmp_path, "VALUE = 1\n" + APP, warm=True).ok
    broken = probe(tmp_path, "VALUE = 1\nundefined_name\n" + APP, warm=True)
    assert (broken.file, broken.line, broken.message) == (str(tmp_path / "probe_app.py"), 2,
                                                          "NameError: name 'undefined_name' is not defined")
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(60)\n")
    assert probe(tmp_path, "import slow\n" + APP, timeout=1, warm=True).stage == "timeout"
    assert probe(tmp_path, "VALUE = 2\n" + APP, warm=True).ok
    assert checks_forked() >= 2  # these ran in the warm process, not cold
    close_all()


def test_a_warm_process_killed_mid_check_leaves_the_checks_cold(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The warm process killed with -9 while it runs a check (the OOM killer): that check is run
    again cold and answers, and it is not started again (it might be killed again): later checks
    run cold, as one line says once."""
    source = "import os, time\nopen('parent', 'w').write(str(os.getppid()))\ntime.sleep(0.5)\n" + APP
    assert probe(tmp_path, APP, warm=True).ok
    parent = tmp_path / "parent"

    def kill_the_warm_process() -> None:
        deadline = time.monotonic() + 30
        while not parent.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        os.kill(int(parent.read_text()), 9)  # the forked check's parent: the warm process

    killer = threading.Thread(target=kill_the_warm_process)
    killer.start()
    with caplog.at_level(logging.INFO, logger="wsgi_reload"):
        assert probe(tmp_path, source, warm=False, warm_from=PRELOADED).ok
        killer.join()
        for _ in range(2):
            assert probe(tmp_path, source, warm_from=PRELOADED).ok
            assert int(parent.read_text()) == os.getpid()  # cold: a child of this process
    assert caplog.text.count("checks run cold, each in a fresh interpreter (it exited)") == 1
    close_all()


def test_a_changed_installed_package_retires_the_warm_process(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    assert probe(tmp_path, APP, warm=True).ok
    with caplog.at_level(logging.INFO, logger="wsgi_reload"):
        result = import_app("probe_app:application", cwd=str(tmp_path), sys_path=[str(tmp_path), *sys.path[1:]],
                            warm_from=PRELOADED, changed=[json.__file__])
    assert result.ok
    assert "an installed package changed; the warm check process starts again" in caplog.text
    close_all()


def test_a_check_beside_a_forking_thread_does_not_hang(tmp_path: Path) -> None:
    """A process forks while another of its threads checks (the app's own process under
    ``wsgi_reload.hot``, say): a child forked then must not inherit anything the check waits on
    (Popen's error pipe and output pipes did)."""
    import threading

    (tmp_path / "probe_app.py").write_text(APP)
    results: list[object] = []

    def checks() -> None:
        for _ in range(10):
            results.append(import_app("probe_app:application", cwd=str(tmp_path), sys_path=[str(tmp_path)]))

    thread = threading.Thread(target=checks)
    children = []
    thread.start()
    try:
        while thread.is_alive() and len(children) < 400:
            pid = os.fork()
            if pid == 0:
                time.sleep(60)  # holds whatever it inherited
                os._exit(0)
            children.append(pid)
            time.sleep(0.005)
        thread.join(30)  # liveness: far less than the children's 60 s
        assert not thread.is_alive(), "a check waited on a descriptor a forked child inherited"
    finally:
        for pid in children:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    assert len(results) == 10 and all(r.ok for r in results)  # type: ignore[attr-defined]


def test_the_gate_checks_again_when_files_changed_during_the_check(tmp_path: Path) -> None:
    seen: list[list[str]] = []
    rescans = [[Change("/b.py", "modified")], []]

    def check_paths(paths: list[str]) -> object:
        seen.append(list(paths))
        from wsgi_reload import CheckResult
        return CheckResult(True)

    acted: list[object] = []
    gate = ReloadGate(Settings(), acted.append, check=check_paths, rescan=lambda: rescans.pop(0))  # type: ignore[arg-type]
    assert gate([Change("/a.py", "modified")])
    assert seen == [["/a.py"], ["/a.py", "/b.py"]]
    assert acted == [[Change("/a.py", "modified"), Change("/b.py", "modified")]]


def test_files_that_keep_changing_through_every_check_are_no_error_and_are_checked_again(
        caplog: pytest.LogCaptureFixture) -> None:
    from wsgi_reload import CheckResult
    from wsgi_reload._core.gate import MAX_RECHECKS

    rescans = [[Change("/a.py", "modified")] for _ in range(MAX_RECHECKS)] + [[], []]
    acted: list[object] = []
    gate = ReloadGate(Settings(), acted.append, check=lambda paths: CheckResult(True), rescan=lambda: rescans.pop(0))
    with caplog.at_level("INFO", logger="wsgi_reload"):
        assert not gate([Change("/a.py", "modified")])
        assert gate.has_pending() and acted == []
        gate.retry_pending()  # the monitor's next turn, once the files are quiet
    assert acted == [[Change("/a.py", "modified")]] and not gate.has_pending()
    assert [r.levelname for r in caplog.records if "still changing" in r.message] == ["INFO"]
    assert not [r for r in caplog.records if r.levelname == "ERROR" or "loads again" in r.message]


def test_an_action_that_fails_is_retried_until_it_works_or_a_newer_batch_comes() -> None:
    from wsgi_reload import ActionFailed, CheckResult

    attempts: list[object] = []
    failures = [True, True, False]

    def act(batch: object) -> None:
        attempts.append(batch)
        if failures.pop(0):
            raise ActionFailed("the pidfile is missing")

    gate = ReloadGate(Settings(), act, check=lambda paths: CheckResult(True))
    assert not gate([Change("/a.py", "modified")])
    assert gate.pending is not None
    gate.retry_pending()
    assert gate.pending is not None
    gate.retry_pending()
    assert gate.pending is None and len(attempts) == 3
    gate.retry_pending()
    assert len(attempts) == 3


class _Recorded:
    """A watcher over one real file whose check records when it ran and what it read."""

    def __init__(self, tmp_path: Path, settle: float) -> None:
        from wsgi_reload import CheckResult
        from wsgi_reload._core.watcher import Watcher

        self.path = tmp_path / "greeting.py"
        self.path.write_text("GREETING = 'v1'\n")
        self.checks: list[tuple[float, str]] = []
        self.acted: list[float] = []

        def check(paths: object) -> CheckResult:
            source = self.path.read_text()
            self.checks.append((time.monotonic(), source))
            try:
                compile(source, str(self.path), "exec")
            except SyntaxError as exc:
                return CheckResult(False, "import", exc.msg, str(self.path), exc.lineno)
            return CheckResult(True)

        self.watcher = Watcher(Settings(settle=settle, backend="events"), lambda batch: self.acted.append(
            time.monotonic()), server="a test", sources=[lambda: {str(self.path)}], check=check)

    def wait_for_action(self) -> None:
        deadline = time.monotonic() + 15
        while not self.acted:
            assert time.monotonic() < deadline, f"no reload; checks: {self.checks}"
            time.sleep(0.01)


def test_the_check_runs_while_the_save_settles_and_its_verdict_waits_for_the_window(tmp_path: Path) -> None:
    """The check begins as soon as the change is seen, not once the settle window has closed;
    the reload still waits for the window, and a save that settles with the bytes the check
    read is checked once."""
    watched = _Recorded(tmp_path, settle=2.0)
    watched.watcher.start(announce=False)
    try:
        saved = time.monotonic()
        watched.path.write_text("GREETING = 'v2'\n")
        watched.wait_for_action()
    finally:
        watched.watcher.stop()
    assert [source for _, source in watched.checks] == ["GREETING = 'v2'\n"]
    assert watched.checks[0][0] < saved + 2.0  # the check ran inside the window
    assert watched.acted[0] >= saved + 2.0  # the window still held the reload back


def test_a_save_written_again_inside_the_settle_window_is_checked_as_it_settled(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An editor writes half a file, then the rest: the check that began on the half is
    thrown away without a word, and the settled file is checked and reloaded."""
    watched = _Recorded(tmp_path, settle=1.0)
    watched.watcher.start(announce=False)
    with caplog.at_level(logging.INFO, logger="wsgi_reload"):
        try:
            watched.path.write_text("GREETING = (\n")
            deadline = time.monotonic() + 15
            while not watched.checks:  # the check of the half-written file has begun
                assert time.monotonic() < deadline
                time.sleep(0.005)
            watched.path.write_text("GREETING = 'v2'\n")
            watched.wait_for_action()
        finally:
            watched.watcher.stop()
    assert [source for _, source in watched.checks] == ["GREETING = (\n", "GREETING = 'v2'\n"]
    assert len(watched.acted) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or "checking again" in r.getMessage()]


def test_the_early_check_waits_for_a_file_still_open_for_writing(tmp_path: Path) -> None:
    """A writer that truncated the file and holds it open (half written) is waited for: the
    check reads the file once it is closed, never the half."""
    watched = _Recorded(tmp_path, settle=0.2)
    watched.watcher.start(announce=False)
    try:
        with open(watched.path, "w") as f:
            f.write("GREETING = (\n")
            f.flush()
            time.sleep(0.5)  # far beyond the time the monitor takes to see the change
            f.seek(0)
            f.truncate()
            f.write("GREETING = 'v2'\n")
        watched.wait_for_action()
    finally:
        watched.watcher.stop()
    assert [source for _, source in watched.checks] == ["GREETING = 'v2'\n"]


# --- the monitor ---------------------------------------------------------------------------


def run_monitor(tmp_path: Path, backend: str, edits: int, gap: float) -> tuple[Monitor, list[list[Change]]]:
    target = tmp_path / "watched.txt"
    target.write_text("0")
    batches: list[list[Change]] = []
    settings = Settings(extra_files=(str(target),), backend=backend, interval=0.05, settle=0.3)
    monitor = Monitor(Scanner(settings, watch_modules=False), lambda b: batches.append(list(b)))
    with monitor:  # the baseline is recorded when start() returns: edit at once
        for n in range(edits):
            target.write_text("x" * (n + 1))
            time.sleep(gap)
        deadline = time.monotonic() + 10
        while not batches and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)
    return monitor, batches


def test_the_settle_window_turns_a_burst_into_one_batch(tmp_path: Path) -> None:
    _, batches = run_monitor(tmp_path, "poll", edits=10, gap=0.03)
    assert batches == [[Change(str(tmp_path / "watched.txt"), "modified")]]


def test_files_written_in_the_runtime_directory_wake_the_monitor_but_do_not_hold_a_save(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The runtime directory (``wake_dirs``) changes while a batch settles: the workers write
    their records there, the watcher its store and swap. Those events wake the monitor, and
    must not hold the settle window open, or every save under traffic would wait for the cap."""
    import threading

    from wsgi_reload._core import inotify

    if inotify.unavailable():
        pytest.skip(inotify.unavailable() or "")
    target = tmp_path / "app" / "watched.py"
    target.parent.mkdir()
    target.write_text("0")
    runtime = tmp_path / "run"
    runtime.mkdir()
    batches: list[tuple[float, list[Change]]] = []
    settings = Settings(extra_files=(str(target),), backend="events", settle=0.3)
    monitor = Monitor(Scanner(settings, watch_modules=False), lambda b: batches.append((time.monotonic(), list(b))),
                      wake_dirs=[str(runtime)])
    stop = threading.Event()

    def records() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            (runtime / "worker-1.json").write_text(str(n))
            time.sleep(0.01)

    writer = threading.Thread(target=records, daemon=True)
    with caplog.at_level(logging.WARNING, logger="wsgi_reload"), monitor:
        writer.start()
        try:
            target.write_text("1")
            deadline = time.monotonic() + 10
            while not batches and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            stop.set()
            writer.join(5)
    assert [b for _, b in batches] == [[Change(str(target), "modified")]]
    assert not [r for r in caplog.records if "still changing" in r.getMessage()]


def test_a_polling_monitor_does_not_say_it_hears_wakes(tmp_path: Path) -> None:
    """Polling finds a record only at its next scan: the watcher's wait for a held worker then
    looks every 5 ms by itself (``hears_wakes`` False)."""
    monitor = Monitor(Scanner(Settings(backend="poll", interval=0.1), watch_modules=False), lambda b: None,
                      wake_dirs=[str(tmp_path)])
    with monitor:
        assert not monitor.hears_wakes


def test_only_a_record_in_the_runtime_directory_wakes_the_monitor_and_it_resolves_nothing_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a reload the watcher writes its own files in the runtime directory a dozen times (the
    swap's state, the store) and the workers their records: each wake is a scan, so only a
    record wakes the monitor; and a record cannot change where a directory leads, so the
    directories are resolved again only after a file event that holds a batch."""
    import wsgi_reload._core.monitor as monitor_module
    from wsgi_reload._core import inotify
    from wsgi_reload._server.records import is_record_name

    if inotify.unavailable():
        pytest.skip(inotify.unavailable() or "")
    resolved: list[str] = []
    real_symlink_parents = monitor_module.symlink_parents
    monkeypatch.setattr(monitor_module, "symlink_parents",
                        lambda path: resolved.append(path) or real_symlink_parents(path))
    scans: list[float] = []

    class CountingScanner(Scanner):
        def scan(self) -> list[Change]:
            scans.append(time.monotonic())
            return super().scan()

    target = tmp_path / "app" / "watched.py"
    target.parent.mkdir()
    target.write_text("0")
    runtime = tmp_path / "run"
    runtime.mkdir()
    batches: list[list[Change]] = []
    settings = Settings(extra_files=(str(target),), backend="events", settle=0.05)
    heard: list[str] = []
    monitor = Monitor(CountingScanner(settings, watch_modules=False), lambda b: batches.append(list(b)),
                      wake_dirs=[str(runtime)], wakes_on=lambda name: heard.append(name) or is_record_name(name))
    with monitor:
        assert monitor.hears_wakes  # the watcher's wait for a held worker relies on it
        time.sleep(0.5)  # the first turn looks once by itself
        scanned, resolving = len(scans), len(resolved)
        for n in range(20):
            (runtime / "replacing.json").write_text(str(n))
            (runtime / ".4242.json.4243.tmp").write_text(str(n))
        time.sleep(0.5)
        assert len(scans) == scanned
        (runtime / "4242.json").write_text("{}")
        deadline = time.monotonic() + 10
        while len(scans) == scanned and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert len(scans) > scanned and len(resolved) == resolving
        assert "4242.json" in heard  # as it happened, the name asked about
        target.write_text("1")
        while not batches and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
    assert batches == [[Change(str(target), "modified")]]
    assert len(resolved) > resolving


@pytest.fixture(params=["inotify", "watchfiles"])
def event_source(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each event test runs on both sources of events, with the safety rescan off, so that
    only an event can report a change."""
    import wsgi_reload._core.inotify as inotify_module
    import wsgi_reload._core.monitor as monitor_module

    if request.param == "watchfiles":
        pytest.importorskip("watchfiles")
        # The table's next backend alone (a new dict: putting a deleted key back would reorder it).
        monkeypatch.setattr(monitor_module, "EVENT_SOURCES", {"watchfiles": monitor_module.EVENT_SOURCES["watchfiles"]})
    elif inotify_module.unavailable():
        pytest.skip(inotify_module.unavailable() or "")
    monkeypatch.setattr(monitor_module._WatchfilesSource, "rescan_seconds", 3600.0)
    monkeypatch.setattr(inotify_module.DirectoryWatcher, "rescan_seconds", 3600.0)
    return str(request.param)


def test_the_first_backend_of_the_table_that_opens_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The table of event backends, with a fake one: one that cannot open is skipped, the next
    gets the watched directories and its wake-ups make the monitor scan (the rescan is off)."""
    import wsgi_reload._core.monitor as monitor_module

    opened: list[FakeEvents] = []

    def unavailable(*args: object) -> monitor_module.EventSource:
        raise monitor_module.Unavailable("not on this machine")

    def fake(dirs: set[str], wake: Callable[[], object], name: str,
             relevant: Callable[[str, str], bool]) -> monitor_module.EventSource:
        opened.append(FakeEvents(wake, dirs))
        return opened[-1]

    monkeypatch.setattr(monitor_module, "EVENT_SOURCES", {"first": unavailable, "fake": fake})
    target = tmp_path / "watched.txt"
    target.write_text("0")
    batches: list[list[Change]] = []
    settings = Settings(extra_files=(str(target),), backend="events", settle=0)
    with Monitor(Scanner(settings, watch_modules=False), lambda b: batches.append(list(b))) as monitor:
        assert monitor.describe() == "file events (fake; a safety rescan every 3600 s)"
        assert opened[0].dirs == {str(tmp_path)}
        time.sleep(0.3)  # the monitor's first turn looks once by itself (a save made while events started)
        target.write_text("1")
        time.sleep(0.3)
        assert batches == []  # no event, no scan
        opened[0].wake()
        deadline = time.monotonic() + 10
        while not batches and time.monotonic() < deadline:
            time.sleep(0.02)
    assert batches == [[Change(str(target), "modified")]]


class FakeEvents:
    name = "fake"
    rescan_seconds = 3600.0
    clock = None

    def __init__(self, wake: Callable[[], object], dirs: set[str]) -> None:
        self.wake = wake
        self.dirs = set(dirs)

    def set_directories(self, directories: set[str]) -> bool:
        self.dirs = set(directories)
        return False

    def stop(self) -> None:
        pass


def test_the_event_backend_reports_changes(tmp_path: Path, event_source: str) -> None:
    monitor, batches = run_monitor(tmp_path, "events", edits=1, gap=0)
    assert monitor.backend == "events" and f"({event_source};" in monitor.describe()
    assert batches == [[Change(str(tmp_path / "watched.txt"), "modified")]]


def test_with_events_a_burst_is_one_batch_too(tmp_path: Path, event_source: str) -> None:
    """With inotify, quiet is measured from the latest event: every write of the burst moves it."""
    monitor, batches = run_monitor(tmp_path, "events", edits=10, gap=0.03)
    assert monitor.backend == "events"
    assert batches == [[Change(str(tmp_path / "watched.txt"), "modified")]]


def test_settling_on_events_waits_even_when_the_first_event_is_not_read_yet(tmp_path: Path) -> None:
    """The scan can see a write before the watcher thread reads its event; quiet is then
    measured from when the batch was found, so a second file written just after still joins."""
    from wsgi_reload._core.monitor import settle

    first, second = tmp_path / "first.py", tmp_path / "second.py"
    first.write_text("0")
    second.write_text("0")
    scanner = Scanner(Settings(extra_files=(str(first), str(second))), watch_modules=False)
    scanner.scan()
    first.write_text("changed")
    found = scanner.scan()
    writer = threading.Timer(0.05, lambda: second.write_text("changed too"))
    writer.start()
    batch = settle(scanner.scan, found, 0.5, last_event=lambda: 0.0)  # no event read yet
    writer.join()
    assert batch == [Change(str(first), "modified"), Change(str(second), "modified")]


def test_a_crashed_watcher_thread_says_so_and_restarts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "watched.txt"
    target.write_text("0")
    batches: list[list[Change]] = []
    crashes = [RuntimeError("boom")]

    def tick() -> None:
        if crashes:
            raise crashes.pop()

    settings = Settings(extra_files=(str(target),), backend="poll", interval=0.05, settle=0)
    with caplog.at_level(logging.INFO, logger="wsgi_reload"), \
            Monitor(Scanner(settings, watch_modules=False), lambda b: batches.append(list(b)), on_tick=tick):
        deadline = time.monotonic() + 10
        while "restarting it" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        target.write_text("changed")
        while not batches and time.monotonic() < deadline:
            time.sleep(0.02)
    assert caplog.text.count("the watcher thread failed (1 of 5); restarting it") == 1
    assert batches == [[Change(str(target), "modified")]]


def test_poll_backend_is_used_when_asked(tmp_path: Path) -> None:
    monitor, batches = run_monitor(tmp_path, "poll", edits=1, gap=0)
    assert monitor.backend == "poll" and len(batches) == 1


def test_events_hear_a_release_switched_by_symlink(tmp_path: Path, event_source: str) -> None:
    """``current -> releases/r1`` switched to r2 changes nothing inside r1: the event backend
    watches the link's directory too, so the switch wakes it with no safety rescan (turned off
    here), and the watches move to r2, so the next edit there is heard as well."""
    for release in ("r1", "r2"):
        (tmp_path / "releases" / release).mkdir(parents=True)
        (tmp_path / "releases" / release / "app.py").write_text(f"RELEASE = {release!r}\n")
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "releases" / "r1")
    watched = str(current / "app.py")
    batches: list[list[Change]] = []
    settings = Settings(extra_files=(watched,), backend="events", settle=0.1)
    with Monitor(Scanner(settings, watch_modules=False), lambda b: batches.append(list(b))) as monitor:
        assert monitor.backend == "events"
        time.sleep(0.5)
        switching = tmp_path / "current.new"
        switching.symlink_to(tmp_path / "releases" / "r2")
        os.replace(switching, current)  # what `ln -sfn` and deploy tools do
        deadline = time.monotonic() + 10
        while not batches and time.monotonic() < deadline:
            time.sleep(0.05)
        assert batches == [[Change(watched, "modified")]]
        time.sleep(0.5)
        (tmp_path / "releases" / "r2" / "app.py").write_text("RELEASE = 'r2, edited'\n")
        while len(batches) < 2 and time.monotonic() < deadline + 10:
            time.sleep(0.05)
        assert batches[1:] == [[Change(watched, "modified")]]


def test_events_hear_a_new_file_in_a_new_subdirectory_of_a_glob(tmp_path: Path, event_source: str) -> None:
    """A glob such as templates/**/*.html gains files in directories that did not exist when the
    watches were set: every directory under its root is watched, the new one included once it
    appears (the safety rescan is off here, so only events can report it)."""
    templates = tmp_path / "templates"
    (templates / "shop").mkdir(parents=True)
    (templates / "shop" / "hello.html").write_text("hello\n")
    batches: list[list[Change]] = []
    settings = Settings(extra_files=(str(templates / "**" / "*.html"),), backend="events", settle=0.1)
    with Monitor(Scanner(settings, watch_modules=False), lambda b: batches.append(list(b))) as monitor:
        assert monitor.backend == "events"
        time.sleep(0.5)
        (templates / "shop" / "emails").mkdir()
        time.sleep(0.5)  # the new directory is heard, and then watched
        created = templates / "shop" / "emails" / "welcome.html"
        created.write_text("welcome\n")
        deadline = time.monotonic() + 10
        while not any(Change(str(created), "created") in batch for batch in batches) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(Change(str(created), "created") in batch for batch in batches), batches


def test_events_hear_a_file_appear_in_directories_that_did_not_exist(tmp_path: Path, event_source: str) -> None:
    """An extra file named before its directories exist (a deploy that creates them later)."""
    awaited = tmp_path / "conf" / "site" / "local.ini"
    batches: list[list[Change]] = []
    settings = Settings(extra_files=(str(awaited),), backend="events", settle=0.1)
    with Monitor(Scanner(settings, watch_modules=False), lambda b: batches.append(list(b))) as monitor:
        assert monitor.backend == "events"
        time.sleep(0.3)
        (tmp_path / "conf").mkdir()
        time.sleep(0.3)  # heard, and then the new directory is watched in its turn
        (tmp_path / "conf" / "site").mkdir()
        time.sleep(0.3)
        awaited.write_text("[site]\n")
        wait_for_batch(batches)
    assert batches == [[Change(str(awaited), "created")]]


def test_events_hear_a_watched_directory_replaced_by_another(tmp_path: Path, event_source: str) -> None:
    """``mv app app.old && mv app.new app`` in one go: the path is another directory now, which
    must be watched afresh (the old watch went away with the old directory)."""
    app, staged = tmp_path / "app", tmp_path / "app.new"
    for directory, text in ((app, "v1\n"), (staged, "v2, staged\n")):
        directory.mkdir()
        (directory / "views.py").write_text(text)
    module = app / "views.py"
    batches: list[list[Change]] = []
    settings = Settings(extra_files=(str(module),), backend="events", settle=0.1)
    with Monitor(Scanner(settings, watch_modules=False), lambda b: batches.append(list(b))) as monitor:
        assert monitor.backend == "events"
        time.sleep(0.3)
        app.rename(tmp_path / "app.old")
        staged.rename(app)
        wait_for_batch(batches)
        time.sleep(0.3)  # the new directory is watched in the turn after its batch
        module.write_text("v3, edited in place\n")
        wait_for_batch(batches, 2)
    # The first scan may fall between the two renames, when views.py is briefly gone.
    assert batches[0] in ([Change(str(module), "modified")], [Change(str(module), "created")]), batches
    assert batches[1:] == [[Change(str(module), "modified")]]


def inotify_watches_of_root() -> int:
    """An upper bound of the watches root holds now, in every process (the limit is per user;
    a forked child shows its parent's instance again)."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid != 0:
                continue
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    count += sum(line.startswith("inotify wd:") for line in f)
        except OSError:
            continue
    return count


def watches_free() -> int:
    """How many more watches the kernel grants now, found by taking them."""
    import shutil
    import tempfile

    from wsgi_reload._core.inotify import DirectoryWatcher, WatchLimitReached

    probe = DirectoryWatcher(lambda: None)
    scratch = tempfile.mkdtemp(prefix="wsgi-reload-probe-")
    directories = [os.path.join(scratch, str(n)) for n in range(inotify_watches_of_root() + 1)]
    for directory in directories:
        os.mkdir(directory)
    try:
        probe.set_directories(directories)
        return len(directories)
    except WatchLimitReached:
        return len(probe.directories)
    finally:
        probe.stop()
        shutil.rmtree(scratch)


@contextlib.contextmanager
def inotify_watch_limit(headroom: int) -> Iterator[None]:
    """fs.inotify.max_user_watches lowered to what root uses now plus ``headroom``, then put back."""
    import wsgi_reload._core.inotify as inotify_module

    if os.geteuid() != 0:
        pytest.skip("lowering fs.inotify.max_user_watches needs root")
    if inotify_module.unavailable():
        pytest.skip(inotify_module.unavailable() or "")
    limit = Path(inotify_module.MAX_WATCHES_FILE)
    saved = limit.read_text()
    # Watchers of earlier tests release their watches a moment after they stop (watchfiles'
    # thread wakes once a second): wait until root's count holds still, or the headroom is off.
    deadline = time.monotonic() + 5
    count = inotify_watches_of_root()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        count, previous = inotify_watches_of_root(), count
        if count == previous:
            break
    try:
        upper_bound = inotify_watches_of_root()
        limit.write_text(str(upper_bound))
        limit.write_text(str(upper_bound - watches_free() + headroom))
        yield
    finally:
        limit.write_text(saved)


def wait_for_batch(batches: list[list[Change]], count: int = 1, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(batches) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_watch_limit_at_start_means_polling_and_one_clear_line(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    for n in range(6):
        (tmp_path / f"d{n}").mkdir()
        (tmp_path / f"d{n}" / "page.html").write_text("0")
    batches: list[list[Change]] = []
    settings = Settings(extra_files=(str(tmp_path / "**" / "*.html"),), backend="events", interval=0.1, settle=0)
    monitor = Monitor(Scanner(settings, watch_modules=False), lambda b: batches.append(list(b)))
    with caplog.at_level(logging.INFO, logger="wsgi_reload"):
        with inotify_watch_limit(headroom=3):
            monitor.start()
        try:
            assert monitor.backend == "poll"
            (tmp_path / "d4" / "page.html").write_text("changed")
            wait_for_batch(batches)
        finally:
            monitor.stop()
    lines = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(lines) == 1 and "the inotify watch limit is reached" in lines[0], lines
    assert "fs.inotify.max_user_watches=" in lines[0] and "polling every 0.1 s" in lines[0]
    assert batches == [[Change(str(tmp_path / "d4" / "page.html"), "modified")]]


def test_a_watch_limit_reached_later_switches_to_polling(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """New directories under a glob need new watches; when the limit refuses them, the monitor
    says so once and polls from then on, and the new directories' files still count."""
    (tmp_path / "d0").mkdir()
    (tmp_path / "d0" / "page.html").write_text("0")
    batches: list[list[Change]] = []
    settings = Settings(extra_files=(str(tmp_path / "**" / "*.html"),), backend="events", interval=0.1, settle=0)
    with caplog.at_level(logging.INFO, logger="wsgi_reload"), inotify_watch_limit(headroom=6), \
            Monitor(Scanner(settings, watch_modules=False), lambda b: batches.append(list(b))) as monitor:
        assert monitor.backend == "events"
        # New directories until the limit refuses one: a test running beside this one may free
        # watches meanwhile (its server stops), which raises the headroom.
        deadline, n = time.monotonic() + 10, 0
        while monitor.backend == "events" and time.monotonic() < deadline:
            if n < 400:
                n += 1
                (tmp_path / f"d{n}").mkdir()
            time.sleep(0.02)
        assert monitor.backend == "poll"
        (tmp_path / f"d{n}" / "page.html").write_text("new")
        wait_for_batch(batches)
    stopped = [r.getMessage() for r in caplog.records if "file events stopped" in r.getMessage()]
    assert len(stopped) == 1 and "the inotify watch limit is reached" in stopped[0], stopped
    assert "failed" not in caplog.text
    assert batches == [[Change(str(tmp_path / f"d{n}" / "page.html"), "created")]]


def test_a_check_interpreter_has_a_short_honest_command_line(tmp_path: Path) -> None:
    """ps shows what the process is, not kilobytes of source; the source is gone from its
    environment before anything else runs (an app that lists os.environ does not see it)."""
    from wsgi_reload._check import spawn
    from wsgi_reload._check.check import CHECK_TITLE

    out = tmp_path / "env.txt"
    source = f"import os, time\nopen({str(out)!r}, 'w').write(repr(sorted(os.environ)))\ntime.sleep(30)\n" + "#" * 5000
    argv, env = spawn.python_source(CHECK_TITLE, source, os.environ)
    pid = spawn.spawn(argv, env=env)
    try:
        deadline = time.monotonic() + 30
        while not out.exists() or not out.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode()
        assert CHECK_TITLE in command and len(command) < 300
        assert spawn.SOURCE_ENV not in out.read_text()
    finally:
        spawn.kill_group(pid)  # and reaps it


def test_a_helper_inherits_no_descriptor_of_the_process_that_starts_it(tmp_path: Path) -> None:
    """A server keeps its listening sockets inheritable (for its own re-exec); a helper started
    from it (the watcher, a check) gets only its standard streams and the one descriptor it is
    handed, so it never holds the server's port."""
    from wsgi_reload._check import spawn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.set_inheritable(True)
    handed = spawn.data_file(b"for the child")
    out = tmp_path / "fds.txt"
    source = (f"import json, os\nfds = sorted(int(n) for n in os.listdir('/proc/self/fd'))\n"
              f"open({str(out)!r}, 'w').write(json.dumps(fds))\n")
    argv, env = spawn.python_source("fd test", source, os.environ)
    try:
        assert listener.fileno() in spawn.inheritable_fds()
        pid = spawn.spawn(argv, env=env, extra_fd=handed.fileno())
        exited, code = spawn.wait_exit(pid, 30)
        spawn.kill_group(pid)
        assert exited and code == 0
        fds = json.loads(out.read_text())
        # 0-2, the handed one as 3, and the listing's own descriptor.
        assert fds[:4] == [0, 1, 2, 3] and len(fds) == 5, fds
    finally:
        listener.close()
        handed.close()
