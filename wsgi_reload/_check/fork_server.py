"""A warm check process: imports the installed packages the app uses once, then forks a probe per check.

:mod:`wsgi_reload._check.warm` runs this file's source with ``python -I -B -c``; like ``probe.py``
it must not import ``wsgi_reload``. Its payload (JSON on standard input) names the
directory, ``sys.path``, the library directories, the modules to import first, the
probe's source and the generation finder's file. While the modules load, importing any file
of the project's own raises ImportError, so no project code (a settings module a package
reads at import, say) is ever cached here: each check's child imports the project afresh,
exactly as a cold check would. Then it runs the probe's source once (its imports and
definitions, and the finder), and each check's child calls the probe's ``main()``.

Over the socket on fd 3 (SOCK_SEQPACKET) it answers ``{"ready": ...}`` once, then for each
request carrying three descriptors (payload, records, stderr) forks a child that leads its
own session and runs the probe with them as fds 0, 3 and 2; it sends ``{"pid": ...}`` at
once and ``{"status": ...}`` when the child exits. End of file on the socket ends it.
"""

from __future__ import annotations

import gc
import importlib
import importlib.abc
import json
import os
import socket
import sys
import threading
from typing import Any

CONTROL_FD = 3


class _NoProjectCode(importlib.abc.MetaPathFinder):
    """While preloading: refuse every module whose file is not under ``library_dirs`` (the
    standard library's and the installed packages', as the watcher reckons them), and count
    the refusals."""

    refused = 0

    def __init__(self, library_dirs: tuple[str, ...]) -> None:
        self.library_dirs = library_dirs

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is None:
                continue
            origin = spec.origin if spec.has_location else None
            if origin and not os.path.abspath(origin).startswith(self.library_dirs):
                self.refused += 1
                raise ImportError(f"{name} is project code, not preloaded")
            return spec
        return None


def preload(names: list[str], library_dirs: tuple[str, ...]) -> None:
    """Import ``names``; a package that fails here, or that reached for project code (and may
    have cached its absence, as ``try: import local_settings`` does), is forgotten with all it
    imported, so each check's child imports it afresh, as the workers did."""
    blocker = _NoProjectCode(library_dirs)
    sys.meta_path.insert(0, blocker)
    try:
        for name in names:
            before, refused = set(sys.modules), blocker.refused
            try:
                importlib.import_module(name)
                clean = blocker.refused == refused
            except BaseException:
                clean = False
            if not clean:
                for added in set(sys.modules) - before:
                    del sys.modules[added]
    finally:
        sys.meta_path.remove(blocker)
    gc.collect()
    gc.freeze()  # the children's garbage collector then leaves these objects (and their pages) alone


def load_probe(source: str, finder: str | None) -> dict[str, Any]:
    """Run the probe's source once here, as a module rather than as ``__main__``, so that its
    imports, its definitions and the generation finder it loads are in place before any check
    forks: a check then spends its time on the project's code alone."""
    probe: dict[str, Any] = {"__name__": "wsgi_reload_probe"}
    exec(compile(source, "<wsgi_reload probe>", "exec"), probe)
    if finder:
        probe["load_finder"](finder)
    return probe


def serve(control: socket.socket, probe: dict[str, Any]) -> None:
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(control, 64, 3)
        except OSError:
            return
        if len(fds) != 3:
            return  # end of file: the watcher is gone
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                control.close()
                for fd, target in zip(fds, (0, 3, 2), strict=True):
                    os.dup2(fd, target)
                sys.stdin = open(0, closefd=False)  # noqa: SIM115 - this process's stdin until it exits
                probe["main"]()
            finally:
                os._exit(70)
        for fd in fds:
            os.close(fd)
        control.send(json.dumps({"pid": pid}).encode())
        _, status = os.waitpid(pid, 0)
        control.send(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode())


def main() -> None:
    payload = json.loads(sys.stdin.read())
    os.chdir(payload["cwd"])
    sys.path[:] = payload["sys_path"]
    control = socket.socket(fileno=CONTROL_FD)
    preload(payload["preload"], tuple(payload["library_dirs"]))
    probe = load_probe(payload["probe"], payload.get("finder"))
    gc.freeze()
    if threading.active_count() > 1:
        control.send(json.dumps({"ready": False, "why": "a preloaded package started a thread"}).encode())
        return
    control.send(json.dumps({"ready": True, "modules": len(sys.modules)}).encode())
    serve(control, probe)


if __name__ == "__main__":
    main()
