"""Imports a project's modules from one verified generation instead of from the disk.

A worker reads the disk whenever it imports lazily, and a respawned worker reads it all
again: both long after any check. Installed first on ``sys.meta_path``, the finder here
serves every project file that belongs to the generation from the bytes that passed the
check (``objects/<sha256>`` in the store), whatever is on disk by then. ``__file__`` stays
the real path, and tracebacks, ``linecache`` and ``inspect.getsource`` show the
generation's lines.

This file imports only the standard library: the check's probe loads it by path, without
importing ``wsgi_reload``.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import linecache
import marshal
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from types import CodeType, ModuleType
from typing import Any

OBJECTS = "objects"
"""Content-addressed file contents, one file per SHA-256 digest."""
CODE = "code"
"""Compiled code objects, keyed by digest, path and interpreter (``<digest>-<path hash>.<cache tag>``)."""


def code_key(digest: str, path: str) -> str:
    """The cache name of the code compiled from ``digest`` at ``path`` by this interpreter.

    The path is part of the key because a code object records its file name, and identical
    files (every empty ``__init__.py``) share one digest.
    """
    where = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
    return f"{digest}-{where}.{sys.implementation.cache_tag}"


def _read(path: str) -> bytes:
    """The whole file, never through a symlink; no file object (this runs once per import)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        chunks = [os.read(fd, max(size, 1))]
        while chunks[-1]:
            chunks.append(os.read(fd, 65536))
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_object(store: str, digest: str, path: str) -> bytes:
    """The checked bytes of ``path``: from the store or, where a cleaner removed them there (the
    watcher restores them), from the disk if they are still the very same bytes there."""
    try:
        return _read(os.path.join(store, OBJECTS, digest))
    except FileNotFoundError:
        with open(path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != digest:
            raise FileNotFoundError(f"the checked bytes of {path} are gone from the runtime directory (a temp-file "
                                    "cleaner?) and the file has changed since; the watcher restores them") from None
        return data


class GenerationFinder(importlib.abc.MetaPathFinder):
    """Finds modules as the interpreter does, then loads project files from the generation.

    ``files`` maps each real path of the generation to its digest. Resolution is the
    ordinary ``PathFinder`` lookup, so ``sys.path`` order, packages and namespace packages
    behave as usual; only the bytes of a file in the generation come from the store. A
    file that is in the generation but gone from the disk still imports.
    """

    def __init__(self, store: str, generation: int | None = None, files: Mapping[str, str] | None = None) -> None:
        self.store = store
        self._state: tuple[int | None, Mapping[str, str]] = (generation, dict(files or {}))
        self.unchecked: tuple[str, ...] = ()
        """Project files this process had imported from the disk before the finder came."""
        self.trial = False
        """The generation was under check when this process took it (the store's trial): the
        process serves it only once the check passed (:func:`generations.await_verdict`)."""

    @property
    def generation(self) -> int | None:
        """The id of the generation this process imports from (None: none yet, the disk)."""
        return self._state[0]

    @property
    def files(self) -> Mapping[str, str]:
        return self._state[1]

    def set(self, generation: int, files: Mapping[str, str]) -> None:
        """Import from another generation from now on. One assignment: a process forked at any
        instant inherits one whole generation."""
        self._state = (generation, dict(files))

    def find_spec(self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> Any:
        files = self._state[1]
        if not files:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        origin = spec.origin if spec is not None else None
        if origin is not None and not os.path.isabs(origin):
            origin = os.path.abspath(origin)
        if spec is not None and origin is not None and origin in files:
            # The ordinary spec, with a loader that reads the generation's bytes.
            spec.loader = GenerationLoader(name, origin, self.store, files[origin])
            spec.origin = origin
            spec.cached = None  # nothing is read from or written to __pycache__
            return spec
        if spec is None:
            # Deleted from the disk after the check: the generation still has it.
            for candidate in self._candidates(name, path):
                if candidate in files:
                    return self._spec(name, candidate, files[candidate])
        return spec  # not a project file of the generation: the ordinary spec, found once

    def _candidates(self, name: str, path: Sequence[str] | None) -> Iterator[str]:
        leaf = name.rpartition(".")[2]
        for entry in sys.path if path is None else path:
            base = os.path.join(os.path.abspath(entry or os.getcwd()), leaf)
            yield os.path.join(base, "__init__.py")
            yield base + ".py"

    def _spec(self, name: str, origin: str, digest: str) -> importlib.machinery.ModuleSpec:
        loader = GenerationLoader(name, origin, self.store, digest)
        package = os.path.basename(origin) == "__init__.py"
        spec = importlib.util.spec_from_file_location(
            name, origin, loader=loader, submodule_search_locations=[os.path.dirname(origin)] if package else None)
        assert spec is not None
        spec.cached = None  # nothing is read from or written to __pycache__
        return spec

    def invalidate_caches(self) -> None:
        importlib.machinery.PathFinder.invalidate_caches()


class GenerationLoader(importlib.machinery.SourceFileLoader):
    """Loads one file of the generation: its checked bytes, compiled once per interpreter."""

    def __init__(self, fullname: str, path: str, store: str, digest: str) -> None:
        super().__init__(fullname, path)
        self.store = store
        self.digest = digest

    def get_data(self, path: str) -> bytes:
        if path == self.path:
            return read_object(self.store, self.digest, self.path)
        return super().get_data(path)  # a package's data files come from the disk

    def path_stats(self, path: str) -> Mapping[str, Any]:
        raise OSError("a generation file has no bytecode cache on the disk")

    def get_code(self, fullname: str) -> CodeType:
        cache = os.path.join(self.store, CODE, code_key(self.digest, self.path))
        magic = importlib.util.MAGIC_NUMBER
        try:
            data = _read(cache)
            if data[:len(magic)] == magic:
                code = marshal.loads(data[len(magic):])
                if isinstance(code, CodeType):
                    return code
        except (OSError, ValueError, EOFError, TypeError):
            pass
        code = compile(self.get_data(self.path), self.path, "exec", dont_inherit=True)
        _write_cache(cache, magic + marshal.dumps(code))
        return code

    def exec_module(self, module: ModuleType) -> None:
        # Tracebacks read source lines through linecache, which prefers the disk whenever the
        # file exists there; an entry with no mtime is never re-read from the disk.
        linecache.cache[self.path] = _GenerationLines(self.store, self.digest, self.path)  # type: ignore[assignment]
        super().exec_module(module)


class _GenerationLines:
    """A ``linecache`` entry ``(size, mtime, lines, path)`` whose lines are read on first use.

    ``linecache.checkcache`` unpacks it and skips it (its mtime is None); ``getlines`` takes
    item 2. Reading lazily keeps every worker from holding the whole source in memory.
    """

    __slots__ = ("store", "digest", "path", "_lines")

    def __init__(self, store: str, digest: str, path: str) -> None:
        self.store = store
        self.digest = digest
        self.path = path
        self._lines: list[str] | None = None

    def lines(self) -> list[str]:
        if self._lines is None:
            try:
                text = importlib.util.decode_source(read_object(self.store, self.digest, self.path))
            except (OSError, SyntaxError, UnicodeDecodeError):
                text = ""
            self._lines = text.splitlines(keepends=True)
            if self._lines and not self._lines[-1].endswith("\n"):
                self._lines[-1] += "\n"
        return self._lines

    def __len__(self) -> int:
        return 4

    def __iter__(self) -> Iterator[object]:
        return iter((0, None, self.lines(), self.path))

    def __getitem__(self, index: int) -> object:
        return (0, None, None, self.path)[index] if index != 2 else self.lines()


def _write_cache(path: str, data: bytes) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except OSError:  # a read-only or full store only costs a compile next time
        try:
            os.unlink(temporary)
        except OSError:
            pass


def install(store: str, generation: int | None = None, files: Mapping[str, str] | None = None) -> GenerationFinder:
    """The finder of this process, first on ``sys.meta_path``, set to this generation (if given)."""
    finder = installed()
    if finder is None or finder.store != store:
        uninstall()
        finder = GenerationFinder(store)
        sys.meta_path.insert(0, finder)
    if generation is not None:
        finder.set(generation, files or {})
    return finder


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, GenerationFinder)]


def installed() -> GenerationFinder | None:
    """The finder of this process's generation, if it has one."""
    return next((f for f in sys.meta_path if isinstance(f, GenerationFinder)), None)
