"""Verified code generations: the exact bytes of the project's files that passed one check.

The watcher reads the changed files once into a new generation; the check imports from
those bytes, and so does every process that loads the app afterwards (new workers of a
swap, a worker that replaces a crashed or killed one, a ``max_requests`` restart), through
:mod:`wsgi_reload._server.genimport`. A save that lands after the check stays on the disk until
the next check passes; a worker never reads it.

The store lives in the server's private runtime directory::

    objects/<sha256>        file contents, content-addressed: a reload copies only what changed
    code/<key>              compiled code objects of those files (see ``genimport.code_key``)
    <id>.json               one generation: its roots, and each file's digest and stat signature
    current                 the id of the newest verified generation
    trial                   the id of a generation under check that new workers load early
                            (see :meth:`Store.offer`)

Project files are the ``.py`` files under the project's directories on ``sys.path``
(not the standard library, not installed packages, not a virtual environment inside the
project), the files in their ``templates`` directories and their compiled ``.mo`` catalogs,
and the files of the patterns the workers name (Django's template and locale globs), less
what the ``exclude`` setting excludes. As in Erlang's code server, two
generations are kept, the running one and the one before it, plus any a live process
still names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from .._core.files import expand, library_dirs
from . import genimport, runtime

log = logging.getLogger("wsgi_reload.generations")

MAX_FILES = 20_000
"""A walk of the project's directories stops after this many ``.py`` files (one log line says so)."""
MAX_WALK_SECONDS = 5.0
SKIP_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "dist-packages"})

