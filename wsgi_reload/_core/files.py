"""Which files hold the running code: module sources, user globs, and files that failed to import.

Nothing here stats a file for changes; that is :mod:`wsgi_reload._core.scanner`'s job.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import importlib.util
import logging
import os
import site
import sys
import sysconfig
import threading
import time
import traceback
import weakref
import zipimport
from collections.abc import Iterable, Mapping
from types import ModuleType

GLOB_CHARS = frozenset("*?[")

VIRTUAL_DIRS = ("/proc/", "/sys/", "/dev/")
"""Kernel file systems: never code, and their files change all the time."""

DEFAULT_EXCLUDE_NAMES = ("*.swp", "*.swo", "*.swx", "*~", ".#*", "#*#", "4913", "*.tmp")
"""Editor swap, backup and lock files (4913 is the file vim writes to probe a directory)."""


def module_file(module: object) -> str | None:
    """The source file behind a module, or None when it has none worth watching.

    ``.pyc`` maps to its ``.py``; a zip import maps to the archive; weakref proxies,
    built-in and frozen modules, and paths with NUL bytes give None.
    """
    if isinstance(module, weakref.ProxyTypes) or not isinstance(module, ModuleType):
        return None
    spec = getattr(module, "__spec__", None)
    path: object = None
    if spec is not None and getattr(spec, "has_location", False):
        loader = getattr(spec, "loader", None)
        path = loader.archive if isinstance(loader, zipimport.zipimporter) else spec.origin
    if path is None:
        # __main__ and modules loaded by hand have no spec with a location.
        path = getattr(module, "__file__", None)
    if not isinstance(path, str) or not path or "\0" in path:
        return None
    if path.endswith((".pyc", ".pyo")):
        path = _source_for_bytecode(path)
    return os.path.abspath(path)


def _source_for_bytecode(path: str) -> str:
    try:
        source = importlib.util.source_from_cache(path)
    except ValueError:
        source = path[:-1]  # a legacy foo.pyc beside foo.py
    return source if os.path.exists(source) else path


class ModuleFiles:
    """The files of ``sys.modules``, remembered per module object so a rescan costs one dict lookup each."""

    def __init__(self, modules: Mapping[str, object] | None = None) -> None:
        self._modules = sys.modules if modules is None else modules
        self._known: dict[str, tuple[object, str | None]] = {}
        self._last: tuple[dict[str, object], frozenset[str]] | None = None

    def __call__(self) -> frozenset[str]:
        """The files; the very same object as last time when no module came, went or was replaced
        (callers can cache what they derive from it)."""
        # Another thread may import while we look: work on a copy of the dict.
        snapshot = dict(self._modules)
        if self._last is not None and self._same(self._last[0], snapshot):
            return self._last[1]
        known = self._known
        files: set[str] = set()
        for name, module in snapshot.items():
            entry = known.get(name)
            if entry is None or entry[0] is not module:
                entry = (module, module_file(module))
                known[name] = entry
            if entry[1] is not None:
                files.add(entry[1])
        if len(known) > len(snapshot):
            for gone in known.keys() - snapshot.keys():
                del known[gone]
        self._last = (snapshot, frozenset(files))
        return self._last[1]

    @staticmethod
    def _same(before: dict[str, object], now: dict[str, object]) -> bool:
        # C-speed: an unchanged entry is the same object, which == takes at once; a replaced
        # entry is compared with its own __eq__, which an odd module object may make raise.
        try:
            return before == now
        except Exception:
            return False


def _stdlib_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {os.path.abspath(paths[key]) for key in ("stdlib", "platstdlib") if key in paths}
    return tuple(sorted(dirs))


def _site_dirs() -> tuple[str, ...]:
    dirs = set()
    paths = sysconfig.get_paths()
    for key in ("purelib", "platlib"):
        if key in paths:
            dirs.add(os.path.abspath(paths[key]))
    try:
        dirs.update(os.path.abspath(p) for p in site.getsitepackages())
    except AttributeError:  # old virtualenv's site.py
        pass
    user_site = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if user_site:
        dirs.add(os.path.abspath(user_site))
    return tuple(sorted(dirs))


@functools.cache  # the interpreter's layout does not change while it runs
def library_dirs() -> tuple[str, ...]:
    """What is not the project's own code, each directory ending in a separator (for
    ``str.startswith``): the standard library, the installed packages (the user's site-packages
    too), the interpreter's ``bin`` directories (a console script's directory is first on its
    ``sys.path``), and this library itself (installed in editable mode it lies outside
    site-packages). The one definition: the watcher, the generations and the check interpreter
    all use it."""
    bins = {os.path.join(p, "bin") for p in (sys.prefix, sys.exec_prefix, sys.base_prefix)}
    dirs = (*_stdlib_dirs(), *_site_dirs(), *sorted(bins), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return tuple(sorted({d.rstrip(os.sep) + os.sep for d in dirs}))


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip(os.sep) + os.sep)


class PathFilter:
    """Decides whether a path is watched: an include always wins, then the excludes.

    A pattern with ``*``, ``?`` or ``[`` is a glob matched against the whole path (or,
    without a slash, the file name); anything else is a path prefix.
    """

    def __init__(self, include: Iterable[str] = (), exclude: Iterable[str] = (), *, base: str | None = None) -> None:
        base = os.getcwd() if base is None else base
        self._include = [_absolute_pattern(p, base) for p in include]
        self._exclude = [_absolute_pattern(p, base) for p in exclude]
        self._stdlib = _stdlib_dirs()
        self._site = _site_dirs()
        self._cache: dict[str, bool] = {}

    def __call__(self, path: str) -> bool:
        verdict = self._cache.get(path)
        if verdict is None:
            verdict = self._decide(path)
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[path] = verdict
        return verdict

    def _decide(self, path: str) -> bool:
        if any(_matches(path, p) for p in self._include):
            return True
        if any(_matches(path, p) for p in self._exclude):
            return False
        name = os.path.basename(path)
        if path.startswith(VIRTUAL_DIRS):
            return False
        if "__pycache__" in path.split(os.sep) or any(fnmatch.fnmatch(name, p) for p in DEFAULT_EXCLUDE_NAMES):
            return False
        in_stdlib = any(_under(path, d) for d in self._stdlib)
        return not in_stdlib or any(_under(path, d) for d in self._site)


def _absolute_pattern(pattern: str, base: str) -> str:
    pattern = os.path.expanduser(pattern)
    if os.sep not in pattern and GLOB_CHARS & set(pattern):
        return pattern  # a bare name glob such as "*.log"
    return os.path.normpath(os.path.join(base, pattern))


def _matches(path: str, pattern: str) -> bool:
    if GLOB_CHARS & set(pattern):
        target = path if os.sep in pattern else os.path.basename(path)
        return fnmatch.fnmatch(target, pattern)
    return _under(path, pattern)


def is_glob(pattern: str) -> bool:
    """True when the pattern has glob characters."""
    return bool(GLOB_CHARS & set(pattern))


MAX_PATTERN_FILES = 20_000
"""A glob or directory of ``extra_files`` is cut at this many files..."""
MAX_PATTERN_SECONDS = 2.0
"""...or after this long, with one warning: a pattern such as ``/**/*`` must never hang a server."""
_cut_reported: set[str] = set()


def expand(pattern: str, base: str | None = None) -> tuple[set[str], bool]:
    """The files a user pattern names now, and whether it can gain files (a glob or a directory).

    A plain file is returned even when it does not exist yet, so it is watched for appearing.
    A glob or directory is expanded to at most :data:`MAX_PATTERN_FILES` files and for at most
    :data:`MAX_PATTERN_SECONDS`; the first time a pattern is cut, one warning says so.
    """
    path = os.path.join(os.getcwd() if base is None else base, os.path.expanduser(pattern))
    if is_glob(pattern):
        return _bounded(pattern, glob.iglob(path, recursive=True)), True
    if os.path.isdir(path):
        return _bounded(pattern, glob.iglob(os.path.join(glob.escape(path), "**", "*"), recursive=True)), True
    return {os.path.abspath(path)}, False


def _bounded(pattern: str, matches: Iterable[str]) -> set[str]:
    found: set[str] = set()
    deadline = time.monotonic() + MAX_PATTERN_SECONDS
    for match in matches:
        match = os.path.abspath(match)
        if not match.startswith(VIRTUAL_DIRS) and not os.path.isdir(match):
            found.add(match)
        if len(found) >= MAX_PATTERN_FILES or time.monotonic() > deadline:
            if pattern not in _cut_reported:
                _cut_reported.add(pattern)
                logging.getLogger("wsgi_reload.files").warning(
                    "wsgi_reload: the extra_files pattern %r matches more than %d files or takes longer than %g s to "
                    "list; watching the first %d. Name the project's own directories or globs instead",
                    pattern, MAX_PATTERN_FILES, MAX_PATTERN_SECONDS, len(found))
            break
    return found


def pattern_dirs(pattern: str, base: str | None = None, limit: int = 4096) -> set[str]:
    """The directories a glob or directory pattern can gain files in: its fixed root and every
    directory below it (hidden ones and ``__pycache__`` aside), at most ``limit`` of them; none
    for a plain file."""
    path = os.path.join(os.getcwd() if base is None else base, os.path.expanduser(pattern))
    if is_glob(pattern):
        parts = path.split(os.sep)
        fixed = next(i for i, part in enumerate(parts) if GLOB_CHARS & set(part))
        root = os.sep.join(parts[:fixed]) or os.sep
        if "**" not in pattern:
            return {root} if os.path.isdir(root) else set()
    elif os.path.isdir(path):
        root = path
    else:
        return set()
    found: set[str] = set()
    for directory, subdirs, _ in os.walk(root):
        found.add(os.path.abspath(directory))
        if len(found) >= limit:
            break
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d != "__pycache__"]
    return found


def error_location(exc: BaseException) -> tuple[str | None, int | None]:
    """The file and line an exception points at: a SyntaxError's own, else the last frame's."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return os.path.abspath(exc.filename), exc.lineno
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if frame.filename and not frame.filename.startswith("<"):
            return os.path.abspath(frame.filename), frame.lineno
    return None, None


def describe_error(exc: BaseException) -> str:
    """``file:line: Kind: message`` for one log line. An error the check's probe raised itself
    (a ``kind`` and its own ``file``, such as "NotReady") names its own kind and place."""
    kind = getattr(exc, "kind", None)
    if isinstance(kind, str):
        path, line = getattr(exc, "file", None), getattr(exc, "line", None)
    else:
        kind = type(exc).__name__
        path, line = error_location(exc)
    where = f"{path}:{line}: " if path and line else f"{path}: " if path else ""
    return f"{where}{kind}: {exc}"


class FailedImports:
    """Files whose import failed: they are not in ``sys.modules`` but a fix to them must count.

    Each file keeps the time its broken content was read, so a fix saved between that read
    and the next scan still counts as a change.
    """

    def __init__(self) -> None:
        self._files: dict[str, int] = {}
        self._lock = threading.Lock()

    def record(self, exc_or_path: BaseException | str, read_at_ns: int | None = None) -> str | None:
        """Remember the file an import error points at (or a path); returns that file."""
        if isinstance(exc_or_path, BaseException):
            path, _ = error_location(exc_or_path)
        else:
            path = os.path.abspath(exc_or_path)
        if path:
            with self._lock:
                self._files[path] = time.time_ns() if read_at_ns is None else read_at_ns
        return path

    def clear(self) -> None:
        """Forget them all, for example once the code loads again."""
        with self._lock:
            self._files.clear()

    def __call__(self) -> dict[str, int]:
        with self._lock:
            return dict(self._files)


failed_imports = FailedImports()
"""The process-wide record of files that failed to import; every scanner watches it."""
