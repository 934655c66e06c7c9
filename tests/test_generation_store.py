"""The generation store and its import finder, in a child interpreter of their own (no servers).

Each case imports through a real ``sys.meta_path`` finder from a real store on disk, in a
fresh interpreter, so nothing of the test process's imports leaks in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from wsgi_reload._server import generations
from wsgi_reload._server.generations import Store, project_roots, walk


def run(code: str, cwd: Path) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "mod.py").write_text('def text():\n    return "v1"\n')
    (root / "pkg" / "data.txt").write_text("data on disk\n")
    (root / "top.py").write_text('def boom():\n    raise ValueError("from the generation")\n')
    return root


def test_a_generation_serves_its_own_bytes_whatever_the_disk_says(tmp_path: Path) -> None:
    root = project(tmp_path)
    store = Store(str(tmp_path / "store"))
    generation = store.build([str(root)])
    store.publish(generation)
    # Then the disk changes: broken, shifted, deleted. None of it may show.
    (root / "pkg" / "mod.py").write_text("undefined_name\n")
    (root / "top.py").write_text("\n\n\n# shifted\ndef boom():\n    raise ValueError('from the disk')\n")
    result = run(f"""
        import inspect, json, sys, traceback
        sys.path.insert(0, {str(root)!r})
        from wsgi_reload._server.generations import Store
        store = Store({str(tmp_path / 'store')!r})
        store.install(store.load(store.current_id()))
        import pkg.mod, top, os
        os.unlink({str(root / 'pkg' / 'mod.py')!r})
        try:
            top.boom()
        except ValueError:
            tb = traceback.format_exc()
        print(json.dumps({{"text": pkg.mod.text(), "file": top.__file__, "tb": tb,
                          "source": inspect.getsource(top.boom),
                          "data": pkg.mod.__spec__.loader.get_data({str(root / 'pkg' / 'data.txt')!r}).decode(),
                          "package": pkg.__path__}}))
    """, tmp_path)
    assert result["text"] == "v1"
    assert result["file"] == str(root / "top.py")
    assert 'line 2, in boom\n    raise ValueError("from the generation")' in str(result["tb"])
    assert result["source"] == 'def boom():\n    raise ValueError("from the generation")\n'
    assert result["data"] == "data on disk\n"  # a package's data files still come from the disk
    assert result["package"] == [str(root / "pkg")]


def test_a_file_deleted_after_the_check_still_imports_and_a_new_one_comes_from_the_disk(tmp_path: Path) -> None:
    root = project(tmp_path)
    store = Store(str(tmp_path / "store"))
    store.publish(store.build([str(root)]))
    (root / "pkg" / "mod.py").unlink()
    (root / "newer.py").write_text('TEXT = "new file"\n')
    result = run(f"""
        import json, sys
        sys.path.insert(0, {str(root)!r})
        from wsgi_reload._server.generations import Store
        store = Store({str(tmp_path / 'store')!r})
        store.install(store.load(store.current_id()))
        import pkg.mod, newer
        print(json.dumps({{"text": pkg.mod.text(), "newer": newer.TEXT}}))
    """, tmp_path)
    assert result == {"text": "v1", "newer": "new file"}


def test_checked_bytes_a_cleaner_removed_come_from_the_disk_only_if_unchanged(tmp_path: Path) -> None:
    """A cleaner (tmpreaper) removed the store's objects and compiled code: a module whose file is
    still the checked bytes imports from the disk; one whose file changed since fails to import,
    saying why, rather than run bytes no check saw."""
    root = project(tmp_path)
    store = Store(str(tmp_path / "store"))
    store.publish(store.build([str(root)]))
    for sub in ("objects", "code"):
        for entry in (tmp_path / "store" / sub).iterdir():
            entry.unlink()
    (root / "top.py").write_text("undefined_name\n")  # unchecked, and its checked bytes are gone
    result = run(f"""
        import json, sys
        sys.path.insert(0, {str(root)!r})
        from wsgi_reload._server.generations import Store
        store = Store({str(tmp_path / 'store')!r})
        store.install(store.load(store.current_id()))
        import pkg.mod
        try:
            import top
            error = None
        except OSError as exc:
            error = str(exc)
        print(json.dumps({{"text": pkg.mod.text(), "error": error}}))
    """, tmp_path)
    assert result["text"] == "v1"
    assert str(result["error"]).startswith(f"the checked bytes of {root / 'top.py'} are gone from the runtime")


def test_a_store_emptied_in_part_is_made_whole_once_even_with_a_file_changed_since(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """recover(): the store's ``current`` and objects deleted (the directory left) and a file of
    the running generation changed since its check. The running generation is restored and named
    current again at once (a process finding none would build one from the disk, unchecked), the
    changed file is handed back to check, and the next turn finds the store whole (one line)."""
    monkeypatch.setattr(generations, "EMPTYING_GRACE", 0.0)
    root = project(tmp_path)
    runtime_dir = tmp_path / "run"
    runtime_dir.mkdir(mode=0o700)
    store = generations.store_of(str(runtime_dir))
    generation = store.build([str(root)])
    store.publish(generation)
    assert generations.recover(str(runtime_dir), store, generation) is None
    (Path(store.directory) / "current").unlink()
    for entry in (Path(store.directory) / "objects").iterdir():
        entry.unlink()
    (root / "top.py").write_text("changed = True\n")
    with caplog.at_level("WARNING", logger="wsgi_reload"):
        assert generations.recover(str(runtime_dir), store, generation) == [str(root / "top.py")]
        assert store.current_id() == generation.id
        assert generations.recover(str(runtime_dir), store, generation) is None
    assert [r.getMessage() for r in caplog.records if "emptied in part" in r.getMessage()] == [
        f"wsgi_reload: the runtime directory {runtime_dir} was emptied in part (the running generation gone: a "
        "temp-file cleaner?); it is made whole again and the running code restored; 1 file changed since that code "
        "was checked, so it is checked now"]


def test_a_rebuild_reads_only_what_changed(tmp_path: Path) -> None:
    root = project(tmp_path)
    store = Store(str(tmp_path / "store"))
    first = store.build([str(root)])
    assert set(first.changed) == set(first.files)
    (root / "pkg" / "mod.py").write_text('def text():\n    return "v2"\n')
    (root / "pkg" / "added.py").write_text("")
    (root / "top.py").unlink()
    second = store.build([str(root)], base=first)
    assert set(second.changed) == {str(root / "pkg" / "mod.py"), str(root / "pkg" / "added.py"), str(root / "top.py")}
    assert second.files[str(root / "pkg" / "__init__.py")] == first.files[str(root / "pkg" / "__init__.py")]
    assert second.id == first.id + 1


def test_two_generations_are_kept_and_the_rest_pruned(tmp_path: Path) -> None:
    root = project(tmp_path)
    store = Store(str(tmp_path / "store"))
    generation = None
    digests = []
    for n in range(5):
        (root / "pkg" / "mod.py").write_text(f'def text():\n    return "v{n}"\n')
        generation = store.build([str(root)], base=generation)
        store.publish(generation)
        digests.append(generation.files[str(root / "pkg" / "mod.py")])
    assert store.ids() == [3, 4]
    objects = set(os.listdir(tmp_path / "store" / "objects"))
    assert digests[-1] in objects and digests[-2] in objects
    assert not objects & set(digests[:3])
    (root / "pkg" / "mod.py").write_text('def text():\n    return "v5"\n')
    store.publish(store.build([str(root)], base=generation), keep={3})  # a live worker still runs 3
    assert store.ids() == [3, 4, 5]
    assert digests[3] in set(os.listdir(tmp_path / "store" / "objects"))


def test_a_trial_is_offered_kept_and_ended_by_its_verdict(tmp_path: Path) -> None:
    """A generation under check is the trial until it is published (a pass) or withdrawn (a
    refusal); a held worker's verdict follows; a publish meanwhile does not prune it."""
    from wsgi_reload._server.generations import await_verdict

    root = project(tmp_path)
    store = Store(str(tmp_path / "store"))
    first = store.build([str(root)])
    store.publish(first)
    (root / "pkg" / "mod.py").write_text('def text():\n    return "v2"\n')
    trial = store.build([str(root)], base=first)
    store.offer(trial)
    assert store.trial_id() == trial.id and store.current_id() == first.id
    assert not await_verdict(store, trial.id, 0.05)  # undecided: held until the timeout
    assert not await_verdict(store, trial.id, 5, alive=lambda: False)  # its worker is told to stop
    assert await_verdict(store, first.id, 0)  # the running code is served at once
    store.prune()
    assert trial.id in store.ids()
    store.withdraw(trial.id + 1)  # another generation's end leaves this trial alone
    assert store.trial_id() == trial.id
    store.withdraw(trial.id)
    assert store.trial_id() is None and not await_verdict(store, trial.id, 5)
    store.offer(trial)
    store.publish(trial)
    assert store.trial_id() is None and store.current_id() == trial.id and await_verdict(store, trial.id, 0)
    assert not (tmp_path / "store" / "trial").exists()


