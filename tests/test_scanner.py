"""The change scanner on a real filesystem."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
import types
import weakref
import zipfile
from pathlib import Path

import pytest

import wsgi_reload
from wsgi_reload._core.files import PathFilter, failed_imports, module_file
from wsgi_reload._core.scanner import Change, Scanner
from wsgi_reload._core.settings import Settings


@pytest.fixture(autouse=True)
def _clean_failed_imports() -> None:
    failed_imports.clear()


def files_scanner(tmp_path: Path, *patterns: str, **settings: object) -> Scanner:
    return Scanner(Settings.load({}, extra_files=[str(tmp_path / p) for p in patterns], **settings),
                   watch_modules=False)


def test_an_edit_within_the_same_second_with_the_same_mtime_counts(tmp_path: Path) -> None:
    target = tmp_path / "a.py"
    target.write_text("x = 1\n")
    st = target.stat()
    scanner = files_scanner(tmp_path, "a.py")
    assert scanner.scan() == []
    target.write_text("x = 10\n")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # the clock did not move; the size did
    assert scanner.scan() == [Change(str(target), "modified")]


def test_a_same_size_edit_within_the_same_second_counts(tmp_path: Path) -> None:
    target = tmp_path / "a.py"
    target.write_text("x = 1\n")
    st = target.stat()
    scanner = files_scanner(tmp_path, "a.py")
    scanner.scan()
    target.write_text("x = 2\n")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))  # same second, a few ns later
    assert scanner.scan() == [Change(str(target), "modified")]


def test_an_mtime_going_backwards_counts(tmp_path: Path) -> None:
    target = tmp_path / "a.py"
    target.write_text("x = 1\n")
    scanner = files_scanner(tmp_path, "a.py")
    scanner.scan()
    os.utime(target, (time.time() - 3600, time.time() - 3600))  # rsync -t, git checkout
    assert scanner.scan() == [Change(str(target), "modified")]


def test_an_atomic_rename_save_counts_even_with_the_same_mtime_and_size(tmp_path: Path) -> None:
    target = tmp_path / "a.py"
    target.write_text("x = 1\n")
    st = target.stat()
    scanner = files_scanner(tmp_path, "a.py")
    scanner.scan()
    replacement = tmp_path / "a.py.new"
    replacement.write_text("x = 2\n")
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, target)
    assert target.stat().st_ino != st.st_ino
    assert scanner.scan() == [Change(str(target), "modified")]


def test_a_deleted_file_counts_and_its_return_counts_too(tmp_path: Path) -> None:
    target = tmp_path / "a.py"
    target.write_text("x = 1\n")
    scanner = files_scanner(tmp_path, "a.py")
    scanner.scan()
    target.unlink()
    assert scanner.scan() == [Change(str(target), "deleted")]
    assert scanner.scan() == []
    target.write_text("x = 1\n")
    assert scanner.scan() == [Change(str(target), "created")]


def test_a_new_file_under_a_glob_counts_but_not_on_the_first_scan(tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "old.html").write_text("old")
    scanner = files_scanner(tmp_path, "templates/**/*.html")
    assert scanner.scan() == []
    (tmp_path / "templates" / "deep").mkdir()
    new = tmp_path / "templates" / "deep" / "new.html"
    new.write_text("new")
    assert scanner.scan() == [Change(str(new), "created")]
    new.unlink()
    assert scanner.scan() == [Change(str(new), "deleted")]


def test_a_directory_is_watched_recursively_without_swap_files(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    scanner = files_scanner(tmp_path, "conf")
    scanner.scan()
    (tmp_path / "conf" / ".settings.ini.swp").write_text("swap")
    (tmp_path / "conf" / "settings.ini~").write_text("backup")
    assert scanner.scan() == []
    (tmp_path / "conf" / "settings.ini").write_text("[a]")
    assert scanner.scan() == [Change(str(tmp_path / "conf" / "settings.ini"), "created")]


def test_a_file_that_failed_to_import_is_watched_and_its_fix_counts(tmp_path: Path) -> None:
    broken = tmp_path / "brokenmod_fixme.py"
    broken.write_text("def f(:\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(SyntaxError) as info:
            importlib.import_module("brokenmod_fixme")
        assert "brokenmod_fixme" not in sys.modules
        scanner = Scanner(Settings())
        failed_imports.record(info.value)
        scanner.scan()
        assert str(broken) in scanner.watched_files()
        broken.write_text("def f():\n    pass\n")
        assert Change(str(broken), "modified") in scanner.scan()
    finally:
        sys.path.remove(str(tmp_path))


def test_the_failed_file_comes_from_the_last_traceback_frame(tmp_path: Path) -> None:
    failing = tmp_path / "failing_at_import.py"
    failing.write_text("x = 1\nundefined_name\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(NameError) as info:
            importlib.import_module("failing_at_import")
    finally:
        sys.path.remove(str(tmp_path))
    assert failed_imports.record(info.value) == str(failing)


def test_a_fix_saved_between_the_failed_read_and_the_next_scan_still_counts(tmp_path: Path) -> None:
    broken = tmp_path / "b.py"
    broken.write_text("def f(:\n")
    read_at = time.time_ns() - 1_000_000_000  # the check read it a second ago
    scanner = files_scanner(tmp_path)
    scanner.scan()
    broken.write_text("def f():\n    pass\n")
    failed_imports.record(str(broken), read_at_ns=read_at)
    assert scanner.scan() == [Change(str(broken), "modified")]


def test_a_module_first_seen_after_it_changed_counts_against_its_load_time(tmp_path: Path) -> None:
    loaded_at = time.time_ns() - 5_000_000_000
    module = tmp_path / "lazy.py"
    module.write_text("x = 1\n")
    paths: dict[str, int | None] = {}
    scanner = Scanner(Settings(), watch_modules=False, sources=[lambda: paths])
    scanner.scan()
    paths[str(module)] = loaded_at  # a worker imported it 5 s ago; the file is newer
    assert scanner.scan() == [Change(str(module), "modified")]
    other = tmp_path / "fresh.py"
    other.write_text("y = 1\n")
    paths[str(other)] = time.time_ns() + 1_000_000_000
    assert scanner.scan() == []


def test_sys_modules_files_are_watched_and_an_edit_counts(tmp_path: Path) -> None:
    (tmp_path / "watched_pkg_a").mkdir()
    init = tmp_path / "watched_pkg_a" / "__init__.py"
    init.write_text("VALUE = 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        importlib.import_module("watched_pkg_a")
        scanner = Scanner(Settings())
        scanner.scan()
        assert str(init) in scanner.watched_files()
        init.write_text("VALUE = 22\n")
        assert scanner.scan() == [Change(str(init), "modified")]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("watched_pkg_a", None)


def test_module_files_are_computed_again_only_when_a_module_comes_goes_or_is_replaced(tmp_path: Path) -> None:
    """A rescan reuses the last module file list while sys.modules holds the same objects; an
    import, a removal or a replaced module object shows at once."""
    from wsgi_reload._core.files import ModuleFiles

    for name in ("cache_a", "cache_b"):
        (tmp_path / f"{name}.py").write_text("VALUE = 1\n")
    modules: dict[str, object] = {"cache_a": types.ModuleType("cache_a")}
    modules["cache_a"].__file__ = str(tmp_path / "cache_a.py")  # type: ignore[attr-defined]
    files = ModuleFiles(modules)
    first = files()
    assert first == {str(tmp_path / "cache_a.py")} and files() is first
    imported = types.ModuleType("cache_b")
    imported.__file__ = str(tmp_path / "cache_b.py")
    modules["cache_b"] = imported
    assert files() == {str(tmp_path / "cache_a.py"), str(tmp_path / "cache_b.py")}
    replaced = types.ModuleType("cache_b")
    replaced.__file__ = str(tmp_path / "elsewhere" / "cache_b.py")
    modules["cache_b"] = replaced
    assert str(tmp_path / "elsewhere" / "cache_b.py") in files()
    del modules["cache_b"]
    assert files() == first

    class Odd(types.ModuleType):
        def __eq__(self, other: object) -> bool:
            raise RuntimeError("no comparing me")

        __hash__ = types.ModuleType.__hash__

    odd = Odd("cache_a")
    odd.__file__ = str(tmp_path / "cache_b.py")
    modules["cache_a"] = odd
    assert files() == {str(tmp_path / "cache_b.py")}


def test_the_standard_library_and_pycache_are_excluded_by_default(tmp_path: Path) -> None:
    watched = Scanner(Settings()).watched_files()
    assert os.__file__ not in watched
    assert wsgi_reload.__file__ in watched
    accept = PathFilter()
    assert not accept(str(tmp_path / "__pycache__" / "a.cpython-311.pyc"))
    assert not accept(str(tmp_path / ".a.py.swp"))
    assert accept(str(tmp_path / "a.py"))


def test_include_wins_over_exclude(tmp_path: Path) -> None:
    accept = PathFilter(include=[str(tmp_path / "keep")], exclude=[str(tmp_path), "*.html"], base=str(tmp_path))
    assert accept(str(tmp_path / "keep" / "a.py"))
    assert not accept(str(tmp_path / "other" / "a.py"))
    assert not PathFilter(exclude=["*.html"])(str(tmp_path / "x" / "page.html"))
    assert PathFilter(include=[os.path.dirname(os.__file__)])(os.__file__)


def test_sys_modules_mutating_in_another_thread_does_not_break_a_scan(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("")
    count = 20_000  # enough that a thread switch lands inside the scan's walk over sys.modules
    names = [f"_wsgi_reload_churn_{n}" for n in range(count)]
    for name in names[::2]:
        module = types.ModuleType(name)
        module.__file__ = str(source)
        sys.modules[name] = module
    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.is_set():
            module = types.ModuleType(names[n % count])
            module.__file__ = str(source)
            sys.modules[module.__name__] = module
            sys.modules.pop(names[(n + count // 2) % count], None)
            n += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        scanner = Scanner(Settings())
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            scanner.scan()
    finally:
        stop.set()
        thread.join()
        for name in names:
            sys.modules.pop(name, None)


def test_a_file_that_cannot_be_stated_is_logged_once_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loop = tmp_path / "loop"
    os.symlink(loop, loop)  # stat() fails with ELOOP
    good = tmp_path / "good.py"
    good.write_text("x = 1\n")
    scanner = Scanner(Settings.load({}, extra_files=[str(loop), str(good)]), watch_modules=False)
    with caplog.at_level(logging.WARNING, logger="wsgi_reload"):
        scanner.scan()
        scanner.scan()
        good.write_text("x = 22\n")
        assert scanner.scan() == [Change(str(good), "modified")]
    assert [r.getMessage() for r in caplog.records].count(
        f"wsgi_reload: cannot stat {loop} ([Errno 40] Too many levels of symbolic links: '{loop}'); "
        "not watching it until it can be read") == 1


def test_module_file_maps_odd_modules(tmp_path: Path) -> None:
    source = tmp_path / "legacy.py"
    source.write_text("")
    legacy = types.ModuleType("legacy")
    legacy.__file__ = str(tmp_path / "legacy.pyc")
    assert module_file(legacy) == str(source)

    cached = types.ModuleType("cached")
    cached.__file__ = str(tmp_path / "__pycache__" / "legacy.cpython-311.pyc")
    assert module_file(cached) == str(source)

    nul = types.ModuleType("nul")
    nul.__file__ = "/tmp/bad\0name.py"
    assert module_file(nul) is None

    assert module_file(types.ModuleType("no_file")) is None
    assert module_file(sys) is None  # built in
    assert module_file(weakref.proxy(legacy)) is None


def test_module_file_uses_the_archive_for_zip_imports(tmp_path: Path) -> None:
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("zipped_mod_for_test.py", "X = 1\n")
    sys.path.insert(0, str(archive))
    try:
        module = importlib.import_module("zipped_mod_for_test")
        assert module_file(module) == str(archive)
    finally:
        sys.path.remove(str(archive))
        sys.modules.pop("zipped_mod_for_test", None)


def test_code_changed_keeps_the_classic_contract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsgi_reload._core import scanner as scanner_module

    target = tmp_path / "settings.ini"
    target.write_text("a")
    monkeypatch.setenv("WSGI_RELOAD_EXTRA_FILES", str(target))
    monkeypatch.setattr(scanner_module, "_default_scanner", None)
    assert wsgi_reload.code_changed() is False
    assert wsgi_reload.code_changed() is False
    target.write_text("bb")
    assert wsgi_reload.code_changed() is True
    assert wsgi_reload.code_changed() is False


def test_a_glob_file_saved_after_the_process_started_counts_on_the_first_scan(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    old = tmp_path / "t" / "old.html"
    old.write_text("old")
    os.utime(old, (time.time() - 60, time.time() - 60))
    started = time.time_ns() - 30_000_000_000
    edited = tmp_path / "t" / "edited.html"
    edited.write_text("edited during the reload")
    scanner = Scanner(Settings.load({}, extra_files=[str(tmp_path / "t" / "*.html")]), watch_modules=False,
                      modules_loaded_at_ns=started)
    assert scanner.scan() == [Change(str(edited), "modified")]


def test_a_named_extra_file_saved_after_the_process_started_counts_on_the_first_scan(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("A=1")
    scanner = Scanner(Settings.load({}, extra_files=[str(env)]), watch_modules=False,
                      modules_loaded_at_ns=time.time_ns() - 30_000_000_000)
    assert scanner.scan() == [Change(str(env), "modified")]
