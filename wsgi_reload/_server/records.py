"""Module lists handed from the processes that import the code to the one process that watches it.

A writer publishes the files of its ``sys.modules`` (when it began loading them, extra
watch patterns, and whether the app loaded) as a small JSON file in the server's private
runtime directory; a reader turns that directory into a scanner source.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from .._core.files import ModuleFiles, expand
from . import genimport, runtime


class Held(NamedTuple):
    """What a worker holding with the generation under check says of it."""

    generation: int | None
    loaded: bool
    """Its import of the app (and of the URLconf, for Django) succeeded."""
    files: frozenset[str]
    """The files it imported."""


class RecordWriter:
    """Publishes this process's module files to ``directory/<pid>.json``, atomically."""

    def __init__(self, directory: str, loaded_at_ns: int, *, patterns: Iterable[str] = (),
                 app_loaded: Callable[[], bool | None] = lambda: None) -> None:
        self.directory = directory
        self.path = record_path(directory, os.getpid())
        self.loaded_at_ns = loaded_at_ns
        self.patterns = list(patterns)
        self.app_loaded = app_loaded
        self.failure: str | None = None
        """Why the app did not load here (one line), once it did not."""
        self.published_count = -1
        self.files = ModuleFiles()
        self._lock = threading.Lock()  # gthread workers finish requests on several threads

    def publish(self, held: bool | None = None) -> None:
        """Write the record now.

        :param held: this process imported the generation under check and holds before serving
            until its verdict; the record says only whether that import succeeded (True) or
            not, and with which files (:attr:`WorkerRecords.held`). The record written once the
            process may serve replaces it.
        """
        with self._lock:
            self.published_count = len(sys.modules)
            finder = genimport.installed()
            body = {"pid": os.getpid(), "loaded_at_ns": self.loaded_at_ns, "files": sorted(self.files()),
                    "patterns": self.patterns, "app_loaded": self.app_loaded() if held is None else held,
                    "failure": self.failure, "generation": None if finder is None else finder.generation,
                    "unchecked": [] if finder is None else list(finder.unchecked), "held": held is not None}
            runtime.write_record(self.directory, os.path.basename(self.path), body)

    def publish_if_missing(self) -> None:
        """Publish again if the record is gone (the runtime directory was removed and made again)."""
        if self.published_count >= 0 and not os.path.exists(self.path):
            self.publish()

    def publish_if_grown(self) -> None:
        """Publish again when modules were imported since (views load lazily)."""
        if len(sys.modules) != self.published_count:
            self.publish()


