"""The pre-reload check, the reloader's decisions, the settings and the monitor."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wsgi_reload import Change, Monitor, ReloadGate, Scanner, Settings, SettingsError
from wsgi_reload.check import check_code, compile_files, import_app
from wsgi_reload.files import failed_imports


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
])
def test_bad_settings_fail_with_one_clear_line(
    environ: dict[str, str], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.load(environ, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# --- the monitor ---------------------------------------------------------------------------


def run_monitor(tmp_path: Path, backend: str, edits: int, gap: float) -> tuple[Monitor, list[list[Change]]]:
    target = tmp_path / "watched.txt"
    target.write_text("0")
    batches: list[list[Change]] = []
    settings = Settings(extra_files=(str(target),), backend=backend, interval=0.05, settle=0.3)
    monitor = Monitor(Scanner(settings, watch_modules=False), lambda b: batches.append(list(b)))
    with monitor:
        time.sleep(0.3)
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


def test_the_event_backend_reports_changes(tmp_path: Path) -> None:
    pytest.importorskip("watchfiles")
    monitor, batches = run_monitor(tmp_path, "events", edits=1, gap=0)
    assert monitor.backend == "events"
    assert batches == [[Change(str(tmp_path / "watched.txt"), "modified")]]


def test_poll_backend_is_used_when_asked(tmp_path: Path) -> None:
    monitor, batches = run_monitor(tmp_path, "poll", edits=1, gap=0)
    assert monitor.backend == "poll" and len(batches) == 1
