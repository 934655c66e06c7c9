"""The pre-reload check that keeps a broken save away from the workers.

First every changed ``.py`` file is compiled in memory (no ``.pyc`` written); then, in
``import`` mode, the application entry point is imported in a fresh interpreter with the
same ``sys.path``, environment and working directory, under a time limit.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .settings import Settings

PROBE_ENV = "_WSGI_RELOAD_PROBE"
"""Set in the check's interpreter, so adapters imported by the app stay quiet there."""

_PROBE_SOURCE = (Path(__file__).with_name("_probe.py")).read_text(encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """OK, or an error naming the file, line and message."""

    ok: bool
    stage: str = "import"
    """``compile``, ``import``, ``timeout`` or ``off``."""
    message: str = ""
    file: str | None = None
    line: int | None = None
    details: str = ""
    """The full traceback of an import failure, for debug logs."""
    started_ns: int = 0
    """When the check began reading the code (``time.time_ns()``)."""
    seconds: float = 0.0

    def __str__(self) -> str:
        if self.ok:
            return "OK"
        where = f"{self.file}:{self.line}: " if self.file and self.line else f"{self.file}: " if self.file else ""
        return f"{where}{self.message}"

    @property
    def key(self) -> tuple[str | None, int | None, str]:
        """What makes two errors the same error, for logging each only once."""
        return (self.file, self.line, self.message)


def in_probe() -> bool:
    """True inside the check's own interpreter."""
    return os.environ.get(PROBE_ENV) == "1"


def compile_files(paths: Iterable[str]) -> CheckResult:
    """Compile each ``.py`` file in memory; the first error wins."""
    started = time.time_ns()
    for path in sorted(set(paths)):
        if not path.endswith(".py") or not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as f:
                source = f.read()
            compile(source, path, "exec", dont_inherit=True)
        except SyntaxError as exc:
            return CheckResult(False, "compile", f"{type(exc).__name__}: {exc.msg}",
                               os.path.abspath(exc.filename or path), exc.lineno, started_ns=started)
        except (OSError, ValueError) as exc:
            return CheckResult(False, "compile", f"{type(exc).__name__}: {exc}", path, None, started_ns=started)
    return CheckResult(True, "compile", started_ns=started)


def import_app(
    app: str,
    *,
    timeout: float = 30.0,
    cwd: str | None = None,
    sys_path: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> CheckResult:
    """Import ``app`` (``module:callable``) in a fresh interpreter and report how it went."""
    started = time.time_ns()
    clock = time.monotonic()
    payload_env = dict(os.environ if env is None else env)
    payload_env[PROBE_ENV] = "1"
    payload_env["PYTHONDONTWRITEBYTECODE"] = "1"
    read_fd, write_fd = os.pipe()
    payload = {
        "sys_path": [os.path.abspath(p) if p else os.getcwd() for p in (sys.path if sys_path is None else sys_path)],
        "app": app,
        "result_fd": write_fd,
    }
    try:
        proc = subprocess.Popen(
            [python_executable(), "-B", "-c", _PROBE_SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=payload_env,
            pass_fds=(write_fd,),
        )
    except OSError as exc:
        os.close(read_fd)
        os.close(write_fd)
        return CheckResult(False, "import", f"cannot start the check interpreter: {exc}", started_ns=started)
    os.close(write_fd)
    try:
        _, stderr = proc.communicate(json.dumps(payload).encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        os.close(read_fd)
        return CheckResult(False, "timeout", f"importing {app} took longer than {timeout:g} s "
                           "(raise check_timeout if the app is slow to load)",
                           started_ns=started, seconds=time.monotonic() - clock)
    with os.fdopen(read_fd, "r", encoding="utf-8") as pipe:
        raw = pipe.read()
    seconds = time.monotonic() - clock
    try:
        result = json.loads(raw)
    except ValueError:
        tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return CheckResult(False, "import", f"the check interpreter died while importing {app}: {tail[0]}",
                           started_ns=started, seconds=seconds)
    if result["ok"]:
        return CheckResult(True, "import", started_ns=started, seconds=seconds)
    return CheckResult(False, "import", f"{result['type']}: {result['message']}", result["file"], result["line"],
                       details=result["traceback"], started_ns=started, seconds=seconds)


def check_code(
    changed: Iterable[str],
    settings: Settings,
    *,
    cwd: str | None = None,
    sys_path: Sequence[str] | None = None,
) -> CheckResult:
    """The shared pre-reload check, in the mode the settings ask for."""
    changed = list(changed)
    if settings.check == "off":
        return CheckResult(True, "off", started_ns=time.time_ns())
    forget_bytecode(changed)
    compiled = compile_files(changed)
    if not compiled.ok or settings.check == "compile" or not settings.app:
        return compiled
    imported = import_app(settings.app, timeout=settings.check_timeout, cwd=cwd, sys_path=sys_path)
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


def python_executable() -> str:
    """A Python interpreter for the check, even where ``sys.executable`` is a server binary (uWSGI)."""
    exe = sys.executable
    if exe and os.path.basename(exe).startswith("python") and os.access(exe, os.X_OK):
        return exe
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for prefix in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix):
        for name in (version, "python3", "python"):
            candidate = os.path.join(prefix, "bin", name)
            if os.access(candidate, os.X_OK):
                return candidate
    return shutil.which(version) or shutil.which("python3") or "python3"
