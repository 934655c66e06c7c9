"""The pre-reload check that keeps a broken save away from the workers.

First every changed ``.py`` file is compiled in memory (no ``.pyc`` written); then, in
``import`` mode, the application entry point is imported in a fresh interpreter with the
same ``sys.path``, environment and working directory, under a time limit.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._core.files import library_dirs
from .._core.settings import Settings
from .._server import genimport
from . import spawn, warm

log = logging.getLogger("wsgi_reload.check")

_FINDER_FILE = str(Path(genimport.__file__).resolve())

PROBE_ENV = "_WSGI_RELOAD_PROBE"
"""Set in the check's interpreter, so adapters imported by the app stay quiet there."""

CHECK_TITLE = "wsgi_reload: check process"
"""On the check interpreter's command line (``ps``)."""
_PROBE_SOURCE = (Path(__file__).with_name("probe.py")).read_text(encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class Checked:
    """The generation a check imports from: the store's directory and the files' digests."""

    store: str
    id: int
    files: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """OK, or an error naming the file, line and message."""

    ok: bool
    stage: str = "import"
    """``compile``, ``import``, ``timeout`` or ``off``; ``import by a new worker`` when a new worker's
    own import of the code was the proof (gunicorn's swap begun beside the check)."""
    message: str = ""
    file: str | None = None
    line: int | None = None
    details: str = ""
    """The full traceback of an import failure, for debug logs."""
    started_ns: int = 0
    """When the check began reading the code (``time.time_ns()``)."""
    seconds: float = 0.0
    warm: bool = False
    """The import ran forked from a warm probe process (:mod:`wsgi_reload._check.warm`)."""
    killed: bool = False
    """The check interpreter was killed with SIGKILL by someone else (the OOM killer, a person)."""
    watch_for: tuple[str, ...] = ()
    """Files that do not exist yet and would fix the error (a missing module's candidates)."""
    holds: Callable[[], bool] = dataclasses.field(default=lambda: True, compare=False, repr=False)
    """Whether the verdict still covers what the workers run, asked once the batch has settled:
    False when a worker has since loaded a changed module the check did not import (a lazy
    import whose record came after the check began). The gate then checks again."""

    def __str__(self) -> str:
        if self.ok:
            return "OK"
        where = f"{self.file}:{self.line}: " if self.file and self.line else f"{self.file}: " if self.file else ""
        return f"{where}{self.message}"

    @property
    def key(self) -> tuple[str | None, int | None, str]:
        """What makes two errors the same error, for logging each only once."""
        return (self.file, self.line, self.message)


def checking() -> bool:
    """True only inside wsgi_reload's pre-reload check: the interpreter that imports the new code
    to see whether it loads, and throws it away. An app can skip side effects there (sending
    mail, starting a scheduler, opening a metrics port) with ``if not wsgi_reload.checking():``,
    as Django code does with ``RUN_MAIN``."""
    return os.environ.get(PROBE_ENV) == "1"


def compile_files(paths: Iterable[str], generation: Checked | None = None) -> CheckResult:
    """Compile each ``.py`` file in memory (with a generation: its bytes of the file); the first
    error wins."""
    started = time.time_ns()
    for path in sorted(set(paths)):
        if not path.endswith(".py"):
            continue
        digest = None if generation is None else generation.files.get(path)
        if generation is not None and digest is None:
            continue
        if generation is None and not os.path.isfile(path):
            continue
        try:
            if generation is not None and digest is not None:
                source = genimport.read_object(generation.store, digest, path)
            else:
                with open(path, "rb") as f:
                    source = f.read()
            compile(source, path, "exec", dont_inherit=True)
        except SyntaxError as exc:
            return CheckResult(False, "compile", f"{type(exc).__name__}: {exc.msg}",
                               os.path.abspath(exc.filename or path), exc.lineno, started_ns=started)
        except (OSError, ValueError) as exc:
            return CheckResult(False, "compile", f"{type(exc).__name__}: {exc}", path, None, started_ns=started)
    return CheckResult(True, "compile", started_ns=started)


def _child_context(cwd: str | None, sys_path: Sequence[str] | None,
                   env: Mapping[str, str] | None) -> tuple[str, list[str], dict[str, str]]:
    """The check interpreter's directory, ``sys.path`` and environment (a warm process is kept
    per such triple)."""
    child_env = dict(os.environ if env is None else env)
    child_env[PROBE_ENV] = "1"
    child_env["PYTHONDONTWRITEBYTECODE"] = "1"
    cwd = os.path.abspath(cwd) if cwd else os.getcwd()
    return cwd, [os.path.abspath(p) if p else cwd for p in (sys.path if sys_path is None else sys_path)], child_env


def start_warm(settings: Settings, loaded_modules: Iterable[str]) -> None:
    """Start the warm check process now instead of at the first check, which would run cold:
    in a process that each reload replaces whole (runserver's), every check is the first.

    :param settings: the check settings (nothing starts unless they import the app).
    :param loaded_modules: the module files this process runs; their installed packages load.
    """
    if settings.check != "import" or not settings.app:
        return
    cwd, child_sys_path, child_env = _child_context(None, None, None)
    warm.probe_for(cwd, child_sys_path, child_env, (), loaded_modules, _PROBE_SOURCE, _FINDER_FILE)


def import_app(
    app: str,
    *,
    timeout: float = 30.0,
    cwd: str | None = None,
    sys_path: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    modules: Sequence[str] = (),
    files: Sequence[str] = (),
    warm_from: Iterable[str] | None = None,
    changed: Iterable[str] = (),
    generation: Checked | None = None,
    ready_path: str | None = None,
    server_pid: int | None = None,
) -> CheckResult:
    """Import ``app`` (``module:callable``), then the module files ``modules`` it did not import,
    in a fresh interpreter, and report how it went. For a Django app, changed template and
    ``.mo`` files among ``files`` are compiled and parsed too.

    The interpreter leads its own process group, and the whole group is killed when it is
    done or when ``timeout`` runs out, so a child the app starts at import (or a fork) can
    neither outlive the check nor hold it up. Nothing is read from a pipe: the payload goes
    in and the records come out through unlinked temporary files.

    With ``warm_from`` (the module files the workers run) the check is forked from a warm
    probe process that has imported the installed packages among them (:mod:`wsgi_reload._check.warm`),
    once one is ready; the probe and what it reports are the same.

    With ``generation`` the project's files are imported from that generation's bytes, the
    ones the workers will load, not from the disk.

    A port the app binds at import that ``server_pid`` (default: this process) holds already
    (a metrics port a ``--preload`` master opened) is bound on a free port in the check instead,
    with one note on the check's standard error: the workers never bind it again.
    """
    started = time.time_ns()
    clock = time.monotonic()
    cwd, child_sys_path, child_env = _child_context(cwd, sys_path, env)
    payload: dict[str, object] = {
        "sys_path": child_sys_path,
        "app": app,
        "cwd": cwd,
        "modules": list(modules),
        "files": list(files),
        "ready_path": ready_path,
        "library_dirs": list(library_dirs()),
        "server_pid": os.getpid() if server_pid is None else server_pid,
    }
    if generation is not None:
        payload["generation"] = {"finder": _FINDER_FILE, "store": generation.store, "id": generation.id,
                                 "files": dict(generation.files)}
    warm_probe = None
    if warm_from is not None:
        warm_probe = warm.probe_for(cwd, child_sys_path, child_env, changed, warm_from, _PROBE_SOURCE,
                                     _FINDER_FILE)
    with spawn.data_file(json.dumps(payload).encode()) as stdin, spawn.data_file() as records, \
            spawn.data_file() as stderr:
        forked = warm_probe.run(stdin, records, stderr, timeout) if warm_probe is not None else None
        if forked is not None:
            exited, code = forked
        else:
            for f in (stdin, records, stderr):
                f.seek(0)
            records.truncate()
            try:
                argv, env = spawn.python_source(CHECK_TITLE, _PROBE_SOURCE, child_env)
                pid = spawn.spawn(argv, env=env, stdin=stdin, stderr=stderr, extra_fd=records.fileno())
            except OSError as exc:
                return CheckResult(False, "import", f"cannot start the check interpreter: {exc}", started_ns=started)
            try:
                exited, code = spawn.wait_exit(pid, timeout)
            finally:
                spawn.kill_group(pid)
        seconds = time.monotonic() - clock
        records.seek(0)
        outcome = _read_records(records.read().decode("utf-8", errors="replace"))
        stderr.seek(0)
        errors = stderr.read()[-4000:].decode("utf-8", errors="replace")
    loading = outcome.loading
    if not exited:
        where = f" (it was still running {loading})" if loading else ""
        return CheckResult(False, "timeout", f"importing {app} took longer than {timeout:g} s{where}; raise "
                           "check_timeout if the app is slow to load", loading, started_ns=started, seconds=seconds)
    result = outcome.result
    if result is None:
        tail = errors.strip().splitlines()[-1:]
        detail = f": {tail[0][:300]}" if tail else ""
        what = "this file" if loading else app
        return CheckResult(False, "import", f"{_exit_description(code)} while importing {what}{detail}", loading,
                           details=errors, started_ns=started, seconds=seconds, killed=code == -signal.SIGKILL)
    if result["ok"]:
        return CheckResult(True, "import", started_ns=started, seconds=seconds, warm=forked is not None)
    return CheckResult(False, "import", f"{result['type']}: {result['message']}", result["file"], result["line"],
                       details=result["traceback"], started_ns=started, seconds=seconds,
                       watch_for=tuple(result.get("watch_for", ())))


@dataclasses.dataclass
class _ProbeOutcome:
    result: dict[str, Any] | None
    loading: str | None
    """The innermost user module still executing when the records stop."""


def _read_records(text: str) -> _ProbeOutcome:
    stack: list[str] = []
    result = None
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            break  # a record cut short by a crash
        event = record.get("event")
        if event == "start":
            stack.append(record["file"])
        elif event == "end" and stack:
            stack.pop()
        elif event == "result":
            result = record["result"]
    return _ProbeOutcome(result, stack[-1] if stack else None)


def _exit_description(code: int | None) -> str:
    if code is None:
        return "the check interpreter exited before the app loaded"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the check interpreter crashed ({name})"
    return f"the check interpreter exited with code {code} before the app loaded"


def check_code(
    changed: Iterable[str],
    settings: Settings,
    *,
    cwd: str | None = None,
    sys_path: Sequence[str] | None = None,
    loaded_modules: Iterable[str] = (),
    generation: Checked | None = None,
    server_pid: int | None = None,
) -> CheckResult:
    """The shared pre-reload check, in the mode the settings ask for.

    ``loaded_modules`` are the module files the workers run; the changed ones among them are
    imported after the app, so a module a worker imported lazily is checked too. With
    ``generation``, every project file is compiled and imported from that generation.
    """
    changed = list(changed)
    if settings.check == "off":
        return CheckResult(True, "off", started_ns=time.time_ns())
    if generation is None:
        forget_bytecode(changed)
    compiled = compile_files(changed, generation)
    if not compiled.ok or settings.check == "compile" or not settings.app:
        return compiled
    loaded = set(loaded_modules)
    lazy = [path for path in changed if path in loaded and path.endswith(".py")]
    def run() -> CheckResult:
        return import_app(settings.app or "", timeout=settings.check_timeout, cwd=cwd, sys_path=sys_path,
                          modules=lazy, files=[path for path in changed if not path.endswith(".py")],
                          warm_from=loaded or None, changed=changed, generation=generation,
                          ready_path=settings.ready_path, server_pid=server_pid)

    imported = run()
    if imported.killed:
        # Killed from outside (the OOM killer, a person), which says nothing of the code: once more.
        log.warning("wsgi_reload: the check interpreter was killed (SIGKILL) while importing %s; checking again",
                    imported.file or settings.app)
        imported = run()
    return dataclasses.replace(imported, started_ns=compiled.started_ns)


def forget_bytecode(paths: Iterable[str]) -> None:
    """Delete cached bytecode of changed sources.

    CPython trusts a ``.pyc`` whose recorded mtime (whole seconds) and size match the
    source, so a same-size edit within one second would otherwise load the old code.
    """
    for path in paths:
        if not path.endswith(".py"):
            continue
        folder, name = os.path.split(path)
        pattern = os.path.join(glob.escape(folder), "__pycache__", glob.escape(name[:-3]) + ".*.pyc")
        for cached in glob.glob(pattern):
            try:
                os.unlink(cached)
            except OSError:
                pass