Signature = tuple[int, int, int]
"""(st_mtime_ns, st_size, st_ino): when it is unchanged, the bytes in the store are the file's."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """One set of file contents that a check imported."""

    id: int
    roots: tuple[str, ...]
    files: Mapping[str, str]
    """Real path -> SHA-256 digest of its contents in the store."""
    signatures: Mapping[str, Signature]
    changed: tuple[str, ...] = ()
    """The files whose contents differ from the generation this one was built on."""
    complete: bool = True
    """False when a walk hit :data:`MAX_FILES` or the time bound: the rest loads from the disk."""
    built_ns: int = 0
    """When the build began reading the files (``time.time_ns()``)."""

    def to_record(self) -> dict[str, object]:
        return {"id": self.id, "roots": list(self.roots), "files": dict(self.files),
                "signatures": {p: list(s) for p, s in self.signatures.items()},
                "complete": self.complete, "built_ns": self.built_ns}


class Store:
    """The generations of one server, in ``directory`` (created 0700 if it does not exist)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._walked: tuple[Callable[[str], bool], dict[str, Listing]] | None = None
        for sub in ("", genimport.OBJECTS, genimport.CODE):
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(directory, sub), 0o700)

    # Building.

    def build(self, roots: Iterable[str], *, base: Generation | None = None,
              accept: Callable[[str], bool] = lambda path: True, extra: Iterable[str] = (),
              patterns: Iterable[str] = ()) -> Generation:
        """A new generation of the project's files under ``roots`` (plus the ``extra`` ``.py`` files
        and the files ``patterns`` match) as they are on the disk now. Files whose stat signature
        matches ``base`` keep their digest unread; the others are read once and stored."""
        started = time.time_ns()
        roots = tuple(dict.fromkeys(os.path.abspath(r) for r in roots))
        paths, complete = walk(roots, accept, listings=self._listings(accept))
        paths.update(p for p in map(os.path.abspath, extra) if is_project_file(p) and accept(p))
        for pattern in patterns:
            matched, _ = expand(pattern)
            paths.update(p for p in matched if accept(p) and not p.startswith(library_dirs()))
        # One stat per file and no other work for an unchanged one: a rebuild after one edit
        # should cost about what a scan does. (A record's files and signatures share their keys.)
        files: dict[str, str] = dict(base.files) if base is not None else {}
        signatures: dict[str, Signature] = dict(base.signatures) if base is not None else {}
        changed = [p for p in files.keys() - paths]
        for path in changed:
            del files[path], signatures[path]
        stat_of = os.stat
        for path in paths:
            try:
                st = stat_of(path)
                signature = (st.st_mtime_ns, st.st_size, st.st_ino)
                if signatures.get(path) == signature:
                    continue
                digest, signature = self._read(path)
            except OSError:
                if path in files:  # gone since the walk, or unreadable: it loads from the disk, if at all
                    del files[path], signatures[path]
                    changed.append(path)
                continue
            if files.get(path) != digest:
                changed.append(path)
            files[path] = digest
            signatures[path] = signature
        return Generation(self._next_id(base), roots, files, signatures, tuple(sorted(changed)), complete, started)

    def _listings(self, accept: Callable[[str], bool]) -> dict[str, Listing]:
        """The directory listings of this store's last walk, while ``accept`` is the same."""
        if self._walked is None or self._walked[0] is not accept:
            self._walked = (accept, {})
        return self._walked[1]

    def _read(self, path: str) -> tuple[str, Signature]:
        """Store the file's bytes; returns their digest and the signature of what was read."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"{path} is not a regular file")
            data = f.read()
        digest = hashlib.sha256(data).hexdigest()
        if not os.path.exists(os.path.join(self.directory, genimport.OBJECTS, digest)):
            runtime.write_atomic(os.path.join(self.directory, genimport.OBJECTS), digest, data)
        # The signature from fstat of the descriptor we read: a write after the read changes it.
        return digest, (st.st_mtime_ns, st.st_size, st.st_ino)

    def restore(self, generation: Generation) -> list[str]:
        """Write ``generation``'s contents again after the store was removed: a file whose stat
        signature is still the recorded one, and whose bytes still have the recorded digest, is
        read back from the disk. Returns the files that changed since (they need a check).

        The generation is named current again either way: a process that found none would take
        the disk for a first start's code (:func:`adopt`), unchecked. One that imports a file
        whose checked bytes are lost fails, saying why (:func:`genimport.read_object`)."""
        for sub in ("", genimport.OBJECTS, genimport.CODE):
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(self.directory, sub), 0o700)
        lost = []
        for path, digest in generation.files.items():
            try:
                st = os.stat(path)
                if (st.st_mtime_ns, st.st_size, st.st_ino) != generation.signatures.get(path):
                    raise OSError("changed")
                with open(path, "rb") as f:
                    data = f.read()
                if hashlib.sha256(data).hexdigest() != digest:
                    raise OSError("changed")
                runtime.write_atomic(os.path.join(self.directory, genimport.OBJECTS), digest, data)
            except OSError:
                lost.append(path)
        self.publish(generation)
        return lost

    def _next_id(self, base: Generation | None) -> int:
        ids = self.ids()
        return max([*ids, base.id if base is not None else -1]) + 1

    # Publishing and reading.

    def save(self, generation: Generation) -> str:
        """Write the generation's record (a candidate for the check); returns its path."""
        runtime.write_record(self.directory, f"{generation.id}.json", generation.to_record())
        return os.path.join(self.directory, f"{generation.id}.json")

    def publish(self, generation: Generation, keep: Iterable[int] = ()) -> None:
        """Make ``generation`` the newest verified one: what every process loads from now on.
        ``keep`` names generations that live processes still import from."""
        self.save(generation)
        runtime.write_atomic(self.directory, "current", str(generation.id).encode())
        # Only after "current" names it: a worker held on this trial always finds one file naming it.
        self.withdraw(generation.id)
        self.prune(keep={generation.id, *keep})

    def offer(self, generation: Generation) -> None:
        """Name ``generation``, under check, the trial: a worker that starts now imports it and
        holds before serving until the check's verdict (:func:`await_verdict`), so that its
        import runs beside the check instead of after it."""
        self.save(generation)
        runtime.write_atomic(self.directory, "trial", str(generation.id).encode())

    def withdraw(self, generation_id: int | None = None) -> None:
        """End the trial (of ``generation_id`` only, if given): its held workers exit."""
        if generation_id is None or self._read_id("trial") == generation_id:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, "trial"))

    def read(self, generation: Generation, path: str) -> bytes | None:
        """The bytes ``path`` has in ``generation``, or None if it is not one of its files."""
        digest = generation.files.get(path)
        if digest is None:
            return None
        try:
            fd = os.open(os.path.join(self.directory, genimport.OBJECTS, digest),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def current_id(self) -> int | None:
        return self._read_id("current")

    def names_a_current(self) -> bool:
        """Whether a current generation is named here and its record is here (a cleaner may have
        removed either; cheap enough for every turn of the watcher)."""
        current = self.current_id()
        return current is not None and os.path.lexists(os.path.join(self.directory, f"{current}.json"))

    def trial_id(self) -> int | None:
        """The generation under check that new workers load early, if newer than the current one."""
        trial = self._read_id("trial")
        current = self.current_id()
        return trial if trial is not None and (current is None or trial > current) else None

    def _read_id(self, name: str) -> int | None:
        data = runtime.read_bytes(self.directory, name, limit=32)
        text = "" if data is None else data.decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None

    def load(self, generation_id: int) -> Generation | None:
        record = runtime.read_record(self.directory, f"{generation_id}.json")
        if record is None:
            return None
        try:
            return Generation(int(record["id"]), tuple(record["roots"]), dict(record["files"]),
                              {p: (s[0], s[1], s[2]) for p, s in record["signatures"].items()},
                              complete=bool(record.get("complete", True)), built_ns=int(record.get("built_ns", 0)))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return None

    def ids(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def prune(self, keep: Iterable[int] = ()) -> None:
        """Keep the current generation, the one before it and ``keep``; remove the other records
        and every object and compiled code no kept generation names."""
        current = self.current_id()
        verified = [i for i in self.ids() if current is not None and i <= current]
        kept = set(keep) | set(verified[-2:])
        trial = self._read_id("trial")
        if trial is not None:
            kept.add(trial)
        live: set[str] = set()
        for generation_id in self.ids():
            if generation_id in kept:
                generation = self.load(generation_id)
                if generation is not None:
                    live.update(generation.files.values())
                    continue
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.directory, f"{generation_id}.json"))
        if not live:
            return  # nothing loaded: never empty the store on a read error
        for sub in (genimport.OBJECTS, genimport.CODE):
            folder = os.path.join(self.directory, sub)
            with contextlib.suppress(OSError):
                for name in os.listdir(folder):
                    if name.split("-", 1)[0].split(".", 1)[0] not in live:
                        with contextlib.suppress(OSError):
                            os.unlink(os.path.join(folder, name))

    def size(self) -> int:
        """Bytes the store holds on the disk (for the benchmarks)."""
        total = 0
        for folder, _, names in os.walk(self.directory):
            for name in names:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(folder, name)).st_size
        return total

    def install(self, generation: Generation | None = None) -> genimport.GenerationFinder:
        """Import this process's project modules from ``generation`` from now on (None: keep the
        finder's generation, or the disk until it has one); returns the finder."""
        if generation is None:
            return genimport.install(self.directory)
        return genimport.install(self.directory, generation.id, generation.files)


