"""The spare worker: a gunicorn worker that has imported Django and waits for the next save.

Django under gunicorn with no gunicorn config: the master never imports Django, so each new
worker a swap starts imports the framework from scratch before any code of the project, about
80% of its boot (:mod:`wsgi_reload.django._gunicorn`), on cores the old workers keep busy.
So as each swap's new workers serve (and at the server's start), its watcher leaves a token
in the runtime directory and starts one worker more (TTIN); the booting worker that takes it
(:func:`claim`) stops where ``django.setup()`` imports ``wsgi_reload.django``, before any app
of the project loads, and waits (:func:`wait_for_trial`). At the next save the watcher offers the candidate as the
trial, and the spare carries on its boot from there, importing the project from the candidate:
the swap's first new worker, already half booted
(:meth:`wsgi_reload._server.strategies.SignalledSwap.begin`).

The spare read some files from the disk before it stopped (``wsgi.py``, the settings, Django
itself). A worker started at the save would read them then, so the spare goes on only if none
of them has changed since: otherwise it exits unserved and gunicorn starts a worker in its
place, which boots from scratch. Every file the spare holds is in the runtime directory, which
only the server's user can reach::

    spare          the watcher's token: a spare is wanted
    spare.<pid>    the token, taken by worker <pid>, which waits as the spare
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

from .generations import RACY_NS, Signature, store_of
from .signals import alive, start_epoch

TOKEN = "spare"


def want(directory: str) -> None:
    """Watcher: the next worker to boot waits as the spare (leave the token before the TTIN).
    The token names the current generation: a spare that takes it after a newer one was
    published (a save passed while it booted) goes on at once, with that one."""
    withdraw(directory)
    fd = os.open(os.path.join(directory, TOKEN), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as token:
        token.write(str(store_of(directory).current_id()))


def withdraw(directory: str) -> None:
    """Watcher: no spare is wanted any more; one that waits sees its claim gone and exits unserved."""
    for name in _names(directory):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))


def claimant(directory: str) -> int | None:
    """Watcher: the live worker waiting as the spare, if any."""
    for name in _names(directory):
        pid = name[len(TOKEN) + 1:]
        if pid.isdigit() and alive(int(pid)):
            return int(pid)
    return None


def wanted(directory: str) -> bool:
    """Watcher: the token is there, not yet taken."""
    return os.path.lexists(os.path.join(directory, TOKEN))


def _names(directory: str) -> list[str]:
    try:
        return [name for name in os.listdir(directory) if name == TOKEN or name.startswith(TOKEN + ".")]
    except OSError:
        return []


def _claim_path(directory: str) -> str:
    return os.path.join(directory, f"{TOKEN}.{os.getpid()}")


def claim(directory: str) -> bool:
    """Worker: take the token, if the watcher left one; True when this worker is the spare.
    A rename, so that of two workers booting at once exactly one takes it."""
    try:
        os.rename(os.path.join(directory, TOKEN), _claim_path(directory))
    except OSError:
        return False
    return True


def wait_for_trial(directory: str, *, period: float, wait: Callable[[float], object],
                   heartbeat: Callable[[], object], alive: Callable[[], bool] = lambda: True) -> bool:
    """Worker: wait as the spare until the watcher offers a trial (or a newer generation than
    the one the token names was published meanwhile); True to import it and carry on booting,
    False to exit unserved: the claim was withdrawn, the worker was told to stop,
    or a file it read from the disk before it stopped has changed since.

    :param period: call ``heartbeat`` at least this often (gunicorn kills a worker that does not
        tell it that it is alive within its ``timeout``).
    :param wait: sleeps until the watcher says the generations changed, at most the seconds it
        is given (:func:`wsgi_reload._server.launch.wait_for_news`).
    :param alive: False once the worker is told to stop.
    """
    read = _signatures()
    store = store_of(directory)
    path = _claim_path(directory)
    try:
        with open(path, encoding="ascii", errors="replace") as token:
            asked = token.read(32)
    except OSError:
        return False  # withdrawn already
    try:
        while store.trial_id() is None and str(current := store.current_id()) == asked:
            # (A claim gone with the whole runtime directory, which a temp-file cleaner removed, is
            # withdrawn too: the watcher makes the directory again without it, and asks for another.)
            if current is None or not os.path.lexists(path) or not alive():
                return False
            heartbeat()
            wait(period)
        if store.current_id() is None or not os.path.lexists(path):
            return False  # the store is gone (nothing to load), or the claim was withdrawn meanwhile
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    started = start_epoch(os.getpid())
    if started is None:
        return False
    # Changed since it was read, or saved so close before this process started that the read
    # may have caught the old bytes under the new time: a worker started now would differ.
    newest_safe = int(started * 1e9) - RACY_NS
    return _signatures(read) == read and all(s is None or s[0] < newest_safe for s in read.values())


def _signatures(paths: dict[str, Signature | None] | None = None) -> dict[str, Signature | None]:
    """The stat signature of each file a loaded module came from (None: gone)."""
    if paths is None:
        paths = dict.fromkeys(f for m in list(sys.modules.values())
                              if isinstance(f := getattr(m, "__file__", None), str))
    signatures: dict[str, Signature | None] = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            signatures[path] = None
            continue
        signatures[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return signatures


class Spare:
    """The watcher's side (:class:`wsgi_reload._server.strategies.SpareSlot`).

    :param notify: tells the workers' keepers to look again (a withdrawn spare then exits at once).
    """

    def __init__(self, directory: str, notify: Callable[[], object]) -> None:
        self.directory = directory
        self.notify = notify

    def want(self) -> None:
        want(self.directory)

    def withdraw(self) -> None:
        withdraw(self.directory)
        self.notify()

    def claimant(self) -> int | None:
        return claimant(self.directory)

    def wanted(self) -> bool:
        return wanted(self.directory)