def test_a_worker_holds_only_on_a_trial_and_serves_only_a_trial_that_passed(tmp_path: Path) -> None:
    """``WorkerAgent.may_serve`` in a worker's interpreter: code taken as current is served even
    once a newer generation is published; a trial refused is not served, even after a later
    generation passed."""
    root = project(tmp_path)
    runtime_dir = tmp_path / "run"
    runtime_dir.mkdir(mode=0o700)
    result = run(f"""
        import json, sys
        sys.path.insert(0, {str(root)!r})
        from wsgi_reload._server.agent import WorkerAgent
        from wsgi_reload._server.generations import adopt, store_of
        store = store_of({str(runtime_dir)!r})
        agent = WorkerAgent({str(runtime_dir)!r}, 0)
        store, finder = adopt({str(runtime_dir)!r}, trial=True)  # the first generation, current
        first = finder.generation
        store.publish(store.build([{str(root)!r}], base=store.load(first)))
        verified = agent.may_serve(5)
        store.offer(store.build([{str(root)!r}], base=store.load(store.current_id())))
        store, finder = adopt({str(runtime_dir)!r}, trial=True)
        trial = finder.generation
        store.withdraw(trial)  # refused
        store.publish(store.build([{str(root)!r}], base=store.load(store.current_id())))  # a later one passed
        refused = agent.may_serve(5)
        print(json.dumps({{"first": first, "trial": trial, "verified": verified, "refused": refused}}))
    """, tmp_path)
    assert result["trial"] != result["first"]
    assert result["verified"] is True and result["refused"] is False


