"""Django templates from the verified generation, not from the disk.

A worker reads a template from the disk the first time it renders it (the cached loader
keeps it after that), which can be long after the check. Django's filesystem loader, and
the app-directories loader built on it, read a template through ``get_contents(origin)``;
wrapped here, a template that belongs to this process's generation comes from the bytes
that passed the check. Anything else (a template outside the project, a process with no
generation) is read as Django reads it.
"""

from __future__ import annotations

import os
from typing import Any

from .. import _genimport


def serve_from_generation() -> None:
    """Wrap the filesystem loader's ``get_contents`` once per process."""
    from django.template.loaders import filesystem

    loader: Any = filesystem.Loader
    if getattr(loader.get_contents, "_wsgi_reload", False):
        return
    read_from_disk = loader.get_contents

    def get_contents(self: Any, origin: Any) -> str:
        finder = _genimport.installed()
        digest = None if finder is None else finder.files.get(os.path.abspath(str(origin.name)))
        if finder is None or digest is None:
            return str(read_from_disk(self, origin))
        return _genimport.read_object(finder.store, digest).decode(self.engine.file_charset)

    get_contents._wsgi_reload = True  # type: ignore[attr-defined]
    loader.get_contents = get_contents