class WorkerRecords:
    """A scanner source: the union of the records in a directory, each file with its load time.

    ``accept(pid)`` says which records still count (live workers); a file in several
    records keeps the earliest load time, and so do the files a record's extra patterns
    match. After each call, ``files`` holds that union; after each call or :meth:`refresh`,
    ``live`` the accepted pids, ``loaded`` what each says of its app, ``serving`` the pids whose
    app loaded, and ``app_failed`` every pid whose app did not load.
    """

    def __init__(self, directory: str, accept: Callable[[int], bool] = lambda pid: True) -> None:
        self.directory = directory
        self.accept = accept
        self.live: set[int] = set()
        self.files: dict[str, int | None] = {}
        self.app_failed: set[int] = set()
        self.patterns: set[str] = set()
        """The extra patterns the live records name (template and locale globs)."""
        self.loaded: dict[int, bool | None] = {}
        """Each live pid's ``app_loaded``: True once its app loaded, None while unknown."""
        self.serving: set[int] = set()
        """The live pids whose app loaded: the one meaning of "this worker has loaded"."""
        self.generation_of: dict[int, int | None] = {}
        """The generation each live pid runs (None: it imports from the disk)."""
        self.failures: dict[int, str] = {}
        """Why the app did not load, for each live pid that says so."""
        self.generations: set[int | None] = set()
        """The code generations the live processes run (None: one imports from the disk)."""
        self.unchecked: set[str] = set()
        """Project files a live process imported from the disk before its generation's finder
        came (Django's settings with no gunicorn config): a new worker reads them there too."""
        self.held: dict[int, Held] = {}
        """Workers holding with the generation under check, which they imported. Counted nowhere
        else: they serve nothing yet."""
        self._cache: dict[str, tuple[tuple[int, int, int], Mapping[str, Any]]] = {}
        self._live_records: list[tuple[str, tuple[int, int, int], Mapping[str, Any]]] = []
        self._merged_key: tuple[tuple[str, tuple[int, int, int]], ...] | None = None
        self._named: dict[str, int | None] = {}

    def refresh(self) -> None:
        """Read the directory again: every attribute but ``files``. Cheap enough to poll: a record
        is parsed again only once it was replaced, and the files are not merged."""
        live: set[int] = set()
        loaded: dict[int, bool | None] = {}
        patterns: set[str] = set()
        generations: set[int | None] = set()
        failures: dict[int, str] = {}
        generation_of: dict[int, int | None] = {}
        unchecked: set[str] = set()
        held: dict[int, Held] = {}
        merged: list[tuple[str, tuple[int, int, int], Mapping[str, Any]]] = []
        try:
            names = os.listdir(self.directory)
        except OSError:
            names = []
        seen = set()
        for name in sorted(names):
            if not is_record_name(name):
                continue
            pid = int(name.partition(".")[0])
            if not self.accept(pid):
                continue
            seen.add(name)
            read = self._read(name)
            if read is None:
                continue
            key, record = read
            generation = record.get("generation")
            if record.get("held") is True:
                held[pid] = Held(generation if isinstance(generation, int) else None,
                                 record.get("app_loaded") is True,
                                 frozenset(p for p in record["files"] if isinstance(p, str)))
                continue
            merged.append((name, key, record))
            live.add(pid)
            loaded[pid] = record.get("app_loaded")
            generations.add(generation)
            generation_of[pid] = generation if isinstance(generation, int) else None
            patterns.update(record.get("patterns", ()))
            unchecked.update(p for p in record.get("unchecked", ()) if isinstance(p, str))
            if record.get("app_loaded") is False:
                self.app_failed.add(pid)
                if isinstance(record.get("failure"), str):
                    failures[pid] = record["failure"]
        for gone in self._cache.keys() - seen:
            del self._cache[gone]
        self.live = live
        self.loaded = loaded
        self.serving = {pid for pid, state in loaded.items() if state is True}
        self.failures = failures
        self.generation_of = generation_of
        self.generations = generations
        self.patterns = patterns
        self.unchecked = unchecked
        self.held = held
        self._live_records = merged

    def __call__(self) -> dict[str, int | None]:
        """Read again (:meth:`refresh`) and return ``files``: each file a live record names, or an
        extra pattern of one matches, with the earliest load time among those records."""
        self.refresh()
        key = tuple((name, stat) for name, stat, _ in self._live_records)
        if key != self._merged_key:
            # Only when a record was replaced: a few thousand paths each, and the scanner calls
            # this at every wake of the monitor, a dozen times a reload, mostly with none replaced.
            named: dict[str, int | None] = {}
            for _, _, record in self._live_records:
                loaded_at = record["loaded_at_ns"]
                for path in record["files"]:
                    earlier = named.get(path)
                    named[path] = loaded_at if earlier is None else min(earlier, loaded_at)
            self._merged_key, self._named = key, named
        files = dict(self._named)
        # Template and locale globs, expanded afresh (a file made since is a change too), each
        # once with the earliest load of the records that name it: a file newer than a worker's
        # load is stale there.
        earliest: dict[str, int] = {}
        for _, _, record in self._live_records:
            for pattern in record.get("patterns", ()):
                earliest[pattern] = min(earliest.get(pattern, record["loaded_at_ns"]), record["loaded_at_ns"])
        for pattern, loaded_at in earliest.items():
            for path in expand(pattern)[0]:
                earlier = files.get(path)
                files[path] = loaded_at if earlier is None else min(earlier, loaded_at)
        self.files = files
        return files

    def read(self, pid: int) -> Mapping[str, Any] | None:
        """The record of ``pid``, or None while it has none."""
        read = self._read(f"{pid}.json")
        return None if read is None else read[1]

    def _read(self, name: str) -> tuple[tuple[int, int, int], Mapping[str, Any]] | None:
        try:
            st = os.lstat(os.path.join(self.directory, name))
        except OSError:
            return None
        # Records are replaced by a rename, so each write is a new inode: with it in the key, two
        # writes of one size within one tick of the file system's clock are not taken for one
        # ("app_loaded": null and true are the same length).
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._cache.get(name)
        if cached is not None and cached[0] == key:
            return cached
        record = runtime.read_record(self.directory, name)
        if record is None or not isinstance(record.get("files"), list) \
                or not isinstance(record.get("loaded_at_ns"), int):
            return None
        self._cache[name] = (key, record)
        return key, record


def is_record_name(name: str) -> bool:
    """Whether ``name`` in a runtime directory is a process's record (``<pid>.json``)."""
    stem, _, ext = name.partition(".")
    return ext == "json" and stem.isdigit()


def record_path(directory: str, pid: int) -> str:
    """Where process ``pid`` publishes its record."""
    return os.path.join(directory, f"{pid}.json")