def test_compiled_code_is_cached_in_the_store_and_used(tmp_path: Path) -> None:
    root = project(tmp_path)
    store = Store(str(tmp_path / "store"))
    store.publish(store.build([str(root)]))
    code = f"""
        import json, sys, builtins
        sys.path.insert(0, {str(root)!r})
        from wsgi_reload._server.generations import Store
        compiled = []
        real = builtins.compile
        builtins.compile = lambda *a, **k: compiled.append(a[1]) or real(*a, **k)
        store = Store({str(tmp_path / 'store')!r})
        store.install(store.load(store.current_id()))
        import pkg.mod
        print(json.dumps({{"compiled": compiled}}))
    """
    assert run(code, tmp_path)["compiled"] == [str(root / "pkg" / "__init__.py"), str(root / "pkg" / "mod.py")]
    assert run(code, tmp_path)["compiled"] == []  # the second interpreter takes the cached code


def test_the_walk_skips_virtual_environments_hidden_and_cache_directories(tmp_path: Path) -> None:
    root = project(tmp_path)
    (root / ".venv" / "lib").mkdir(parents=True)
    (root / ".venv" / "lib" / "x.py").write_text("")
    (root / "env").mkdir()
    (root / "env" / "pyvenv.cfg").write_text("")
    (root / "env" / "y.py").write_text("")
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "z.py").write_text("")
    found, complete = walk([str(root)])
    assert complete
    assert found == {str(root / "pkg" / "__init__.py"), str(root / "pkg" / "mod.py"), str(root / "top.py")}
    found, complete = walk([str(root)], max_files=1)
    assert not complete and len(found) >= 1


