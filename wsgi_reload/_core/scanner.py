"""The change scanner: stats the watched files and says which ones changed since the last scan.

It knows nothing of servers. A file counts as changed when its ``st_mtime_ns``, size or
inode differ from the last scan, so same-second edits, mtimes that go backwards and
atomic-rename saves all count; so do deleted files and new files under a watched glob.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

from .files import ModuleFiles, PathFilter, expand, failed_imports, pattern_dirs
from .settings import Settings

log = logging.getLogger("wsgi_reload.scanner")

Signature = tuple[int, int, int]
"""(st_mtime_ns, st_size, st_ino) of a file."""

ChangeKind = Literal["modified", "created", "deleted"]

Source = Callable[[], Mapping[str, int | None] | Iterable[str]]
"""A callable giving paths to watch; a mapping may give each path the time (ns) its content was loaded."""

_GLOB = -1  # hint for a file found by a glob or directory pattern
_MISSING = (FileNotFoundError, NotADirectoryError)
_UNSEEN = (-2, -2, -2)  # not in the baseline yet


@dataclasses.dataclass(frozen=True, order=True)
class Change:
    """One file that changed, and how."""

    path: str
    kind: ChangeKind

    def __str__(self) -> str:
        return self.path if self.kind == "modified" else f"{self.path} ({self.kind})"


class Scanner:
    """Watches module sources, extra files and globs, and files that failed to import.

    ``scan()`` returns the changes since the previous scan. The first scan records a
    baseline; a file first seen later is compared with the time its content was loaded
    (when a source gives one), so an edit made just after an import is not lost.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        watch_modules: bool = True,
        modules: Mapping[str, object] | None = None,
        sources: Iterable[Source] = (),
        modules_loaded_at_ns: int | None = None,  # also applies to extra files and glob matches
        base_dir: str | None = None,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        self._base_dir = os.getcwd() if base_dir is None else base_dir
        self._filter = PathFilter(self.settings.include, self.settings.exclude, base=self._base_dir)
        self._module_files = ModuleFiles(modules) if watch_modules else None
        self._modules_loaded_at = modules_loaded_at_ns
        self._sources = list(sources)
        self._baseline: dict[str, Signature | None] = {}
        self._scanned = False
        self._unstatable: set[str] = set()
        self._lock = threading.Lock()
        self._module_entries: tuple[frozenset[str], dict[str, int | None]] | None = None

    def watched_files(self) -> dict[str, int | None]:
        """Every watched path, with the time its content was loaded when known (-1 for glob matches)."""
        accept = self._filter
        entries: dict[str, int | None] = {}
        if self._module_files is not None:
            files = self._module_files()
            cached = self._module_entries
            if cached is None or cached[0] is not files:
                loaded_at = self._modules_loaded_at
                cached = self._module_entries = (files, {path: loaded_at for path in files if accept(path)})
            entries.update(cached[1])
        for source in self._sources:
            found = source()
            if isinstance(found, Mapping):
                for path, hint in found.items():
                    if path not in entries and accept(path):
                        entries[path] = hint
            else:
                for path in found:
                    if path not in entries and accept(path):
                        entries[path] = None
        for pattern in self.settings.extra_files:
            paths, grows = expand(pattern, self._base_dir)
            if grows:
                for path in paths:
                    if accept(path):
                        entries.setdefault(path, _GLOB)
            else:  # a file the user named is watched whatever the excludes say
                for path in paths:
                    entries.setdefault(path, self._modules_loaded_at)
        for path, read_at in failed_imports().items():
            entries[path] = read_at
        return entries

    def growing_dirs(self) -> set[str]:
        """Directories where a watched glob or directory can gain a file, new subdirectories
        included: an event watcher must hear about a file created there."""
        patterns = list(self.settings.extra_files)
        for source in self._sources:
            patterns.extend(getattr(source, "patterns", ()))
        dirs: set[str] = set()
        for pattern in patterns:
            dirs |= pattern_dirs(pattern, self._base_dir)
        return dirs

    def scan(self) -> list[Change]:
        """Stat every watched file; return what changed since the last scan, sorted by path."""
        with self._lock:
            entries = self.watched_files()
            baseline = self._baseline
            first = not self._scanned
            changes: list[Change] = []
            stat = os.stat
            missing = _MISSING
            for path, hint in entries.items():
                # The hot loop: one stat and one comparison per file, no calls besides.
                try:
                    st = stat(path)
                    sig: Signature | None = (st.st_mtime_ns, st.st_size, st.st_ino)
                except missing:
                    sig = None
                except (OSError, ValueError) as exc:
                    self._cannot_stat(path, exc)
                    continue
                old = baseline.get(path, _UNSEEN)
                if old == sig:
                    continue
                if old is not _UNSEEN:
                    baseline[path] = sig
                    changes.append(Change(path, _kind(old, sig)))
                    continue
                if self._unstatable:
                    self._unstatable.discard(path)
                baseline[path] = sig
                if sig is None:
                    continue
                if hint == _GLOB:
                    if not first:
                        changes.append(Change(path, "created"))
                    elif self._modules_loaded_at is not None and sig[0] > self._modules_loaded_at:
                        # Saved after this process started: a template edited during a reload.
                        changes.append(Change(path, "modified"))
                elif hint is not None and sig[0] > hint:
                    # Changed after the process loaded it: the running code is stale.
                    changes.append(Change(path, "modified"))
            # Every entry is in the baseline now, so a larger baseline holds files no longer watched.
            if len(baseline) > len(entries):
                changes.extend(self._forget_unwatched(entries))
            self._scanned = True
            changes.sort()
            return changes

    def _forget_unwatched(self, entries: Mapping[str, object]) -> list[Change]:
        """Drop files no longer watched; one that vanished from a glob was deleted."""
        deleted = []
        for path in [p for p in self._baseline if p not in entries]:
            old = self._baseline.pop(path)
            if old is not None and not os.path.exists(path):
                deleted.append(Change(path, "deleted"))
        return deleted

    def _cannot_stat(self, path: str, exc: BaseException) -> None:
        if path not in self._unstatable:
            self._unstatable.add(path)
            log.warning("wsgi_reload: cannot stat %s (%s); not watching it until it can be read", path, exc)


def _kind(old: Signature | None, new: Signature | None) -> ChangeKind:
    if new is None:
        return "deleted"
    if old is None:
        return "created"
    return "modified"


_default_scanner: Scanner | None = None
_default_lock = threading.Lock()


def code_changed() -> bool:
    """The classic CherryPy/Django contract over ``sys.modules`` and ``WSGI_RELOAD_EXTRA_FILES``.

    The first call records a baseline and returns False; each later call returns True when
    any watched file changed since the previous call.
    """
    global _default_scanner
    with _default_lock:
        if _default_scanner is None:
            _default_scanner = Scanner(Settings.load())
            _default_scanner.scan()
            return False
    return bool(_default_scanner.scan())
