"""Warm checks: a process that has imported the installed packages the app uses forks each check.

A cold check starts a fresh interpreter and imports Django (say) and every other package
again before it reaches the project's code. A warm probe process (``fork_server.py``)
imports those packages once, never any project file, and forks one child per check, which
runs the same probe as a cold check: the project is imported afresh each time, so the
check sees exactly what a cold check would. A changed file of an installed package retires
the warm process (its copy is stale); the check then runs cold and a new one starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .._core.files import library_dirs
from . import spawn

log = logging.getLogger("wsgi_reload.check")

WARM_TITLE = "wsgi_reload: warm check process"
"""On the warm process's command line (``ps``); the checks it forks share it."""
_SOURCE = (Path(__file__).with_name("fork_server.py")).read_text(encoding="utf-8")


LIBRARY_DIRS = library_dirs()


def preload_names(files: Iterable[str], sys_path: Sequence[str]) -> list[str]:
    """The importable names of the installed-package modules among ``files``, parents first."""
    entries = sorted({os.path.abspath(p) + os.sep for p in sys_path if p}, key=len, reverse=True)
    names: set[str] = set()
    for path in files:
        if not path.endswith(".py") or not path.startswith(LIBRARY_DIRS):
            continue
        entry = next((e for e in entries if path.startswith(e)), None)
        if entry is None:
            continue
        parts = path[len(entry):-3].split(os.sep)
        if parts[-1] == "__init__":
            parts.pop()
        if parts and all(part.isidentifier() for part in parts) and parts[0] != "wsgi_reload":
            names.add(".".join(parts))
    return sorted(names, key=lambda n: (n.count("."), n))


class WarmProbe:
    """One warm probe process for one (directory, sys.path, environment)."""

    def __init__(self, *, cwd: str, sys_path: Sequence[str], env: Mapping[str, str], probe: str,
                 finder: str, preload: Sequence[str]) -> None:
        self._control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        payload = {"cwd": cwd, "sys_path": list(sys_path), "preload": list(preload), "probe": probe,
                   "finder": finder, "library_dirs": list(LIBRARY_DIRS)}
        try:
            with spawn.data_file(json.dumps(payload).encode()) as stdin:
                argv, environ = spawn.python_source(WARM_TITLE, _SOURCE, env)
                self.pid = spawn.spawn(argv, env=environ, stdin=stdin, extra_fd=theirs.fileno())
        finally:
            theirs.close()
        self.state = "starting"
        self.why = ""
        self._gone = False
        self.forked = 0
        """How many checks it has run."""

    def ready(self) -> bool:
        """True once it has preloaded and can fork checks; never blocks."""
        if self.state == "starting" and select.select([self._control], [], [], 0)[0]:
            answer = self._receive(0)
            if answer is not None and answer.get("ready"):
                self.state = "ready"
            else:
                self.state = "failed"
                self.why = answer.get("why", "it exited") if answer else "it exited"
                self.close()
        return self.state == "ready"

    def run(self, stdin: IO[bytes], records: IO[bytes], stderr: IO[bytes],
            timeout: float) -> tuple[bool, int | None] | None:
        """Run one check; (exited, exit code) as :func:`wsgi_reload._check.spawn.wait_exit` gives them,
        or None when this warm process cannot be used (the caller runs the check cold)."""
        try:
            socket.send_fds(self._control, [b"check"], [stdin.fileno(), records.fileno(), stderr.fileno()])
            started = self._receive(5.0)
        except OSError:  # EPIPE: it died while idle
            self._gone = True
            started = None
        if started is None or "pid" not in started:
            self._give_up()
            return None
        pid = started["pid"]
        self.forked += 1
        finished = self._receive(timeout)
        if finished is None:  # the check hung, or the warm process died under it
            spawn.kill_tree(pid)
            if not self._gone:
                finished = self._receive(5.0)  # the warm process reaps the check and says so
            if self._gone:
                self._give_up()
                return None  # the caller checks again, cold: this says nothing of the code
            if finished is None:
                self.close()
            return False, None
        spawn.kill_tree(pid)  # whatever the app started at import
        return True, finished.get("status")

    def _give_up(self) -> None:
        """Stop using this warm process. One that died (the OOM killer, a person) is not started
        again: the checks run cold from now on, as one line says (see :func:`probe_for`)."""
        if self._gone:
            self.state, self.why = "failed", "it exited"
        self.close()

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        if not select.select([self._control], [], [], timeout)[0]:
            return None
        try:
            data = self._control.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._gone = True
            return None
        answer: dict[str, Any] = json.loads(data)
        return answer

    def close(self) -> None:
        """Stop the warm process (it exits on end of file; SIGKILL makes sure)."""
        if self.state == "closed":
            return
        self.state = "closed" if self.state != "failed" else "failed"
        with contextlib.suppress(OSError):
            self._control.close()
        spawn.kill_group(self.pid)


_probes: dict[tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]], WarmProbe] = {}
_said_why: set[str] = set()


def probe_for(cwd: str, sys_path: Sequence[str], env: Mapping[str, str], changed: Iterable[str],
              loaded_modules: Iterable[str], probe_source: str, finder: str) -> WarmProbe | None:
    """The warm probe process for this check when it is ready; else None (check cold), after
    starting one for the next check. A changed installed-package file retires it.

    :param probe_source: the probe's source, which the warm process runs once.
    :param finder: the generation finder's file, which it loads once.
    """
    key = (cwd, tuple(sys_path), tuple(sorted(env.items())))
    probe = _probes.get(key)
    if probe is not None and any(path.startswith(LIBRARY_DIRS) for path in changed):
        log.info("wsgi_reload: an installed package changed; the warm check process starts again")
        probe.close()
        probe = None
        del _probes[key]
    if probe is not None and probe.state == "closed":
        probe = None  # it stopped answering: start another
        del _probes[key]
    if probe is not None:
        if probe.ready():
            return probe
        if probe.state == "starting":
            return None
        if probe.why and probe.why not in _said_why:
            _said_why.add(probe.why)
            log.info("wsgi_reload: checks run cold, each in a fresh interpreter (%s)", probe.why)
        return None
    preload = preload_names(loaded_modules, sys_path)
    if preload:
        try:
            _probes[key] = WarmProbe(cwd=cwd, sys_path=sys_path, env=env, probe=probe_source, finder=finder,
                                     preload=preload)
        except OSError as exc:
            log.debug("wsgi_reload: no warm check process: %s", exc)
    return None


def checks_forked() -> int:
    """How many checks the current warm probe processes have run (tests, benchmarks)."""
    return sum(probe.forked for probe in _probes.values())


def close_all() -> None:
    """Stop every warm probe process (the tests call it between cases)."""
    while _probes:
        _, probe = _probes.popitem()
        probe.close()


def wait_ready(timeout: float = 30.0) -> bool:
    """Wait until every warm probe process has preloaded (tests, benchmarks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(probe.ready() or probe.state != "starting" for probe in _probes.values()):
            return all(probe.state == "ready" for probe in _probes.values())
        time.sleep(0.01)
    return False