def test_a_rebuild_sees_files_added_and_removed_under_cached_listings(tmp_path: Path) -> None:
    """The store keeps each directory's listing under its stat signature; a file added, removed
    or renamed changes the directory's mtime, so the next build lists it again."""
    root = project(tmp_path)
    (root / "loop").mkdir()
    (root / "loop" / "back").symlink_to(root)  # a symlink loop: walked as os.walk does, not followed
    for directory in (root, root / "pkg", root / "loop"):
        os.utime(directory, (1e9, 1e9))  # older than the "racy" window, so the listings are cached
    store = Store(str(tmp_path / "store"))
    first = store.build([str(root)])
    (root / "pkg" / "new.py").write_text("NEW = 1\n")
    second = store.build([str(root)], base=first)
    assert str(root / "pkg" / "new.py") in second.files
    assert second.changed == (str(root / "pkg" / "new.py"),)
    (root / "pkg" / "new.py").rename(root / "pkg" / "renamed.py")
    third = store.build([str(root)], base=second)
    assert str(root / "pkg" / "new.py") not in third.files and str(root / "pkg" / "renamed.py") in third.files
    (root / "pkg" / "mod.py").write_text('def text():\n    return "v2"\n')  # no entry added: the mtime of
    fourth = store.build([str(root)], base=third)  # the directory is unchanged, the file's is not
    assert fourth.changed == (str(root / "pkg" / "mod.py"),)


def test_project_roots_leave_out_the_standard_library_and_installed_packages(tmp_path: Path) -> None:
    import sysconfig

    paths = sysconfig.get_paths()
    roots = project_roots([str(tmp_path), paths["stdlib"], paths["purelib"], os.path.dirname(sys.executable)])
    assert roots == [str(tmp_path)]


def mo_file(translations: dict[str, str]) -> bytes:
    """A GNU gettext catalog (the .mo format: a header, then two tables of (length, offset))."""
    import struct

    keys = sorted(translations)
    ids = b"".join(k.encode() + b"\0" for k in keys)
    strs = b"".join(translations[k].encode() + b"\0" for k in keys)
    header = 7 * 4
    table = header + 2 * 8 * len(keys)
    originals, translated, offset = [], [], 0
    for k in keys:
        originals.append((len(k.encode()), table + offset))
        offset += len(k.encode()) + 1
    offset = 0
    for k in keys:
        translated.append((len(translations[k].encode()), table + len(ids) + offset))
        offset += len(translations[k].encode()) + 1
    out = struct.pack("<7I", 0x950412DE, 0, len(keys), header, header + 8 * len(keys), 0, 0)
    out += b"".join(struct.pack("<2I", *entry) for entry in originals + translated)
    return out + ids + strs


def test_django_reads_templates_and_catalogs_of_the_generation(tmp_path: Path) -> None:
    pytest.importorskip("django")
    root = tmp_path / "site"
    (root / "templates").mkdir(parents=True)
    (root / "templates" / "page.html").write_text("checked {{ x }}")
    (root / "locale" / "fr" / "LC_MESSAGES").mkdir(parents=True)
    catalog = root / "locale" / "fr" / "LC_MESSAGES" / "django.mo"
    catalog.write_bytes(mo_file({"": "Content-Type: text/plain; charset=UTF-8\n", "hello": "bonjour"}))
    store = Store(str(tmp_path / "store"))
    generation = store.build([str(root)])
    assert str(catalog) in generation.files and str(root / "templates" / "page.html") in generation.files
    store.publish(generation)
    (root / "templates" / "page.html").write_text("{% if %}broken")
    catalog.write_bytes(mo_file({"": "Content-Type: text/plain; charset=UTF-8\n", "hello": "salut (unchecked)"}))
    result = run(f"""
        import json, django
        from django.conf import settings
        settings.configure(USE_I18N=True, LOCALE_PATHS=[{str(root / 'locale')!r}], INSTALLED_APPS=[],
                           TEMPLATES=[{{"BACKEND": "django.template.backends.django.DjangoTemplates",
                                        "DIRS": [{str(root / 'templates')!r}]}}])
        django.setup()
        from wsgi_reload._server.generations import Store
        from wsgi_reload.django._generation import serve_from_generation
        store = Store({str(tmp_path / 'store')!r})
        store.install(store.load(store.current_id()))
        serve_from_generation()
        from django.template.loader import render_to_string
        from django.utils import translation
        translation.activate("fr")
        print(json.dumps({{"page": render_to_string("page.html", {{"x": 1}}), "hello": translation.gettext("hello")}}))
    """, tmp_path)
    assert result == {"page": "checked 1", "hello": "bonjour"}