RETRY_SECONDS = 5.0
"""A worker that cannot load a verified generation (a database down at import, say) exits after
this long, or as soon as newer code passes the check, and its server starts another."""

STORE_DIR = "generations"
"""The store's place in the server's runtime directory."""


def store_of(runtime_dir: str) -> Store:
    return Store(os.path.join(runtime_dir, STORE_DIR))


def adopt(runtime_dir: str, cover: str = "", *, trial: bool = False) -> tuple[Store, genimport.GenerationFinder]:
    """In a process about to import the app: import the project's files from the server's
    newest verified generation. At the server's very first start there is none yet: the first
    process to get here reads one from the disk (the others wait for it), and its own import of
    the app is that generation's check.

    :param cover: how to start the server so that our code runs before the app's (said once per
        server, with the project files this process imported before it got here: each new
        process reads those from the disk, unchecked).
    :param trial: import the generation under check instead, if one is offered (see
        :meth:`Store.offer`); the caller then serves only once :func:`await_verdict` says so.
    """
    # gunicorn's config file is the module "__config__" (gunicorn/app/base.py): the master's, not
    # imported again by a worker.
    before = sorted({f for name, m in list(sys.modules.items()) if name != "__config__"
                     and isinstance(f := getattr(m, "__file__", None), str) and is_project_file(f)})
    if before and runtime.first_report(runtime_dir, "read-from-disk"):
        log.warning("wsgi_reload: %d file%s of the project (%s%s) loaded before wsgi_reload, so each new process "
                    "reads %s from the disk, unchecked%s", len(before), "" if len(before) == 1 else "s",
                    ", ".join(before[:3]), ", ..." if len(before) > 3 else "", "it" if len(before) == 1 else "them",
                    f"; {cover}" if cover else "")
    store = store_of(runtime_dir)
    on_trial = None
    lock = os.open(os.path.join(store.directory, "build.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                   0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = store.current_id()
        generation = None if current is None else store.load(current)
        if generation is None:
            modules = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
            generation = store.build(project_roots(), extra=[f for f in modules if isinstance(f, str)])
            store.publish(generation)
        elif trial:
            offered = store.trial_id()
            on_trial = None if offered is None else store.load(offered)
            generation = on_trial or generation
    finally:
        os.close(lock)
    finder = store.install(generation)
    finder.trial = trial and generation is on_trial
    finder.unchecked = tuple(before)
    return store, finder


_paused: set[str] = set()

EMPTYING_GRACE = 0.25
"""How long a runtime directory found emptied in part is left alone before it is made whole: a
removal under way (an ``rm -rf``) finishes first, rather than race the files written back."""


def recover(runtime_dir: str, store: Store, current: Generation | None, kept: Sequence[str] = ()) -> list[str] | None:
    """None while the server's runtime directory is whole: there, with the names in ``kept`` (what
    the watcher keeps in it) and the running generation. If it was removed, or emptied in part (a
    cleaner that deletes old files, as tmpreaper does, leaves a directory that is not empty), make
    it again, restore the running generation into it and say so in one line; returns the files
    that changed since that generation was checked (to check now). If the path was taken by
    something else, says once that reloading is paused, and returns None."""
    gone: list[str] = []
    for attempt in range(2):
        try:
            made = runtime.restore(runtime_dir)
        except runtime.RuntimeDirError as exc:
            if runtime_dir not in _paused:
                _paused.add(runtime_dir)
                log.error("wsgi_reload: reloading is paused: %s", exc)
            return None
        if made:
            break
        gone = [name for name in kept if not os.path.lexists(os.path.join(runtime_dir, name))]
        if current is not None and not store.names_a_current():
            gone.append("the running generation")
        if not gone:
            return None
        if attempt == 0:
            time.sleep(EMPTYING_GRACE)
    what = ("was removed (a temp-file cleaner?); it is made again" if made else
            f"was emptied in part ({', '.join(gone)} gone: a temp-file cleaner?); it is made whole again")
    runtime.hold_against_cleaners(runtime_dir)
    lost = [] if current is None else store.restore(current)
    log.warning("wsgi_reload: the runtime directory %s %s and the running code restored%s", runtime_dir, what,
                f"; {len(lost)} file{'' if len(lost) == 1 else 's'} changed since that code was checked, so "
                f"{'it is' if len(lost) == 1 else 'they are'} checked now" if lost else "")
    return lost


def wait_for_newer(store: Store, newer_than: int | None, timeout: float | None,
                   heartbeat: Callable[[], object] | None = None) -> Generation | None:
    """Wait until a generation newer than ``newer_than`` is published, or ``timeout`` runs out;
    ``heartbeat`` is called meanwhile (a gunicorn worker must tell its master it is alive)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        if heartbeat is not None:
            with contextlib.suppress(Exception):
                heartbeat()
        current = store.current_id()
        if current is not None and (newer_than is None or current > newer_than):
            generation = store.load(current)
            if generation is not None:
                return generation
        time.sleep(0.1)
    return None


def _poll(seconds: float) -> None:
    time.sleep(min(seconds, 0.005))


def await_verdict(store: Store, generation: int | None, timeout: float, *,
                  heartbeat: Callable[[], object] | None = None, alive: Callable[[], bool] = lambda: True,
                  wait: Callable[[float], object] = _poll) -> bool:
    """In a worker that imported ``generation``: True once it is the current generation (it
    passed the check; at once if it already is). False if it stops being the trial without
    becoming current (refused, or the watcher that offered it stopped), if ``timeout`` runs
    out, or once ``alive()`` says the worker is stopping: it must not serve that code.

    :param heartbeat: called meanwhile (a gunicorn worker must tell its master it is alive).
    :param wait: sleeps until the store may have changed, at most the seconds it is given
        (:func:`wsgi_reload._server.launch.wait_for_news`); by default a 5 ms poll.
    """
    deadline = time.monotonic() + timeout
    while True:
        if generation is None or store.current_id() == generation:
            return True
        if store.trial_id() != generation and store.current_id() != generation:
            return False  # the trial is named before current is: read current again after it
        if time.monotonic() > deadline or not alive():
            return False
        if heartbeat is not None:
            with contextlib.suppress(Exception):
                heartbeat()
        wait(0.25)


def is_project_file(path: str) -> bool:
    """A ``.py`` file of the project's own: not the standard library's, an installed package's
    or the interpreter's."""
    return path.endswith(".py") and not os.path.abspath(path).startswith(library_dirs())


def project_roots(sys_path: Iterable[str] | None = None) -> list[str]:
    """The directories on ``sys.path`` that hold the project's own code: not the standard
    library's or an installed package's, not inside the interpreter's prefix (a virtual
    environment's ``bin``), and existing."""
    not_project = library_dirs()
    roots: list[str] = []
    for entry in sys.path if sys_path is None else sys_path:
        path = os.path.abspath(entry or os.getcwd())
        if not (path + os.sep).startswith(not_project) and os.path.isdir(path) and path not in roots:
            roots.append(path)
    return roots


RACY_NS = 2_000_000_000
Listing = tuple[Signature, tuple[str, ...], tuple[str, ...]]
"""A directory's stat signature, the files of it a walk keeps, and the subdirectories it enters."""


def walk(roots: Iterable[str], accept: Callable[[str], bool] = lambda path: True,
         max_files: int = MAX_FILES, max_seconds: float = MAX_WALK_SECONDS,
         listings: dict[str, Listing] | None = None) -> tuple[set[str], bool]:
    """Every ``.py`` and ``.mo`` file under ``roots`` and every file in a ``templates`` directory
    there, skipping hidden directories, ``__pycache__``, installed packages and virtual
    environments; bounded by count and time. Returns (files, complete).

    ``listings`` caches each directory's listing under its stat signature: adding, removing or
    renaming an entry changes a directory's mtime, so an unchanged directory costs one ``stat``
    instead of a listing (a rebuild after one edit is then about one stat per file, as a scan is).
    """
    roots = tuple(roots)
    found: set[str] = set()
    deadline = time.monotonic() + max_seconds
    libraries = library_dirs()
    cache: dict[str, Listing] = {} if listings is None else listings
    pending = list(reversed(roots))
    while pending:
        directory = pending.pop()
        try:
            st = os.stat(directory)
        except OSError:
            continue
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        listing = cache.get(directory)
        if listing is None or listing[0] != signature:
            listing = _list(directory, signature, accept, libraries)
            # A directory changed within the mtime granularity of some file systems could change
            # again without a new mtime (git's "racy clean" problem): list it again next time.
            if time.time_ns() - st.st_mtime_ns > RACY_NS:
                cache[directory] = listing
        found.update(listing[1])
        pending.extend(reversed(listing[2]))
        if len(found) >= max_files or time.monotonic() > deadline:
            log.warning("wsgi_reload: the project's directories (%s) hold more than %d Python files or took "
                        "longer than %g s to list; files beyond that load from the disk, unchecked. Run the "
                        "server from the project's own directory", ", ".join(roots), max_files, max_seconds)
            return found, False
    return found, True


def _list(directory: str, signature: Signature, accept: Callable[[str], bool],
          libraries: tuple[str, ...]) -> Listing:
    files: list[str] = []
    subdirs: list[str] = []
    templates = f"{os.sep}templates{os.sep}" in directory + os.sep
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return signature, (), ()
    for entry in entries:
        try:
            is_dir = entry.is_dir(follow_symlinks=False)  # as os.walk: a symlink loop ends nowhere
        except OSError:
            continue
        if is_dir:
            if not entry.name.startswith(".") and entry.name not in SKIP_DIRS \
                    and not (entry.path + os.sep).startswith(libraries) \
                    and not os.path.exists(os.path.join(entry.path, "pyvenv.cfg")):
                subdirs.append(entry.path)
        elif (entry.name.endswith((".py", ".mo")) or templates) and accept(entry.path):
            files.append(entry.path)
    return signature, tuple(files), tuple(sorted(subdirs))
