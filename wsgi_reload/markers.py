"""What a server's watcher tells its workers, and what they tell each other, through the
server's private runtime directory (:mod:`wsgi_reload.runtime`).

- ``code-broken`` exists while the code on disk fails the check;
- ``code-verified`` holds when (``time.time_ns()``) the last passing check began reading it;
- ``respawn-failures`` counts new workers in a row that could not load the app;
- ``reported-<hash>`` says an error was logged once for the whole server.

A passing check removes all but ``code-verified``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable

from . import runtime
from .files import error_location
from .gate import ReloadGate

log = logging.getLogger("wsgi_reload.workers")

RESPAWN_BACKOFF_MAX = 30.0

BROKEN = "code-broken"
VERIFIED = "code-verified"
RESPAWN_FAILURES = "respawn-failures"
REPORTED_PREFIX = "reported-"


def mark_code_state(directory: str, gate: ReloadGate) -> None:
    """Record whether the code on disk passed the gate's last check."""
    if gate.broken is not None:
        if not os.path.exists(os.path.join(directory, BROKEN)):
            runtime.write_atomic(directory, BROKEN, b"")
        return
    if gate.last_passed_ns:
        runtime.write_atomic(directory, VERIFIED, str(gate.last_passed_ns).encode())
    for name in os.listdir(directory):
        if name in (BROKEN, RESPAWN_FAILURES) or name.startswith(REPORTED_PREFIX):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


def code_broken(directory: str) -> bool:
    """True while the code on disk fails the check."""
    return os.path.exists(os.path.join(directory, BROKEN))


def verified_ns(directory: str) -> int:
    """When the last passing check began reading the code; 0 when none passed yet."""
    try:
        with open(os.path.join(directory, VERIFIED), encoding="ascii") as f:
            return int(f.read() or 0)
    except (OSError, ValueError):
        return 0


def first_report(directory: str, key: str) -> bool:
    """True for the first process of the server to report ``key`` (an error, say)."""
    name = REPORTED_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:32]
    try:
        os.close(os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True
    return True


def count_respawn_failure(directory: str) -> int:
    """Count one more new worker that could not load the app; returns the count so far."""
    try:
        with open(os.path.join(directory, RESPAWN_FAILURES), encoding="ascii") as f:
            count = int(f.read() or 0) + 1
    except (OSError, ValueError):
        count = 1
    with contextlib.suppress(OSError):
        runtime.write_atomic(directory, RESPAWN_FAILURES, str(count).encode())
    return count


def hold_failed_worker(directory: str, exc: BaseException, loaded_at_ns: int,
                       heartbeat: Callable[[], object] | None = None) -> None:
    """A new worker could not load the app while others serve: log the error once for the whole
    server, then wait before the server tries again (longer after each failure, up to 30 s, so a
    crash loop does not re-import the app every second; at once when a check passes on code newer
    than this worker read). The worker never accepts a connection meanwhile; ``heartbeat`` tells
    the master it is alive."""
    path, line = error_location(exc)
    delay = min(RESPAWN_BACKOFF_MAX, 2.0 ** (count_respawn_failure(directory) - 1))
    if first_report(directory, f"{path}:{line}:{type(exc).__name__}:{exc}"):
        log.error("wsgi_reload: a new worker cannot load the app (%s:%s: %s: %s); the other workers keep "
                  "serving, and new workers are tried again, less often each time (now every %g s)",
                  path, line, type(exc).__name__, exc, delay)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and verified_ns(directory) <= loaded_at_ns:
        if heartbeat is not None:
            with contextlib.suppress(Exception):
                heartbeat()
        time.sleep(0.1)