def test_looking_for_the_watcher_does_not_wake_it(tmp_path: Path) -> None:
    """Each worker takes a look at the server's watcher lock every second: that must be no file
    event in the runtime directory, which the watcher watches (it would wake and scan twice a
    second on an idle server). A record written is one."""
    import fcntl

    from wsgi_reload._core.inotify import DirectoryWatcher
    from wsgi_reload._server import runtime

    woken: list[float] = []
    watcher = DirectoryWatcher(lambda: woken.append(time.monotonic()))
    watcher.set_directories([str(tmp_path)])
    watcher.start()
    try:
        runtime.open_lock(str(tmp_path), "watcher.lock")  # created: one event
        time.sleep(0.3)
        woken.clear()
        for _ in range(5):
            fd = runtime.open_lock(str(tmp_path), "watcher.lock")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.close(fd)
        time.sleep(0.5)
        assert woken == []
        runtime.write_record(str(tmp_path), "123.json", {"files": []})
        deadline = time.monotonic() + 5
        while not woken and time.monotonic() < deadline:
            time.sleep(0.02)
        assert woken
    finally:
        watcher.stop()


def test_a_record_rewritten_within_one_clock_tick_at_the_same_size_is_read_anew(tmp_path: Path) -> None:
    """A worker's record says ``"app_loaded": null`` and then ``true`` (the same length) within one
    tick of the file system's clock: the watcher's cached reading must not keep the first."""
    from wsgi_reload._server.records import WorkerRecords
    from wsgi_reload._server.runtime import write_record

    directory = str(tmp_path)
    body = {"pid": 4242, "loaded_at_ns": 1, "files": [], "patterns": [], "app_loaded": None}
    write_record(directory, "4242.json", body)
    path = tmp_path / "4242.json"
    stamp = path.stat().st_mtime_ns
    records = WorkerRecords(directory)
    records()
    assert records.serving == set()
    write_record(directory, "4242.json", {**body, "app_loaded": True})
    os.utime(path, ns=(stamp, stamp))  # the same tick
    assert path.stat().st_size == len(json.dumps(body).encode())
    records()
    assert records.serving == {4242}


def test_the_records_merge_to_the_earliest_load_of_each_file_and_patterns_see_new_files(tmp_path: Path) -> None:
    """The union the scanner watches: each file with the earliest load among the records naming
    it, pattern matches too; a file made later that matches a pattern is in the next read even
    though no record changed, and a replaced record is merged anew. ``refresh`` leaves ``files``."""
    from wsgi_reload._server.records import WorkerRecords
    from wsgi_reload._server.runtime import write_record

    directory = tmp_path / "run"
    directory.mkdir()
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "a.html").write_text("a")
    pattern = str(templates / "*.html")
    write_record(str(directory), "10.json", {"pid": 10, "loaded_at_ns": 5, "files": ["/x.py", "/y.py"],
                                             "patterns": [pattern], "app_loaded": True})
    write_record(str(directory), "11.json", {"pid": 11, "loaded_at_ns": 3, "files": ["/y.py"],
                                             "patterns": [pattern], "app_loaded": True})
    records = WorkerRecords(str(directory))
    assert records() == {"/x.py": 5, "/y.py": 3, str(templates / "a.html"): 3}
    (templates / "b.html").write_text("b")
    assert records()[str(templates / "b.html")] == 3
    write_record(str(directory), "11.json", {"pid": 11, "loaded_at_ns": 7, "files": ["/y.py", "/z.py"],
                                             "patterns": [], "app_loaded": True})
    records.refresh()
    assert "/z.py" not in records.files and records.live == {10, 11}
    assert records() == {"/x.py": 5, "/y.py": 5, "/z.py": 7, str(templates / "a.html"): 5,
                         str(templates / "b.html"): 5}
    os.unlink(directory / "10.json")
    assert records() == {"/y.py": 7, "/z.py": 7}
