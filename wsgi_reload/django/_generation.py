"""Django's templates and translation catalogs from the verified generation, not from the disk.

A worker reads a template from the disk the first time it renders it (the cached loader
keeps it after that), and a catalog the first time it activates a language: both can be long
after the check. Here a file that belongs to this process's generation comes from the bytes
that passed the check instead; anything else (a file outside the project, a process with no
generation) is read as Django reads it.

- Templates: Django's filesystem loader, and the app-directories loader built on it, read a
  template through ``Loader.get_contents(origin)``, which is wrapped.
- Catalogs: ``gettext.translation()``, which Django calls for each locale directory, opens a
  ``.mo`` file with the ``open`` it finds in the ``gettext`` module's globals; a module-level
  ``open`` there answers generation files from the store.
"""

from __future__ import annotations

import builtins
import gettext
import io
import os
from typing import IO, Any

from .._server import genimport


def serve_from_generation() -> None:
    """Wrap the filesystem template loader and gettext's catalog reads, once per process."""
    from django.template.loaders import filesystem

    loader: Any = filesystem.Loader
    if getattr(loader.get_contents, "_wsgi_reload", False):
        return
    read_from_disk = loader.get_contents

    def get_contents(self: Any, origin: Any) -> str:
        data = _generation_bytes(str(origin.name))
        if data is None:
            return str(read_from_disk(self, origin))
        return data.decode(self.engine.file_charset)

    get_contents._wsgi_reload = True  # type: ignore[attr-defined]
    loader.get_contents = get_contents
    gettext.open = _open_catalog  # type: ignore[attr-defined]


def _open_catalog(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> IO[Any]:
    if mode == "rb" and isinstance(file, str) and file.endswith(".mo"):
        data = _generation_bytes(file)
        if data is not None:
            return io.BytesIO(data)
    return builtins.open(file, mode, *args, **kwargs)


def _generation_bytes(path: str) -> bytes | None:
    finder = genimport.installed()
    digest = None if finder is None else finder.files.get(os.path.abspath(path))
    if finder is None or digest is None:
        return None
    return genimport.read_object(finder.store, digest, os.path.abspath(path))
